"""A DiT training step against a UNet's at equal FLOPs per image, side by side in one run, with MFU.

Both networks are text-conditional denoisers of the same latents with the same 77-token context:
the UNet is ``bench_models.mid_unet`` (the txt2img_kl8 layout at 128 base channels, or
``--unet-channels``; cross-attention at every level); the DiT is a PixArt-style cross-attention DiT (patch 2, ``--width``) whose depth is
chosen so that its forward FLOPs per image (counted by ``FlopCounterMode``, 2 per multiply-add) are
the closest to the UNet's. One step = forward + backward of an eps-style loss + a foreach AdamW
update, at a fixed batch. Rounds alternate the two (rotating which goes first); each round's median
step time is taken and the result is the median over rounds.

MFU = counted training FLOPs per second (3 x forward: the backward costs two forwards) / the
device's peak, which on a CPU is measured here (the best of several large fp32 / bf16 matmuls,
the ceiling a dense network could reach) and on a GPU is the datasheet's dense bf16 figure
(``--peak-tflops``).

    OMP_NUM_THREADS=2 python benchmarks/bench_dit.py [--latent 16] [--batch 8] [--rounds 5] [--steps 3]
    python benchmarks/bench_dit.py --device cuda --dtype bf16 --latent 32 --batch 64 --width 1152 --peak-tflops 989
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_models import mid_unet, sync  # noqa: E402
from ldm_scale.models.dit import DiT, DiTConfig  # noqa: E402
from ldm_scale.models.unet import UNetModel  # noqa: E402

TOKENS, CONTEXT = 77, 512


def forward_flops(net: nn.Module, latent: int) -> float:
    with torch.device("meta"):
        x = torch.empty(1, 4, latent, latent)
        ctx = torch.empty(1, TOKENS, CONTEXT)
        t = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, t, context=ctx)
    return float(counter.get_total_flops())


def dit_config(width: int, depth: int, latent: int) -> DiTConfig:
    return DiTConfig(input_size=latent, patch_size=2, hidden_size=width, depth=depth, num_heads=max(width // 64, 1),
                     text="cross", context_dim=CONTEXT)


def matched_dit(width: int, latent: int, target: float) -> DiTConfig:
    """The DiT depth whose forward FLOPs are the closest to ``target`` (FLOPs are affine in depth:
    two counts give the line)."""
    def flops(depth: int) -> float:
        with torch.device("meta"):
            return forward_flops(DiT(dit_config(width, depth, latent)), latent)

    one, per_block = flops(1), flops(2) - flops(1)
    depth = max(1, round((target - one) / per_block) + 1)
    return dit_config(width, depth, latent)


def peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """The best dense matmul rate this device reaches (FLOP/s)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


class Trainer:
    def __init__(self, net: nn.Module, latent: int, batch: int, device: torch.device, dtype: torch.dtype):
        self.net = net.to(device)
        for p in self.net.parameters():  # zero-initialised output layers would make backward trivial
            if p.dim() > 1 and not p.any():
                torch.nn.init.normal_(p, std=0.02)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4, foreach=True)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
        self.ctx = torch.randn(batch, TOKENS, CONTEXT, generator=g).to(device)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.target = torch.randn(batch, 4, latent, latent, generator=g).to(device)
        self.device, self.dtype = device, dtype

    def step(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = (self.net(self.x, self.t, context=self.ctx).float() - self.target).pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--unet-channels", type=int, default=128, help="the UNet's base channels (mid_unet: 128)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: measured)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)

    unet_cfg = dataclasses.replace(mid_unet(), model_channels=args.unet_channels)
    with torch.device("meta"):
        unet_flops = forward_flops(UNetModel(unet_cfg), args.latent)
    dit_cfg = matched_dit(args.width, args.latent, unet_flops)
    with torch.device("meta"):
        dit_flops = forward_flops(DiT(dit_cfg), args.latent)
    nets: Dict[str, Callable[[], nn.Module]] = {"unet": lambda: UNetModel(unet_cfg), "dit": lambda: DiT(dit_cfg)}
    trainers = {name: Trainer(build(), args.latent, args.batch, device, dtype) for name, build in nets.items()}
    fwd = {"unet": unet_flops, "dit": dit_flops}
    params = {name: sum(q.numel() for q in t.net.parameters()) for name, t in trainers.items()}
    for t in trainers.values():
        for _ in range(args.warmup):
            t.step()
    per_round: Dict[str, list] = {name: [] for name in trainers}
    names = list(trainers)
    for r in range(args.rounds):
        for name in names[r % 2:] + names[:r % 2]:  # rotate which goes first
            per_round[name].append(statistics.median(trainers[name].step() for _ in range(args.steps)))
    step_s = {name: statistics.median(v) for name, v in per_round.items()}
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, dtype)
    out = {"device": str(device), "dtype": args.dtype, "latent": args.latent, "batch": args.batch,
           "dit": {"width": dit_cfg.hidden_size, "depth": dit_cfg.depth, "patch": dit_cfg.patch_size},
           "params_M": {k: round(v / 1e6, 2) for k, v in params.items()},
           "forward_gflop_per_image": {k: round(v / 1e9, 4) for k, v in fwd.items()},
           "step_s": {k: round(v, 5) for k, v in step_s.items()},
           "images_per_s": {k: round(args.batch / v, 2) for k, v in step_s.items()},
           "per_round_step_s": {k: [round(x, 5) for x in v] for k, v in per_round.items()},
           "peak_tflops": round(peak / 1e12, 4), "peak_source": "given" if args.peak_tflops else "measured matmul"}
    out["mfu"] = {k: round(3 * fwd[k] * args.batch / step_s[k] / peak, 4) for k in step_s}
    out["dit_over_unet_images_per_s"] = round(step_s["unet"] / step_s["dit"], 3)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
