"""The fixed-timestep validation loss (ldm_scale/evaluation/val_loss.py) is a function of the
weights alone: the same value, to the bit, on 1 and on 2 ranks, under ZeRO-2 and under ZeRO-3 (whose
forward passes gather the parameters, and where the 2-rank run's second rank repeats a batch to
keep the gathers in step), for the same freshly built model; run twice, it repeats.
Identity across a kill -9 resume is checked in test_resume_train.py (its reference and killed runs
log val/loss at the same steps)."""
from __future__ import annotations

import json

import pytest

from ldm_scale.data.synthetic import write_synthetic_dataset
from tests.fixtures.torchrun import run_torchrun
from tests.integration.tiny_training import write_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("val_loss")
    train_url = write_shards(root / "train")
    write_synthetic_dataset(str(root / "val"), num_samples=24, samples_per_shard=8, seed=1, min_size=32, max_size=40)
    val_url = f"{root}/val/{{00000..00002}}.tar"
    out = {}
    for nproc in (1, 2):  # one launch per world size, both ZeRO stages in it
        run = run_torchrun(["tests/integration/_val_loss_driver.py", train_url, val_url, "2,3"], nproc=nproc,
                           timeout=600).check()
        line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
        for stage, record in json.loads(line[len("RESULT "):]).items():
            out[(nproc, int(stage))] = record
    return out


def test_the_same_bits_on_any_world_size_and_zero_stage(results):
    one = results[(1, 2)]
    assert one["n"] == 20  # eval.val_samples of the 24 held-out images
    keys = {"val/loss"} | {f"val/loss_t{t}" for t in (62, 187, 312, 437, 562, 687, 812, 937)}
    assert set(one["first"]) == keys
    for (nproc, stage), record in results.items():
        # Exact, no tolerance. ZeRO-3 builds its partitioned model under zero.Init, which draws the
        # initial weights differently: the same model, hence the same number, per stage.
        assert record["first"] == results[(1, stage)]["first"], (nproc, stage)
        assert record["second"] == record["first"], (nproc, stage)


def test_losses_are_finite_and_depend_on_the_timestep(results):
    values = results[(1, 2)]["first"]
    per_t = [values[f"val/loss_t{t}"] for t in (62, 187, 312, 437, 562, 687, 812, 937)]
    assert all(v > 0 for v in per_t) and len(set(per_t)) == len(per_t)
    assert values["val/loss"] == pytest.approx(sum(per_t) / len(per_t), rel=1e-12)
