"""CPU step time of this tree's training step vs an older tree's, same model and batch, 1 and 2
ranks, alternating A/B processes (issue 12: new / old <= 1.0).

    git worktree add /tmp/old_tree <old commit>
    OMP_NUM_THREADS=1 python benchmarks/bench_step_vs_old.py --old /tmp/old_tree [--rounds 3] [--steps 6]

Each round runs benchmarks/step_time.py once against each tree (PYTHONPATH selects the tree; the
worker script is this tree's, and it drives either API), in alternating order, on tiny synthetic
shards; the medians of the per-round medians give the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(tree: Path, url: str, ranks: int, steps: int, micro: int, port: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if ranks == 1:  # the old tree needs a hand-set world of one (plain python made DeepSpeed look for MPI)
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker = [str(REPO / "benchmarks" / "step_time.py"), url, str(steps), str(micro)]
    cmd = ([sys.executable, *worker] if ranks == 1 else
           [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", *worker])
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    line = next((l for l in out.stdout.splitlines() if l.startswith("STEP_MS ")), None)
    if line is None:
        raise RuntimeError(f"{tree}: {out.stderr[-3000:]}")
    return json.loads(line[len("STEP_MS "):])["median"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--old", required=True, type=Path)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=4)
    args = p.parse_args()
    from ldm_scale.data.synthetic import write_synthetic_dataset

    data = tempfile.mkdtemp(prefix="bench_step_")
    write_synthetic_dataset(data, num_samples=256, samples_per_shard=64, seed=0, min_size=32, max_size=40)
    url = f"{data}/{{00000..00003}}.tar"
    for ranks in (1, 2):
        new, old = [], []
        for r in range(args.rounds):
            order = [("new", REPO), ("old", args.old)] if r % 2 == 0 else [("old", args.old), ("new", REPO)]
            for name, tree in order:
                ms = run(tree, url, ranks, args.steps, args.micro_batch, 29800 + r)
                (new if name == "new" else old).append(ms)
        n, o = statistics.median(new), statistics.median(old)
        print(f"{ranks} rank(s): new {n:.1f} ms/step {[round(x) for x in new]}, old {o:.1f} ms/step "
              f"{[round(x) for x in old]}: new / old = {n / o:.3f} (target <= 1.0); load {os.getloadavg()[0]:.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
