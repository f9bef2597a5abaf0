"""The quickstart: synthetic data -> tiny autoencoder -> tiny text-to-image LDM -> samples + score.

    python launch/quickstart.py [--workdir quickstart] [--nproc 2]

On a machine with only Python and 2 CPU cores (after ``pip install -e .``) this runs, through the
same entry points and configs as a cluster job:

1. ``data_tools``' synthetic LAION-shaped shards (coloured shapes with captions) under
   ``<workdir>/data/synthetic``, and a word-level WordPiece ``vocab.txt`` of their captions;
2. ``torchrun launch/train.py experiment=autoencoder_tiny`` (KL f=4 autoencoder, ZeRO-2, 2 ranks);
3. ``data_tools/precompute_latents.py``: the shards encoded once by that autoencoder into latent
   shards (posterior mean + log-variance) under ``<workdir>/data/latents``, so LDM steps skip
   JPEG decoding and the encoder (paper Sec. 3: the first stage is trained once and reused);
4. ``torchrun launch/train.py experiment=quickstart`` (tiny text-conditional LDM on those latents,
   ZeRO-2, 2 ranks), which writes a DDIM + classifier-free-guidance sample grid, the
   fixed-timestep validation loss on a held-out set (256 other images, encoded the same way) and the
   prompt-adherence score: the synthetic dataset's attribute detector applied to images generated
   for random prompts (chance level ~0.24). ``--experiment quickstart_dit`` trains the tiny
   PixArt-style transformer with rectified flow instead (run ``quickstart-dit``, Euler samples), on
   the same autoencoder and latents.

``--buckets`` trains the LDM stage on wide and tall images instead (aspect ratios up to 3:1, a second
synthetic set): latents encoded in aspect-ratio buckets of ~32^2 px (16x48, 32x32, 48x16:
``precompute_latents.py buckets.*``), batches of one bucket each, the denoiser micro-conditioned on
size and crop (SDXL), and a grid of one sample per bucket (run ``quickstart-ldm-buckets`` /
``quickstart-dit-buckets``; the autoencoder and the held-out set are shared).

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

from ldm_scale.data.caption_vocab import tokenizer_overrides, write_caption_vocab  # noqa: E402
from ldm_scale.data.synthetic import CHANCE_ADHERENCE, write_synthetic_dataset  # noqa: E402

# The synthetic captions use ~20 words: a 64-row embedding table instead of CLIP's 49408 rows, which
# (3.2M of the 5M trained parameters) would dominate the optimizer step and gradient exchange of
# every CPU step. data_tools/build_vocab.py applies the same idea, with its rule, to any shards.
CAPTION_VOCAB_ROWS = 64
HELDOUT_SAMPLES = 256
# The LDM stage's experiment -> its run id (the autoencoder, data and latents are shared).
LDM_EXPERIMENTS = {"quickstart": "quickstart-ldm", "quickstart_dit": "quickstart-dit"}
VAL_EVERY = 325  # the validation loss 4 times in the experiment's 1300 steps, and at the end
# --buckets: images up to 3:1 either way, buckets of ~32^2 px in 16 px steps (the tiny models' size
# multiple: f=4 x UNet 4 or DiT patch 2 x 2) up to 3:1, i.e. 16x48, 32x32 and 48x16.
WIDE_MAX_ASPECT = 3.0
BUCKET_STEP, BUCKET_MAX_ASPECT = 16, 3.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: the ranks share the cores
    env.setdefault("WANDB_SILENT", "true")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun(nproc: int, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO_ROOT / "launch" / "train.py"), *overrides]
    print("+ " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, env=_env(), cwd=REPO_ROOT, check=True)


def python_tool(args: list[str]) -> None:
    """Run a repository CLI (one process) with the quickstart's environment."""
    print("+ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], env=_env(), cwd=REPO_ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="quickstart", help="where data, runs and checkpoints go")
    p.add_argument("--nproc", type=int, default=2, help="training processes (ranks)")
    p.add_argument("--num-samples", type=int, default=4096, help="synthetic training images")
    p.add_argument("--ae-steps", type=int, default=None, help="autoencoder steps (default: the experiment's)")
    p.add_argument("--ldm-steps", type=int, default=None, help="LDM steps (default: the experiment's)")
    p.add_argument("--experiment", default="quickstart", choices=LDM_EXPERIMENTS,
                   help="the LDM stage: the tiny UNet (quickstart) or the tiny DiT trained with rectified flow")
    p.add_argument("--buckets", action="store_true",
                   help="train the LDM stage on wide and tall images in aspect-ratio buckets (see above)")
    args = p.parse_args(argv)
    work = Path(args.workdir).resolve()
    runs = work / "runs"
    t0 = time.time()

    # 1. Synthetic shards and the vocabulary of their captions.
    data = work / "data" / "synthetic"
    per_shard = 256
    num_shards = -(-args.num_samples // per_shard)
    shards = f"{{{0:05d}..{num_shards - 1:05d}}}.tar"
    if not (data / "dataset.json").exists():
        print(f"[1/4] writing {args.num_samples} synthetic images to {data}", flush=True)
        write_synthetic_dataset(str(data), num_samples=args.num_samples, samples_per_shard=per_shard, seed=0)
    # A held-out set (other seed, other images) for the fixed-timestep validation loss.
    heldout = work / "data" / "heldout"
    if not (heldout / "dataset.json").exists():
        write_synthetic_dataset(str(heldout), num_samples=HELDOUT_SAMPLES, samples_per_shard=HELDOUT_SAMPLES, seed=1)
    vocab = work / "data" / "vocab.txt"
    if not vocab.exists():
        size = write_caption_vocab([str(data / f"{i:05d}.tar") for i in range(num_shards)], vocab)
        print(f"      caption vocabulary: {size} tokens in {vocab}", flush=True)
    common = [f"output_dir={runs}", f"checkpoint.root={runs}/checkpoints", f"checkpoint.local_dir={work}/staging"]

    # 2. The tiny autoencoder (the LDM's frozen first stage).
    ae_export = runs / "checkpoints" / "quickstart-ae" / "export.pt"
    if not ae_export.exists():
        print("[2/4] training the tiny autoencoder", flush=True)
        steps = [f"train.max_steps={args.ae_steps}"] if args.ae_steps else []
        torchrun(args.nproc, ["experiment=autoencoder_tiny", "run_id=quickstart-ae", f"data.urls=['{data}/{shards}']",
                              *common, *steps])

    # 3. Latent shards: the images encoded once by the frozen autoencoder.
    latents, bucketing = work / "data" / "latents", []
    if args.buckets:
        # Wide and tall images (another synthetic set) encoded at their buckets' sizes.
        data, latents = work / "data" / "synthetic_wide", work / "data" / "latents_buckets"
        bucketing = ["buckets.enabled=true", f"buckets.step={BUCKET_STEP}", f"buckets.max_aspect={BUCKET_MAX_ASPECT}"]
        if not (data / "dataset.json").exists():
            print(f"      writing {args.num_samples} wide and tall synthetic images to {data}", flush=True)
            write_synthetic_dataset(str(data), num_samples=args.num_samples, samples_per_shard=per_shard, seed=2,
                                    max_aspect=WIDE_MAX_ASPECT)
    if not (latents / "dataset.json").exists():
        print(f"[3/4] encoding the images into latent shards under {latents}", flush=True)
        python_tool(["data_tools/precompute_latents.py", f"data={data}/{shards}", f"out={latents}",
                     f"ckpt={ae_export}", "resolution=32", "batch_size=64", *bucketing])
    heldout_latents = work / "data" / "heldout_latents"
    if not (heldout_latents / "dataset.json").exists():
        python_tool(["data_tools/precompute_latents.py", f"data={heldout}/00000.tar", f"out={heldout_latents}",
                     f"ckpt={ae_export}", "resolution=32", "batch_size=64"])

    # 4. The tiny text-to-image LDM, its samples and the prompt-adherence score.
    ldm_run = LDM_EXPERIMENTS[args.experiment] + ("-buckets" if args.buckets else "")
    result_path = runs / ldm_run / "result.json"
    if not result_path.exists():
        print("[4/4] training the tiny text-to-image LDM", flush=True)
        steps = [f"train.max_steps={args.ldm_steps}"] if args.ldm_steps else []
        # Latent shards read in the rank's own process (no decoding left to parallelise), and the
        # captions' word vocabulary (write_caption_vocab) in place of CLIP's BPE; "++": the
        # quickstart experiment does not set these keys.
        latent_data = [f"data.urls=['{latents}/{shards}']", "data.input=latent", "data.num_workers=0"]
        # The fixed-timestep validation loss on the held-out latents (evaluation/val_loss.py).
        validation = [f"eval.val_data=['{heldout_latents}/00000.tar']", f"eval.val_samples={HELDOUT_SAMPLES}",
                      f"eval.val_every={VAL_EVERY}"]
        wordpiece = ["++" + o for o in tokenizer_overrides("wordpiece", str(vocab), CAPTION_VOCAB_ROWS)]
        if args.buckets:
            backbone = "dit" if args.experiment == "quickstart_dit" else "unet"
            latent_data += ["data." + o for o in bucketing] + [f"model.ldm.{backbone}.micro_conditioning=true"]
        torchrun(args.nproc, [f"experiment={args.experiment}", f"run_id={ldm_run}", f"model.first_stage_ckpt={ae_export}",
                              *latent_data, *validation, *wordpiece, *common, *steps])

    result = json.loads(result_path.read_text())
    grids = sorted((runs / ldm_run / "samples").glob("*.png"))
    adherence = result.get("eval/prompt_adherence")
    print("\nquickstart finished in %.1f min" % ((time.time() - t0) / 60))
    samples = [g for g in grids if g.name.startswith("samples_")]
    print(f"  sample grid:       {samples[-1] if samples else '(none)'}")
    if args.buckets:
        per_bucket = [g for g in grids if g.name.startswith("buckets_")]
        print(f"  one per bucket:    {per_bucket[-1] if per_bucket else '(none)'}")
    if adherence is not None:
        print(f"  prompt adherence:  {adherence:.3f} (chance {CHANCE_ADHERENCE:.3f})")
    print(f"  exported model:    {runs / 'checkpoints' / ldm_run / 'export.pt'}")
    print(f"  metrics:           {runs / ldm_run / 'metrics.jsonl'} (W&B offline run in the same directory)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
