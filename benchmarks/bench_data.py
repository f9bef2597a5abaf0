"""Data pipeline throughput, measured side by side in one run (ratios, not absolute targets).

1. Full pipeline (tar read -> decode -> filter -> resize/crop -> batch, W DataLoader workers) vs a
   bare loop doing only decode + resize/crop of the same JPEGs in W processes.   target >= 0.85
2. The same pipeline reading from a local S3 server (moto_server process on 127.0.0.1) vs local disk.
                                                                                target >= 0.8
3. Latent shards vs image shards + online encoding with the kl_f8 encoder (samples/s, reported).

    python benchmarks/bench_data.py [--samples 768] [--workers 2] [--resolution 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm_scale import storage  # noqa: E402
from ldm_scale.data import DataConfig, FilterConfig, build_loader  # noqa: E402
from ldm_scale.data.synthetic import write_synthetic_dataset  # noqa: E402
from ldm_scale.data.transforms import decode_image, resize_crop_flip  # noqa: E402
from ldm_scale.dist import DistInfo  # noqa: E402


def pipeline_rate(urls: str, args, workers=None, **overrides) -> float:
    """Samples/s in steady state: timed from the moment every worker has delivered its first batch
    (worker start-up, i.e. fork + S3 client creation + filling the shuffle buffer, is a once-per-epoch
    cost reported separately as ``startup_s``)."""
    workers = args.workers if workers is None else workers
    cfg = DataConfig(urls=[urls], resolution=args.resolution, num_workers=workers, shuffle_buffer=64,
                     crop="random", flip=True, filters=FilterConfig(min_width=32, max_punsafe=0.99),
                     storage=storage.StorageConfig(retries=2), **overrides)
    loader = build_loader(cfg, DistInfo(), batch_size=args.batch_size, seed=0)
    warm = max(1, workers)
    n = 0
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        if i == warm - 1:
            start = time.perf_counter()
            STARTUP.append(start - t0)
        elif i >= warm:
            n += len(batch["key"])
    return n / (time.perf_counter() - start)


STARTUP: list = []


def _bare_worker(job):
    files, resolution = job
    n = 0
    for jpg in files:
        img = decode_image(jpg, resolution, "auto")
        resize_crop_flip(img, resolution, "center", False, None)
        n += 1
    return n


def bare_rate(jpegs, args, workers=None) -> float:
    """Decode + resize only, JPEG bytes already in memory, split over W processes."""
    w = max(1, args.workers if workers is None else workers)
    jobs = [(jpegs[i::w], args.resolution) for i in range(w)]
    start = time.perf_counter()
    if w == 1:
        n = _bare_worker(jobs[0])
    else:
        with mp.get_context("fork").Pool(w) as pool:
            n = sum(pool.map(_bare_worker, jobs))
    return n / (time.perf_counter() - start)


def read_jpegs(root: str) -> list:
    import tarfile

    out = []
    for name in sorted(os.listdir(root)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(root, name)) as tar:
                out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return out


def start_s3():
    from tests.fixtures.s3 import ACCESS_KEY, SECRET_KEY, _wait_listening, free_port

    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_listening(port)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                       "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-west-2"})
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-west-2").create_bucket(
        Bucket="bench", CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    return proc


def latent_vs_online(tmp: str, args) -> dict:
    from ldm_scale.data.latents import load_autoencoder, posterior_moments, precompute_latents

    res = args.latent_resolution
    src = os.path.join(tmp, "lat_src")
    write_synthetic_dataset(src, num_samples=args.latent_samples, samples_per_shard=args.latent_samples // 4,
                            seed=1, min_size=res, max_size=res + res // 2)
    model = load_autoencoder(None, "kl_f8")
    pattern = src + "/{00000..00003}.tar"
    out = os.path.join(tmp, "lat_out")
    precompute_latents(pattern, out, model, resolution=res, batch_size=8)
    from ldm_scale.data.latents import finalize_latent_dataset

    finalize_latent_dataset(pattern, out, model, res)
    common = dict(resolution=res, num_workers=args.workers, shuffle_buffer=16)

    start, n = time.perf_counter(), 0
    loader = build_loader(DataConfig(urls=[pattern], **common), DistInfo(), batch_size=8, seed=0)
    for batch in loader:
        moments = posterior_moments(model, batch["image"])
        z = moments[:, 0] + torch.exp(0.5 * moments[:, 1]) * torch.randn_like(moments[:, 0])
        n += z.shape[0]
    online = n / (time.perf_counter() - start)

    start, n = time.perf_counter(), 0
    loader = build_loader(DataConfig(urls=[out + "/{00000..00003}.tar"], input="latent", **common), DistInfo(),
                          batch_size=8, seed=0)
    for batch in loader:
        z = batch["latent_mean"] + torch.exp(0.5 * batch["latent_logvar"]) * torch.randn_like(batch["latent_mean"])
        n += z.shape[0]
    latent = n / (time.perf_counter() - start)
    return {"resolution": res, "online_encode_samples_per_s": online, "latent_shards_samples_per_s": latent,
            "speedup": latent / online}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=768)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--min-size", type=int, default=320, help="smallest original image side")
    p.add_argument("--max-size", type=int, default=640)
    p.add_argument("--repeats", type=int, default=2, help="best of N for each measurement")
    p.add_argument("--latent-resolution", type=int, default=128)
    p.add_argument("--latent-samples", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "shards")
        shards = max(8, 2 * args.workers)
        write_synthetic_dataset(local, num_samples=args.samples, samples_per_shard=args.samples // shards, seed=0,
                                min_size=args.min_size, max_size=args.max_size)
        pattern = "/{00000..%05d}.tar" % (shards - 1)
        jpegs = read_jpegs(local)
        results = {"samples": args.samples, "workers": args.workers, "resolution": args.resolution,
                   "original_sizes": [args.min_size, args.max_size], "cpu_count": os.cpu_count(),
                   "load_average_at_start": os.getloadavg()[0]}

        # Alternate the two measurements so load changes on a shared machine hit both alike.
        bare, disk, bare1, inproc = [], [], [], []
        for _ in range(args.repeats):
            bare.append(bare_rate(jpegs, args))
            disk.append(pipeline_rate(local + pattern, args))
            bare1.append(bare_rate(jpegs, args, workers=1))
            inproc.append(pipeline_rate(local + pattern, args, workers=0))
        bare, disk = max(bare), max(disk)
        results["startup_s_median"] = sorted(STARTUP)[len(STARTUP) // 2]
        results.update(bare_decode_resize_samples_per_s=bare, pipeline_disk_samples_per_s=disk,
                       pipeline_vs_bare=disk / bare, in_process_bare_samples_per_s=max(bare1),
                       in_process_pipeline_samples_per_s=max(inproc),
                       in_process_pipeline_vs_bare=max(inproc) / max(bare1))

        proc = start_s3()
        try:
            remote = "s3://bench/shards"
            for name in os.listdir(local):
                storage.put_file(os.path.join(local, name), storage.join(remote, name))
            s3 = max(pipeline_rate(remote + pattern, args) for _ in range(args.repeats))
        finally:
            proc.kill()
            proc.wait(timeout=10)
        results.update(pipeline_s3_samples_per_s=s3, s3_vs_disk=s3 / disk,
                       s3_startup_s_median=sorted(STARTUP[-args.repeats:])[args.repeats // 2])
        results["latents"] = latent_vs_online(tmp, args)

    results["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(results, indent=1))
    print(f"pipeline / bare decode+resize : {results['pipeline_vs_bare']:.3f}  (target >= 0.85; "
          f"{args.workers} workers vs {args.workers} processes)")
    print(f"  same, in one process         : {results['in_process_pipeline_vs_bare']:.3f}")
    print(f"S3 / local disk               : {results['s3_vs_disk']:.3f}  (target >= 0.8)")
    print(f"latent shards / online kl_f8  : {results['latents']['speedup']:.1f}x "
          f"({results['latents']['latent_shards_samples_per_s']:.1f} vs "
          f"{results['latents']['online_encode_samples_per_s']:.2f} samples/s at {args.latent_resolution}px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
