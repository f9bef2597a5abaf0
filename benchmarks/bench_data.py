"""Data pipeline throughput, measured side by side in one run (ratios, not absolute targets).

1. Full pipeline (tar read -> decode -> filter -> resize/crop -> batch, float [-1, 1]) vs a bare loop
   doing only decode + resize/crop of the same JPEGs (bytes already in memory).     target >= 0.85
   Both sides do the same image work: ``decode_image`` (PIL; JPEGs larger than needed decoded at a
   reduced DCT scale via ``draft``) then ``resize_crop_flip`` (bicubic resize of the short side,
   random crop, random flip, uint8 [3, R, R]). The pipeline adds reading the tars, metadata
   filters, caption cleanup, the shuffle buffer, per-sample seeding, batching and the float
   conversion (and, with workers, moving batches between processes).
   a. one process: ``num_workers=0`` vs a plain loop, alternated batch by batch (each pipeline
      batch is followed by the bare loop over 32 images), so load changes hit both alike;
   b. W DataLoader workers vs the bare loop in W processes, whole runs alternated: best of N and
      the median of the N paired ratios, plus CPU seconds per sample of each side in all its
      processes (whole run; less sensitive to being descheduled than wall time).
2. The same pipeline reading from a local S3 server (moto_server process on 127.0.0.1) vs local disk.
                                                                                target >= 0.8
3. Latent shards vs image shards + online encoding with the kl_f8 encoder (samples/s, reported).

    python benchmarks/bench_data.py [--samples 768] [--workers 2] [--resolution 256] [--repeats 3]
                                    [--parts pipeline,s3,latents]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
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


def _cfg(urls: str, args, workers: int) -> DataConfig:
    return DataConfig(urls=[urls], resolution=args.resolution, num_workers=workers, shuffle_buffer=64,
                      crop="random", flip=True, filters=FilterConfig(min_width=32, max_punsafe=0.99),
                      storage=storage.StorageConfig(retries=2))


def _bare(jpegs, resolution: int, rng: random.Random) -> None:
    """The bare loop's work for each image: exactly the pipeline's decode + resize/crop/flip."""
    for jpg in jpegs:
        resize_crop_flip(decode_image(jpg, resolution, "auto"), resolution, "random", True, rng)


def pipeline_rate(urls: str, args, workers=None) -> float:
    """Samples/s in steady state: timed from the moment every worker has delivered its first batch
    (worker start-up, i.e. fork + S3 client creation + filling the shuffle buffer, is a once-per-epoch
    cost reported separately as ``startup_s``)."""
    workers = args.workers if workers is None else workers
    loader = build_loader(_cfg(urls, args, workers), DistInfo(), batch_size=args.batch_size, seed=0)
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


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (pool processes, DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed_cpu(fn, *args):
    """``fn(*args)`` and the CPU seconds it took in all processes (workers are joined by the end)."""
    before = cpu_seconds()
    out = fn(*args)
    return out, cpu_seconds() - before


def _bare_worker(job):
    files, resolution = job
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    _bare(files, resolution, random.Random(len(files)))
    return len(files), start, time.perf_counter()


def bare_rate(jpegs, args, workers=None) -> float:
    """Decode + resize/crop/flip only, JPEG bytes already in memory, split over W processes; timed
    from the first process's start to the last one's end (pool start-up excluded)."""
    w = max(1, args.workers if workers is None else workers)
    jobs = [(jpegs[i::w], args.resolution) for i in range(w)]
    with mp.get_context("fork").Pool(w) as pool:
        done = pool.map(_bare_worker, jobs)
    return sum(n for n, _, _ in done) / (max(e for _, _, e in done) - min(s for _, s, _ in done))


def interleaved_in_process(urls: str, jpegs, args) -> dict:
    """``num_workers=0`` pipeline vs the bare loop in this process, alternated batch by batch."""
    loader = build_loader(_cfg(urls, args, 0), DistInfo(), batch_size=args.batch_size, seed=0)
    rng = random.Random(0)
    t_pipe = t_bare = 0.0
    n = 0
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        t1 = time.perf_counter()
        if batch is None:
            break
        k = len(batch["key"])
        _bare(jpegs[n:n + k], args.resolution, rng)
        t_bare += time.perf_counter() - t1
        t_pipe += t1 - t0
        n += k
    return {"pipeline_samples_per_s": n / t_pipe, "bare_samples_per_s": n / t_bare, "ratio": t_bare / t_pipe}


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
    p.add_argument("--repeats", type=int, default=3, help="best of N for each measurement")
    p.add_argument("--parts", default="pipeline,s3,latents", help="comma-separated subset to run")
    p.add_argument("--latent-resolution", type=int, default=128)
    p.add_argument("--latent-samples", type=int, default=64)
    args = p.parse_args()
    parts = set(args.parts.split(","))
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
                   "load_average_at_start": os.getloadavg()}
        disk = None
        if "pipeline" in parts:
            # Alternate the measurements so load changes on a shared machine hit both alike.
            bare, pipe, inproc, cpu_bare, cpu_pipe = [], [], [], [], []
            for _ in range(args.repeats):
                rate, cpu = timed_cpu(bare_rate, jpegs, args)
                bare.append(rate)
                cpu_bare.append(cpu / len(jpegs))
                rate, cpu = timed_cpu(pipeline_rate, local + pattern, args)
                pipe.append(rate)
                cpu_pipe.append(cpu / len(jpegs))
                inproc.append(interleaved_in_process(local + pattern, jpegs, args))
            disk = max(pipe)
            ratios = [r["ratio"] for r in inproc]
            results.update(
                workers_bare_samples_per_s=max(bare), workers_pipeline_samples_per_s=disk,
                workers_pipeline_vs_bare=disk / max(bare),
                workers_paired_ratio_median=statistics.median(q / b for b, q in zip(bare, pipe)),
                workers_runs=[[round(b, 1), round(q, 1)] for b, q in zip(bare, pipe)],
                cpu_ms_per_sample_bare=[round(1e3 * c, 2) for c in cpu_bare],
                cpu_ms_per_sample_pipeline=[round(1e3 * c, 2) for c in cpu_pipe],
                cpu_bare_vs_pipeline=min(cpu_bare) / min(cpu_pipe),
                startup_s_median=statistics.median(STARTUP),
                in_process_pipeline_vs_bare=statistics.median(ratios),
                in_process_ratios=[round(r, 3) for r in ratios],
                in_process_runs=inproc)
        if "s3" in parts:
            disk = disk or max(pipeline_rate(local + pattern, args) for _ in range(args.repeats))
            proc = start_s3()
            try:
                remote = "s3://bench/shards"
                for name in os.listdir(local):
                    storage.put_file(os.path.join(local, name), storage.join(remote, name))
                s3 = max(pipeline_rate(remote + pattern, args) for _ in range(args.repeats))
            finally:
                proc.kill()
                proc.wait(timeout=10)
            results.update(pipeline_disk_samples_per_s=disk, pipeline_s3_samples_per_s=s3, s3_vs_disk=s3 / disk,
                           s3_startup_s_median=statistics.median(STARTUP[-args.repeats:]))
        if "latents" in parts:
            results["latents"] = latent_vs_online(tmp, args)

    results["load_average_at_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))
    if "pipeline" in parts:
        print(f"pipeline / bare decode+resize, in one process (batch-by-batch alternation, median of "
              f"{args.repeats}): {results['in_process_pipeline_vs_bare']:.3f}  {results['in_process_ratios']}")
        print(f"pipeline / bare decode+resize, {args.workers} workers vs {args.workers} processes (best of "
              f"{args.repeats}): {results['workers_pipeline_vs_bare']:.3f}  (target >= 0.85); median of paired "
              f"runs {results['workers_paired_ratio_median']:.3f}; CPU per sample bare/pipeline (best) "
              f"{results['cpu_bare_vs_pipeline']:.3f}")
    if "s3" in parts:
        print(f"S3 / local disk               : {results['s3_vs_disk']:.3f}  (target >= 0.8)")
    if "latents" in parts:
        lat = results["latents"]
        print(f"latent shards / online kl_f8  : {lat['speedup']:.1f}x ({lat['latent_shards_samples_per_s']:.1f} vs "
              f"{lat['online_encode_samples_per_s']:.2f} samples/s at {args.latent_resolution}px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
