"""Step health, the spike rule, metrics de-duplication and the run lease, one process."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from ldm_scale.logging import history_step, truncate_metrics
from ldm_scale.train import health as H
from ldm_scale.train import lease as L


def vector(loss=1.0, nonfinite=0, applied=True, norm=1.0, searching=False, count=1):
    return H.local_health(torch.tensor(float(loss)), count, torch.tensor(float(nonfinite)), norm, applied, searching)


def test_healthy_step_reports_the_mean_loss_and_resets_the_streak():
    h = H.StepHealth(3)
    assert not h.decide(vector(applied=False), 0).healthy
    verdict = h.decide(vector(loss=6.0, count=3), 0)
    assert verdict.healthy and verdict.loss == pytest.approx(2.0) and h.in_a_row == 0
    assert h.metrics()["train/skipped_steps"] == 1.0


def test_each_skip_reason_is_counted_and_the_streak_stops_the_run():
    h = H.StepHealth(3)
    v1 = h.decide(vector(loss=math.nan, nonfinite=1, applied=False), 4)
    v2 = h.decide(vector(applied=False, norm=math.inf), 4)
    assert (v1.reason, v2.reason) == (H.SkipReason.NONFINITE_LOSS, H.SkipReason.GRAD_OVERFLOW)
    with pytest.raises(H.UnhealthyRunError, match="3 optimizer steps in a row") as info:
        h.decide(vector(applied=False), 4)
    assert info.value.reason == "grad_overflow"
    assert h.skipped == {"nonfinite_loss": 1, "grad_overflow": 2, "nonfinite_grad_norm": 0}


def test_an_applied_step_with_a_nonfinite_norm_stops_at_once():
    with pytest.raises(H.UnhealthyRunError, match="weights may be damaged"):
        H.StepHealth(5).decide(vector(norm=math.nan), 7)


def test_fp16_overflows_while_the_scale_searches_do_not_count_toward_the_streak():
    h = H.StepHealth(2)
    for _ in range(10):
        verdict = h.decide(vector(applied=False, norm=math.inf, searching=True), 0)
        assert not verdict.healthy and not verdict.counts_toward_streak
    assert h.in_a_row == 0 and h.skipped["grad_overflow"] == 10
    h.decide(vector(applied=False, norm=math.inf), 0)  # at the scale floor: counts
    with pytest.raises(H.UnhealthyRunError):
        h.decide(vector(applied=False, norm=math.inf), 0)


def test_nonfinite_loss_sum_does_not_poison_the_vector():
    v = vector(loss=math.inf, nonfinite=1, applied=False)
    assert torch.isfinite(v).all() and v[0] == 1


def test_spike_detector_fires_after_patience_and_ignores_single_outliers():
    d = H.LossSpikeDetector(H.SpikeRuleConfig(enabled=True, factor=3.0, window=4, patience=2))
    for step, loss in enumerate([1.0, 1.2, 0.8, 1.0], start=1):
        assert d.update(step, loss) is None
    assert d.update(5, 10.0) is None and d.suspicious  # one outlier: suspicious only
    assert d.update(6, 1.1) is None and not d.suspicious
    assert d.update(7, 9.0) is None
    spike = d.update(8, 12.0)
    assert spike == H.Spike(start_step=7, end_step=8, loss=12.0, median=1.05)
    assert 10.0 not in d.history and 9.0 not in d.history  # spikes never enter the median


def test_spike_detector_is_off_by_default_and_round_trips_its_state():
    off = H.LossSpikeDetector(H.SpikeRuleConfig())
    assert all(off.update(s, 1e9) is None for s in range(100))
    d = H.LossSpikeDetector(H.SpikeRuleConfig(enabled=True, window=3))
    for s, loss in enumerate([1.0, 2.0, 3.0]):
        d.update(s, loss)
    d.rollbacks, d.events = 1, [{"spike_start": 5}]
    e = H.LossSpikeDetector(H.SpikeRuleConfig(enabled=True, window=3))
    e.load_state_dict(json.loads(json.dumps(d.state_dict())))
    assert list(e.history) == [1.0, 2.0, 3.0] and e.median() == 2.0 and e.rollbacks == 1 and e.events == d.events


def test_debug_spike_window_is_a_function_of_the_data_position():
    cfg = H.DebugSpikeConfig(start_batch=3, num_batches=2, factor=7.0)
    assert [cfg.loss_scale(p) for p in range(6)] == [1, 1, 1, 7.0, 7.0, 1]
    assert H.DebugSpikeConfig().loss_scale(0) == 1.0


def test_truncate_metrics_keeps_one_row_per_step_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s} for s in (2, 4, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "tra')
    assert history_step(path) == 6
    assert truncate_metrics(path, 4) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    assert truncate_metrics(path, 0) == 2 and path.read_text() == ""
    assert history_step(path) is None and truncate_metrics(tmp_path / "absent.jsonl", 0) == 0


def _record(**kw):
    base = {"token": "other", "host": "elsewhere", "pid": 1, "job": None, "started_at": time.time(),
            "renewed_at": time.time()}
    base.update(kw)
    return base


def test_owner_gone_rules():
    now = time.time()
    assert L.owner_gone(_record(), now, 60, "here", None) is None
    assert "not renewed" in L.owner_gone(_record(renewed_at=now - 120), now, 60, "here", None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert "no longer exists" in L.owner_gone(_record(host="here", pid=dead.pid), now, 60, "here", None)
    assert L.owner_gone(_record(host="here", pid=os.getpid()), now, 60, "here", None) is None
    assert "same launcher job" in L.owner_gone(_record(job="slurm:7"), now, 60, "here", "slurm:7")


def test_launcher_job_ignores_torchruns_default_run_id(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert L.launcher_job() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert L.launcher_job() == "torchrun:abc"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert L.launcher_job() == "slurm:42"


def test_lease_is_exclusive_renewed_released_and_taken_over_when_stale(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    cfg = L.LeaseConfig(timeout_s=60, renew_every_s=0.05, settle_s=0.01)
    first = L.RunLease(cfg, str(tmp_path / "run"))
    first.acquire()
    renewed = json.loads((tmp_path / "run" / "LEASE").read_text())["renewed_at"]
    time.sleep(0.3)
    assert json.loads((tmp_path / "run" / "LEASE").read_text())["renewed_at"] > renewed
    second = L.RunLease(cfg, str(tmp_path / "run"))
    with pytest.raises(L.LeaseHeldError, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    assert not (tmp_path / "run").exists()  # nothing else was written: no empty directory left
    (tmp_path / "run").mkdir()
    # A stale lease of a vanished owner elsewhere is taken over, and the takeover is logged.
    (tmp_path / "run" / "LEASE").write_text(json.dumps(_record(renewed_at=time.time() - 3600)))
    with caplog.at_level("WARNING"):
        second.acquire()
    assert "taking over the lease" in caplog.text
    # The displaced owner notices at its next renewal and refuses to write more.
    (tmp_path / "run" / "LEASE").write_text(json.dumps(_record()))
    time.sleep(0.3)
    with pytest.raises(L.LeaseHeldError, match="lost its lease"):
        second.check()
    second.release()
    assert (tmp_path / "run" / "LEASE").exists()  # not ours any more: left alone


def test_collective_timeout_is_set_on_every_group_and_restored_after_a_slow_phase():
    import datetime

    from torch.distributed import distributed_c10d

    from ldm_scale import dist

    dist.init_distributed()  # a world of one
    extra = torch.distributed.new_group(ranks=[0])  # as DeepSpeed makes for its reductions

    def timeouts():
        return [g._get_backend(torch.device("cpu")).options._timeout for g in distributed_c10d._world.pg_map]

    dist.set_collective_timeout(42)
    assert timeouts() == [datetime.timedelta(seconds=42)] * 2
    with dist.collective_timeout(1800):
        assert timeouts() == [datetime.timedelta(seconds=1800)] * 2
    assert timeouts() == [datetime.timedelta(seconds=42)] * 2
    torch.distributed.destroy_process_group(extra)
    dist.set_collective_timeout(1800)  # later tests in this process share the default group


def test_garbage_collection_runs_at_fixed_steps_only(monkeypatch):
    import gc

    from ldm_scale.train.loop import GarbageCollection

    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or 0)
    control = GarbageCollection(every=3)
    try:
        assert not gc.isenabled()
        for step in range(1, 10):
            control.after_step(step)
        assert calls == [2, 1, 1, 1]  # the start-up full collection, then steps 3, 6, 9
    finally:
        control.close()
    assert gc.isenabled()
    off = GarbageCollection(every=0)
    off.after_step(3)
    assert gc.isenabled() and calls == [2, 1, 1, 1]
