"""Host syncs and collectives per optimizer step of the training hot path (task.train_step + the
step-health decision), counted on 2 CPU ranks for the LDM (ZeRO-2, ZeRO-3) and the autoencoder
(ZeRO-1, ZeRO-2) with 2 accumulation micro-batches per step (driver: _sync_count_driver.py).

What is allowed, by call site:
- ours: exactly one collective and one device->host copy per optimizer step (the step-health
  all-reduce and its ``tolist``, train/health.py), whatever the accumulation, and no tensor built
  from host values on the device (``torch.tensor(x, device=...)``: a blocking copy on CUDA);
- host-only tensors that count as "syncs" on CPU but are host memory on CUDA too: the condition
  dropout mask (drawn from the CPU RNG on purpose, diffusion/objective.py) and torch AdamW's CPU step
  counters;
- DeepSpeed's own: its gradient reduction (collectives) and its overflow / gradient-norm checks,
  a fixed number per step (asserted constant across steps and bounded).
"""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.fixtures.torchrun import run_torchrun
from tests.integration.tiny_training import write_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]

HOST_ONLY_SITES = ("ldm_scale/diffusion/objective.py", "torch/optim/")
HEALTH = "ldm_scale/train/health.py"
DIST = "ldm_scale/dist.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    url = write_shards(tmp_path_factory.mktemp("sync_data"))
    run = run_torchrun(["tests/integration/_sync_count_driver.py", url], timeout=900).check()
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return {(r["experiment"], r["stage"]): r for r in json.loads(line[len("RESULT "):])}


def split(step: dict) -> dict:
    out = {"ours_sync": Counter(), "ours_collective": Counter(), "ours_h2d": Counter(), "deepspeed_sync": 0,
           "deepspeed_collective": 0, "deepspeed_h2d": 0, "host_only": 0}
    for key, n in step.items():
        kind, site = key.split(" ", 1)
        if site.startswith(HOST_ONLY_SITES):
            out["host_only"] += n
        elif site.startswith("ldm_scale/"):
            out[f"ours_{kind.split('/')[0]}"][site.rsplit(":", 1)[0]] += n
        elif site.startswith("deepspeed/"):
            out[f"deepspeed_{kind.split('/')[0]}"] += n
        else:
            raise AssertionError(f"unexpected call site {site} ({kind} x{n})")
    return out


@pytest.mark.parametrize("case", [("quickstart", 2), ("quickstart", 3), ("autoencoder_tiny", 1),
                                  ("autoencoder_tiny", 2)])
def test_one_sync_and_one_collective_of_ours_per_optimizer_step(results, case):
    record = results[case]
    assert record["accumulation"] == 2
    steps = [split(s) for s in record["per_step"]]
    for s in steps:
        assert s["ours_sync"] == Counter({HEALTH: 1}), s
        assert s["ours_collective"] == Counter({DIST: 1}), s
        assert s["ours_h2d"] == Counter(), s
    # DeepSpeed's share is fixed per step (no growth with the step count) and small.
    assert len({(s["deepspeed_sync"], s["deepspeed_collective"]) for s in steps}) == 1, steps
    assert steps[0]["deepspeed_sync"] <= 6 and steps[0]["deepspeed_collective"] <= 12, steps[0]
