"""Write the procedural LAION-shaped dataset (coloured shapes with captions) to a path or URL.

    python data_tools/make_synthetic.py --out s3://bucket/synthetic --num-samples 2048 --seed 0
    python data_tools/make_synthetic.py --out gs://bucket/synthetic --num-samples 2048
    python data_tools/make_synthetic.py --out data/shapes_cls --labels class

The output is img2dataset's webdataset layout (tar + parquet + _stats.json per shard) plus sizes.json
and dataset.json; the printed brace pattern goes into `data.urls`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import storage  # noqa: E402
from ldm_scale.data.synthetic import write_synthetic_dataset  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory or URL (local, s3://, gs://)")
    p.add_argument("--num-samples", type=int, default=2048)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=48, help="smallest original image side (px)")
    p.add_argument("--max-size", type=int, default=96, help="largest original image side (px)")
    p.add_argument("--labels", choices=["text", "class", "both"], default="text")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    p.add_argument("--gcs-endpoint-url", default=None, help="GCS endpoint (else STORAGE_EMULATOR_HOST or Google)")
    p.add_argument("--anon", action="store_true", help="unsigned requests (public buckets, GCS emulators)")
    args = p.parse_args(argv)
    cfg = storage.StorageConfig(endpoint_url=args.endpoint_url, gcs_endpoint_url=args.gcs_endpoint_url,
                                anon=args.anon)
    shards = write_synthetic_dataset(args.out, num_samples=args.num_samples, samples_per_shard=args.samples_per_shard,
                                     seed=args.seed, min_size=args.min_size, max_size=args.max_size,
                                     labels=args.labels, cfg=cfg)
    info = json.loads(storage.read_text(storage.join(args.out, "dataset.json"), cfg))
    print(json.dumps({"shards": len(shards), "samples": args.num_samples, "urls": info["shards"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
