"""The quickstart: synthetic data -> tiny autoencoder -> tiny text-to-image LDM -> samples + score.

    python launch/quickstart.py [--workdir quickstart] [--nproc 2]

On a machine with only Python and 2 CPU cores (after ``pip install -e .``) this runs, through the
same entry point and configs as a cluster job:

1. ``data_tools``' synthetic LAION-shaped shards (coloured shapes with captions) under
   ``<workdir>/data/synthetic``;
2. ``torchrun launch/train.py experiment=autoencoder_tiny`` (KL f=4 autoencoder, ZeRO-2, 2 ranks);
3. ``torchrun launch/train.py experiment=quickstart`` (tiny text-conditional LDM over that
   autoencoder, ZeRO-2, 2 ranks), which writes a DDIM + classifier-free-guidance sample grid and the
   prompt-adherence score: the synthetic dataset's attribute detector applied to images generated
   for random prompts (chance level ~0.24).

Finished stages are skipped when the script is run again (delete ``<workdir>`` to start over).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ldm_scale.data.synthetic import CHANCE_ADHERENCE, write_synthetic_dataset  # noqa: E402


def torchrun(nproc: int, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO_ROOT / "launch" / "train.py"), *overrides]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: the ranks share the cores
    env.setdefault("WANDB_SILENT", "true")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    print("+ " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, env=env, cwd=REPO_ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="quickstart", help="where data, runs and checkpoints go")
    p.add_argument("--nproc", type=int, default=2, help="training processes (ranks)")
    p.add_argument("--num-samples", type=int, default=4096, help="synthetic training images")
    p.add_argument("--ae-steps", type=int, default=None, help="autoencoder steps (default: the experiment's)")
    p.add_argument("--ldm-steps", type=int, default=None, help="LDM steps (default: the experiment's)")
    args = p.parse_args(argv)
    work = Path(args.workdir).resolve()
    runs = work / "runs"
    t0 = time.time()

    # 1. Synthetic shards.
    data = work / "data" / "synthetic"
    per_shard = 256
    num_shards = -(-args.num_samples // per_shard)
    if not (data / "dataset.json").exists():
        print(f"[1/3] writing {args.num_samples} synthetic images to {data}", flush=True)
        write_synthetic_dataset(str(data), num_samples=args.num_samples, samples_per_shard=per_shard, seed=0)
    urls = f"data.urls=['{data}/{{{0:05d}..{num_shards - 1:05d}}}.tar']"
    common = [urls, f"output_dir={runs}", f"checkpoint.root={runs}/checkpoints",
              f"checkpoint.local_dir={work}/staging"]

    # 2. The tiny autoencoder (the LDM's frozen first stage).
    ae_export = runs / "checkpoints" / "quickstart-ae" / "export.pt"
    if not ae_export.exists():
        print("[2/3] training the tiny autoencoder", flush=True)
        steps = [f"train.max_steps={args.ae_steps}"] if args.ae_steps else []
        torchrun(args.nproc, ["experiment=autoencoder_tiny", "run_id=quickstart-ae", *common, *steps])

    # 3. The tiny text-to-image LDM, its samples and the prompt-adherence score.
    result_path = runs / "quickstart-ldm" / "result.json"
    if not result_path.exists():
        print("[3/3] training the tiny text-to-image LDM", flush=True)
        steps = [f"train.max_steps={args.ldm_steps}"] if args.ldm_steps else []
        torchrun(args.nproc, ["experiment=quickstart", "run_id=quickstart-ldm", f"model.first_stage_ckpt={ae_export}",
                              *common, *steps])

    result = json.loads(result_path.read_text())
    grids = sorted((runs / "quickstart-ldm" / "samples").glob("*.png"))
    adherence = result.get("eval/prompt_adherence")
    print("\nquickstart finished in %.1f min" % ((time.time() - t0) / 60))
    print(f"  sample grid:       {grids[-1] if grids else '(none)'}")
    if adherence is not None:
        print(f"  prompt adherence:  {adherence:.3f} (chance {CHANCE_ADHERENCE:.3f})")
    print(f"  exported model:    {runs / 'checkpoints' / 'quickstart-ldm' / 'export.pt'}")
    print(f"  metrics:           {runs / 'quickstart-ldm' / 'metrics.jsonl'} (W&B offline run in the same directory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
