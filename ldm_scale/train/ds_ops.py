"""DeepSpeed's JIT-built ops: one build directory per environment, no silent wait on a build lock,
compiler output in a log file, and no build at all of the CPU comm op that training never uses.

DeepSpeed compiles some C++ ops on first use (``OpBuilder.jit_load`` -> ``torch.utils.cpp_extension
.load``: ninja and the host compiler): on CPU its shared-memory comm op ``deepspeed_shm_comm`` when
the comm backend starts, ``cpu_adam`` with ZeRO-Offload, fused kernels on GPUs when a config asks
for them. torch builds op ``X`` in ``$TORCH_EXTENSIONS_DIR/X/`` under the lock file ``X/lock``.
Older torch (``FileBaton``) takes the file's *existence* as the lock: a build killed half-way
leaves it behind and every later run waits on it forever. Newer torch holds an OS lock on it
(filelock's ``flock``), which the kernel drops when the holder dies, so a leftover file is harmless,
but a live holder (a stuck build, an orphaned rank) is still waited on without a word.

:func:`prepare`, called before DeepSpeed starts its comm backend (``train/engine.py``), makes that:

1. ``TORCH_EXTENSIONS_DIR`` defaults to ``$XDG_CACHE_HOME/ldm_scale/torch_extensions/<tag>`` (else
   ``~/.cache/...``), tag = Python, torch and DeepSpeed versions and a hash of ``sys.prefix``: one
   directory per environment, where torch's default is shared by every virtualenv with the same
   Python and CUDA. A ``TORCH_EXTENSIONS_DIR`` already set is kept.
2. The CPU shm comm op is not built: DeepSpeed uses it only in ``inference_all_reduce``
   (DeepSpeed-Inference tensor parallelism), never in training, so a first run on a machine needs
   no compiler. ``LDM_SCALE_DS_SHM_COMM=1`` builds it as DeepSpeed would.
3. Every JIT build runs under :func:`op_build`: stdout/stderr (compiler command lines, DeepSpeed's
   probe compiles and prints) go to ``<extensions dir>/ldm_scale-op-build.log``; an existence-style
   lock with no live holder is removed with a warning (and the load retried once); while another
   process holds the lock, a line every 15 s names the lock and its holder, and after
   ``LDM_SCALE_OP_BUILD_TIMEOUT_S`` (600 s) of waiting :class:`OpBuildTimeout` says what to do.

Holders are found on this host (``/proc/locks``, ``/proc/<pid>/fd``): with an old torch on a
network home shared by several nodes, set ``TORCH_EXTENSIONS_DIR`` to a node-local directory.

Why one module of ~460 lines: the three parts above share one mechanism, the guarded build (lock
inspection on this host, the waiting loop, the build log), and are tested together against real
builds (``tests/integration/test_ds_op_build.py``); about a fifth of its lines are docstrings
and the why-comments at each lock and process check.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import importlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional

log = logging.getLogger(__name__)

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
SHM_COMM_ENV = "LDM_SCALE_DS_SHM_COMM"
TIMEOUT_ENV = "LDM_SCALE_OP_BUILD_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
BUILD_LOG = "ldm_scale-op-build.log"
SHM_COMM_OP = "deepspeed_shm_comm"
MESSAGE_EVERY_S = 15.0
POLL_S = 0.5
# An existence-style lock younger than this may belong to a builder between creating it and
# opening its handle: never removed.
STALE_AFTER_S = 2.0


class OpBuildTimeout(RuntimeError):
    """Waited longer than ``LDM_SCALE_OP_BUILD_TIMEOUT_S`` for another process's op build lock."""


class _WaitExpired(BaseException):
    """Raised asynchronously in the waiting thread by the watchdog; :func:`op_build` turns it into
    :class:`OpBuildTimeout` with the message (an async exception cannot carry arguments)."""


# ------------------------------------------------------------------------------------------
# Where ops are built

