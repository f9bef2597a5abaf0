"""Model-side ratios, each measured side by side in one run.

1. Activation checkpointing: activation memory held between forward and backward, with vs without
   ``UNetModel.set_activation_checkpointing(True)`` (target: >= 2x less), and the extra compute of
   forward+backward (target: <= 1.5x; one extra forward per block). Memory is measured as the growth
   of the process's resident set across the forward pass, in a fresh subprocess per variant (large
   CPU tensors are mmapped, so freed memory returns to the OS and RSS tracks live tensors); on CUDA
   use ``torch.cuda.max_memory_allocated`` instead (``--device cuda``).
2. Attention: ``F.scaled_dot_product_attention`` (models/attention.py) vs the explicit softmax
   reference, time and peak memory of the [N, N] weights it avoids (target: SDPA time <= naive).

    python benchmarks/bench_models.py [--device cpu|cuda] [--latent 32] [--batch 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm_scale.models.attention import multihead_attention, naive_attention  # noqa: E402
from ldm_scale.models.unet import UNetConfig, UNetModel  # noqa: E402


def mid_unet() -> UNetConfig:
    """A mid-size text-conditional UNet (the txt2img_kl8 layout at 128 base channels)."""
    return UNetConfig(in_channels=4, out_channels=4, model_channels=128, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
                      attention_resolutions=[4, 2, 1], num_heads=8, num_head_channels=-1,
                      use_spatial_transformer=True, transformer_depth=1, context_dim=512)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def activation_memory_child(checkpointing: bool, device: str, latent: int, batch: int) -> None:
    """Runs in a subprocess: prints the activation memory held after one forward pass."""
    dev = torch.device(device)
    torch.manual_seed(0)
    unet = UNetModel(mid_unet()).to(dev)
    unet.set_activation_checkpointing(checkpointing)
    x = torch.randn(batch, 4, latent, latent, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)
    ctx = torch.randn(batch, 77, 512, device=dev)
    unet(x, t, context=ctx).float().pow(2).mean().backward()  # warm-up: allocator caches, lazy inits
    unet.zero_grad(set_to_none=False)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = rss_bytes()
    loss = unet(x, t, context=ctx).float().pow(2).mean()
    held = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rss_bytes()) - base
    loss.backward()
    print(json.dumps({"held_bytes": held}))


def activation_memory(checkpointing: bool, args) -> int:
    cmd = [sys.executable, __file__, "--child-memory", "1" if checkpointing else "0", "--device", args.device,
           "--latent", str(args.latent), "--batch", str(args.batch)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(out.stdout.strip().splitlines()[-1])["held_bytes"]


def train_step_time(unet: UNetModel, checkpointing: bool, x, t, ctx, device) -> float:
    unet.set_activation_checkpointing(checkpointing)
    sync(device)
    start = time.perf_counter()
    unet(x, t, context=ctx).float().pow(2).mean().backward()
    sync(device)
    return time.perf_counter() - start


def attention_times(device: torch.device, repeats: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    # The txt2img_kl8 self-attention at 32x32 latents: 1024 tokens, 8 heads of 40 channels.
    q, k, v = (torch.randn(4, 1024, 320, generator=g).to(device) for _ in range(3))
    sdpa, naive = [], []
    with torch.no_grad():
        for fn in (multihead_attention, naive_attention):  # warm-up
            fn(q, k, v, 8)
        for _ in range(repeats):
            for fn, store in ((multihead_attention, sdpa), (naive_attention, naive)):
                sync(device)
                start = time.perf_counter()
                fn(q, k, v, 8)
                sync(device)
                store.append(time.perf_counter() - start)
    weights_bytes = 4 * 8 * 1024 * 1024 * 4  # the [B, H, N, N] fp32 weights the naive version materialises
    return statistics.median(sdpa), statistics.median(naive), weights_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory is not None:
        activation_memory_child(args.child_memory == "1", args.device, args.latent, args.batch)
        return
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")

    mem_plain = activation_memory(False, args)
    mem_ckpt = activation_memory(True, args)
    print(f"[checkpointing] UNet(128ch, 1,2,4,4) batch {args.batch} latent {args.latent}: activation memory "
          f"{mem_plain / 2**20:.0f} MiB plain vs {mem_ckpt / 2**20:.0f} MiB checkpointed -> "
          f"{mem_plain / max(mem_ckpt, 1):.2f}x less (target >= 2x)")

    torch.manual_seed(0)
    unet = UNetModel(mid_unet()).to(device)
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    ctx = torch.randn(args.batch, 77, 512, device=device)
    train_step_time(unet, False, x, t, ctx, device)  # warm-up
    train_step_time(unet, True, x, t, ctx, device)
    plain, ckpt = [], []
    for _ in range(args.repeats):  # alternate the two measurements
        plain.append(train_step_time(unet, False, x, t, ctx, device))
        ckpt.append(train_step_time(unet, True, x, t, ctx, device))
    ratio = statistics.median(ckpt) / statistics.median(plain)
    print(f"[checkpointing] forward+backward {statistics.median(plain):.2f}s plain vs {statistics.median(ckpt):.2f}s "
          f"checkpointed -> {ratio:.2f}x time (target <= 1.5x)")

    sdpa, naive, weights = attention_times(device, args.repeats)
    print(f"[attention] 4x1024 tokens, 8 heads: SDPA {sdpa * 1e3:.1f} ms vs naive {naive * 1e3:.1f} ms -> "
          f"{sdpa / naive:.2f}x time (target <= 1.0); naive materialises {weights / 2**20:.0f} MiB of weights")


if __name__ == "__main__":
    main()
