"""DeepSpeed op builds never wait silently: per-environment build directory, build-lock holders
found, a stale lock removed, a held one reported and given up on, compiler output in the build log."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ldm_scale.train import ds_ops

HOLD_FLOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def _plant(root, op="some_op", age_s=60.0):
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s,) * 2)
    return lock


@pytest.fixture
def flock_holder(tmp_path):
    """A live process holding an OS lock on <tmp>/some_op/lock (a stuck or orphaned builder)."""
    lock = _plant(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", HOLD_FLOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc, lock
    proc.kill()
    proc.wait(timeout=10)


def test_extensions_dir_is_per_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(ds_ops.EXTENSIONS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = ds_ops.extensions_dir()
    assert here.parent == tmp_path / "ldm_scale" / "torch_extensions"
    assert f"py{sys.version_info.major}{sys.version_info.minor}-torch" in here.name and "-ds" in here.name
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another-venv"))
    assert ds_ops.extensions_dir() != here
    monkeypatch.setenv(ds_ops.EXTENSIONS_ENV, str(tmp_path / "mine"))
    assert ds_ops.extensions_dir() == tmp_path / "mine"


def test_existence_lock_without_holder_is_stale_and_with_one_is_not(tmp_path):
    lock = _plant(tmp_path)
    [found] = ds_ops.find_build_locks(tmp_path, existence_style=True)
    assert found.op == "some_op" and found.stale and not found.held
    fd = os.open(lock, os.O_RDONLY)  # what a live FileBaton builder keeps open
    try:
        [found] = ds_ops.find_build_locks(tmp_path, existence_style=True)
        assert found.held and found.holders == [os.getpid()] and not found.stale
    finally:
        os.close(fd)
    assert [lk.path for lk in ds_ops.clear_stale_locks(tmp_path, existence_style=True)] == [lock]
    assert not lock.exists()


def test_os_lock_holder_is_found_and_a_leftover_file_is_harmless(tmp_path, flock_holder):
    proc, lock = flock_holder
    [found] = ds_ops.find_build_locks(tmp_path, existence_style=False)
    assert found.held and found.holders == [proc.pid] and f"pid {proc.pid}" in found.describe_holders()
    proc.kill()
    proc.wait(timeout=10)
    [found] = ds_ops.find_build_locks(tmp_path, existence_style=False)
    assert not found.held and not found.stale  # the kernel dropped it: nothing blocks, nothing to remove
    assert ds_ops.clear_stale_locks(tmp_path, existence_style=False) == [] and lock.exists()


def test_stale_existence_lock_does_not_hang_a_filebaton_wait(tmp_path, caplog):
    """torch's FileBaton (the lock of older torch releases) waits while the file exists: forever
    after a killed build, unless the watchdog sees that nobody holds it."""
    from torch.utils.file_baton import FileBaton

    lock = _plant(tmp_path)
    start = time.monotonic()
    with ds_ops.op_build("some_op", existence_style=True, root=tmp_path, timeout_s=60):
        baton = FileBaton(str(lock))
        assert not baton.try_acquire()
        baton.wait()
    assert time.monotonic() - start < 10
    assert not lock.exists()
    assert any("no live process holds it" in r.getMessage() for r in caplog.records)


def test_lock_held_by_another_process_is_reported_then_given_up_on(tmp_path, flock_holder, caplog, monkeypatch):
    import filelock

    proc, lock = flock_holder
    monkeypatch.setattr(ds_ops, "MESSAGE_EVERY_S", 0.5)
    start = time.monotonic()
    with pytest.raises(ds_ops.OpBuildTimeout) as info:
        with ds_ops.op_build("some_op", existence_style=False, root=tmp_path, timeout_s=2):
            filelock.FileLock(str(lock)).acquire()  # torch's wait: no timeout of its own
    elapsed = time.monotonic() - start
    assert 2 <= elapsed < 15
    message = str(info.value)
    assert f"pid {proc.pid}" in message and str(lock) in message and ds_ops.TIMEOUT_ENV in message
    assert any("waiting for the build of DeepSpeed op some_op" in r.getMessage() for r in caplog.records)


def test_compiler_output_goes_to_the_build_log(tmp_path, capfd):
    with ds_ops.op_build("some_op", root=tmp_path, existence_style=False):
        print("gcc -c from python", flush=True)
        subprocess.run(["sh", "-c", "echo 'gcc -c from a compiler'; echo 'cc1: warning' >&2"], check=True)
    out, err = capfd.readouterr()
    assert "gcc" not in out + err and "cc1" not in out + err
    text = (tmp_path / ds_ops.BUILD_LOG).read_text()
    assert "gcc -c from python" in text and "gcc -c from a compiler" in text and "cc1: warning" in text


def test_cpu_shm_comm_op_is_not_built_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setenv(ds_ops.EXTENSIONS_ENV, str(tmp_path))
    monkeypatch.delenv(ds_ops.SHM_COMM_ENV, raising=False)
    ds_ops.prepare()
    build_shm_op = sys.modules["deepspeed.comm.torch"].build_shm_op
    assert build_shm_op() is None and not (tmp_path / ds_ops.SHM_COMM_OP).exists()
