"""Numbers behind docs/scaling.md, computed on the ``meta`` device (no memory, no GPU needed).

    python benchmarks/scaling_estimate.py [--flavour txt2img_kl8] [--global-batch 680]
        [--micro-batch 17 85] [--mfu 0.35] [--json PATH]

- parameters by component (trainable = UNet + jointly trained text transformer);
- training FLOPs per image (``ldm_scale.logging.count_flops``): UNet + text transformer forward +
  backward on 32x32x4 latents with 77 tokens, with and without activation checkpointing (the
  difference is the recomputation), and the frozen KL-f8 encoder's forward at 256x256;
- activation memory per image in bf16 (:func:`measure_activations`): what the autograd graph holds
  after the forward pass, and the peak over forward + backward, each as ``per_image x B + fixed``
  from batches of 1 and 2, for no checkpointing, the UNet checkpointed (what ``LDMTask`` does with
  ``model.activation_checkpointing=true``) and UNet + text transformer checkpointed;
- per-GPU memory for ZeRO 1/2/3 at 8/64/256 GPUs, and the largest micro-batch that fits 40 GB and
  80 GB cards without checkpointing (rule in :func:`fits`);
- images/s at a stated MFU from the counted FLOPs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from ldm_scale.logging import count_flops  # noqa: E402
from ldm_scale.models.conditioners import build_conditioner  # noqa: E402
from ldm_scale.models.registry import build_autoencoder, build_denoiser, denoiser_inputs, get_spec  # noqa: E402

GIB, MIB = 2**30, 2**20
PEAK_TFLOPS = {"A100 (bf16 dense 312 TFLOPS)": 312e12, "H100 SXM (bf16 dense 989 TFLOPS)": 989e12}
# What torch.cuda.mem_get_info() reports as total on the cards (A100 40GB / A100 80GB, H100 80GB).
CARDS_GIB = {"40 GB": 39.4, "80 GB": 79.1}
HEADROOM = 0.85  # share of the card the predicted peak may use: fragmentation, CUDA/NCCL workspaces
COMM_BUCKETS_GIB = 0.4  # DeepSpeed reduce / all-gather buckets at the default 200M-element sizes
# Model states per trainable parameter: bf16 weights, bf16 gradients, fp32 master + Adam m and v.
WEIGHT_B, GRAD_B, OPTIM_B = 2, 2, 12
# The frozen first stage keeps fp32 storage (train/precision.py: it is exported and decodes samples)
# and computes in bf16 under autocast, so its activations are bf16 but its weights 4 B each.
FROZEN_FIRST_STAGE_B = 4


# ------------------------------------------------------------------------------ activation memory

class _StorageLedger(TorchDispatchMode):
    """Every storage an op creates while active, by weak reference (so the ledger keeps nothing
    alive), with its size and the stack of module labels active at creation. With ``track_peak``
    the bytes of the recorded storages still alive are summed after every op."""

    def __init__(self, track_peak: bool = False):
        super().__init__()
        self.entries: Dict[int, Tuple[StorageWeakRef, int, Tuple[str, ...]]] = {}
        self.labels: List[str] = []
        self.track_peak = track_peak
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view (or in-place result) of a storage that existed before the pass, such as a
        # parameter's ``weight.t()`` or an input's reshape, allocates nothing: not recorded.
        inputs = {StorageWeakRef(t.untyped_storage()).cdata
                  for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata in inputs and ref.cdata not in self.entries:
                    continue
                if ref.cdata not in self.entries or self.entries[ref.cdata][1] < storage.nbytes():
                    self.entries[ref.cdata] = (ref, storage.nbytes(), tuple(self.labels))
        if self.track_peak:
            self.peak = max(self.peak, sum(n for _, n, _ in self.live()))
        return out

    def live(self) -> Iterator[Tuple[int, int, Tuple[str, ...]]]:
        for key, (ref, nbytes, labels) in list(self.entries.items()):
            if ref.expired():
                del self.entries[key]  # also keeps the per-op peak sum short
            else:
                yield key, nbytes, labels

    @contextlib.contextmanager
    def labelled(self, parts: Sequence[Tuple[str, nn.Module]]) -> Iterator[None]:
        """Label storages by the part (a name for some modules) running when they are created."""
        def push(name: str):
            def hook(*_) -> None:
                self.labels.append(name)
            return hook

        def pop(*_) -> None:  # a forward hook's return value would replace the module's output
            self.labels.pop()

        handles = []
        for name, module in parts:
            handles.append(module.register_forward_pre_hook(push(name)))
            handles.append(module.register_forward_hook(pop))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@dataclass
class ActivationMemory:
    """Bytes of one forward (+ backward) pass: ``held`` is what the autograd graph keeps for
    backward once the forward returns (split by part label, ``None`` for unlabelled ops); ``peak``
    is the most bytes alive at once over forward and backward, gradients of parameters excluded
    (they are freed as they are produced, as ZeRO-2's reduction buckets do; model states count them)."""

    held: int
    held_by_part: Dict[Optional[str], int]
    peak: Optional[int] = None


def measure_activations(forward: Callable[[], torch.Tensor], modules: Sequence[nn.Module], *,
                        backward: bool = False, parts: Sequence[Tuple[str, nn.Module]] = ()) -> ActivationMemory:
    """Activation memory of ``forward()`` (which returns a scalar loss), on any device, meta included.

    Counted: every storage created by an op during ``forward()`` that is still alive when it has
    returned, i.e. what autograd saved for backward (and anything else the pass keeps). Each storage
    counts once, however many views or saved copies refer to it. Not counted: parameters and buffers
    of ``modules`` and the caller's inputs (they exist before the pass), and temporaries freed inside
    it. Non-reentrant ``torch.utils.checkpoint`` is measured as it behaves: only its inputs stay
    alive. ``saved_tensors_hooks`` cannot see that (the checkpoint installs its own hooks, and the
    innermost pair wins), which is why this ledger watches storages instead of saved tensors.
    """
    excluded = {StorageWeakRef(t.untyped_storage()).cdata
                for m in modules for t in [*m.parameters(), *m.buffers()]}
    ledger = _StorageLedger(track_peak=backward)
    grad_hooks = []
    if backward:
        grad_hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
                      for m in modules for p in m.parameters() if p.requires_grad]
    try:
        with ledger.labelled(parts), ledger:
            loss = forward()
            held_by_part: Dict[Optional[str], int] = {}
            for key, nbytes, labels in ledger.live():
                if key not in excluded:
                    part = labels[0] if labels else None
                    held_by_part[part] = held_by_part.get(part, 0) + nbytes
            if backward:
                loss.backward()
            del loss
    finally:
        for h in grad_hooks:
            h.remove()
    return ActivationMemory(sum(held_by_part.values()), held_by_part, ledger.peak if backward else None)


