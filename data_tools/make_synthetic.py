"""Write the procedural LAION-shaped dataset (coloured shapes with captions) to a path or URL.

    python data_tools/make_synthetic.py out=s3://bucket/synthetic num_samples=2048 seed=0
    python data_tools/make_synthetic.py out=gs://bucket/synthetic storage.anon=true
    python data_tools/make_synthetic.py out=data/shapes_cls labels=class
    python data_tools/make_synthetic.py out=data/shapes_wide max_aspect=3   # 1:3 to 3:1 (aspect buckets)

Arguments are Hydra overrides of ``conf/commands/make_synthetic.yaml`` (typed by
``ldm_scale.data.commands.MakeSyntheticConfig``; ``--help`` lists the keys). The output is
img2dataset's webdataset layout (tar + parquet + _stats.json per shard) plus sizes.json and
dataset.json; the printed brace pattern goes into `data.urls`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import storage  # noqa: E402
from ldm_scale.cli import report_input_errors, start_command  # noqa: E402
from ldm_scale.data.commands import MakeSyntheticConfig  # noqa: E402
from ldm_scale.data.synthetic import write_synthetic_dataset  # noqa: E402

PROGRAM = "data_tools/make_synthetic.py"


def main(argv=None) -> int:
    cfg = start_command(argv, "make_synthetic", MakeSyntheticConfig, program=PROGRAM, doc=__doc__)
    shards = report_input_errors(PROGRAM, lambda: write_synthetic_dataset(
        cfg.out, num_samples=cfg.num_samples, samples_per_shard=cfg.samples_per_shard, seed=cfg.seed,
        min_size=cfg.min_size, max_size=cfg.max_size, labels=cfg.labels, max_aspect=cfg.max_aspect,
        cfg=cfg.storage))
    info = json.loads(storage.read_text(storage.join(cfg.out, "dataset.json"), cfg.storage))
    print(json.dumps({"shards": len(shards), "samples": cfg.num_samples, "urls": info["shards"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
