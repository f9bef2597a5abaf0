"""Worker for tests/integration/test_train_engine.py: many engine checks in ONE torchrun launch
(each launch costs ~20-40 s here). Prints one ``RESULT {json}`` line per check on rank 0.

Checks (2 ranks, CPU/gloo, the tiny LDM's real UNet):
- zero1 fp32, zero2 bf16, zero3 bf16: the loss on a fixed batch decreases;
- zero3: the model was built partitioned (zero.Init) and each rank holds about half of the
  parameter + optimizer bytes of an unsharded bf16 run;
- gradient accumulation: micro 2 x accumulation 2 gives the same loss and update as micro 4 x 1;
- non-finite loss: a NaN on ONE rank makes BOTH ranks skip the optimizer step (DeepSpeed's
  overflow check; ZeRO-0 fp32 through our guard), the health rule agrees on every rank and stops
  after its limit, weights untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch

from ldm_scale import dist
from ldm_scale.models.registry import get_spec
from ldm_scale.models.unet import UNetModel
from ldm_scale.train import engine as E
from ldm_scale.train.health import StepHealth, UnhealthyRunError, local_health


class FixedTargetUNet(torch.nn.Module):
    """The tiny UNet regressing fixed targets at fixed timesteps: a deterministic loss."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = UNetModel(get_spec("tiny").unet)

    def forward(self, x, t, context, target):
        return (self.unet(x, t, context=context).float() - target).pow(2).flatten(1).mean(1)


def fixed_batch(n: int, rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 77, 64, generator=g), torch.randn(n, 4, 8, 8, generator=g))


def build(stage: int, precision: str, micro: int, accum: int, world: int, optim: E.OptimConfig, clip: float = 0.0):
    ds = E.DeepSpeedConfig(zero=E.ZeroConfig(stage=stage, stage3_param_persistence_threshold=0),
                           precision=precision, gradient_clipping=clip)
    plan = E.BatchPlan(micro, accum, world)
    cfg = E.build_ds_config(ds, plan)
    torch.manual_seed(0)
    with E.model_init_context(cfg):
        model = FixedTargetUNet()
    E.initialize_partitioned(model)  # as LDMTask does
    return E.initialize_engine(model, cfg, optim, plan, total_steps=100), cfg


def zero_init_abs(engine, stage: int) -> float:
    """Sum of |w| over the UNet's zero-initialised layers (output conv, ResBlock last convs,
    transformer proj_out), gathered whole under ZeRO-3: 0 for a correctly initialised model."""
    params = [p for m in engine.module.modules() if getattr(m, "_zero_init", False) for p in m.parameters()]
    gather = E.gathered_parameters(params, modifier_rank=None) if stage == 3 else contextlib.nullcontext()
    with gather:
        return sum(float(p.detach().float().abs().sum()) for p in params)


def report(name: str, **values) -> None:
    if dist.get_dist_info().is_main:
        print("RESULT " + json.dumps({"check": name, **values}), flush=True)


def loss_decreases(stage: int, precision: str, world: int, rank: int) -> None:
    engine, cfg = build(stage, precision, 4, 1, world, E.OptimConfig(lr=2e-3))
    fresh_zero_layers = zero_init_abs(engine, stage)
    x, t, ctx, target = fixed_batch(4, rank)
    losses = []
    for _ in range(8):
        with E.autocast(cfg, torch.device("cpu")):
            loss = engine(x, t, ctx, target).mean()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    params = sum(p.numel() for p in engine.module.parameters() if getattr(p, "ds_tensor", None) is None)
    report(f"zero{stage}_{precision}", losses=losses, local_bytes=E.local_param_and_optimizer_bytes(engine),
           unpartitioned_params=params, global_steps=engine.global_steps, fresh_zero_layers=fresh_zero_layers)


def accumulation_equivalence(world: int, rank: int) -> None:
    # Large eps turns Adam's first step into lr * g / eps: the update is proportional to the gradient.
    optim = E.OptimConfig(lr=1.0, eps=1e3)
    x, t, ctx, target = fixed_batch(4, rank)
    results = {}
    for micro, accum in [(4, 1), (2, 2)]:
        engine, _ = build(2, "fp32", micro, accum, world, optim)
        before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        losses = []
        for i in range(accum):
            sl = slice(i * micro, (i + 1) * micro)
            loss = engine(x[sl], t[sl], ctx[sl], target[sl]).mean()
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        delta = torch.cat([(p.detach() - before[n]).flatten() for n, p in engine.module.named_parameters()])
        results[(micro, accum)] = (sum(losses) / len(losses), delta, engine.global_steps)
    (l1, d1, s1), (l2, d2, s2) = results[(4, 1)], results[(2, 2)]
    report("accumulation", loss_micro4=l1, loss_micro2x2=l2, steps=[s1, s2],
           update_rel_diff=float((d1 - d2).norm() / d1.norm()), update_norm=float(d1.norm()))


