"""CPU EMA update vs the AdamW step on the same parameters (target: EMA / AdamW <= 0.25).

Both run on the CPU here, side by side in one process, on a UNet-like set of fp32 tensors:

- ``adamw``: ``torch.optim.AdamW.step()`` with gradients present, in each of torch's kernels:
  the default (a for-loop on CPU), ``foreach`` and ``fused`` (the training default, ``optim.
  implementation=auto``); the EMA is reported against each, the fused one being the bar;
- ``ema_blocking``: time ``CpuEma.update()`` keeps the training loop busy (the staging copy; the
  lerp runs on the worker thread), measured with the previous update already finished;
- ``ema_total``: the whole update, copy + lerp (``async_update=False``).

On a GPU node the copy is a non-blocking device-to-host transfer and the AdamW step runs on the
GPU, so ``ema_blocking`` is the number the loop pays; ``ema_total`` bounds the CPU work per step.

    python benchmarks/bench_ema.py [--params 50e6] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldm_scale.train.ema import CpuEma, EmaConfig


def unet_like_params(total: float) -> list:
    """Tensors with a UNet's size mix: many small (norms, biases), a few large (convs, attention)."""
    shapes, count = [], 0
    while count < total:
        for shape in [(320, 320, 3, 3), (320,), (320,), (1280, 320), (320, 1280), (640, 640, 3, 3), (640,),
                      (1280, 1280)]:
            shapes.append(shape)
            count += torch.Size(shape).numel()
    return [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    params = unet_like_params(args.params)
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kernels = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {name: torch.optim.AdamW(params, lr=1e-4, **kw) for name, kw in kernels.items()}
    for opt in optimizers.values():
        opt.step()  # allocate the moments outside the timing
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    ema_async = CpuEma(named, EmaConfig(decay=0.9999, async_update=True))
    ema_sync = CpuEma(named, EmaConfig(decay=0.9999, async_update=False))
    step = {"async": 0, "sync": 0}

    def update_async():
        step["async"] += 1
        ema_async.update(step["async"])

    def update_sync():
        step["sync"] += 1
        ema_sync.update(step["sync"])

    blocking = []
    adamw = {name: [] for name in optimizers}
    total = []
    for _ in range(args.repeats):  # interleaved so load changes hit every measurement alike
        for name, opt in optimizers.items():
            adamw[name].append(timed(opt.step, 1))
        total.append(timed(update_sync, 1))
        ema_async.wait()
        blocking.append(timed(update_async, 1))
        ema_async.wait()
    total_s, blocking_s = statistics.median(total), statistics.median(blocking)
    print(f"parameters: {n / 1e6:.1f}M in {len(params)} tensors, torch threads {torch.get_num_threads()}")
    print(f"ema total         {total_s * 1e3:8.1f} ms")
    print(f"ema blocking      {blocking_s * 1e3:8.1f} ms")
    for name, times in adamw.items():
        adamw_s = statistics.median(times)
        print(f"adamw {name:8s}    {adamw_s * 1e3:8.1f} ms   ema total / adamw {total_s / adamw_s:.3f}   "
              f"ema blocking / adamw {blocking_s / adamw_s:.3f}  (target <= 0.25)")
    ema_async.close()
    ema_sync.close()


if __name__ == "__main__":
    main()
