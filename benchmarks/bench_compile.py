"""``train.compile`` on CPU: compiled / eager training-step time of a UNet, side by side in one run.

One step is forward + backward of an eps-style loss + a foreach AdamW update, at fixed shapes, for
the tiny flavour's UNet (8x8 latents) and a mid-size text UNet (``bench_models.mid_unet`` at
``--mid-channels``, 32x32 latents), with a random text context. Each mode (eager, and
``ldm_scale.train.compile`` modes ``unet`` / ``blocks``) has its own copy of the same weights;
warm-up steps compile (their time is reported as the compile time), then rounds alternate the
modes (rotating which goes first) and each round's median step is taken; the result is the median
over rounds, and compiled / eager is printed per model.

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py [--models tiny,mid] [--modes unet,blocks]
        [--batch 4] [--rounds 3] [--steps 3] [--mid-channels 64] [--checkpointing]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_models import mid_unet  # noqa: E402
from ldm_scale.models.registry import get_spec  # noqa: E402
from ldm_scale.models.unet import UNetConfig, UNetModel  # noqa: E402
from ldm_scale.train.compile import CompileMode, apply_compile  # noqa: E402

TOKENS = 77


def model_config(name: str, args) -> Tuple[UNetConfig, int]:
    """(UNet config, latent size) of a benchmarked model."""
    if name == "tiny":
        spec = get_spec("tiny")
        return spec.unet, spec.latent_size
    if name == "mid":
        return dataclasses.replace(mid_unet(), model_channels=args.mid_channels), 32
    raise ValueError(f"unknown model {name!r}: tiny or mid")


class Runner:
    """One mode's model, optimizer and fixed batch; ``step()`` is one timed training step."""

    def __init__(self, unet: UNetModel, mode: str, cfg: UNetConfig, latent: int, batch: int):
        self.unet, self.mode = unet, mode
        if mode != "eager":
            apply_compile(unet, CompileMode(mode))
        self.optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, foreach=True)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
        self.t = torch.randint(0, 1000, (batch,), generator=g)
        self.context = torch.randn(batch, TOKENS, cfg.context_dim, generator=g) if cfg.context_dim else None
        self.target = torch.randn(batch, cfg.out_channels, latent, latent, generator=g)

    def step(self) -> float:
        start = time.perf_counter()
        loss = (self.unet(self.x, self.t, context=self.context) - self.target).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def bench_model(name: str, args) -> Dict[str, object]:
    cfg, latent = model_config(name, args)
    torch.manual_seed(0)
    base = UNetModel(cfg)
    with torch.no_grad():  # zero-initialised output layers: give backward real work everywhere
        for p in base.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    base.set_activation_checkpointing(args.checkpointing)
    modes = ["eager", *args.modes]
    runners = {mode: Runner(copy.deepcopy(base), mode, cfg, latent, args.batch) for mode in modes}
    warmup: Dict[str, List[float]] = {mode: [runner.step() for _ in range(args.warmup)]
                                      for mode, runner in runners.items()}
    rounds: Dict[str, List[float]] = {mode: [] for mode in modes}
    for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            rounds[mode].append(statistics.median(runners[mode].step() for _ in range(args.steps)))
    median = {mode: statistics.median(v) for mode, v in rounds.items()}
    params = sum(p.numel() for p in base.parameters())
    return {
        "model": name, "params": params, "model_channels": cfg.model_channels, "latent": latent, "batch": args.batch,
        "checkpointing": args.checkpointing, "step_ms": {m: round(1e3 * v, 1) for m, v in median.items()},
        "rounds_ms": {m: [round(1e3 * x, 1) for x in v] for m, v in rounds.items()},
        "first_step_s": {m: round(v[0], 1) for m, v in warmup.items()},
        "ratio": {m: round(median[m] / median["eager"], 3) for m in args.modes},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--modes", default="unet,blocks")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--mid-channels", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode (the first compiles)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per UNet block")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    for mode in args.modes:
        CompileMode(mode)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for name in args.models.split(","):
        result = bench_model(name, args)
        results.append(result)
        steps = ", ".join(f"{m} {v:.1f} ms" for m, v in result["step_ms"].items())
        ratios = ", ".join(f"{m}/eager = {v:.3f}" for m, v in result["ratio"].items())
        print(f"{name} ({result['params'] / 1e6:.2f}M params, {result['model_channels']} ch, batch {args.batch}, "
              f"{result['latent']}x{result['latent']} latents): median step {steps}; {ratios}; "
              f"first step (compile) {result['first_step_s']} s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("RESULT " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