def nonfinite_skip(stage: int, precision: str, world: int, rank: int) -> None:
    engine, cfg = build(stage, precision, 4, 1, world, E.OptimConfig(lr=1e-3))
    x, t, ctx, target = fixed_batch(4, rank)
    if rank == 1:
        target = target.clone()
        target[0, 0, 0, 0] = float("nan")  # only rank 1 sees a bad sample
    before = [p.detach().clone() for p in engine.module.parameters()]
    health = StepHealth(max_consecutive_unhealthy=3)
    verdicts, applied, error = [], [], ""
    # What the training loop does: backward and step regardless (no per-micro-batch check), then
    # one collective health decision per optimizer step.
    try:
        for _ in range(5):
            with E.autocast(cfg, torch.device("cpu")):
                loss = engine(x, t, ctx, target).mean()
            engine.backward(loss)
            engine.step()
            ok, norm, searching = E.step_status(engine, cfg)
            applied.append(ok)
            vec = local_health(loss.detach().float(), 1, (~torch.isfinite(loss.detach())).float(), norm, ok, searching)
            verdicts.append(health.decide(vec, 0).reason.value)
    except UnhealthyRunError as exc:
        error = str(exc)
    unchanged = all(torch.equal(a, p.detach()) for a, p in zip(before, engine.module.parameters()))
    report(f"nonfinite_zero{stage}_{precision}", verdicts=dist.all_gather_object(verdicts), unchanged=dist.all_gather_object(unchanged),
           applied=dist.all_gather_object(applied), skipped=health.skipped, error=error)


def clipping(stage: int, world: int, rank: int) -> None:
    """One fp32 step with gradient clipping at 0.02 (active: the norm is far above it) against
    plain torch on all ranks' batches: mean loss, clip_grad_norm_, AdamW. ZeRO-0 clips in our
    checked step (engine._guard_unchecked_optimizer), ZeRO-2 in DeepSpeed's optimizer. A huge eps
    makes Adam's first step lr * g / eps (Adam is otherwise blind to a gradient's scale), so the
    update shows whether and how much the gradient was clipped."""
    optim = E.OptimConfig(lr=1e3, eps=1e3)
    engine, _ = build(stage, "fp32", 4, 1, world, optim, clip=0.02)
    start = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    x, t, ctx, target = fixed_batch(4, rank)
    engine.backward(engine(x, t, ctx, target).mean())
    engine.step()
    ours = torch.cat([p.detach().flatten() for p in engine.module.parameters()]) - start
    updates = {}
    for clip in (0.02, None):
        torch.manual_seed(0)
        model = FixedTargetUNet()  # the engine's initial weights (same seed)
        loss = sum(model(*fixed_batch(4, r)).mean() for r in range(world)) / world
        loss.backward()
        if clip is not None:
            updates["reference_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                          weight_decay=0.0).step()
        updates[clip] = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    report(f"clip_zero{stage}", norm=float(engine.get_global_grad_norm()), reference_norm=updates["reference_norm"],
           rel_diff_clipped=float((ours - updates[0.02]).norm() / updates[0.02].norm()),
           rel_diff_unclipped=float((ours - updates[None]).norm() / updates[None].norm()))


def main() -> int:
    info = dist.init_distributed()
    world, rank = info.world_size, info.rank
    # ZeRO-3 first: zero.Init must work before any engine has set up deepspeed.comm.
    for stage, precision in [(3, "bf16"), (1, "fp32"), (2, "bf16")]:
        loss_decreases(stage, precision, world, rank)
    report("unsharded_bytes", **{"bytes": unsharded_bytes()})
    accumulation_equivalence(world, rank)
    for stage, precision in [(3, "bf16"), (2, "fp32"), (0, "fp32")]:
        nonfinite_skip(stage, precision, world, rank)
    for stage in (0, 2):
        clipping(stage, world, rank)
    dist.barrier()
    return 0


def unsharded_bytes() -> int:
    """One unsharded bf16 replica: bf16 weights + fp32 master weights + AdamW's two fp32 moments."""
    model = FixedTargetUNet()
    n = sum(p.numel() for p in model.parameters())
    return n * (2 + 4 + 4 + 4)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
