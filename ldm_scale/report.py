"""One HTML page a person can read about a training run, from what the run wrote.

    python -m ldm_scale.report <run dir or URL> [--out DIR] [--eval <eval/fid.py out dir or results.json> ...]

Reads ``metrics.jsonl``, ``result.json``, ``plan.json``, ``events.jsonl`` and ``samples/*.png`` of the
run directory (a path or any storage URL) and writes ``<run dir>/report/index.html`` (or ``--out``)
with PNG plots beside it: training loss against optimizer steps and samples seen, loss by timestep
bucket, learning rate, gradient norm, skipped steps and rollbacks, throughput and MFU, data-skip
counts, the validation loss and any ``eval/*`` score over training, the last sample grids, the run's
result and the given ``eval/fid.py`` results. A panel whose metrics the run did not record says so
instead of showing an empty plot. Training writes it at the end of every completed run
(``logger.report``).

Plots are drawn with matplotlib (Agg, no display needed); the page is static (no script or network
access needed to view it), and each image is a file next to it, so the directory can be copied or
served as is.
"""
from __future__ import annotations

import argparse
import html
import io
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ldm_scale import storage

log = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX = "index.html"
LAST_GRIDS = 3  # sample grids shown: the newest of each key, up to this many keys


@dataclass
class Panel:
    """One plot: series (metric keys) against ``x`` ("step" or "train/samples_seen")."""

    name: str
    title: str
    keys: List[str]
    x: str = "step"
    ylabel: str = ""
    log_y: bool = False
    prefixes: List[str] = field(default_factory=list)  # every key starting with one of these


PANELS = [
    Panel("loss", "Training loss", ["train/loss"], ylabel="loss"),
    Panel("loss_samples", "Training loss against samples seen", ["train/loss"], x="train/samples_seen", ylabel="loss"),
    Panel("loss_by_t", "Training loss by timestep bucket", [], ylabel="loss", prefixes=["train/loss_by_t/"], log_y=True),
    Panel("lr", "Learning rate", ["lr", "discriminator/lr"], ylabel="lr"),
    Panel("grad_norm", "Gradient norm", ["grad_norm", "discriminator/grad_norm"], ylabel="norm", log_y=True),
    Panel("skipped", "Skipped optimizer steps and rollbacks (cumulative)", ["train/skipped_steps", "train/rollbacks"],
          prefixes=["train/skipped_steps/"], ylabel="count"),
    Panel("throughput", "Throughput", ["perf/samples_per_s", "perf/images_per_s_per_device"], ylabel="samples/s"),
    Panel("mfu", "Model FLOPs utilisation", ["perf/mfu", "perf/tflops_per_device"], ylabel="MFU / TFLOPS"),
    Panel("data_skips", "Data: samples skipped by reason (cumulative)", [], prefixes=["data/skip/", "data/filter/"],
          ylabel="samples"),
    Panel("val_loss", "Fixed-timestep validation loss", ["val/loss"], prefixes=["val/loss_t"], ylabel="loss"),
    Panel("eval", "Evaluations during training", [], prefixes=["eval/"], ylabel="score"),
]


def read_run(run_dir: str) -> Dict[str, Any]:
    """What a run directory holds: metrics rows, result, plan, events and sample grid URLs."""
    def text(name: str) -> Optional[str]:
        url = storage.join(run_dir, name)
        return storage.read_bytes(url).decode() if storage.exists(url) else None

    metrics = text("metrics.jsonl")
    if metrics is None:
        raise FileNotFoundError(f"{storage.redact(run_dir)} has no metrics.jsonl: is it a training run directory "
                                "(<output_dir>/<run_id>)?")
    rows = [json.loads(line) for line in metrics.splitlines() if line.strip()]
    events = text("events.jsonl")
    samples = storage.join(run_dir, "samples")
    grids = sorted(u for u in storage.glob(storage.join(samples, "*.png"))) if storage.exists(samples) else []
    return {"rows": rows, "result": json.loads(text("result.json") or "{}"), "plan": json.loads(text("plan.json") or "{}"),
            "events": [json.loads(line) for line in (events or "").splitlines() if line.strip()], "grids": grids}


def series(rows: Sequence[Dict[str, Any]], key: str, x: str = "step") -> Tuple[List[float], List[float]]:
    """(x, y) of every row that has both, finite values only, in step order (the last row per step wins)."""
    by_step: Dict[int, Tuple[float, float]] = {}
    for r in rows:
        if key in r and x in r and isinstance(r[key], (int, float)) and math.isfinite(r[key]):
            by_step[int(r["step"])] = (float(r[x]), float(r[key]))
    points = [by_step[s] for s in sorted(by_step)]
    return [p[0] for p in points], [p[1] for p in points]


def panel_keys(panel: Panel, rows: Sequence[Dict[str, Any]]) -> List[str]:
    present = {k for r in rows for k in r}
    keys = [k for k in panel.keys if k in present]
    keys += sorted(k for k in present if any(k.startswith(p) for p in panel.prefixes) and k not in keys
                   and not k.endswith("_chance"))
    return keys


