"""Worker for tests/integration/test_sync_count.py: host syncs and collectives per optimizer step.

Builds the real task (``build_task``) from the composed quickstart / autoencoder_tiny experiments,
runs a few warm-up steps, then counts, over N non-log optimizer steps of the loop's hot path
(``task.train_step`` + ``StepHealth.decide``), every call that copies device data to the host
(``Tensor.item / tolist / cpu / numpy / __bool__ / __float__ / __int__``), every
``torch.distributed`` collective, our own and DeepSpeed's, and every tensor made from host values
straight on a device (``torch.tensor / as_tensor`` given a ``device``: on CUDA a blocking copy from
pageable memory, which waits for the stream). Prints ``RESULT {json}`` on rank 0.

On CPU a "sync" is only a call site (nothing waits), but the call sites are exactly those that
would block the host on CUDA, which is what the bound is about.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
import traceback

import torch
import torch.distributed as torch_dist

from ldm_scale import config as config_lib
from ldm_scale import dist
from ldm_scale.data import build_loader
from ldm_scale.train.health import StepHealth
from ldm_scale.train.tasks import build_task

HOST_COPIES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
HOST_TO_DEVICE = ("tensor", "as_tensor")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "barrier", "all_gather_object", "broadcast_object_list", "all_to_all_single")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep
SITES: collections.Counter | None = None  # (kind, call site) -> count, while counting


def _call_site() -> str:
    """The innermost frame outside torch (ldm_scale, deepspeed, ...): who asked for the sync."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename:
            name = frame.filename.split("site-packages/")[-1]
            if name.startswith(REPO_ROOT):  # wherever the checkout lives
                name = name[len(REPO_ROOT):]
            return f"{name}:{frame.lineno}"
    return "?"


@contextlib.contextmanager
def counting(counts: collections.Counter):
    """Wrap the host-copy methods of torch.Tensor and the collectives of torch.distributed."""
    saved = []

    def wrap(owner, name, key):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            counts[key] += 1
            if SITES is not None:
                SITES[(key, _call_site())] += 1
            return original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, counted)

    def wrap_factory(name):
        original = getattr(torch, name)

        def counted(*args, **kwargs):
            if kwargs.get("device") is not None:
                counts[f"h2d/{name}"] += 1
                if SITES is not None:
                    SITES[(f"h2d/{name}", _call_site())] += 1
            return original(*args, **kwargs)

        saved.append((torch, name, original))
        setattr(torch, name, counted)

    for name in HOST_COPIES:
        wrap(torch.Tensor, name, f"sync/{name}")
    for name in HOST_TO_DEVICE:
        wrap_factory(name)
    for name in COLLECTIVES:
        if hasattr(torch_dist, name):
            wrap(torch_dist, name, f"collective/{name}")
    try:
        yield counts
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def measure(experiment: str, stage: int, data_url: str, steps: int) -> dict:
    global SITES
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
        SITES = collections.Counter()
        with counting(collections.Counter()):
            out = task.train_step(micro, step)
            verdict = health.decide(out.health, step)
        assert verdict.healthy
        per_step.append({f"{kind} {site}": n for (kind, site), n in sorted(SITES.items())})
        SITES = None
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
