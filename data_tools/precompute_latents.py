"""Encode image shards into latent shards (posterior mean + logvar) with a frozen autoencoder.

    torchrun --nproc_per_node 8 data_tools/precompute_latents.py \
        --src 's3://bucket/laion/{00000..41407}.tar' --out s3://bucket/laion_kl8_256 \
        --ckpt s3://bucket/ae/kl_f8.pt --resolution 256

Shards are split over ranks; finished shards (their _stats.json exists) are skipped on a rerun.
Train on the result with `data.input=latent data.urls=[s3://bucket/laion_kl8_256/{00000..41407}.tar]`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import dist, storage  # noqa: E402
from ldm_scale.data.latents import finalize_latent_dataset, load_autoencoder, precompute_latents  # noqa: E402


def main(argv=None) -> int:
    from ldm_scale.logging import setup_console

    setup_console()  # library warnings off (LDM_SCALE_SHOW_LIBRARY_WARNINGS=1 shows them)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="image shard pattern (brace/glob/list)")
    p.add_argument("--out", required=True, help="output directory or URL for latent shards")
    p.add_argument("--ckpt", default=None, help="exported autoencoder checkpoint (ldm_scale/autoencoder-v1)")
    p.add_argument("--autoencoder", default=None,
                   help="registry name (e.g. kl_f8): architecture override, or random weights without --ckpt (tests only)")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--endpoint-url", default=None)
    args = p.parse_args(argv)
    if args.ckpt is None and args.autoencoder is None:
        p.error("--ckpt is required (or --autoencoder NAME for a randomly initialised test encoder)")

    info = dist.init_distributed()
    cfg = storage.StorageConfig(endpoint_url=args.endpoint_url)
    model = load_autoencoder(args.ckpt, args.autoencoder, cfg)
    result = precompute_latents(args.src, args.out, model, resolution=args.resolution, rank=info.rank,
                                world_size=info.world_size, batch_size=args.batch_size, dtype=args.dtype,
                                device=dist.default_device(info), cfg=cfg)
    dist.barrier()  # every rank's shards are complete before rank 0 writes sizes.json
    if info.is_main:
        meta = finalize_latent_dataset(args.src, args.out, model, args.resolution, cfg,
                                       autoencoder=args.autoencoder, ckpt=storage.redact(args.ckpt) if args.ckpt else None)
        print(json.dumps({"encoded_here": len(result.encoded), "skipped_complete": len(result.skipped_complete),
                          "num_samples": meta["num_samples"], "latent_shape": meta["latent_shape"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