def figure_png(draw: Callable[[Any], None], size: Tuple[float, float] = (6.4, 3.6)) -> bytes:
    """PNG bytes of one matplotlib figure (Agg: no display) that ``draw(ax)`` fills."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        draw(ax)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def plot_panel(panel: Panel, rows: Sequence[Dict[str, Any]], keys: List[str]) -> bytes:
    def draw(ax) -> None:
        for key in keys:
            xs, ys = series(rows, key, panel.x)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.4, label=key)
        if panel.log_y and all(v > 0 for key in keys for v in series(rows, key, panel.x)[1]):
            ax.set_yscale("log")
        ax.set_title(panel.title)
        ax.set_xlabel("optimizer step" if panel.x == "step" else "samples seen")
        ax.set_ylabel(panel.ylabel)
        if len(keys) > 1:
            ax.legend(fontsize=7)

    return figure_png(draw)


def _table(values: Dict[str, Any]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in values.items())
    return f"<table>{cells}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _eval_results(paths: Sequence[str]) -> List[Tuple[str, Dict[str, Any]]]:
    out = []
    for p in paths:
        url = p if p.endswith(".json") else storage.join(p, "results.json")
        out.append((storage.redact(url), json.loads(storage.read_bytes(url).decode())))
    return out


def write_report(run_dir: str, out_dir: Optional[str] = None, eval_results: Sequence[str] = ()) -> str:
    """Render the report; returns the URL of its ``index.html``."""
    run = read_run(run_dir)
    out = out_dir or storage.join(run_dir, REPORT_DIR)
    rows, result = run["rows"], run["result"]
    title = f"Run {result.get('run_id') or Path(str(run_dir).rstrip('/')).name}"
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p class=source>{html.escape(storage.redact(run_dir))}</p>"]
    if result:
        parts += ["<h2>Result</h2>", _table(result)]
    if run["plan"]:
        parts += ["<h2>Plan</h2>", _table({k: v for k, v in run["plan"].items() if not isinstance(v, dict)})]

    parts.append("<h2>Training</h2>")
    missing = []
    for panel in PANELS:
        keys = panel_keys(panel, rows)
        if not keys or not any(series(rows, k, panel.x)[0] for k in keys):
            missing.append(panel.title)
            continue
        name = f"{panel.name}.png"
        storage.write_bytes(storage.join(out, name), plot_panel(panel, rows, keys))
        parts.append(f'<figure><img src="{name}" alt="{html.escape(panel.title)}" data-panel="{panel.name}">'
                     f"<figcaption>{html.escape(panel.title)}</figcaption></figure>")
    if missing:
        parts.append("<p class=missing>Not recorded in this run: " + html.escape("; ".join(missing)) + ".</p>")

    latest: Dict[str, str] = {}
    for url in run["grids"]:  # <key>_step<NNNNNNN>.png, sorted: the last per key is the newest
        latest[url.rsplit("/", 1)[-1].rsplit("_step", 1)[0]] = url
    if latest:
        parts.append("<h2>Latest samples</h2>")
        for key, url in list(latest.items())[:LAST_GRIDS]:
            name = "grid_" + url.rsplit("/", 1)[-1]
            storage.write_bytes(storage.join(out, name), storage.read_bytes(url))  # the report stands alone
            parts.append(f'<figure><img src="{name}" alt="{html.escape(key)}" data-panel="grid">'
                         f"<figcaption>{html.escape(url.rsplit('/', 1)[-1])}</figcaption></figure>")
    for source, record in _eval_results(eval_results):
        parts += [f"<h2>Evaluation: {html.escape(source)}</h2>", _table(record.get("metrics", record))]
        if "settings" in record or "metric_settings" in record:
            parts.append(_table({k: record[k] for k in ("settings", "metric_settings") if k in record}))
    if run["events"]:
        parts += ["<h2>Events</h2>", "<ul>" + "".join(f"<li>{html.escape(json.dumps(e))}</li>" for e in run["events"])
                  + "</ul>"]
    page = ("<!doctype html><html><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>" + "\n".join(parts)
            + "</body></html>\n")
    index = storage.join(out, INDEX)
    storage.write_bytes(index, page.encode())
    return index


_CSS = ("body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;color:#222}"
        "figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:.85em;color:#555}"
        "table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        ".source,.missing{color:#666}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm_scale.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a training run directory (<output_dir>/<run_id>), a path or storage URL")
    p.add_argument("--out", default=None, help="where to write the report (default <run_dir>/report)")
    p.add_argument("--eval", action="append", default=[], help="an eval/fid.py output dir or results.json (repeatable)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        index = write_report(args.run_dir, args.out, args.eval)
    except (FileNotFoundError, storage.StorageError) as exc:
        print(f"report: error: {storage.redact(exc)}", file=sys.stderr)
        return 2
    print(index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
