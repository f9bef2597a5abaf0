"""DeepSpeed's real JIT op load (its CPU shm comm op, through ``ds_ops.load_op``) with a build lock
planted in a fresh extensions directory: it never hangs. A lock a live process holds is waited on
with messages and given up on with an error naming the holder; a stale existence-style lock (what a
build killed under an older torch leaves) is removed and the op is built."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from ldm_scale.train import ds_ops
from tests.fixtures.torchrun import REPO_ROOT, child_env
from tests.unit.test_ds_ops import HOLD_FLOCK

LOAD = "from ldm_scale.train import ds_ops; ds_ops.load_op('ShareMemCommBuilder'); print('LOADED')"
# torch before its OS lock: FileBaton, whose file's existence is the lock (waits while it exists).
AS_OLD_TORCH = """
from torch.utils import cpp_extension
from torch.utils.file_baton import FileBaton

class BatonLock:
    def __init__(self, path):
        self.baton = FileBaton(path)
    def __enter__(self):
        while not self.baton.try_acquire():
            self.baton.wait()
    def __exit__(self, *exc):
        self.baton.release()

cpp_extension.FileLock = BatonLock
"""


def _load(ext_dir, timeout_s: float, prelude: str = "", **env) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", prelude + LOAD], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout_s, env=child_env({"TORCH_EXTENSIONS_DIR": str(ext_dir), **env}))
    return proc, time.monotonic() - start


@pytest.fixture(scope="module")
def built_op():
    """DeepSpeed's shm comm op built in this environment's extensions directory (once: ~30-90 s on
    2 busy cores; later sessions and the console test reuse it). Copies of it load without a build."""
    built = ds_ops.extensions_dir() / ds_ops.SHM_COMM_OP
    if not (built / f"{ds_ops.SHM_COMM_OP}.so").exists():
        proc, _ = _load(built.parent, 900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return built


def _plant(ext_dir, age_s: float = 120.0):
    lock = ext_dir / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - age_s,) * 2)
    return lock


def test_real_op_load_reports_a_held_lock_and_gives_up(tmp_path):
    lock = _plant(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FLOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc, elapsed = _load(tmp_path, 120, LDM_SCALE_OP_BUILD_TIMEOUT_S="4")
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert proc.returncode != 0 and "LOADED" not in proc.stdout
    assert "waiting for the build of DeepSpeed op deepspeed_shm_comm" in proc.stderr
    assert "OpBuildTimeout" in proc.stderr and f"pid {holder.pid}" in proc.stderr and str(lock) in proc.stderr
    assert elapsed < 60


def test_real_op_load_removes_a_stale_lock_left_by_a_killed_build(tmp_path, built_op):
    shutil.copytree(built_op, tmp_path / ds_ops.SHM_COMM_OP)  # mtimes kept: ninja finds it up to date
    lock = _plant(tmp_path)
    proc, elapsed = _load(tmp_path, 300, AS_OLD_TORCH)  # an existence lock: without the guard, forever
    assert proc.returncode == 0 and "LOADED" in proc.stdout, proc.stderr[-3000:]
    assert f"removed the build lock {lock}" in proc.stderr and "no live process holds it" in proc.stderr
    assert elapsed < 120