def linear_fit(at_1: int, at_2: int) -> Tuple[int, int]:
    """(per_image, fixed) of bytes measured at batch 1 and 2: weight copies made in the forward
    (e.g. GroupNorm32's fp32 affine parameters) are the fixed part, not per image."""
    return at_2 - at_1, 2 * at_1 - at_2


@contextlib.contextmanager
def cuda_bf16_kernels() -> Iterator[None]:
    """Make meta tensors save for backward what a CUDA GPU saves in bf16 training under
    ``torch.autocast`` (``ldm_scale.train.engine.autocast``), for the two ops where meta differs:

    - ``F.scaled_dot_product_attention`` goes to the flash kernel's op. On meta SDPA falls back to
      the math kernel, which upcasts to fp32 and saves [B, heads, N, M] attention weights (64 MiB
      per 32x32 self-attention layer per image here); flash saves q, k, v, the output and a
      [B, heads, N] fp32 log-sum-exp. Its meta kernels give the shapes. (FLOPs are counted outside
      this context: the model's matmuls, not flash's recomputation of the scores in backward.)
    - ``F.layer_norm`` runs in fp32, as autocast's fp32 op list does: it saves an fp32 copy of its
      input, and the next matmul's bf16 cast of its output (autocast does not apply on meta).
    """
    sdpa, layer_norm = F.scaled_dot_product_attention, F.layer_norm

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or enable_gqa:
            return sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]

    def layer_norm_fp32(x, shape, weight=None, bias=None, eps=1e-5):
        weight, bias = (None if w is None else w.float() for w in (weight, bias))
        return layer_norm(x.float(), shape, weight, bias, eps).to(x.dtype)

    F.scaled_dot_product_attention, F.layer_norm = flash, layer_norm_fp32
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.layer_norm = sdpa, layer_norm


