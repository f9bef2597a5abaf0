"""FID and precision/recall time against torchmetrics / torch-fidelity on the same features, plus
evaluation sampling throughput per rank (tiny LDM). Prints ratios measured side by side.

    OMP_NUM_THREADS=2 python benchmarks/bench_fid.py [--n 10000] [--dim 2048] [--pr-n 5000]
    python benchmarks/bench_fid.py --threads 1,2 --n 5000 --repeats 3   # FID vs torch-fidelity per thread count

Ratio = ours / theirs (time): <= 1.0 means we are at least as fast. Each timing is the best of
``--repeats`` runs, implementations interleaved so machine load hits them alike.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def best_of(fns, repeats):
    times = {name: float("inf") for name in fns}
    values = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            values[name] = fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times, values


def features(n, dim, seed):
    rng = np.random.default_rng(seed)
    # Inception pool features are non-negative, correlated and low-rank-ish; mimic with a ReLU mix.
    mix = rng.normal(size=(dim // 4, dim)) / np.sqrt(dim // 4)
    return np.maximum(rng.normal(size=(n, dim // 4)) @ mix, 0).astype(np.float32)


def bench_fid(n, dim, repeats):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ldm_scale.evaluation.fid import fid_from_features

    a = features(n, dim, 0)
    b = a.copy()  # identical sets: FID ~ 0

    class FeaturesAsImages(torch.nn.Module):
        num_features = dim

        def forward(self, x):
            return x

    def torchmetrics_fid():
        metric = FrechetInceptionDistance(feature=FeaturesAsImages())
        metric.update(torch.from_numpy(a), real=True)
        metric.update(torch.from_numpy(b), real=False)
        return float(metric.compute())

    def torch_fidelity_fid():
        s1 = fid_features_to_statistics(torch.from_numpy(a).double())
        s2 = fid_features_to_statistics(torch.from_numpy(b).double())
        return fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]

    times, values = best_of({"ours": lambda: fid_from_features(a, b, warn=False), "torchmetrics": torchmetrics_fid,
                             "torch-fidelity": torch_fidelity_fid}, repeats)
    print(f"FID, identical {n} x {dim} features (time incl. statistics):")
    for name in times:
        ratio = times["ours"] / times[name]
        print(f"  {name:15s} {times[name]:8.2f} s   FID={values[name]:.3e}   ours/this={ratio:.2f}")


def bench_fid_threads(n, dim, repeats, thread_counts):
    """Ours vs torch-fidelity at each BLAS/OpenMP thread count (threadpoolctl + torch), alternating
    implementations within each repeat: statistics + distance, and the distance alone from the
    same float64 statistics (where the eigen-decomposition is)."""
    from threadpoolctl import threadpool_limits
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    from ldm_scale.evaluation.fid import fid_from_features, frechet_distance, gaussian_stats

    a = features(n, dim, 0)
    b = features(n, dim, 2)  # different sets: a non-trivial distance
    sa, sb = gaussian_stats(a), gaussian_stats(b)
    tf_a = {"mu": sa.mu, "sigma": sa.sigma}
    tf_b = {"mu": sb.mu, "sigma": sb.sigma}

    def theirs_full():
        s1 = fid_features_to_statistics(torch.from_numpy(a).double())
        s2 = fid_features_to_statistics(torch.from_numpy(b).double())
        return fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]

    saved = torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            with threadpool_limits(limits=threads):
                times, values = best_of({
                    "ours": lambda: fid_from_features(a, b, warn=False), "torch-fidelity": theirs_full,
                    "ours distance": lambda: frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma),
                    "torch-fidelity distance": lambda: fid_statistics_to_metric(tf_a, tf_b, verbose=False)[
                        "frechet_inception_distance"],
                }, repeats)
            print(f"FID, {n} x {dim} features, {threads} thread(s):")
            for what in ("", " distance"):
                ours, theirs = times["ours" + what], times["torch-fidelity" + what]
                print(f"  {'statistics + distance' if not what else 'distance only':22s} ours {ours:7.2f} s "
                      f"(FID {values['ours' + what]:.6f})  torch-fidelity {theirs:7.2f} s "
                      f"(FID {values['torch-fidelity' + what]:.6f})  ours/theirs={ours / theirs:.2f}")
    finally:
        torch.set_num_threads(saved)


def bench_pr(n, dim, repeats):
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    from ldm_scale.evaluation.precision_recall import precision_recall

    a = torch.from_numpy(features(n, dim, 1))
    b = a.clone()
    times, values = best_of({
        "ours": lambda: tuple(precision_recall(a, b, k=3, batch_size=10000).values()),
        "torch-fidelity": lambda: calculate_precision_recall_part(b, a, neighborhood=3, batch_size=10000),
    }, repeats)
    print(f"precision/recall (k=3), identical {n} x {dim} features:")
    for name in times:
        print(f"  {name:15s} {times[name]:8.2f} s   P,R={values[name]}   ours/this={times['ours'] / times[name]:.2f}")


def bench_sampling(steps, batch, repeats):
    from ldm_scale.evaluation.config import FIDEvalConfig
    from ldm_scale.evaluation.generate import initial_noise
    from ldm_scale.diffusion import SamplerConfig
    from ldm_scale.evaluation.model_sampler import load_model_sampler
    from ldm_scale.models.registry import build_ldm, get_spec

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.pt"
        model = build_ldm("tiny")
        torch.save({"format": "ldm_scale/ldm-v1", "model_config": dataclasses.asdict(get_spec("tiny")),
                    "state_dict": model.state_dict(), "ema_state_dict": model.unet.state_dict(), "step": 0,
                    "scale_factor": 1.0, "config": {}}, path)
        ms = load_model_sampler(FIDEvalConfig(ckpt=str(path), sampler=SamplerConfig(steps=steps, guidance_scale=3.0)), torch.device("cpu"))
    x_T = initial_noise(ms.latent_shape, range(batch), seed=0)
    prompts = ["a red circle on a blue background"] * batch
    ms.sample_batch(x_T[:2], prompts[:2], torch.Generator().manual_seed(0))  # warm-up
    times, _ = best_of({"sample": lambda: ms.sample_batch(x_T, prompts, torch.Generator().manual_seed(0))}, repeats)
    print(f"sampling throughput, tiny text LDM 32px, DDIM {steps} steps + CFG 3.0, batch {batch}, 1 rank "
          f"({torch.get_num_threads()} threads): {batch / times['sample']:.2f} images/s per rank")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--pr-n", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--threads", default="", help="e.g. 1,2: only the FID comparison with torch-fidelity "
                                                    "at each thread count")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.threads:
        bench_fid_threads(args.n, args.dim, args.repeats, [int(t) for t in args.threads.split(",")])
        return
    bench_fid(args.n, args.dim, args.repeats)
    bench_pr(args.pr_n, args.dim, args.repeats)
    bench_sampling(args.sample_steps, args.sample_batch, args.repeats)


if __name__ == "__main__":
    main()
