"""Inspect shards: counts, sizes, caption/metadata histograms, damaged members; writes sizes.json.

(Named inspect_shards.py: a data_tools/inspect.py would shadow the standard library's `inspect`
module for every script run from this directory.)

    python data_tools/inspect_shards.py data='s3://bucket/laion/{00000..41407}.tar' report=laion_report.json

Arguments are Hydra overrides of ``conf/commands/inspect_shards.yaml`` (typed by
``ldm_scale.data.commands.InspectShardsConfig``; ``--help`` lists the keys). sizes.json (samples per
shard, next to the shards) lets the loader size epochs without opening every shard; run this once
after img2dataset (download.py already does; ``write_sizes=false`` skips it).

Prints a JSON summary on stdout (the report's counts, the written samples' ``status`` and
``downloads``: what img2dataset's ``<shard>_stats.json`` files say was attempted, written and failed,
by error) and one line about the downloads on stderr; ``report=`` writes everything, per shard too.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import storage  # noqa: E402
from ldm_scale.cli import report_input_errors, start_command  # noqa: E402
from ldm_scale.data.commands import InspectShardsConfig  # noqa: E402
from ldm_scale.data.shard_stats import format_downloads, inspect_shards  # noqa: E402

PROGRAM = "data_tools/inspect_shards.py"


def main(argv=None) -> int:
    cfg = start_command(argv, "inspect_shards", InspectShardsConfig, program=PROGRAM, doc=__doc__)
    report = report_input_errors(PROGRAM, lambda: inspect_shards(cfg.shard_patterns(), cfg.storage, threads=cfg.threads,
                                                                 write_sizes_json=cfg.write_sizes))
    if cfg.report:
        storage.write_text(cfg.report, json.dumps(report, indent=1), cfg.storage)
    summary = {k: report[k] for k in ("num_shards", "num_samples", "total_bytes", "damage", "members", "status",
                                      "downloads")}
    print(json.dumps(summary, indent=1))
    print(format_downloads(report["downloads"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
