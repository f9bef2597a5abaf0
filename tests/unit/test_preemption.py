"""ldm_scale.preemption in one process: real signals to this process, real marker files.

The multi-rank agreement (a signal reaching one rank stops all at the same step) is exercised
through launch/train.py in tests/integration/test_multinode.py and test_slurm.py.
"""
from __future__ import annotations

import json
import os
import signal

import pytest

from ldm_scale import preemption
from ldm_scale.preemption import PreemptionConfig


@pytest.fixture(autouse=True)
def clean_state():
    preemption.uninstall()
    yield
    preemption.uninstall()


def test_signal_sets_flag_and_stop_is_decided_on_check_steps():
    preemption.install(PreemptionConfig(signals=["SIGUSR1", "USR2"], check_every=5))
    assert preemption.signal_received() is None
    assert not any(preemption.requested(step) for step in range(1, 11))

    os.kill(os.getpid(), signal.SIGUSR2)  # delivered before os.kill returns (same thread)
    assert preemption.signal_received() == "SIGUSR2"
    assert [step for step in range(11, 21) if preemption.requested(step)] == [15, 20]
    os.kill(os.getpid(), signal.SIGUSR1)
    assert preemption.signal_received() == "SIGUSR2"  # the first signal is the one recorded


def test_uninstall_restores_previous_handlers():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        preemption.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [] and preemption.signal_received() == "SIGUSR1"
        preemption.uninstall()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] and preemption.signal_received() is None
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_disabled_installs_nothing():
    before = signal.getsignal(signal.SIGUSR1)
    preemption.install(PreemptionConfig(enabled=False))
    assert signal.getsignal(signal.SIGUSR1) is before
    assert not preemption.requested(10)


def test_request_from_code_takes_the_same_path():
    preemption.install(PreemptionConfig(check_every=1))
    preemption.request("wall-clock budget")
    assert preemption.requested(3) and preemption.signal_received() == "wall-clock budget"


@pytest.mark.parametrize("cfg, message", [
    (PreemptionConfig(signals=["SIGNOPE"]), "unknown signal 'SIGNOPE'"),
    (PreemptionConfig(signals=["SIGKILL"]), "SIGKILL cannot be caught"),
    (PreemptionConfig(check_every=0), "check_every must be >= 1"),
])
def test_bad_config_names_the_problem(cfg, message):
    with pytest.raises(ValueError, match=message):
        preemption.install(cfg)


def test_acknowledge_writes_the_requeue_marker(tmp_path, monkeypatch):
    preemption.install()
    os.kill(os.getpid(), signal.SIGUSR1)
    monkeypatch.delenv(preemption.MARKER_ENV, raising=False)
    assert preemption.acknowledge(7) is None

    marker = tmp_path / "slurm" / "preempted.12.0.json"
    monkeypatch.setenv(preemption.MARKER_ENV, str(marker))
    assert preemption.acknowledge(7, "s3://bucket/ckpt/run/step_7") == marker
    record = json.loads(marker.read_text())
    assert record["step"] == 7 and record["signal"] == "SIGUSR1"
    assert record["checkpoint"] == "s3://bucket/ckpt/run/step_7"
    assert record["received_at"] <= record["acknowledged_at"]
    assert [p.name for p in marker.parent.iterdir()] == [marker.name]  # no temporary file left
