"""Inspect shards: counts, sizes, caption/metadata histograms, damaged members; writes sizes.json.

(Named inspect_shards.py: a data_tools/inspect.py would shadow the standard library's `inspect`
module for every script run from this directory.)

    python data_tools/inspect_shards.py 's3://bucket/laion/{00000..41407}.tar' --report laion_report.json

sizes.json (samples per shard, next to the shards) lets the loader size epochs without opening
every shard; run this once after img2dataset (download.py already does).

Prints a JSON summary on stdout (the report's counts, the written samples' ``status`` and
``downloads``: what img2dataset's ``<shard>_stats.json`` files say was attempted, written and failed,
by error) and one line about the downloads on stderr; ``--report`` writes everything, per shard too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import storage  # noqa: E402
from ldm_scale.data.shard_stats import format_downloads, inspect_shards  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("urls", nargs="+", help="shard patterns (brace / glob / list)")
    p.add_argument("--report", default=None, help="write the full report JSON here (path or URL)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--no-sizes", action="store_true", help="do not write sizes.json")
    p.add_argument("--endpoint-url", default=None)
    args = p.parse_args(argv)
    cfg = storage.StorageConfig(endpoint_url=args.endpoint_url)
    report = inspect_shards(args.urls, cfg, threads=args.threads, write_sizes_json=not args.no_sizes)
    if args.report:
        storage.write_text(args.report, json.dumps(report, indent=1), cfg)
    summary = {k: report[k] for k in ("num_shards", "num_samples", "total_bytes", "damage", "members", "status",
                                      "downloads")}
    print(json.dumps(summary, indent=1))
    print(format_downloads(report["downloads"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
