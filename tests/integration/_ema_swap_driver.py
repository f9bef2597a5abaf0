"""CpuEma.swapped_in with real DeepSpeed engines (run under torchrun, 2 ranks, gloo, CPU).

For each ZeRO stage given: two identical engines train side by side on the same batches; engine A
samples with its EMA swapped in after step 3, engine B never does. Checks, printed as
``CHECK <stage> <name> <value>`` lines for the test to assert on:
- inside the block the module computes what a plain copy of the model loaded with the full EMA
  computes (max abs output difference);
- after the block the parameters are bitwise the trained ones (number of differing tensors);
- the losses of the following steps equal engine B's bitwise (the swap left no trace in training).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from ldm_scale import dist
from ldm_scale.train.ema import CpuEma, EmaConfig, assemble_full_state_dict
from tests.integration._ckpt_driver import ToyLoader, full_params


def build(stage: int):
    import deepspeed

    from ldm_scale.train import ds_ops

    ds_ops.prepare()  # as training does: no JIT build of the CPU shm comm op training never uses
    torch.manual_seed(4321)
    model = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 4))
    # A persistence threshold above the biases' size keeps them whole on every rank under ZeRO-3:
    # the swap must handle both persistent and partitioned parameters.
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 64},
          "steps_per_print": 10**9}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine


def step(engine, batch) -> float:
    x, y = batch
    loss = nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    return float(loss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="2,3")
    args = ap.parse_args()
    info = dist.init_distributed()
    probe = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    for stage in (int(s) for s in args.stages.split(",")):
        a, b = build(stage), build(stage)
        ema = CpuEma(a.module, EmaConfig(decay=0.5, async_update=False))  # fast-moving: differs from weights
        loader_a, loader_b = ToyLoader(info.rank), ToyLoader(info.rank)
        for n in range(1, 4):
            step(a, next(loader_a)), step(b, next(loader_b))
            ema.update(n)
        trained = full_params(a)
        full_ema = ema.full_state_dict(dst=None)
        # The flat-tensor gather (chunked, to all ranks or to one) equals the shards' own assembly.
        shards = [None] * info.world_size
        torch.distributed.all_gather_object(shards, ema.state_dict())
        assembled = assemble_full_state_dict(shards)
        to_rank0 = ema.full_state_dict(dst=0, chunk_numel=7)
        gathers_match = all(torch.equal(full_ema[k], v) for k, v in assembled.items()) and (
            (to_rank0 is None) != info.is_main) and (to_rank0 is None or all(
                torch.equal(to_rank0[k], v) for k, v in assembled.items()))
        gathers_match = all(dist.all_gather_object(gathers_match))
        reference = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 4))
        reference.load_state_dict(full_ema)
        with ema.swapped_in(chunk_numel=600):  # several chunks: 1,316 parameters in 6 tensors
            with torch.no_grad():
                out = a(probe)  # a collective forward under ZeRO-3
            inside = full_params(a)
        ema_vs_reference = float((out - reference(probe)).abs().max())
        ema_in_params = max(float((inside[k] - full_ema[k]).abs().max()) for k in full_ema)
        restored = sum(not torch.equal(v, trained[k]) for k, v in full_params(a).items())
        moved = max(float((trained[k] - full_ema[k]).abs().max()) for k in full_ema)
        same_losses = all(step(a, next(loader_a)) == step(b, next(loader_b)) for _ in range(3))
        if info.is_main:
            print(f"CHECK {stage} ema_vs_weights {moved:.3e}", flush=True)
            print(f"CHECK {stage} output_vs_reference {ema_vs_reference:.3e}", flush=True)
            print(f"CHECK {stage} params_vs_ema {ema_in_params:.3e}", flush=True)
            print(f"CHECK {stage} tensors_not_restored {restored}", flush=True)
            print(f"CHECK {stage} same_losses_after {same_losses}", flush=True)
            print(f"CHECK {stage} flat_gather_equals_shards {gathers_match}", flush=True)
        ema.close()
        dist.barrier()


if __name__ == "__main__":
    main()
