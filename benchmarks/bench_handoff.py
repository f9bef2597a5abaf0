"""Main-process time per batch for the data hand-off, before / after the uint8 input path (issue 12).

    OMP_NUM_THREADS=1 python benchmarks/bench_handoff.py [--batch 32] [--size 256] [--rounds 7]

Before: the loader's main process converted every uint8 batch to float32 [-1, 1]
(``batch_to_unit_range``) and that float batch (4x the bytes) was pinned and copied to the device.
After: the loader hands the uint8 batch over as is (``ShardLoader(uint8_images=True)``); the
conversion is one elementwise kernel on the device (``data/device.py``). On a CPU-only machine the
"device" is the CPU, so the after path's conversion is timed too (it then runs in the main process,
as before: no gain there, by design), and the bytes to pin and copy are reported for both paths.
Alternating rounds; medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from ldm_scale.data.device import DeviceHandoff  # noqa: E402
from ldm_scale.data.transforms import batch_to_unit_range  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    handoff = DeviceHandoff(torch.device("cpu"))

    def before() -> None:
        batch_to_unit_range(images)

    def after_host() -> None:
        dict(image=images)  # what the main process does with the uint8 batch: hand it on

    def after_cpu_device() -> None:
        handoff({"image": images})

    timings = {f.__name__: [] for f in (before, after_host, after_cpu_device)}
    for _ in range(args.rounds):
        for fn in (before, after_host, after_cpu_device):
            t0 = time.perf_counter()
            for _ in range(args.reps):
                fn()
            timings[fn.__name__].append((time.perf_counter() - t0) / args.reps * 1000)
    med = {k: statistics.median(v) for k, v in timings.items()}
    mb_uint8 = images.numel() / 2**20
    print(f"batch {args.batch} x 3 x {args.size}^2, {args.rounds} alternating rounds x {args.reps}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"before: main process converts to float32: {med['before']:.2f} ms/batch; pinned + copied: "
          f"{4 * mb_uint8:.1f} MiB")
    print(f"after:  main process hands uint8 on:       {med['after_host']:.4f} ms/batch; pinned + copied: "
          f"{mb_uint8:.1f} MiB (4x fewer bytes)")
    print(f"        conversion on the device (here: the CPU, for reference): {med['after_cpu_device']:.2f} ms/batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
