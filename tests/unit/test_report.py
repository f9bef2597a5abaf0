"""ldm_scale/report.py on a hand-written run directory: the series it plots (last row per step
wins, non-finite values dropped), the panels it draws or names as missing, the eval table, and the
error for a directory that is not a run. The browser check of a real run's report is in
tests/integration/test_train_loop.py."""
from __future__ import annotations

import json
import math

from ldm_scale import report


def _run_dir(tmp_path, rows):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "result.json").write_text(json.dumps({"run_id": "r1", "step": 3}))
    return run


def test_series_keeps_the_last_row_per_step_and_drops_non_finite_values():
    rows = [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": math.nan}, {"step": 1, "train/loss": 0.9},
            {"step": 3, "train/loss": 0.5, "train/samples_seen": 96.0}, {"step": 4, "lr": 1e-3}]
    assert report.series(rows, "train/loss") == ([1.0, 3.0], [0.9, 0.5])
    assert report.series(rows, "train/loss", x="train/samples_seen") == ([96.0], [0.5])


def test_panels_drawn_missing_ones_named_eval_results_tabled(tmp_path):
    rows = [{"step": s, "train/loss": 1.0 / s, "lr": 1e-3, "train/loss_by_t/0-499": 2.0 / s,
             "train/loss_by_t/500-999": 0.5 / s, "train/samples_seen": 32.0 * s} for s in (1, 2, 3)]
    rows.append({"step": 3, "val/loss": 0.4, "val/loss_t62": 0.8, "val/loss_t937": 0.1})
    run = _run_dir(tmp_path, rows)
    fid = tmp_path / "fid"
    fid.mkdir()
    (fid / "results.json").write_text(json.dumps({"metrics": {"fid": 12.5, "inception_score": 3.25}}))
    index = report.write_report(str(run), eval_results=[str(fid)])
    out = run / "report"
    page = (out / "index.html").read_text()
    for name in ("loss", "loss_samples", "loss_by_t", "lr", "val_loss"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f'src="{name}.png"' in page
    assert not (out / "grad_norm.png").exists()
    assert "Not recorded in this run: " in page and "Gradient norm" in page.split("Not recorded", 1)[1]
    assert "<th>fid</th><td>12.5</td>" in page and "results.json" in page
    assert index == str(out / "index.html")


def test_a_directory_without_metrics_is_refused_with_exit_status_2(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
