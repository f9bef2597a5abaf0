"""Numbers behind docs/scaling.md, computed on the ``meta`` device (no memory, no GPU needed).

    python benchmarks/scaling_estimate.py [--flavour txt2img_kl8] [--micro-batch 16] [--mfu 0.35]

- parameters by component (trainable = UNet + jointly trained text transformer);
- training FLOPs per image, counted by ``torch.utils.flop_counter.FlopCounterMode``: UNet forward +
  backward on 32x32x4 latents with 77 context tokens, the text transformer forward + backward, and
  the frozen KL-f8 encoder's forward at 256x256 (zero when latents are pre-encoded);
- activation bytes saved for backward per image in bf16, with and without activation
  checkpointing (``torch.autograd.graph.saved_tensors_hooks`` on meta tensors);
- per-GPU memory for ZeRO 1/2/3 at 8/64/256 GPUs (bf16 weights and gradients, fp32 master weights
  and Adam moments: 2 + 2 + 12 bytes per trainable parameter before sharding);
- images/s at a stated MFU from the counted FLOPs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm_scale.logging import count_flops  # noqa: E402
from ldm_scale.models.conditioners import build_conditioner  # noqa: E402
from ldm_scale.models.registry import build_autoencoder, get_spec  # noqa: E402
from ldm_scale.models.unet import UNetModel  # noqa: E402

GIB = 2**30
PEAK_TFLOPS = {"A100 (bf16 dense 312 TFLOPS)": 312e12, "H100 SXM (bf16 dense 989 TFLOPS)": 989e12}


def saved_bytes(forward) -> int:
    """Bytes of tensors autograd keeps for backward after ``forward()`` (meta tensors): the
    activation memory held at the end of the forward pass. Under checkpointing the recomputation
    in backward adds one block's activations at a time on top of this."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--flavour", default="txt2img_kl8")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--mfu", type=float, default=0.35)
    args = p.parse_args()
    spec = get_spec(args.flavour)
    h, tokens = spec.latent_size, spec.cond_stage.text.max_length

    with torch.device("meta"):
        unet = UNetModel(spec.unet).to(torch.bfloat16)
        text = build_conditioner(spec.cond_stage).to(torch.bfloat16)
        ae = build_autoencoder(spec.first_stage).to(torch.bfloat16)
    n_unet = sum(q.numel() for q in unet.parameters())
    n_text = sum(q.numel() for q in text.parameters())
    n_ae = sum(q.numel() for q in ae.parameters())
    trainable = n_unet + n_text

    def batch(n: int):
        x = torch.empty(n, spec.unet.in_channels, h, h, device="meta", dtype=torch.bfloat16)
        t = torch.zeros(n, dtype=torch.long, device="meta")
        ids = torch.zeros(n, tokens, dtype=torch.long, device="meta")
        return x, t, ids

    def forward(n: int, checkpointing: bool):
        unet.set_activation_checkpointing(checkpointing)
        x, t, ids = batch(n)
        return lambda: unet(x, t, context=text.encode_tokens(ids)).float().pow(2).mean()

    flops_train = count_flops(lambda: forward(1, False)().backward())
    image = torch.empty(1, 3, spec.image_size, spec.image_size, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        flops_encode = count_flops(lambda: ae.encode(image))
    act_plain = saved_bytes(forward(1, False))
    act_ckpt = saved_bytes(forward(1, True))

    print(f"flavour {args.flavour}: UNet {n_unet / 1e6:.1f}M + text transformer {n_text / 1e6:.1f}M = "
          f"{trainable / 1e6:.1f}M trainable; frozen first stage {n_ae / 1e6:.1f}M")
    print(f"training FLOPs per image: {flops_train / 1e9:.1f} GFLOP (UNet + text fwd/bwd), "
          f"+ {flops_encode / 1e9:.1f} GFLOP frozen encoder forward")
    print(f"activations held after forward per image (bf16): {act_plain / 2**20:.0f} MiB plain, "
          f"{act_ckpt / 2**20:.0f} MiB with activation checkpointing")
    frozen = n_ae * 2  # bf16 copy of the first stage on every GPU
    print(f"\nper-GPU memory, micro-batch {args.micro_batch}, activation checkpointing on (GiB)")
    print("| GPUs | ZeRO-1 | ZeRO-2 | ZeRO-3 | activations | frozen AE |")
    print("|---|---|---|---|---|---|")
    act = act_ckpt * args.micro_batch
    for gpus in (8, 64, 256):
        z1 = (2 + 2) * trainable + 12 * trainable / gpus
        z2 = 2 * trainable + (2 + 12) * trainable / gpus
        z3 = 16 * trainable / gpus
        row = [(z + act + frozen) / GIB for z in (z1, z2, z3)]
        print(f"| {gpus} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} | {act / GIB:.1f} | {frozen / GIB:.2f} |")
    print(f"\nthroughput at MFU {args.mfu:.2f} (training FLOPs only; the encoder adds "
          f"{100 * flops_encode / flops_train:.0f}% unless latents are pre-encoded)")
    for name, peak in PEAK_TFLOPS.items():
        per_gpu = args.mfu * peak / flops_train
        print(f"- {name}: {per_gpu:.0f} images/s per GPU; 8 GPUs {8 * per_gpu:.0f}, 64 GPUs "
              f"{64 * per_gpu:.0f}, 256 GPUs {256 * per_gpu:.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
