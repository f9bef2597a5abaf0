"""Build webdataset shards from a LAION-style parquet with img2dataset (downloads the images).

    python data_tools/download.py parquet=laion_part0.parquet out=s3://bucket/laion \
        image_size=512 processes=16 threads=64

Arguments are Hydra overrides of ``conf/commands/download.yaml`` (typed by
``ldm_scale.data.commands.DownloadCommandConfig``, whose img2dataset settings are
``ldm_scale.data.download.DownloadConfig``; ``--help`` lists the keys). Needs the img2dataset extra:
pip install 'ldm_scale[img2dataset]'. Writes sizes.json at the end and prints the totals of
img2dataset's stats (attempted, written, failed by error) as JSON.

Every input column other than the url / caption columns is kept in each sample's .json (and the shard
parquet) unless ``extra_columns`` says otherwise: ``none``, or comma-separated names
(``extra_columns=label,aesthetic``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from ldm_scale.cli import report_input_errors, start_command  # noqa: E402
from ldm_scale.data.commands import DownloadCommandConfig  # noqa: E402
from ldm_scale.data.download import download_shards  # noqa: E402

PROGRAM = "data_tools/download.py"


def main(argv=None) -> int:
    cfg = start_command(argv, "download", DownloadCommandConfig, program=PROGRAM, doc=__doc__)
    # A column that is not in the input or that img2dataset reserves: one line, exit 2.
    totals = report_input_errors(PROGRAM, lambda: download_shards(cfg.parquet, cfg.out, cfg, cfg.storage))
    print(json.dumps(totals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
