"""A tiny distributed trainer standing in for launch/train.py while the spine is being written.

Trains nothing real: each step all-reduces a counter over gloo (so ranks stay in lock-step like a
data-parallel step), checkpoints ``<run_dir>/<run_id>/step_<N>/rank<R>.json`` + ``latest``, resumes
from ``latest`` and stops on the preemption signal through ``ldm_scale.preemption``.
Usage: standin_train.py run_dir=... run_id=... steps=N step_seconds=S checkpoint_every=K
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ldm_scale import preemption

preemption.install(preemption.PreemptionConfig(check_every=1))

import torch  # noqa: E402

from ldm_scale import dist  # noqa: E402


def save(ckpt_root: Path, step: int, info: dist.DistInfo) -> Path:
    step_dir = ckpt_root / f"step_{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / f"rank{info.rank}.json").write_text(json.dumps({"step": step}))
    dist.barrier()
    if info.is_main:
        (ckpt_root / "latest").write_text(f"step_{step}\n")
    dist.barrier()
    return step_dir


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    steps, step_seconds = int(args["steps"]), float(args.get("step_seconds", "0"))
    every = int(args.get("checkpoint_every", "1000000"))
    info = dist.init_distributed()
    ckpt_root = Path(args["run_dir"]) / args["run_id"]
    start = 0
    if (ckpt_root / "latest").exists():
        start = int((ckpt_root / "latest").read_text().strip().split("_")[1])
    print(f"rank {info.rank}/{info.world_size} node {info.node_rank} start_step {start}", flush=True)
    for step in range(start + 1, steps + 1):
        counter = torch.ones(1)
        dist.all_reduce_sum(counter)
        assert counter.item() == info.world_size
        time.sleep(step_seconds)
        if preemption.requested(step):
            path = save(ckpt_root, step, info)
            preemption.acknowledge(step, str(path))
            print(f"rank {info.rank} preempted by {preemption.signal_received()} at step {step}", flush=True)
            return preemption.EXIT_STATUS
        if step % every == 0 or step == steps:
            save(ckpt_root, step, info)
    print(f"rank {info.rank} finished step {steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
