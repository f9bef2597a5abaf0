"""Worker for tests/integration/test_sync_count.py: host syncs and collectives per optimizer step.

Builds the real task (``build_task``) from the composed quickstart / autoencoder_tiny experiments,
runs a few warm-up steps, then counts by call site (benchmarks/sync_counter.py: device->host
copies, collectives, tensors built from host values on a device), over N non-log optimizer steps
of the loop's hot path (``task.train_step`` + ``StepHealth.decide``). Prints ``RESULT {json}`` on
rank 0.
"""
from __future__ import annotations

import collections
import json
import sys

import torch

from benchmarks.sync_counter import counting
from ldm_scale import config as config_lib
from ldm_scale import dist
from ldm_scale.data import build_loader
from ldm_scale.train.health import StepHealth
from ldm_scale.train.tasks import build_task


def measure(experiment: str, stage: int, data_url: str, steps: int) -> dict:
    overrides = [f"experiment={experiment}", f"data.urls=['{data_url}']", "data.num_workers=0",
                 "train.micro_batch_size=2", "train.gradient_accumulation_steps=2", f"deepspeed.zero.stage={stage}",
                 "checkpoint.root=/tmp/unused", "logger=none"]
    if experiment == "quickstart":
        overrides.append("model.allow_random_first_stage=true")
    else:
        overrides.append("autoencoder_loss.disc_start=0")  # both engines step from the first step
    cfg = config_lib.to_object(config_lib.compose(overrides))
    plan = config_lib.validate(cfg, dist.get_dist_info().world_size, check_files=False)
    loader = build_loader(cfg.data, dist.get_dist_info(), batch_size=plan.batch.micro_batch_size, seed=0)
    task = build_task(cfg, plan, device=torch.device("cpu"), total_steps=100)
    health = StepHealth(5)
    loader.tokenize = getattr(task, "caption_tokenizer", lambda: None)()  # as the loop does
    batches = loader.infinite()
    accumulation = plan.batch.gradient_accumulation_steps

    # Warm-up: the latent scale estimate (once per run) and DeepSpeed's first-step set-up.
    for step in range(2):
        micro = [next(batches) for _ in range(accumulation)]
        health.decide(task.train_step(micro, step).health, step)
    per_step = []
    for step in range(2, 2 + steps):
        micro = [next(batches) for _ in range(accumulation)]
        sites: collections.Counter = collections.Counter()
        with counting(sites):
            out = task.train_step(micro, step)
            verdict = health.decide(out.health, step)
        assert verdict.healthy
        per_step.append({f"{kind} {site}": n for (kind, site), n in sorted(sites.items())})
    return {"experiment": experiment, "stage": stage, "accumulation": accumulation, "per_step": per_step}


def main() -> int:
    data_url = sys.argv[1]
    dist.init_distributed()
    results = []
    for experiment, stage in [("quickstart", 2), ("quickstart", 3), ("autoencoder_tiny", 1), ("autoencoder_tiny", 2)]:
        results.append(measure(experiment, stage, data_url, steps=3))
    if dist.get_dist_info().is_main:
        print("RESULT " + json.dumps(results), flush=True)

    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
