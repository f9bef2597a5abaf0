"""Host syncs and collectives per optimizer step of the training hot path, counted (not timed), for
this tree or an older one: the before/after figure of issue 12.

    torchrun --nproc_per_node 2 benchmarks/count_syncs.py "<shard urls>"                  # this tree
    PYTHONPATH=<old checkout> torchrun --nproc_per_node 2 benchmarks/count_syncs.py ...  # before

It counts, over 3 non-log optimizer steps with 2 accumulation micro-batches on 2 ranks, every
``Tensor.item / tolist / cpu / numpy / __bool__ / __float__ / __int__`` call and every
``torch.distributed`` collective made by the task's step and the loop's per-step bookkeeping, split
into ours (ldm_scale/) and DeepSpeed's, for the LDM (ZeRO-2) and the autoencoder (ZeRO-2). Calls on
host-only tensors (the condition-dropout mask drawn from the CPU RNG, torch AdamW's CPU step
counters) are reported apart: they are not device syncs on CUDA either. The old tree's hot path is
``train_step(batch)`` per micro-batch plus its loop's ``NonFiniteGuard.update`` and
``MetricMeter.add`` (which converted every value with ``float``); the new one is
``train_step(micro_batches, step)`` plus ``StepHealth.decide`` and ``MetricMeter.add``.
"""
from __future__ import annotations

import collections
import inspect
import json
import sys

import torch

from sync_counter import counting  # this directory (sys.path[0] of a script): runs against an old tree too

HOST_ONLY = ("ldm_scale/diffusion/objective.py", "torch/optim/")


def _who(site: str) -> str:
    return ("host_only" if site.startswith(HOST_ONLY) else "ours" if site.startswith("ldm_scale/")
            else "deepspeed" if site.startswith("deepspeed/") else "other")


def measure(experiment: str, data_url: str, steps: int = 3) -> dict:
    from ldm_scale import config as config_lib
    from ldm_scale import dist
    from ldm_scale.data import build_loader
    from ldm_scale.logging import MetricMeter
    from ldm_scale.train.tasks import build_task

    overrides = [f"experiment={experiment}", f"data.urls=['{data_url}']", "data.num_workers=0",
                 "train.micro_batch_size=2", "train.gradient_accumulation_steps=2", "deepspeed.zero.stage=2",
                 "checkpoint.root=/tmp/unused", "logger=none"]
    overrides.append("model.allow_random_first_stage=true" if experiment == "quickstart"
                     else "autoencoder_loss.disc_start=0")
    cfg = config_lib.to_object(config_lib.compose(overrides))
    validate = config_lib.validate
    kwargs = {"check_files": False} if "check_files" in inspect.signature(validate).parameters else {}
    plan = validate(cfg, dist.get_dist_info().world_size, **kwargs)
    loader = build_loader(cfg.data, dist.get_dist_info(), batch_size=plan.batch.micro_batch_size, seed=0)
    task = build_task(cfg, plan, device=torch.device("cpu"), total_steps=100)
    batches, accumulation, meter = loader.infinite(), plan.batch.gradient_accumulation_steps, MetricMeter()
    new_api = "micro_batches" in inspect.signature(task.train_step).parameters
    if new_api:
        from ldm_scale.train.health import StepHealth

        health = StepHealth(5)

        def optimizer_step(step: int) -> None:
            out = task.train_step([next(batches) for _ in range(accumulation)], step)
            health.decide(out.health, step)
            meter.add(out.metrics)
    else:
        from ldm_scale.train.loop import NonFiniteGuard

        guard = NonFiniteGuard(5)

        def optimizer_step(step: int) -> None:
            for _ in range(accumulation):
                metrics = task.train_step(next(batches))
                guard.update(metrics, step)
                meter.add(metrics)

    for step in range(2):  # warm-up: the scale-factor estimate, DeepSpeed's first step
        optimizer_step(step)
    per_step = []
    for step in range(2, 2 + steps):
        sites: collections.Counter = collections.Counter()
        with counting(sites):
            optimizer_step(step)
        counts: collections.Counter = collections.Counter()
        for (kind, site), n in sites.items():  # kind: sync/<method>, collective/<fn>, h2d/<factory>
            counts[f"{_who(site)}_{kind.split('/')[0]}"] += n
        per_step.append(dict(counts))
    return {"experiment": experiment, "api": "new" if new_api else "old", "per_step": per_step}


def main() -> int:
    from ldm_scale import dist

    dist.init_distributed()
    results = [measure(e, sys.argv[1]) for e in ("quickstart", "autoencoder_tiny")]
    if dist.get_dist_info().is_main:
        print(json.dumps(results, indent=1))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