def environment_tag() -> str:
    """``py311-torch2.14.1-ds0.19.8-<8 hex of sys.prefix>``: what a built op depends on."""
    import torch

    try:
        from importlib.metadata import version

        ds_version = version("deepspeed")
    except Exception:  # noqa: BLE001 - not installed: the tag still separates environments
        ds_version = "none"
    prefix = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:8]
    torch_version = torch.__version__.replace("+", "-")
    return f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch_version}-ds{ds_version}-{prefix}"


def default_extensions_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ldm_scale" / "torch_extensions" / environment_tag()


def extensions_dir() -> Path:
    """``$TORCH_EXTENSIONS_DIR`` if set, else :func:`default_extensions_dir`."""
    explicit = os.environ.get(EXTENSIONS_ENV)
    return Path(explicit) if explicit else default_extensions_dir()


def build_log_path() -> Path:
    return extensions_dir() / BUILD_LOG


# ------------------------------------------------------------------------------------------
# Build locks

@dataclass
class BuildLock:
    """One op's build lock file and who holds it (on this host)."""

    path: Path
    op: str
    held: bool  # blocks a build now (existence style: has a live holder; OS lock: is locked)
    holders: List[int] = field(default_factory=list)  # pids holding it, where they can be seen
    age_s: float = 0.0
    existence_style: bool = False

    @property
    def stale(self) -> bool:
        """Left by a killed build: an existence-style lock nobody holds (it would block forever)."""
        return self.existence_style and not self.held and self.age_s >= STALE_AFTER_S

    def describe_holders(self) -> str:
        if not self.holders:
            return "a process this host cannot see (another node on a shared directory?)"
        return ", ".join(f"pid {pid} ({_cmdline(pid)})" for pid in self.holders)


def torch_lock_is_existence_based() -> bool:
    """Whether this torch's extension build lock is a file whose existence blocks (``FileBaton``,
    filelock's ``SoftFileLock``) rather than an OS lock the kernel drops with its holder."""
    from torch.utils import cpp_extension

    lock_cls = getattr(cpp_extension, "FileLock", None)
    if lock_cls is None:
        return True
    try:
        import filelock

        return not issubclass(lock_cls, filelock.BaseFileLock) or issubclass(lock_cls, filelock.SoftFileLock)
    except ImportError:
        return True


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160] or "?"


def _flock_holders(path: Path) -> Optional[List[int]]:
    """Pids holding a ``flock``/``fcntl`` lock on ``path`` per ``/proc/locks`` (None: unreadable)."""
    try:
        st = os.stat(path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] != "->" and parts[5] == ident:
            pids.append(int(parts[4]))
    return sorted(set(pids))


def _os_lock_taken(path: Path) -> bool:
    """Whether some process (here or, on a network filesystem, elsewhere) holds an OS lock on
    ``path``: a non-blocking try on our own handle, released at once."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _open_by(path: Path) -> List[int]:
    """Pids with ``path`` open (``/proc/<pid>/fd``): a ``FileBaton`` builder keeps its handle open."""
    target = os.path.realpath(path)
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
            with fds:
                if any(os.readlink(fd.path) == target for fd in fds):
                    pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def inspect_lock(path: Path, existence_style: bool) -> Optional[BuildLock]:
    """The state of one op's build lock file, or None when there is none."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    op = path.parent.name
    if existence_style:
        holders = _open_by(path)
        return BuildLock(path, op, bool(holders), holders, age, True)
    holders = _flock_holders(path) or []
    return BuildLock(path, op, bool(holders) or _os_lock_taken(path), holders, age, False)


def find_build_locks(root: Optional[Path] = None, existence_style: Optional[bool] = None) -> List[BuildLock]:
    """Every ``<root>/<op>/lock`` under the extensions directory, with its holders."""
    root = Path(root) if root is not None else extensions_dir()
    paths = sorted(root.glob("*/lock"))
    if paths and existence_style is None:
        existence_style = torch_lock_is_existence_based()
    found = (inspect_lock(p, bool(existence_style)) for p in paths)
    return [lock for lock in found if lock is not None]


def remove_stale_lock(lock: BuildLock) -> bool:
    """Delete a stale lock (see :attr:`BuildLock.stale`) after checking again; True if removed."""
    again = inspect_lock(lock.path, lock.existence_style)
    if again is None or not again.stale:
        return False
    try:
        os.remove(lock.path)
    except FileNotFoundError:
        return False
    return True


