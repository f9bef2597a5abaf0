"""Encode image shards into latent shards (posterior mean + logvar) with a frozen autoencoder.

    torchrun --nproc_per_node 8 data_tools/precompute_latents.py \
        data='s3://bucket/laion/{00000..41407}.tar' out=s3://bucket/laion_kl8_256 \
        ckpt=s3://bucket/ae/kl_f8.pt resolution=256

Arguments are Hydra overrides of ``conf/commands/precompute_latents.yaml`` (typed by
``ldm_scale.data.commands.PrecomputeLatentsConfig``; ``--help`` lists the keys). Shards are split
over ranks; finished shards (their _stats.json exists) are skipped on a rerun. Train on the result
with `data.input=latent data.urls=[s3://bucket/laion_kl8_256/{00000..41407}.tar]`.

With a frozen text encoder the shards also carry its outputs per caption (docs/data.md):

    torchrun --nproc_per_node 8 data_tools/precompute_latents.py data=... out=... ckpt=... resolution=256 \
        text_encoder.kind=openclip text_encoder.openclip.arch=ViT-H-14 \
        text_encoder.openclip.pretrained=/models/open_clip_vit_h14.bin text_dtype=bfloat16

and training reads them with ``data.text_embeddings=true`` (the encoder never runs in the step).

With aspect-ratio buckets (``buckets.enabled=true buckets.step=64 buckets.max_aspect=2``) each image
is encoded at its bucket's size; train with the same ``data.resolution`` and ``data.buckets.*``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import dist, storage  # noqa: E402
from ldm_scale.cli import report_input_errors, start_command  # noqa: E402
from ldm_scale.data.buckets import make_buckets  # noqa: E402
from ldm_scale.data.commands import PrecomputeLatentsConfig  # noqa: E402
from ldm_scale.data.latents import finalize_latent_dataset, load_autoencoder, precompute_latents  # noqa: E402
from ldm_scale.models.conditioners import build_conditioner  # noqa: E402

PROGRAM = "data_tools/precompute_latents.py"


def main(argv=None) -> int:
    cfg = start_command(argv, "precompute_latents", PrecomputeLatentsConfig, program=PROGRAM, doc=__doc__)
    # A missing or wrong checkpoint: one line, exit 2, before any process group or shard.
    model = report_input_errors(PROGRAM, lambda: load_autoencoder(cfg.ckpt, cfg.architecture, cfg.storage))
    # The frozen text encoder (text_encoder.kind=openclip): a missing checkpoint file is one line, exit 2.
    text_encoder = None if cfg.text_encoder.kind == "none" else \
        report_input_errors(PROGRAM, lambda: build_conditioner(cfg.text_encoder).eval())
    buckets = make_buckets(cfg.resolution, cfg.buckets.step, cfg.buckets.max_aspect) if cfg.buckets.enabled else None
    f = model.downsample_factor
    if buckets is not None and cfg.buckets.step % f:
        print(f"{PROGRAM}: buckets.step={cfg.buckets.step} is not a multiple of the autoencoder's factor f={f}: "
              f"use a multiple of {f}", file=sys.stderr)
        return 2
    info = dist.init_distributed()
    result = precompute_latents(cfg.shard_patterns(), cfg.out, model, resolution=cfg.resolution, rank=info.rank,
                                world_size=info.world_size, batch_size=cfg.batch_size, dtype=cfg.dtype,
                                device=dist.default_device(info), cfg=cfg.storage, text_encoder=text_encoder,
                                text_dtype=cfg.text_dtype, buckets=buckets)
    dist.barrier()  # every rank's shards are complete before rank 0 writes sizes.json
    if info.is_main:
        meta = finalize_latent_dataset(cfg.shard_patterns(), cfg.out, model, cfg.resolution, cfg.storage,
                                       text_encoder=text_encoder, text_cond_stage=cfg.text_encoder,
                                       text_dtype=cfg.text_dtype, autoencoder=cfg.architecture,
                                       buckets=None if buckets is None else {
                                           "step": cfg.buckets.step, "max_aspect": cfg.buckets.max_aspect,
                                           "sizes": buckets},
                                       ckpt=storage.redact(cfg.ckpt) if cfg.ckpt else None)
        print(json.dumps({"encoded_here": len(result.encoded), "skipped_complete": len(result.skipped_complete),
                          "num_samples": meta["num_samples"], "latent_shape": meta["latent_shape"],
                          "text_encoder": (meta.get("text_encoder") or {}).get("arch")}))
    return 0


if __name__ == "__main__":
    dist.run_entry_point(main)  # exits without the teardown that can abort a gloo/NCCL process
