"""Build webdataset shards from a LAION-style parquet with img2dataset (downloads the images).

    python data_tools/download.py --parquet laion_part0.parquet --out s3://bucket/laion \
        --image-size 512 --processes 16 --threads 64

Needs the img2dataset extra: pip install 'ldm_scale[img2dataset]'. Writes sizes.json at the end and
prints the totals of img2dataset's stats (attempted, written, failed by error) as JSON.

Every input column other than the url / caption columns is kept in each sample's .json (and the shard
parquet) unless --extra-columns says otherwise: `none`, or a comma-separated list (`label,aesthetic`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from ldm_scale import storage  # noqa: E402
from ldm_scale.data.download import DownloadConfig, download_shards, parse_extra_columns  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parquet", required=True, help="parquet with url / caption / metadata columns (path or URL)")
    p.add_argument("--out", required=True, help="output directory or URL (local or s3://)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="keep_ratio")
    p.add_argument("--min-image-size", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--timeout", type=int, default=10, help="seconds per image request")
    p.add_argument("--retries", type=int, default=0)
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--extra-columns", default="all", metavar="all|none|a,b",
                   help="input columns to keep in each sample's .json: all (default: every column but the url / "
                        "caption columns and img2dataset's own fields), none, or comma-separated names")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for --out")
    args = p.parse_args(argv)
    try:
        extra = parse_extra_columns(args.extra_columns)
    except ValueError as exc:
        p.error(str(exc))
    dl = DownloadConfig(image_size=args.image_size, resize_mode=args.resize_mode, min_image_size=args.min_image_size,
                        samples_per_shard=args.samples_per_shard, processes=args.processes, threads=args.threads,
                        timeout_s=args.timeout, retries=args.retries, url_col=args.url_col,
                        caption_col=args.caption_col, extra_columns=extra)
    try:
        totals = download_shards(args.parquet, args.out, dl, storage.StorageConfig(endpoint_url=args.endpoint_url))
    except ValueError as exc:  # a column that is not in the input or that img2dataset reserves
        print(f"data_tools/download.py: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(totals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
