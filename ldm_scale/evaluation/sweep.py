"""A classifier-free guidance sweep: the paper's FID-vs-CLIP-score trade-off (Rombach et al. 2022,
Fig. 16; Saharia et al. 2022 do the same with guidance weights) from ``eval/fid.py``.

    python eval/fid.py ckpt=... ref=... guidance_scales=[1.5,3,5,8] metrics=text n_samples=10000 out=sweep/

The checkpoint is loaded once; each scale is one ordinary evaluation (:func:`run_fid_eval`, its
own resumable run directory ``<out>/scale_<s>/`` with samples, features and ``results.json``, the
same conditions and per-sample noise for every scale, so the curve compares like with like). Rank 0
then writes to ``<out>``: ``sweep.json`` (every scale's metrics), ``sweep.md`` (the table) and
``sweep.png`` (FID against CLIP score, each point labelled with its scale; FID against the scale
when CLIP score is off).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from ldm_scale import dist, storage
from ldm_scale.evaluation.config import FIDEvalConfig

METRIC_COLUMNS = ("fid", "clip_score", "inception_score", "precision", "recall", "kid", "cmmd")


def sweep_out(cfg: FIDEvalConfig) -> str:
    return cfg.out or str(Path("eval_runs") / f"{Path(str(cfg.ckpt)).stem or 'model'}-guidance-sweep")


def run_guidance_sweep(cfg: FIDEvalConfig) -> Optional[Dict[str, Any]]:
    """Evaluate every ``cfg.guidance_scales`` (collective); the sweep record on rank 0, else None."""
    from ldm_scale.evaluation.evaluate import run_fid_eval
    from ldm_scale.evaluation.model_sampler import load_export, sampler_of_loaded

    dist.init_distributed()
    storage.configure(cfg.storage)
    device = dist.resolve_device(cfg.device)
    base = sweep_out(cfg)
    loaded = load_export(cfg, device)  # once for every scale
    rows: List[Dict[str, Any]] = []
    for scale in cfg.guidance_scales:
        one = copy.deepcopy(cfg)
        one.guidance_scales = []
        one.sampler.guidance_scale = float(scale)
        one.out = storage.join(base, f"scale_{scale:g}")
        record = run_fid_eval(one, model_sampler=sampler_of_loaded(loaded, one, device))
        if record is not None:
            rows.append({"guidance_scale": float(scale), **record["metrics"], "results": record["run_dir"]})
    if not dist.get_dist_info().is_main:
        return None
    sweep = {"checkpoint": storage.redact(cfg.ckpt), "n_samples": cfg.n_samples, "seed": cfg.seed,
             "sampler": {k: v for k, v in asdict(cfg.sampler).items() if k != "guidance_scale"}, "scales": rows}
    storage.write_text(storage.join(base, "sweep.json"), json.dumps(sweep, indent=1, default=str))
    storage.write_text(storage.join(base, "sweep.md"), sweep_table(rows))
    storage.write_bytes(storage.join(base, "sweep.png"), sweep_plot(rows))
    return {"metrics": {f"scale_{r['guidance_scale']:g}/{k}": v for r in rows for k, v in r.items()
                        if k in METRIC_COLUMNS}, "run_dir": base, "sweep": sweep}


def sweep_table(rows: List[Dict[str, Any]]) -> str:
    columns = [c for c in METRIC_COLUMNS if any(c in r for r in rows)]
    lines = ["| guidance scale | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['guidance_scale']:g} | " + " | ".join(
            f"{r[c]:.4f}" if isinstance(r.get(c), float) else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def sweep_plot(rows: List[Dict[str, Any]]) -> bytes:
    from ldm_scale.report import figure_png

    with_clip = all("clip_score" in r for r in rows)
    xs = [r["clip_score"] if with_clip else r["guidance_scale"] for r in rows]
    ys = [r["fid"] for r in rows]

    def draw(ax) -> None:
        ax.plot(xs, ys, marker="o")
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(f"s={r['guidance_scale']:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("CLIP score" if with_clip else "guidance scale")
        ax.set_ylabel("FID")
        ax.set_title("Guidance sweep: FID vs CLIP score" if with_clip else "Guidance sweep: FID vs scale")

    return figure_png(draw, size=(5.5, 4.0))
