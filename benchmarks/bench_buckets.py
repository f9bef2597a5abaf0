"""Bucketed pipeline vs the square one on the same shards, side by side (issue 16: >= 0.9).

Both read the same synthetic LAION-shaped shards (JPEGs of varied aspect ratio, log-uniform in
[1/2.5, 2.5]) through the real loader: tar read -> checks -> shuffle buffer -> decode (JPEG DCT
scaling) -> resize + crop -> batch -> float [-1, 1]. The square side crops a ``resolution``
square; the bucketed side (``data.buckets``, step 64, aspect <= 2) also reads each image's header
to assign its bucket, queues samples per bucket, and crops each to its bucket (about the same pixel
count). Whole epochs alternate A/B ``--repeats`` times; reported: samples/s of each, the median of
the paired ratios, and the ratio of the best runs.

    python benchmarks/bench_buckets.py [--samples 512] [--resolution 256] [--workers 0,2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale.data import DataConfig, build_loader  # noqa: E402
from ldm_scale.data.config import BucketConfig  # noqa: E402
from ldm_scale.data.synthetic import write_synthetic_dataset  # noqa: E402
from ldm_scale.dist import DistInfo  # noqa: E402


PIXELS: dict = {}


def _rate(urls: str, args, workers: int, buckets: bool) -> float:
    """Samples/s over one epoch after each worker's first batch (start-up excluded); records the
    mean output pixels per sample of each side in PIXELS."""
    cfg = DataConfig(urls=[urls], resolution=args.resolution, num_workers=workers, shuffle_buffer=64,
                     crop="random", flip=True, buckets=BucketConfig(enabled=buckets, step=64, max_aspect=2.0))
    loader = build_loader(cfg, DistInfo(), batch_size=args.batch_size, seed=0)
    warm, n, start, pixels, images = max(1, workers), 0, None, 0, 0
    for i, batch in enumerate(loader):
        pixels += batch["image"].shape[0] * batch["image"].shape[2] * batch["image"].shape[3]
        images += batch["image"].shape[0]
        if i == warm - 1:
            start = time.perf_counter()
        elif i >= warm:
            n += len(batch["key"])
    rate = n / (time.perf_counter() - start)
    PIXELS["bucketed" if buckets else "square"] = round(pixels / images)
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = 16
        write_synthetic_dataset(tmp, num_samples=args.samples, samples_per_shard=args.samples // shards, seed=0,
                                min_size=args.resolution, max_size=2 * args.resolution, max_aspect=2.5)
        urls = f"{tmp}/{{00000..{shards - 1:05d}}}.tar"
        report = {"samples": args.samples, "resolution": args.resolution, "batch_size": args.batch_size}
        for workers in (int(w) for w in args.workers.split(",")):
            _rate(urls, args, workers, True)  # warm the page cache and imports once
            square, bucketed = [], []
            for _ in range(args.repeats):
                square.append(_rate(urls, args, workers, False))
                bucketed.append(_rate(urls, args, workers, True))
            ratios = [b / s for b, s in zip(bucketed, square)]
            report[f"workers={workers}"] = {
                "square_samples_per_s": [round(x, 1) for x in square],
                "bucketed_samples_per_s": [round(x, 1) for x in bucketed],
                "median_paired_ratio": round(statistics.median(ratios), 3),
                "best_ratio": round(max(bucketed) / max(square), 3),
                "output_pixels_per_sample": dict(PIXELS),
                # the same ratio in output pixels/s (bucket sizes hold up to resolution^2 pixels, a few % fewer)
                "median_paired_pixel_ratio": round(statistics.median(ratios) * PIXELS["bucketed"] / PIXELS["square"], 3)}
            print(json.dumps({f"workers={workers}": report[f"workers={workers}"]}), flush=True)
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