# ------------------------------------------------------------------------------ model states

def model_state_bytes(stage: int, params: int, gpus: int) -> float:
    """Per-GPU bytes of weights, gradients and optimizer state of ``params`` trainable parameters
    (Rajbhandari et al. 2020, ZeRO Sec. 5): stage 1 shards the 12 B of fp32 master + Adam state,
    stage 2 also the gradients, stage 3 also the weights."""
    sharded = {1: OPTIM_B, 2: GRAD_B + OPTIM_B, 3: WEIGHT_B + GRAD_B + OPTIM_B}[stage]
    replicated = WEIGHT_B + GRAD_B + OPTIM_B - sharded
    return replicated * params + sharded * params / gpus


def fits(peak_bytes: float, card_gib: float) -> bool:
    """The rule for "fits a card": the predicted peak (model states + frozen first stage +
    communication buckets + activation peak) is at most HEADROOM of the memory the card reports."""
    return peak_bytes <= HEADROOM * card_gib * GIB


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------------------ the estimate

VARIANTS = {"plain": "no checkpointing", "unet": "denoiser checkpointed", "all": "denoiser + text checkpointed"}


@dataclass
class Estimate:
    """Everything the report prints. Memory pairs are (bytes per image, fixed bytes)."""

    flavour: str
    params: Dict[str, int]  # unet, cond (trained jointly; 0 if none), first_stage (frozen)
    gflop: Dict[str, float]  # train_<variant> (fwd + bwd per image), encode (frozen encoder fwd)
    held: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # by variant
    peak: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    held_by_part_per_image: Dict[str, Dict[str, int]] = field(default_factory=dict)
    held_math_attention_plain: Tuple[int, int] = (0, 0)  # meta's own SDPA and layer_norm
    encoder_peak: Tuple[int, int] = (0, 0)

    @property
    def trainable(self) -> int:
        return self.params["unet"] + self.params["cond"]


