"""Progressive resolution through the real entry point (`torchrun launch/train.py`, 2 ranks, ZeRO-2):
a tiny text-to-image LDM trains 4 steps at 32 px (micro-batch 4) and then 4 at 64 px (micro-batch 2,
another learning rate, aspect buckets), in one run. Runs resumed from the first run's checkpoints,
one in each stage, land in the right stage and log the first run's loss at every later step
(the one resumed in the first stage crosses the boundary itself)."""
from __future__ import annotations

import json

import pytest

from tests.fixtures.torchrun import run_torchrun
from tests.integration.tiny_training import TRAIN_SCRIPT, tiny_overrides, write_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]
STEPS, BOUNDARY = 8, 4
STAGES = ("train.stages=[{start_step: 0, overrides: []}, {start_step: %d, overrides: ['data.resolution=64', "
          "'model.ldm.image_size=64', 'train.micro_batch_size=2', 'optim.lr=5e-4', 'data.buckets.enabled=true', "
          "'data.buckets.step=16', 'data.buckets.max_aspect=2']}]" % BOUNDARY)


def _rows(out, run_id):
    return [json.loads(line) for line in (out / run_id / "metrics.jsonl").read_text().splitlines()]


def test_a_run_in_two_stages_switches_at_its_step_and_resumes_into_the_right_stage(tmp_path):
    from ldm_scale.data.synthetic import write_synthetic_dataset

    data = write_shards(tmp_path / "data")
    write_synthetic_dataset(str(tmp_path / "data"), num_samples=64, samples_per_shard=16, seed=0, min_size=32,
                            max_size=40, max_aspect=2.0)  # the same shards, now wide and tall too
    out = tmp_path / "runs"
    args = [a for a in tiny_overrides(data, out, STEPS) if not a.startswith(("train.log_every", "checkpoint."))]
    args += ["train.micro_batch_size=4", "train.log_every=1", f"checkpoint.root={out}/ckpt", "checkpoint.every_steps=2",
             "checkpoint.keep_last=10", "checkpoint.export_final=false", "optim.schedule=constant", "optim.warmup_steps=0",
             STAGES]

    def launch(run_id, *extra):
        run_torchrun([TRAIN_SCRIPT, *args, f"run_id={run_id}", f"checkpoint.local_dir={out}/staging_{run_id}",
                      *extra], timeout=900).check()

    launch("ref")
    rows = _rows(out, "ref")
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1))
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lrs[BOUNDARY] == pytest.approx(2e-3) and lrs[BOUNDARY + 1] == pytest.approx(5e-4)  # quickstart's, then the stage's
    result = json.loads((out / "ref" / "result.json").read_text())
    # global batch 4 x 2 ranks for 4 steps, then 2 x 2 for 4
    assert result["step"] == STEPS and result["samples_seen"] == BOUNDARY * 8 + (STEPS - BOUNDARY) * 4
    # the loader states in the checkpoints: stage 0's square pipeline, then stage 1's buckets of 64^2 px
    import torch

    early = torch.load(out / "ckpt" / "ref" / "step_2" / "loader_rank0.pt", weights_only=False)
    late = torch.load(out / "ckpt" / "ref" / "step_6" / "loader_rank0.pt", weights_only=False)
    assert (early["stage"], early["buckets"], early["batch_size"]) == (0, [], 4)
    assert late["stage"] == 1 and late["batch_size"] == 2 and [64, 64] in late["buckets"]

    for resume_at in (2, 6):
        launch(f"from{resume_at}", f"checkpoint.resume={out}/ckpt/ref/step_{resume_at}")
        got = {r["step"]: r["train/loss"] for r in _rows(out, f"from{resume_at}") if "train/loss" in r}
        assert sorted(got) == list(range(resume_at + 1, STEPS + 1))
        for step, loss in got.items():
            assert loss == losses[step], (resume_at, step, loss, losses[step])
