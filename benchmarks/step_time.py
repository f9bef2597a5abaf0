"""Worker of bench_step_vs_old.py: ms per optimizer step of the training hot path of the tree on
PYTHONPATH (this tree's ``train_step(micro_batches, step)`` + ``StepHealth.decide`` + meter, or an
older tree's ``train_step(batch)`` per micro-batch + ``NonFiniteGuard`` + meter). Prints one JSON line
on rank 0. Run alone, under torchrun, or by bench_step_vs_old.py."""
from __future__ import annotations

import inspect
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


def main() -> int:
    data_url, steps, micro = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    from ldm_scale import config as config_lib
    from ldm_scale import dist
    from ldm_scale.data import build_loader
    from ldm_scale.logging import MetricMeter
    from ldm_scale.train.tasks import build_task

    info = dist.init_distributed()
    overrides = ["experiment=quickstart", "model.allow_random_first_stage=true", f"data.urls=['{data_url}']",
                 "data.num_workers=0", f"train.micro_batch_size={micro}", "train.gradient_accumulation_steps=1",
                 "checkpoint.root=/tmp/unused", "logger=none", "diffusion.cond_drop_prob=0.0"]
    cfg = config_lib.to_object(config_lib.compose(overrides))
    kwargs = {"check_files": False} if "check_files" in inspect.signature(config_lib.validate).parameters else {}
    plan = config_lib.validate(cfg, info.world_size, **kwargs)
    loader = build_loader(cfg.data, info, batch_size=micro, seed=0)
    task = build_task(cfg, plan, device=torch.device("cpu"), total_steps=1000)
    if hasattr(task, "caption_tokenizer"):  # this tree: captions are tokenised in the data workers, as in the loop
        loader.tokenize = task.caption_tokenizer()
    batches, meter = loader.infinite(), MetricMeter()
    # The data is drawn before timing: the step, not the loader, is what is compared.
    pool = [next(batches) for _ in range(steps + 2)]
    if "micro_batches" in inspect.signature(task.train_step).parameters:
        from ldm_scale.data.device import unit_range
        from ldm_scale.train.health import StepHealth

        health = StepHealth(5)

        def step(i: int) -> None:
            batch = dict(pool[i], image=unit_range(pool[i]["image"]))
            out = task.train_step([batch], i)
            health.decide(out.health, i)
            meter.add(out.metrics)
    else:
        from ldm_scale.train.loop import NonFiniteGuard

        guard = NonFiniteGuard(5)

        def step(i: int) -> None:
            metrics = task.train_step(pool[i])
            guard.update(metrics, i)
            meter.add(metrics)

    step(0), step(1)  # warm-up: scale-factor estimate, DeepSpeed's first step, allocator
    times = []
    for i in range(2, steps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - t0) * 1000)
    if info.is_main:
        print("STEP_MS " + json.dumps({"median": statistics.median(times), "all": times}), flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