def estimate(flavour: str) -> Estimate:
    spec = get_spec(flavour)
    h, kind = spec.latent_size, spec.cond_stage.kind
    with torch.device("meta"):
        unet = build_denoiser(spec).to(torch.bfloat16)  # the UNet or DiT
        cond = build_conditioner(spec.cond_stage).to(torch.bfloat16) if kind in ("text", "class") else None
        ae = build_autoencoder(spec.first_stage).to(torch.bfloat16).eval().requires_grad_(False)
    trained = [m for m in (unet, cond) if m is not None]
    params = {"unet": sum(p.numel() for p in unet.parameters()),
              "cond": sum(p.numel() for p in cond.parameters()) if cond is not None else 0,
              "first_stage": sum(p.numel() for p in ae.parameters())}
    # Labels for the held-bytes split; the text transformer is run through encode_tokens (its
    # forward tokenises strings), so its called submodules carry the label.
    parts = [("unet", unet)] + [("cond", m) for m in (cond.modules() if cond is not None else ())
                                if m is not cond and not isinstance(m, nn.ModuleList)]

    def loss_fn(n: int, variant: str) -> Callable[[], torch.Tensor]:
        unet.set_activation_checkpointing(variant in ("unet", "all"))
        if hasattr(cond, "set_activation_checkpointing"):
            cond.set_activation_checkpointing(variant == "all")
        x, t, inputs = denoiser_inputs(spec, h, batch=n)
        x = x.to(torch.bfloat16)

        def context() -> Optional[torch.Tensor]:
            if kind == "text":
                return cond.encode_tokens(torch.zeros(n, spec.cond_stage.text.max_length, dtype=torch.long,
                                                      device="meta"))
            if kind == "class":
                return cond.embedding(torch.zeros(n, dtype=torch.long, device="meta"))[:, None, :]
            # A frozen encoder's tokens (openclip) are an input like the latents; none otherwise.
            return inputs["context"].to(torch.bfloat16) if "context" in inputs else None

        return lambda: unet(x, t, context=context(), y=inputs.get("y")).float().pow(2).mean()

    def train_gflop(variant: str) -> float:
        fn = loss_fn(1, variant)
        return count_flops(lambda: fn().backward()) / 1e9

    image = torch.empty(1, 3, spec.image_size, spec.image_size, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        encode = count_flops(lambda: ae.encode(image)) / 1e9
    variants = [v for v in VARIANTS if v != "all" or hasattr(cond, "set_activation_checkpointing")]
    est = Estimate(flavour, params, {**{f"train_{v}": train_gflop(v) for v in variants}, "encode": encode})

    with cuda_bf16_kernels():
        for variant in variants:
            runs = [measure_activations(loss_fn(n, variant), trained, backward=True, parts=parts) for n in (1, 2)]
            est.held[variant] = linear_fit(runs[0].held, runs[1].held)
            est.peak[variant] = linear_fit(runs[0].peak, runs[1].peak)
            names = set(runs[0].held_by_part) | set(runs[1].held_by_part)
            est.held_by_part_per_image[variant] = {
                str(k): runs[1].held_by_part.get(k, 0) - runs[0].held_by_part.get(k, 0) for k in names}

        def encode_peak(n: int) -> int:
            img = torch.empty(n, 3, spec.image_size, spec.image_size, device="meta", dtype=torch.bfloat16)
            ledger = _StorageLedger(track_peak=True)
            with torch.no_grad(), ledger:
                ae.encode(img)
            return ledger.peak

        est.encoder_peak = linear_fit(encode_peak(1), encode_peak(2))
    # The same plain pass with meta's own kernels: what a CPU measurement would see.
    est.held_math_attention_plain = linear_fit(*(measure_activations(loss_fn(n, "plain"), trained).held
                                                 for n in (1, 2)))
    return est


def predicted_peak(est: Estimate, variant: str, stage: int, gpus: int, micro: int) -> float:
    """Bytes per GPU at the step's peak: model states + fp32 frozen first stage + buckets + the
    larger of the activation peak and the frozen encoder's (it runs, under no_grad, before the UNet)."""
    per, fixed = est.peak[variant]
    enc_per, enc_fixed = est.encoder_peak
    activations = max(per * micro + fixed, enc_per * micro + enc_fixed)
    return (model_state_bytes(stage, est.trainable, gpus) + FROZEN_FIRST_STAGE_B * est.params["first_stage"]
            + COMM_BUCKETS_GIB * GIB + activations)


def largest_fitting(est: Estimate, variant: str, stage: int, gpus: int, card_gib: float,
                    candidates: Iterable[int]) -> Optional[int]:
    ok = [m for m in candidates if fits(predicted_peak(est, variant, stage, gpus, m), card_gib)]
    return max(ok) if ok else None


def report(est: Estimate, mfu: float, global_batch: int, micro_batches: Sequence[int]) -> None:
    p, g = est.params, est.gflop
    print(f"flavour {est.flavour}: denoiser {p['unet'] / 1e6:.1f}M + jointly trained conditioner {p['cond'] / 1e6:.1f}M "
          f"= {est.trainable / 1e6:.1f}M trainable; frozen first stage {p['first_stage'] / 1e6:.1f}M; "
          f"fp32 EMA of the denoiser {4 * p['unet'] / 1e9:.2f} GB")
    plain = g["train_plain"]
    flops = ", ".join(f"{VARIANTS[v]} {g[f'train_{v}']:.1f} (+{100 * (g[f'train_{v}'] / plain - 1):.1f}%)"
                      for v in est.held)
    print(f"training GFLOP per image, fwd + bwd: {flops}; frozen encoder forward {g['encode']:.1f}")

    print("\nactivation memory, bf16 under autocast with flash attention, MiB per image + fixed MiB:")
    for variant in est.held:
        (hp, hf), (pp, pf) = est.held[variant], est.peak[variant]
        parts = ", ".join(f"{k} {v / MIB:.1f}" for k, v in sorted(est.held_by_part_per_image[variant].items()))
        print(f"- {VARIANTS[variant]}: held after forward {hp / MIB:.1f} + {hf / MIB:.1f} ({parts}); "
              f"peak over fwd + bwd {pp / MIB:.1f} + {pf / MIB:.1f}")
    mp, mf = est.held_math_attention_plain
    print(f"- no checkpointing, meta's own kernels (math SDPA in fp32, bf16 layer_norm): held {mp / MIB:.1f} + "
          f"{mf / MIB:.1f}")
    ep, ef = est.encoder_peak
    print(f"- frozen encoder forward (no_grad), peak: {ep / MIB:.1f} + {ef / MIB:.1f}")

    frozen = FROZEN_FIRST_STAGE_B * p["first_stage"]
    print(f"\nmodel states per GPU, GiB ({WEIGHT_B} + {GRAD_B} + {OPTIM_B} B x {est.trainable / 1e6:.1f}M, "
          f"sharded per stage); + frozen first stage {frozen / GIB:.2f} + buckets {COMM_BUCKETS_GIB}")
    print("| GPUs | ZeRO-1 | ZeRO-2 | ZeRO-3 |")
    for gpus in (8, 64, 256):
        cells = " | ".join(f"{model_state_bytes(s, est.trainable, gpus) / GIB:.2f}" for s in (1, 2, 3))
        print(f"| {gpus} | {cells} |")

    for micro in micro_batches:
        print(f"\npredicted peak per GPU at micro-batch {micro}, GiB: {' / '.join(VARIANTS[v] for v in est.held)}")
        print("| GPUs | ZeRO-1 | ZeRO-2 | ZeRO-3 |")
        for gpus in (8, 64, 256):
            cells = " | ".join(" / ".join(f"{predicted_peak(est, v, s, gpus, micro) / GIB:.1f}" for v in est.held)
                               for s in (1, 2, 3))
            print(f"| {gpus} | {cells} |")
        peaks = []
        for v in est.held:
            per, fixed = est.peak[v]
            peaks.append(f"{(per * micro + fixed) / GIB:.2f}")
        enc_per, enc_fixed = est.encoder_peak
        print(f"of which the activation peak {' / '.join(peaks)} GiB (frozen encoder's "
              f"{(enc_per * micro + enc_fixed) / GIB:.2f}), frozen first stage {frozen / GIB:.2f}, "
              f"buckets {COMM_BUCKETS_GIB}")

    print(f"\nlargest micro-batch whose predicted peak is <= {HEADROOM:.0%} of the card: any size / "
          f"a divisor of {global_batch} / GPUs (the global batch kept)")
    for variant in ("plain", "unet"):
        for card, cap in CARDS_GIB.items():
            for gpus in (8, 64, 256):
                cells = []
                for stage in (1, 2, 3):
                    any_size = largest_fitting(est, variant, stage, gpus, cap, range(1, 4097))
                    kept = (largest_fitting(est, variant, stage, gpus, cap, divisors(global_batch // gpus))
                            if global_batch % gpus == 0 else None)
                    cells.append(f"ZeRO-{stage} {any_size}/{kept or '-'}")
                print(f"- {VARIANTS[variant]}, {card} ({cap} GiB) x {gpus}: " + ", ".join(cells))

    print(f"\nthroughput at MFU {mfu:.2f} (model FLOPs, recomputation not counted; the encoder adds "
          f"{100 * g['encode'] / plain:.0f}% unless latents are pre-encoded)")
    for name, peak in PEAK_TFLOPS.items():
        per_gpu = mfu * peak / (plain * 1e9)
        print(f"- {name}: {per_gpu:.0f} images/s per GPU; 8 GPUs {8 * per_gpu:.0f}, 64 GPUs "
              f"{64 * per_gpu:.0f}, 256 GPUs {256 * per_gpu:.0f} images/s")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--flavour", default="txt2img_kl8")
    p.add_argument("--mfu", type=float, default=0.35)
    p.add_argument("--global-batch", type=int, default=680, help="the paper's batch for txt2img_kl8")
    p.add_argument("--micro-batch", type=int, nargs="+", default=[17, 85],
                   help="micro-batches to tabulate (17 and 85 divide 680 / 8 GPUs)")
    p.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = p.parse_args()
    est = estimate(args.flavour)
    report(est, args.mfu, args.global_batch, args.micro_batch)
    if args.json:
        args.json.write_text(json.dumps(asdict(est), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
