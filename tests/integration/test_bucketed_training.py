"""Aspect-ratio buckets through the real entry point: `torchrun launch/train.py` (tiny text-to-image
LDM with SDXL's micro-conditioning, 2 ranks, ZeRO-2, one data-loader worker process per rank)
reading wide and tall synthetic shards from a real S3 server and checkpointing there. A run
resumed from the uninterrupted run's step-4 checkpoint logs the same loss at every later step (the
bucket schedule, the queued samples and the crops all resume exactly), the saved loader states
hold the bucket set and the queues, and the export samples at every bucket's size.
"""
from __future__ import annotations

import io
import json

import pytest
import torch

from ldm_scale.data.synthetic import write_synthetic_dataset
from tests.fixtures.torchrun import run_torchrun
from tests.integration.tiny_training import TRAIN_SCRIPT, tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]
STEPS = 8


def _losses(out, run_id):
    rows = [json.loads(line) for line in (out / run_id / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_bucketed_training_resumes_exactly_from_s3(s3_server, tmp_path):
    data = s3_server.url("wide")
    write_synthetic_dataset(data, num_samples=64, samples_per_shard=16, seed=0, min_size=32, max_size=48,
                            max_aspect=2.5)
    out, root = tmp_path / "runs", s3_server.url("ckpt")
    args = [a for a in tiny_overrides(f"{data}/{{00000..00003}}.tar", out, STEPS)
            if not a.startswith(("train.log_every", "checkpoint.", "data.num_workers", "eval.sample_at_end"))]
    # 32^2-px buckets in steps of 16 (the tiny model's f=4 x UNet 4): 16x48, 32x32, 48x16.
    args += ["data.num_workers=1", "train.micro_batch_size=4", "train.log_every=1", "data.buckets.enabled=true",
             "data.buckets.step=16", "data.buckets.max_aspect=3", f"checkpoint.root={root}", "checkpoint.every_steps=4",
             "checkpoint.keep_last=2", "model.ldm.unet.micro_conditioning=true",
             "checkpoint.export_final=true", "eval.sample_at_end=true", "eval.sampler.steps=2"]
    run_torchrun([TRAIN_SCRIPT, *args, "run_id=ref", f"checkpoint.local_dir={out}/staging_ref"], timeout=900).check()
    run_torchrun([TRAIN_SCRIPT, *args, "run_id=resumed", f"checkpoint.local_dir={out}/staging_resumed",
                  f"checkpoint.resume={root}/ref/step_4"], timeout=900).check()
    reference, resumed = _losses(out, "ref"), _losses(out, "resumed")
    assert sorted(reference) == list(range(1, STEPS + 1)) and sorted(resumed) == list(range(5, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == reference[step], (step, loss, reference[step])
    # the end-of-run grids: the prompts at the training size, and the first prompt at every bucket
    # (3 buckets letterboxed to 48x48, enlarged x4 to 192 px cells with 6 px padding: 6 + 3 x 198)
    from PIL import Image

    with Image.open(out / "ref" / "samples" / f"buckets_step{STEPS:07d}.png") as grid:
        assert grid.width == 6 + 3 * (192 + 6)
    assert (out / "ref" / "samples" / f"samples_step{STEPS:07d}.png").exists()

    client = s3_server.client()
    queued = []
    for rank in range(2):
        body = client.get_object(Bucket=s3_server.bucket, Key=f"ckpt/ref/step_4/loader_rank{rank}.pt")["Body"].read()
        state = torch.load(io.BytesIO(body), weights_only=False)
        assert state["buckets"] == [[16, 48], [32, 32], [48, 16]]
        assert state["batches_in_epoch"] == 4 and set(state["workers"]) == {"0"}
        queued.append(state["workers"]["0"]["queued"])
    assert any(queued)  # mid-epoch, samples of other buckets wait in a queue: the resume replayed them

    from ldm_scale.diffusion import SamplerConfig
    from ldm_scale.diffusion.noise import PerSampleGenerators
    from ldm_scale.sampling import generate, load_checkpoint

    export = tmp_path / "export.pt"
    export.write_bytes(client.get_object(Bucket=s3_server.bucket, Key="ckpt/resumed/export.pt")["Body"].read())
    loaded = load_checkpoint(str(export), use_ema=True)
    assert loaded.spec.micro_conditioned
    assert any(k.startswith("unet.micro_embed.") for k in loaded.model.state_dict())
    for width, height in ((16, 48), (32, 32), (48, 16)):
        images = generate(loaded, ["a red circle on a blue background"] * 2, 2, SamplerConfig(steps=2),
                          height=height, width=width, generator=PerSampleGenerators(0, [0, 1]))
        assert images.shape == (2, 3, height, width) and torch.isfinite(images).all()
