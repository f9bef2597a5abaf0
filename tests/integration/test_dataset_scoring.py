"""The quickstart experiment used as a template: its ``eval.prompt_adherence_samples=200`` scores with
the synthetic-shapes detector only when the run trains on the synthetic shapes. On other shards
(here: the same kind of images and captions, written without make_synthetic's dataset card) the run
completes without scoring, says so once, and records why in result.json. Two ranks: the decision is
collective and only rank 0 speaks."""
from __future__ import annotations

import json

import pytest

from ldm_scale.data.shard_writer import write_shard, write_sizes
from ldm_scale.data.synthetic import make_sample, write_synthetic_dataset
from tests.fixtures.torchrun import run_torchrun
from tests.integration.tiny_training import TRAIN_SCRIPT, tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]

NOTICE = "eval.prompt_adherence_samples=200: not scored"


def _write_data(root, synthetic: bool) -> str:
    if synthetic:
        write_synthetic_dataset(str(root), num_samples=32, samples_per_shard=16, seed=0, min_size=32, max_size=36)
        return f"{root}/{{00000..00001}}.tar"
    for shard in range(2):
        samples = []
        for i in range(16):
            _, caption, jpg, meta = make_sample(1, shard * 16 + i, min_size=32, max_size=36)
            samples.append({"__key__": f"{shard:05d}{i:04d}", "jpg": jpg, "txt": caption, "json": meta})
        write_shard(str(root), shard, samples)
    write_sizes(str(root), {"00000.tar": 16, "00001.tar": 16})
    return f"{root}/{{00000..00001}}.tar"


@pytest.mark.parametrize("synthetic", [False, True], ids=["own-shards", "synthetic-shards"])
def test_quickstart_scores_shapes_only_on_the_synthetic_shapes(tmp_path, synthetic):
    urls = _write_data(tmp_path / "data", synthetic)
    # The quickstart's own eval.prompt_adherence_samples (200) is kept: tiny_overrides' 0 is dropped.
    overrides = [o for o in tiny_overrides(urls, tmp_path / "runs", max_steps=2)
                 if not o.startswith("eval.prompt_adherence_samples=")]
    result = run_torchrun([TRAIN_SCRIPT, *overrides, "run_id=scoring", "eval.sampler.steps=2"], nproc=2,
                          cwd=tmp_path, timeout=900).check()
    summary = json.loads((tmp_path / "runs" / "scoring" / "result.json").read_text())
    assert summary["stop_reason"] == "completed" and summary["step"] == 2
    notices = (result.stdout + result.stderr).count(NOTICE)
    if synthetic:
        assert 0.0 <= summary["eval/prompt_adherence"] <= 1.0 and "skipped_evals" not in summary
        assert notices == 0
    else:
        assert "eval/prompt_adherence" not in summary
        assert str(tmp_path / "data") in summary["skipped_evals"]["prompt_adherence"]
        assert notices == 1
