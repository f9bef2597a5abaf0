"""Worker for tests/gpu/test_cuda_paths.py: the process-level CUDA branches, in a process of their own
(a NCCL group and DeepSpeed engines must not live in the pytest process).

A plain ``python`` process is rank 0 of a world of one (``dist.init_distributed``): NCCL on CUDA.
Then, for ZeRO-2 and ZeRO-3, the tiny text-to-image LDM of experiment=quickstart is built through
``build_task`` on CUDA in bf16 with activation checkpointing and trained for a few steps on loader
batches (uint8, pinned, moved by the loop's ``DeviceHandoff``), each judged by ``StepHealth`` as
the loop does. After a warm-up step, the hand-off and ``task.train_step`` run under
``torch.cuda.set_sync_debug_mode("warn")``: every synchronising CUDA call they make is recorded with
the innermost call site outside torch (ours, or DeepSpeed's own). Prints ``RESULT {json}``.
"""
from __future__ import annotations

import collections
import contextlib
import json
import sys
import traceback
import warnings

import torch
import torch.distributed as torch_dist

from ldm_scale import config as config_lib
from ldm_scale import dist
from ldm_scale.data import build_loader
from ldm_scale.data.device import DeviceHandoff
from ldm_scale.train.health import StepHealth
from ldm_scale.train.tasks import build_task

STEPS = 3


@contextlib.contextmanager
def recording_cuda_syncs(sites: collections.Counter):
    """Count synchronising CUDA operations by call site (torch's sync debug mode warns on each)."""
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        for frame in reversed(traceback.extract_stack()[:-1]):
            if "/torch/" not in frame.filename and "/warnings.py" not in frame.filename:
                name = frame.filename.split("site-packages/")[-1]
                sites[f"{name.split('ldm_scale/', 1)[-1] if 'ldm_scale/' in name else name}:{frame.lineno}"] += 1
                break

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown


def train_steps(data_url: str, stage: int, device: torch.device) -> dict:
    overrides = ["experiment=quickstart", "model.allow_random_first_stage=true", f"data.urls=['{data_url}']",
                 "data.num_workers=0", "data.pin_memory=true", "train.micro_batch_size=4",
                 f"deepspeed.zero.stage={stage}", "deepspeed.precision=bf16", "model.activation_checkpointing=true",
                 "checkpoint.root=/tmp/unused", "logger=none"]
    cfg = config_lib.to_object(config_lib.compose(overrides))
    info = dist.get_dist_info()
    plan = config_lib.validate(cfg, info.world_size, check_files=False)
    loader = build_loader(cfg.data, info, batch_size=plan.batch.micro_batch_size, seed=0, uint8_images=True)
    task = build_task(cfg, plan, device=device, total_steps=100)
    engine = task.engine
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    params = [p for p in engine.module.parameters() if p.requires_grad]
    # Under ZeRO-3 the module's tensors are empty placeholders: compare weights under ZeRO-2 only.
    watched = params[0].detach().clone() if stage < 3 else None
    health = StepHealth(cfg.train.max_consecutive_unhealthy)
    to_device = DeviceHandoff(device)
    batches = loader.infinite()
    loader.tokenize = task.caption_tokenizer()  # as the loop does
    losses, healthy, pinned = [], [], []
    syncs: collections.Counter = collections.Counter()
    torch.cuda.reset_peak_memory_stats()
    for step in range(STEPS):
        host = next(batches)
        pinned.append(bool(host["image"].is_pinned()))
        # Step 0 warms up (the latent scale estimate syncs once per run, by design).
        with recording_cuda_syncs(syncs) if step > 0 else contextlib.nullcontext():
            out = task.train_step([to_device(host)], step)
        verdict = health.decide(out.health, step)
        healthy.append(bool(verdict.healthy))
        losses.append(float(verdict.loss))
    return {
        "stage": stage,
        "losses": losses,
        "healthy": healthy,
        "host_batches_pinned": pinned,
        "param_dtypes": sorted({str(p.dtype) for p in params}),
        "param_devices": sorted({p.device.type for p in params}),
        "weights_changed": None if watched is None else bool(not torch.equal(watched, params[0].detach())),
        "optimizer_wrapper": type(engine.optimizer).__name__,
        "optimizer": f"{type(inner).__module__}.{type(inner).__name__}",
        "optimizer_fused": inner.defaults.get("fused"),
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "syncs_in_steps": dict(syncs),  # call site -> count over STEPS - 1 steps
        "tokens_in_batches": "tokens" in host,
    }


def main() -> int:
    data_url = sys.argv[1]
    info = dist.init_distributed()
    device = dist.default_device(info)
    probe = torch.full((4,), 3.0, device=device)
    dist.all_reduce_sum(probe)
    result = {"backend": torch_dist.get_backend(), "world_size": torch_dist.get_world_size(),
              "rank": torch_dist.get_rank(), "device": str(device), "all_reduce": probe.tolist(),
              "runs": [train_steps(data_url, stage, device) for stage in (2, 3)]}
    print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
