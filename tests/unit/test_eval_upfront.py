"""eval/fid.py refuses settings the model cannot serve before any sample is generated."""
from __future__ import annotations

import dataclasses

import torch

from ldm_scale.models.registry import build_ldm, get_spec
from tests.fixtures.torchrun import REPO_ROOT, run_python


def test_clip_score_on_a_class_model_fails_before_sampling(tmp_path):
    torch.manual_seed(0)
    model = build_ldm("tiny_cin")
    export = tmp_path / "cin.pt"
    torch.save({"format": "ldm_scale/ldm-v1", "model_config": dataclasses.asdict(get_spec("tiny_cin")),
                "state_dict": model.state_dict(), "ema_state_dict": None, "scale_factor": 1.0, "step": 1,
                "config": {"diffusion": {"schedule": "scaled_linear"}}}, export)
    out = tmp_path / "run"
    result = run_python([str(REPO_ROOT / "eval" / "fid.py"), f"ckpt={export}", f"ref={tmp_path / 'missing_ref.npz'}",
                         f"out={out}", "n_samples=4", "batch_size=2", "sampler.steps=1", "use_ema=false",
                         "metrics.clip_score=true", "extractor.name=random-inception", "logger.backend=none"],
                        timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "metrics.clip_score=true needs a text-conditional model" in result.stderr
    assert "class-conditioned" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()  # nothing generated, not even the run directory


def test_kid_subsets_larger_than_the_references_stored_features_fail_before_sampling():
    import numpy as np
    import pytest

    from ldm_scale.evaluation.config import compose_fid_config
    from ldm_scale.evaluation.evaluate import check_reference_for_metrics
    from ldm_scale.evaluation.reference import ReferenceStats

    cfg = compose_fid_config(["ckpt=m.pt", "n_samples=64", "metrics.kid=true", "metrics.kid_subset_size=50"])
    small = ReferenceStats(pool=None, features=np.zeros((40, 8), np.float32))
    with pytest.raises(ValueError, match=r"metrics.kid_subset_size=50 but the reference stores 40 images' features"):
        check_reference_for_metrics(cfg, small)
    check_reference_for_metrics(cfg, ReferenceStats(pool=None, features=np.zeros((50, 8), np.float32)))
    check_reference_for_metrics(compose_fid_config(["ckpt=m.pt"]), small)  # KID off: nothing to check
