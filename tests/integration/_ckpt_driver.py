"""A toy DeepSpeed training run that exercises CpuEma + CheckpointManager (run under torchrun).

Independent of the training spine: a small MLP, a deterministic per-rank "loader" with exact
state, target noise from the global torch RNG (so RNG restore matters), gradient accumulation.
Losses are appended to ``<out>/losses_rank<R>.jsonl`` with the torchrun restart count, so a test
can compare the steps replayed after a kill with the first attempt, or with another run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
from torch import nn

from ldm_scale import dist, storage
from ldm_scale.train.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    standard_states,
)
from ldm_scale.train.ema import CpuEma, EmaConfig


class ToyLoader:
    """Batch i of rank r is a pure function of (seed, r, i); the state is the next index."""

    def __init__(self, rank: int, batch: int = 4, seed: int = 0):
        self.rank, self.batch, self.seed, self.index = rank, batch, seed, 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + self.index)
        self.index += 1
        x = torch.randn(self.batch, 16, generator=g)
        return x, torch.sin(x[:, :4] * 2.0)

    def state_dict(self):
        return {"index": self.index, "rank": self.rank}

    def load_state_dict(self, sd):
        self.index = int(sd["index"])


def build_engine(stage: int, hidden: int, accum: int):
    import deepspeed

    from ldm_scale.train import ds_ops

    ds_ops.prepare()  # as training does: no JIT build of the CPU shm comm op training never uses

    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(16, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                          nn.Linear(hidden, 4))
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": accum, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
          "steps_per_print": 10**9}
    # A torch optimizer keeps DeepSpeed from JIT-building its fused Adam on CPU.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return engine


def full_params(engine) -> dict:
    """Gathered fp32 parameters (collective under ZeRO-3); every rank gets them."""
    params = list(engine.module.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().clone().float() for n, p in engine.module.named_parameters()}
    return {n: p.detach().clone().float() for n, p in engine.module.named_parameters()}


def checksum(params: dict) -> float:
    return float(sum(p.double().sum() for p in params.values()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--root", required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--keep-last", type=int, default=2)
    ap.add_argument("--keep-every", type=int, default=0)
    ap.add_argument("--resume", default="auto")
    ap.add_argument("--kill-at", type=int, default=0, help="rank 1 SIGKILLs itself after this step (attempt 0)")
    ap.add_argument("--ema-check", action="store_true", help="compare with an EMA of gathered full params")
    ap.add_argument("--error-checks", action="store_true", help="try bad resumes first (expects clear errors)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    info = dist.init_distributed()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, f"losses_rank{info.rank}.jsonl")
    storage.configure(storage.StorageConfig(retries=6, backoff_s=0.3, max_backoff_s=2.0, timeout_s=10.0))
    ckpt_cfg = CheckpointConfig(root=args.root, local_dir=os.path.join(args.out, "local"), every_steps=args.every,
                                keep_last=args.keep_last, keep_every=args.keep_every or None, resume=args.resume,
                                poll_interval_s=0.1, confirm_timeout_s=120)

    engine = build_engine(args.stage, 32, args.accum)
    ema = CpuEma(engine.module, EmaConfig(decay=0.9))
    loader = ToyLoader(info.rank)
    states = standard_states(engines={"model": engine}, ema=ema, loader=loader)
    if args.error_checks:
        # A different model (hidden width) must be refused before anything is loaded.
        wrong = build_engine(args.stage, 24, args.accum)
        try:
            CheckpointManager(ckpt_cfg, run_id=args.run_id).resume(standard_states(engines={"model": wrong}))
            print("ERROR_CHECK other_model: no error", flush=True)
        except CheckpointError as exc:
            print(f"ERROR_CHECK other_model: {exc}", flush=True)
        for url in os.environ.get("BAD_RESUME_URLS", "").split(","):
            bad = CheckpointConfig(**{**ckpt_cfg.__dict__, "resume": url})
            try:
                CheckpointManager(bad, run_id=args.run_id).resume(states)
                print(f"ERROR_CHECK {url}: no error", flush=True)
            except CheckpointError as exc:
                print(f"ERROR_CHECK {url.rsplit('/', 1)[-1]}: {exc}", flush=True)

    manager = CheckpointManager(ckpt_cfg, run_id=args.run_id)
    resumed = manager.resume(states) or {}
    step = int(engine.global_steps)
    samples_seen = int(resumed.get("samples_seen", 0))
    if resumed:
        print(f"RESUMED step={step} world={info.world_size} from_world={resumed['world_size']} "
              f"ema_updates={ema.num_updates} params={checksum(full_params(engine)):.10f}", flush=True)
        assert resumed["step"] == step and resumed["wandb_run_id"] == "wandb-toy"

    reference = None
    if args.ema_check:
        reference = {n: p.clone() for n, p in full_params(engine).items()}
    while step < args.steps:
        losses = []
        for _ in range(args.accum):
            x, y = next(loader)
            noise = 0.01 * torch.randn(y.shape)  # global RNG: restored by the checkpoint
            loss = (engine(x) - (y + noise)).pow(2).mean()
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        step = int(engine.global_steps)
        samples_seen += 4 * args.accum * info.world_size
        mean = torch.tensor([sum(losses) / len(losses)])
        dist.all_reduce_sum(mean)
        ema.update(step)
        if reference is not None:
            d = ema.cfg.decay if not ema.cfg.use_num_updates else min(ema.cfg.decay, (1 + step) / (10 + step))
            for n, p in full_params(engine).items():
                reference[n].mul_(d).add_(p, alpha=1 - d)
        with open(log_path, "a") as f:
            f.write(json.dumps({"attempt": attempt, "step": step, "loss": float(mean) / info.world_size}) + "\n")
        if manager.due(step):
            manager.save(step, states,
                         client_state={"step": step, "samples_seen": samples_seen, "wandb_run_id": "wandb-toy",
                                       "config": {"stage": args.stage, "storage": {"endpoint_url": None}}})
            value = checksum(full_params(engine))  # a gather under ZeRO-3: every rank takes part
            if info.is_main:  # one writer: two ranks' prints on one pipe can interleave mid-line
                print(f"SAVED step={step} params={value:.10f}", flush=True)
        if args.kill_at and attempt == 0 and args.kill_at - step == 1:
            manager.wait()  # the checkpoint before the kill is durable: the restart resumes from it
        if args.kill_at and attempt == 0 and step == args.kill_at and info.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    full_ema = ema.full_state_dict(dst=0)
    if info.is_main:
        if reference is not None:
            diff = max(float((full_ema[n] - reference[n]).abs().max()) for n in reference)
            print(f"EMA_MAX_DIFF {diff:.3e} updates={ema.num_updates}", flush=True)
        torch.save(full_ema, os.path.join(args.out, f"ema_final_attempt{attempt}.pt"))
    manager.close()
    ema.close()
    print(f"DONE step={step}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
