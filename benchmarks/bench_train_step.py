"""Our training step (LDMTask: DeepSpeed engine, the step-health decision, EMA-ready bookkeeping) vs a bare PyTorch
loop on the same model and batch, 1 rank. Target: ratio <= 1.10.

    OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py [--steps 6] [--rounds 3] [--channels 64]

Both sides run the same work per step: encode the batch with the frozen first stage, embed the
captions, the diffusion loss (``diffusion_loss``), backward, gradient clipping at 1.0, AdamW.
They are timed in alternating rounds (ours, bare, ours, bare, ...) so that load from other processes
hits both alike; the median per-step time of each side gives the ratio.
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
for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "29731", "WANDB_MODE": "disabled"}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402

from ldm_scale import config as C  # noqa: E402
from ldm_scale import dist  # noqa: E402
from ldm_scale.diffusion import diffusion_loss  # noqa: E402
from ldm_scale.models.registry import build_ldm  # noqa: E402
from ldm_scale.train.engine import param_groups  # noqa: E402
from ldm_scale.train.health import StepHealth  # noqa: E402
from ldm_scale.train.tasks import build_task  # noqa: E402


def make_batch(n: int, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    captions = [f"a red circle on a blue background {i}" for i in range(n)]
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "caption": captions}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=64, help="UNet model_channels (tiny flavour: 32)")
    p.add_argument("--stage", type=int, default=0, help="ZeRO stage of our engine (0: nothing to shard at 1 rank)")
    p.add_argument("--profile", action="store_true",
                   help="after the timing, cProfile a round of each side and print where the time goes")
    args = p.parse_args()
    dist.init_distributed()
    torch.manual_seed(0)

    overrides = ["experiment=quickstart", "model.allow_random_first_stage=true", "data.urls=['unused.tar']",
                 f"train.micro_batch_size={args.micro_batch}", f"deepspeed.zero.stage={args.stage}", "deepspeed.precision=fp32",
                 "diffusion.cond_drop_prob=0.0", "model.scale_factor_mode=spec", "optim.warmup_steps=0", "optim.schedule=constant",
                 f"model.ldm.unet.model_channels={args.channels}", "checkpoint.root=/tmp/unused"]
    cfg = C.to_object(C.compose(overrides))
    plan = C.validate(cfg, world_size=1)
    batch = make_batch(args.micro_batch, plan.image_size)

    ours = build_task(cfg, plan, device=torch.device("cpu"), total_steps=10_000)

    # The bare loop: the same networks, plain autograd, the fastest torch AdamW on this device
    # (fused: 4x the default for-loop kernel on CPU) with the same two parameter groups, and
    # torch's multi-tensor clip_grad_norm_: the well-tuned alternative, not the default one.
    torch.manual_seed(0)
    ldm = build_ldm(plan.spec)
    ldm.scale_factor.fill_(float(ours.ldm.scale_factor))
    params = [q for q in ldm.parameters() if q.requires_grad]
    trained = torch.nn.ModuleList([ldm.unet, ldm.cond_stage])
    optimizer = torch.optim.AdamW(param_groups(trained, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=True)
    schedule = cfg.diffusion.make_schedule()

    def bare_step() -> None:
        with torch.no_grad():
            z0 = ldm.first_stage.encode_to_latent(batch["image"]) * ldm.scale_factor
        cond = ldm.condition(batch["caption"])
        loss, _ = diffusion_loss(lambda x, t: ldm.apply_model(x, t, cond), z0, schedule)
        loss = loss.mean()
        if not torch.isfinite(loss):
            raise RuntimeError("bare loop loss is not finite")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()

    health = StepHealth(max_consecutive_unhealthy=5)

    def ours_step() -> None:
        # What the loop does per optimizer step: the task's step and the one collective health decision.
        health.decide(ours.train_step([batch], 0).health, 0)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return (time.perf_counter() - t0) / args.steps

    timed(ours_step), timed(bare_step)  # warm-up: allocator, first-batch scale factor, lazy inits
    ours_t, bare_t = [], []
    for _ in range(args.rounds):
        ours_t.append(timed(ours_step))
        bare_t.append(timed(bare_step))
    o, b = statistics.median(ours_t), statistics.median(bare_t)
    print(f"UNet model_channels={args.channels}, micro-batch {args.micro_batch}, {args.steps} steps x {args.rounds} rounds")
    print(f"ours (LDMTask + DeepSpeed ZeRO-{args.stage}, 1 rank): {o * 1000:.1f} ms/step  (rounds: {[round(x * 1000) for x in ours_t]})")
    print(f"bare PyTorch loop:                         {b * 1000:.1f} ms/step  (rounds: {[round(x * 1000) for x in bare_t]})")
    print(f"ratio ours / bare = {o / b:.3f}  (target <= 1.10)")
    if args.profile:
        profile_sides({"ours": ours_step, "bare": bare_step}, args.steps)
    return 0


def profile_sides(sides: dict, steps: int) -> None:
    """cProfile ``steps`` steps of each side (warm already) and print the functions with the most
    own time, so the two sides' extra work can be read side by side."""
    import cProfile
    import pstats

    for name, fn in sides.items():
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            fn()
        profiler.disable()
        print(f"--- {name}: top functions by own time over {steps} steps")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    sys.exit(main())
