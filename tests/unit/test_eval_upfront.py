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
