"""Training-loop stall caused by a checkpoint vs the full upload time (target: stall / upload <= 0.2).

One process trains a DeepSpeed engine (an MLP of ``--params`` parameters, AdamW, CPU) with a CPU EMA
and checkpoints once to a real S3 API server (``moto_server`` in its own process on 127.0.0.1):

- ``upload``: from ``save()`` until COMPLETE and ``latest`` are on the server (the full checkpoint
  latency: local write + upload + confirmation);
- ``stall``: the wall time the loop lost: the ``save()`` call itself plus, for the steps that ran
  while the upload was in flight, their excess over the median step time without a checkpoint.

    python benchmarks/bench_checkpoint_stall.py [--params 10e6]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> tuple:
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    # The S3 server stands in for a remote store: niced, so its CPU use on this box does not
    # count against the training loop (a real store runs elsewhere).
    proc = subprocess.Popen(["nice", "-n", "19", exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-west-2"})
    import boto3

    boto3.client("s3", region_name="us-west-2").create_bucket(
        Bucket="bench", CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=10e6)
    ap.add_argument("--baseline-steps", type=int, default=8)
    args = ap.parse_args()
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        os.environ.setdefault(k, v)
    s3 = start_s3()
    try:
        import deepspeed
        import torch
        from torch import nn

        from ldm_scale.train import ds_ops
        from ldm_scale.train.checkpoint import CheckpointConfig, CheckpointManager, standard_states
        from ldm_scale.train.ema import CpuEma, EmaConfig

        ds_ops.prepare()  # as training does (no JIT build of the CPU shm comm op)
        width = int((args.params / 4) ** 0.5)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(4)])
        ds = {"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), 1e-4),
                                               config=ds)
        ema = CpuEma(engine.module, EmaConfig())
        local = tempfile.mkdtemp(prefix="bench_ckpt_")
        manager = CheckpointManager(CheckpointConfig(root="s3://bench/ckpt", local_dir=local, poll_interval_s=0.05),
                                    run_id="bench")
        x = torch.randn(64, width)

        def step() -> float:
            t0 = time.perf_counter()
            loss = engine(x).pow(2).mean()
            engine.backward(loss)
            engine.step()
            ema.update(engine.global_steps)
            return time.perf_counter() - t0

        for _ in range(2):
            step()
        baseline = statistics.median(step() for _ in range(args.baseline_steps))

        t0 = time.perf_counter()
        manager.save(engine.global_steps, standard_states(engines={"model": engine}, ema=ema),
                     client_state={"step": engine.global_steps})
        save_call = time.perf_counter() - t0
        during = []
        while manager.upload_pending:
            during.append(step())
        upload = time.perf_counter() - t0
        manager.wait()
        excess = sum(max(0.0, d - baseline) for d in during)
        stall = save_call + excess
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(local) for f in fs)
        print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, checkpoint {size / 1e6:.0f} MB")
        print(f"step (no checkpoint)  {baseline * 1e3:8.1f} ms")
        print(f"save() call           {save_call * 1e3:8.1f} ms  (local write)")
        print(f"steps during upload   {len(during):5d}   excess {excess * 1e3:8.1f} ms")
        print(f"full upload           {upload * 1e3:8.1f} ms")
        print(f"stall / upload        {stall / upload:.3f}  (target <= 0.2)")
        manager.close()
        ema.close()
    finally:
        s3.kill()
        s3.wait()


if __name__ == "__main__":
    main()
