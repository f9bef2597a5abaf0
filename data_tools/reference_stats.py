"""Reference statistics of a shard set, computed once and stored next to the data.

    python data_tools/reference_stats.py data='s3://bucket/laion/{00000..00099}.tar' n_samples=50000 resolution=256
    torchrun --nproc_per_node 8 data_tools/reference_stats.py data=... extractor=inception

Arguments are Hydra overrides of ``conf/commands/reference_stats.yaml`` (typed by
``ldm_scale.evaluation.config.ReferenceStatsConfig``; ``--help`` lists keys and groups). Every
image of ``min(n_samples, set size)`` goes in exactly once (the partial last batch too); N in the file
name and ``meta`` is the number that went in (less any sample that fails to decode, counted in
``meta["dropped"]``). Every rank reads its own shards; each checkpoints its progress, so re-running
after a crash resumes (with the same number of ranks). The output (default
``<shard dir>/reference_stats/<extractor>-<resize>_
<res>px_n<N>.npz``) is ADM-compatible: ``arr_0`` images, ``mu``/``sigma`` (+ ``mu_s``/``sigma_s``),
plus features, labels/captions and a JSON ``meta`` (docs/evaluation.md).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import dist, storage  # noqa: E402
from ldm_scale.cli import config_from_argv, report_input_errors, start_command  # noqa: E402
from ldm_scale.evaluation.config import ReferenceStatsConfig  # noqa: E402
from ldm_scale.evaluation.features import check_extractor_weights, extractor_from_config  # noqa: E402
from ldm_scale.evaluation.reference import load_reference, reference_from_shards  # noqa: E402


def parse_config(argv: list[str]) -> ReferenceStatsConfig:
    return config_from_argv(argv, "reference_stats", ReferenceStatsConfig, program="data_tools/reference_stats.py", doc=__doc__)


def main(argv: list[str] | None = None) -> int:
    cfg = start_command(argv, "reference_stats", ReferenceStatsConfig, program="data_tools/reference_stats.py",
                        doc=__doc__)
    # The Inception weights' hash before any shard is read (one line, exit 2).
    report_input_errors("data_tools/reference_stats.py",
                        lambda: check_extractor_weights(cfg.extractor, storage_cfg=cfg.storage))
    info = dist.init_distributed()
    storage.configure(cfg.storage)
    extractor = extractor_from_config(cfg.extractor, dist.default_device(info))
    url = reference_from_shards(cfg.shard_patterns(), extractor, n_samples=cfg.n_samples, keep_images=cfg.keep_images,
                                resolution=cfg.resolution, conditioning=cfg.conditioning, out_url=cfg.out,
                                batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                                checkpoint_every=cfg.checkpoint_every, storage_cfg=cfg.storage)
    if info.is_main:
        ref = load_reference(url)
        print(json.dumps({"reference": storage.redact(url), "n": ref.pool.n, "n_planned": ref.meta.get("n_planned"),
                          "dropped": ref.meta.get("dropped"), "extractor": ref.extractor_name,
                          "images_kept": 0 if ref.images is None else len(ref.images)}))
    return 0


if __name__ == "__main__":
    dist.run_entry_point(main)  # exits without the teardown that can abort a gloo/NCCL process