def clear_stale_locks(root: Optional[Path] = None, existence_style: Optional[bool] = None) -> List[BuildLock]:
    """Remove every stale lock under ``root`` with a warning that says why; returns them."""
    removed = []
    for lock in find_build_locks(root, existence_style):
        if lock.stale and remove_stale_lock(lock):
            log.warning("removed the build lock %s of DeepSpeed op %s: no live process holds it (a build "
                        "was killed half-way, %.0f s ago); the op is rebuilt", lock.path, lock.op, lock.age_s)
            removed.append(lock)
    return removed


# ------------------------------------------------------------------------------------------
# Guarded builds

def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected seconds, e.g. 600") from None


class _Watchdog(threading.Thread):
    """Watches one op's lock while the main thread loads the op: removes a stale lock, says who it
    is waiting for, and after ``timeout_s`` of waiting on another process raises in that thread."""

    def __init__(self, lock_path: Path, existence_style: bool, timeout_s: float, say: Callable[[str], None]):
        super().__init__(name=f"op-build-watch-{lock_path.parent.name}", daemon=True)
        self.lock_path, self.existence_style, self.timeout_s, self.say = lock_path, existence_style, timeout_s, say
        self.target = threading.get_ident()
        self.done = threading.Event()
        self.guard = threading.Lock()  # the async raise only while the guarded call runs
        self.expired: Optional[str] = None
        self.removed_stale = False

    def run(self) -> None:
        waiting_since: Optional[float] = None
        last_said = -float("inf")
        op = self.lock_path.parent.name
        while not self.done.wait(POLL_S):
            lock = inspect_lock(self.lock_path, self.existence_style)
            now = time.monotonic()
            if lock is not None and lock.stale and remove_stale_lock(lock):
                self.removed_stale = True
                self.say(f"removed the build lock {lock.path} of DeepSpeed op {op}: no live process holds it "
                         f"(a build was killed half-way, {lock.age_s:.0f} s ago); building it again")
            if lock is None or not lock.held or os.getpid() in lock.holders:
                waiting_since = None  # free, or this process is the builder
                continue
            waiting_since = waiting_since if waiting_since is not None else now
            waited = now - waiting_since
            if waited >= self.timeout_s:
                self.expired = (
                    f"DeepSpeed op {op}: waited {waited:.0f} s for its build lock {lock.path}, held by "
                    f"{lock.describe_holders()}. If that process is not building (a stuck or orphaned run), "
                    f"end it; or build elsewhere with {EXTENSIONS_ENV}=<empty dir>. The limit is "
                    f"{TIMEOUT_ENV}={self.timeout_s:g}.")
                with self.guard:
                    if not self.done.is_set():
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.target),
                                                                   ctypes.py_object(_WaitExpired))
                return
            if now - last_said >= MESSAGE_EVERY_S:
                last_said = now
                self.say(f"waiting for the build of DeepSpeed op {op} by {lock.describe_holders()} "
                         f"(lock {lock.path}, {waited:.0f} s so far, giving up after {self.timeout_s:g} s: "
                         f"{TIMEOUT_ENV})")

    def stop(self) -> None:
        with self.guard:
            self.done.set()
            if self.expired:  # the guarded call ended first: drop the raise if still pending
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.target), None)
        self.join()


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[Callable[[str], None]]:
    """Send this process's stdout/stderr (``sys.stdout``/``sys.stderr`` and file descriptors 1
    and 2: compiler subprocesses too) to ``path``; yields ``say(message)``, which still reaches
    the console (and the log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    console = os.dup(2)
    saved = [os.dup(1), os.dup(2)]
    os.write(log_fd, f"--- pid {os.getpid()} rank {os.environ.get('RANK', '0')} "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    # Python-level prints too, where sys.stdout is not file descriptor 1 (a capturing harness).
    streams = sys.stdout, sys.stderr
    text = open(os.dup(log_fd), "w", buffering=1, encoding="utf-8", errors="replace")
    sys.stdout = sys.stderr = text

    def say(message: str) -> None:
        log.warning("%s", message)  # into the build log (fd 2 points there now)
        os.write(console, f"ldm_scale: {message}\n".encode(errors="replace"))

    try:
        yield say
    finally:
        text.flush()
        sys.stdout, sys.stderr = streams
        text.close()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, console, log_fd):
            os.close(fd)


_local = threading.local()


@contextlib.contextmanager
def op_build(op: str, *, existence_style: Optional[bool] = None, timeout_s: Optional[float] = None,
             root: Optional[Path] = None) -> Iterator["_Watchdog"]:
    """Run the build/load of DeepSpeed op ``op`` under the guard described in the module docstring.
    Re-entrant (DeepSpeed's shm comm op loads through ``jit_load``, both guarded)."""
    if getattr(_local, "active", False):
        yield _local.active
        return
    root = Path(root) if root is not None else extensions_dir()
    existence_style = torch_lock_is_existence_based() if existence_style is None else existence_style
    timeout_s = _timeout_s() if timeout_s is None else timeout_s
    with _output_to(root / BUILD_LOG) as say:
        watchdog = _Watchdog(root / op / "lock", existence_style, timeout_s, say)
        _local.active = watchdog
        watchdog.start()
        try:
            yield watchdog
        except _WaitExpired:
            raise OpBuildTimeout(watchdog.expired) from None
        finally:
            watchdog.stop()
            _local.active = None


# ------------------------------------------------------------------------------------------
# Hooks into DeepSpeed

def shm_comm_enabled() -> bool:
    return os.environ.get(SHM_COMM_ENV, "0").lower() in ("1", "true", "yes")


def _guarded_jit_load(original):
    @functools.wraps(original)
    def jit_load(self, verbose=True):
        with op_build(self.name) as watchdog:
            try:
                return original(self, verbose)
            except Exception:
                # An old torch that waited on a stale lock we removed assumes the (killed) holder
                # built the op and fails to import it: build it now.
                if not watchdog.removed_stale:
                    raise
                watchdog.removed_stale = False
                return original(self, verbose)

    jit_load._ldm_scale_guarded = True
    return jit_load


def _build_shm_op(original):
    @functools.wraps(original)
    def build_shm_op():
        if not shm_comm_enabled():
            return None
        with op_build(SHM_COMM_OP):
            return original()

    build_shm_op._ldm_scale_guarded = True
    return build_shm_op


_prepared = False


def prepare() -> Path:
    """Set up op builds for this process (idempotent; before DeepSpeed's comm backend starts):
    per-environment ``TORCH_EXTENSIONS_DIR``, stale locks cleared, every JIT build guarded, the CPU
    shm comm op skipped unless ``LDM_SCALE_DS_SHM_COMM=1``. Returns the extensions directory."""
    global _prepared
    root = extensions_dir()
    os.environ.setdefault(EXTENSIONS_ENV, str(root))
    if _prepared:
        return root
    _prepared = True
    if root.is_dir():
        clear_stale_locks(root)
    try:
        from deepspeed.ops.op_builder.builder import OpBuilder

        if not getattr(OpBuilder.jit_load, "_ldm_scale_guarded", False):
            OpBuilder.jit_load = _guarded_jit_load(OpBuilder.jit_load)
        # importlib: ``import deepspeed.comm.torch as m`` gives torch itself (deepspeed.comm.torch
        # is also the name of the torch module that deepspeed.comm imports).
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
        if not getattr(ds_comm_torch.build_shm_op, "_ldm_scale_guarded", False):
            ds_comm_torch.build_shm_op = _build_shm_op(ds_comm_torch.build_shm_op)
    except (ImportError, AttributeError) as exc:  # another DeepSpeed layout: its own behaviour
        log.debug("DeepSpeed op hooks not installed (%s): builds go unguarded", exc)
    return root


def load_op(builder_name: str):
    """Load (building if needed) DeepSpeed op ``builder_name`` (e.g. ``ShareMemCommBuilder``) for
    this accelerator, through the guarded path: for tools and tests."""
    prepare()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None:
        raise ValueError(f"DeepSpeed has no op {builder_name} for the {get_accelerator()._name} accelerator")
    return builder.load()
