"""Per-rank parameter + optimizer bytes under ZeRO-2 and ZeRO-3 at world 2 vs an unsharded replica.
Target: ratio <= 0.55 (ZeRO-3).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/bench_zero_memory.py [--channels 64]

The model is the tiny text UNet (wider with --channels), bf16 with fp32 master weights and AdamW, as
on a cluster. After one optimizer step each engine reports the bytes this rank holds in parameter
tensors (the local shard under ZeRO-3), fp32 master weights and Adam moments (counted once per
storage). The unsharded reference is ZeRO stage 0 on the same two ranks (every rank a full replica).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from ldm_scale import dist  # noqa: E402
from ldm_scale.models.registry import get_spec  # noqa: E402
from ldm_scale.models.unet import UNetModel  # noqa: E402
from ldm_scale.train import engine as E  # noqa: E402


class UNetLoss(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        cfg = get_spec("tiny").unet
        cfg.model_channels = channels
        self.unet = UNetModel(cfg)

    def forward(self, x, t, context):
        return self.unet(x, t, context=context).float().pow(2).mean()


def measure(stage: int, channels: int, world: int) -> dict:
    ds = E.DeepSpeedConfig(zero=E.ZeroConfig(stage=stage, stage3_param_persistence_threshold=0), precision="bf16")
    plan = E.BatchPlan(2, 1, world)
    cfg = E.build_ds_config(ds, plan)
    torch.manual_seed(0)
    with E.model_init_context(cfg):
        model = UNetLoss(channels)
    engine = E.initialize_engine(model, cfg, E.OptimConfig(lr=1e-4), plan, total_steps=10)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randn(2, 77, 64)
    with E.autocast(cfg, torch.device("cpu")):
        loss = engine(x, t, ctx)
    engine.backward(loss)
    engine.step()
    params = sum(E.iter_local_param_bytes(engine))
    optim = E.optimizer_state_bytes(engine)
    n = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())
    return {"stage": stage, "params": params, "optimizer": optim, "total": params + optim, "numel": n}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=64)
    args = p.parse_args()
    info = dist.init_distributed()
    rows = [measure(stage, args.channels, info.world_size) for stage in (0, 2, 3)]
    gathered = dist.all_gather_object(rows)
    if info.is_main:
        base = max(r[0]["total"] for r in gathered)
        print(f"world {info.world_size}, UNet model_channels={args.channels}, {rows[0]['numel'] / 1e6:.2f}M parameters, "
              "bf16 weights + fp32 master + AdamW")
        for i, stage in enumerate((0, 2, 3)):
            worst = max(gathered, key=lambda per_rank: per_rank[i]["total"])[i]
            print(f"ZeRO-{stage}: params {worst['params'] / 2**20:7.2f} MiB + optimizer {worst['optimizer'] / 2**20:7.2f} MiB"
                  f" = {worst['total'] / 2**20:7.2f} MiB per rank (max over ranks); ratio vs unsharded "
                  f"{worst['total'] / base:.3f}")
        print("target: ZeRO-3 ratio <= 0.55")
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
