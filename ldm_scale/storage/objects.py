"""Reads that survive a broken stream, and the whole-object operations every component calls."""
from __future__ import annotations

import glob as _pyglob
import io
import logging
import os
import shutil
import tempfile
import time
from typing import Any, List, Optional


from ldm_scale.storage.config import StorageConfig, _effective
from ldm_scale.storage.filesystems import (
    StorageError,
    _endpoint_hint,
    _fs_path,
    _is_permanent,
    _sleep_for,
    filesystem,
    with_retries,
)
from ldm_scale.storage.redaction import redact
from ldm_scale.storage.urls import is_local, join, local_path

log = logging.getLogger(__name__)



class _ResumableReader(io.RawIOBase):
    """A read-only raw stream that reopens the object at its current offset after a transient
    failure, up to ``cfg.retries`` consecutive times, then raises :class:`StorageError`."""

    def __init__(self, url: str, cfg: StorageConfig, block_size: int):
        self._url = url
        self._cfg = cfg
        self._block_size = block_size
        self._pos = 0
        self._fh = None
        self.reopens = 0
        self._open()

    def _open(self) -> None:
        def op():
            fs = filesystem(self._url, self._cfg)
            fh = fs.open(_fs_path(self._url), "rb", block_size=self._block_size) if not is_local(self._url) \
                else open(local_path(self._url), "rb")
            if self._pos:
                fh.seek(self._pos)
            return fh

        self._fh = with_retries(op, "open", self._url, self._cfg)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._fh.seek(offset, whence)
        return self._pos

    def readinto(self, buf) -> int:
        attempt = 0
        while True:
            try:
                n = self._fh.readinto(buf) if hasattr(self._fh, "readinto") else None
                if n is None:
                    data = self._fh.read(len(buf))
                    n = len(data)
                    buf[:n] = data
                self._pos += n
                return n
            except Exception as exc:  # noqa: BLE001
                if _is_permanent(exc) or attempt >= self._cfg.retries:
                    raise StorageError(
                        f"read failed for {redact(self._url)}{_endpoint_hint(self._url, self._cfg)} at byte "
                        f"{self._pos} after {attempt + 1} attempt(s) ({self._cfg.key('retries')}={self._cfg.retries}): "
                        f"{type(exc).__name__}: {redact(exc)}"
                    ) from exc
                delay = _sleep_for(attempt, self._cfg)
                log.warning("read of %s broke at byte %d (%s); reopening in %.2fs (%d/%d)",
                            redact(self._url), self._pos, type(exc).__name__, delay, attempt + 1, self._cfg.retries)
                time.sleep(delay)
                attempt += 1
                self.reopens += 1
                try:
                    self._fh.close()
                except Exception:  # noqa: BLE001 - the broken handle may fail to close too
                    pass
                try:
                    self._open()
                except StorageError as open_exc:
                    raise StorageError(
                        f"read failed for {redact(self._url)} at byte {self._pos}: could not reopen "
                        f"({open_exc})") from exc

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            finally:
                self._fh = None
        super().close()


def open_url(url: str, mode: str = "rb", cfg: Optional[StorageConfig] = None, *,
             block_size: int = 8 << 20) -> Any:
    """Open ``url`` like ``open()``. Reads (``rb``/``r``) return a buffered, seekable, resumable
    stream; writes (``wb``/``w``) go to fsspec's writer (local parents are created)."""
    cfg = _effective(cfg)
    if "r" in mode and "+" not in mode:
        raw = _ResumableReader(url, cfg, block_size)
        buffered = io.BufferedReader(raw, buffer_size=1 << 20)
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding="utf-8")
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    fs = filesystem(url, cfg)
    return with_retries(lambda: fs.open(url, mode), "open for write", url, cfg)


def read_bytes(url: str, cfg: Optional[StorageConfig] = None) -> bytes:
    def op():
        if is_local(url):
            with open(local_path(url), "rb") as f:
                return f.read()
        return filesystem(url, cfg).cat_file(url)

    return with_retries(op, "read", url, cfg)


def read_text(url: str, cfg: Optional[StorageConfig] = None) -> str:
    return read_bytes(url, cfg).decode("utf-8")


def write_bytes(url: str, data: bytes, cfg: Optional[StorageConfig] = None) -> None:
    """Write ``data`` to ``url``. Local writes are atomic (temp file + rename); S3 PUTs are atomic."""
    if is_local(url):
        path = local_path(url)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    with_retries(lambda: filesystem(url, cfg).pipe_file(url, data), "write", url, cfg)


def write_text(url: str, text: str, cfg: Optional[StorageConfig] = None) -> None:
    write_bytes(url, text.encode("utf-8"), cfg)


def exists(url: str, cfg: Optional[StorageConfig] = None) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs = filesystem(url, cfg)
    return with_retries(lambda: fs.exists(url), "exists", url, cfg)


def size(url: str, cfg: Optional[StorageConfig] = None) -> int:
    if is_local(url):
        return os.path.getsize(local_path(url))
    fs = filesystem(url, cfg)
    return int(with_retries(lambda: fs.size(url), "size", url, cfg))


def _to_url(like: str, path: str, fs) -> str:
    """Turn a filesystem path returned by fsspec back into a URL of the same style as ``like``."""
    if is_local(like):
        return ("file://" + path) if like.startswith("file://") else path
    return fs.unstrip_protocol(path)


def listdir(url: str, cfg: Optional[StorageConfig] = None) -> List[str]:
    """Sorted URLs of the direct children of ``url``."""
    if is_local(url):
        path = local_path(url)
        return sorted(join(url, name) for name in os.listdir(path))
    fs = filesystem(url, cfg)
    names = with_retries(lambda: fs.ls(url, detail=False, refresh=True), "list", url, cfg)
    return sorted(_to_url(url, n, fs) for n in names)


def glob(pattern: str, cfg: Optional[StorageConfig] = None) -> List[str]:
    """Sorted URLs matching a glob pattern (``*``, ``?``, ``[..]``, ``**``)."""
    if is_local(pattern):
        return sorted(_to_url(pattern, p, None) for p in _pyglob.glob(local_path(pattern), recursive=True))
    fs = filesystem(pattern, cfg)

    def op():
        fs.invalidate_cache()
        return fs.glob(pattern)

    return sorted(_to_url(pattern, p, fs) for p in with_retries(op, "glob", pattern, cfg))


def makedirs(url: str, cfg: Optional[StorageConfig] = None) -> None:
    """Create a local directory (object stores have no directories: a no-op there)."""
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)


def rm(url: str, recursive: bool = False, cfg: Optional[StorageConfig] = None) -> None:
    """Delete ``url`` (a directory/prefix needs ``recursive=True``). Missing objects raise FileNotFoundError."""
    if is_local(url):
        path = local_path(url)
        if os.path.isdir(path) and not os.path.islink(path):
            if not recursive:
                raise IsADirectoryError(f"{path} is a directory; pass recursive=True")
            shutil.rmtree(path)
        else:
            os.remove(path)
        return
    fs = filesystem(url, cfg)
    with_retries(lambda: fs.rm(url, recursive=recursive), "rm", url, cfg)


def put_file(local: str, url: str, cfg: Optional[StorageConfig] = None) -> None:
    """Upload (or copy) the local file ``local`` to ``url``."""
    if not os.path.isfile(local):
        raise FileNotFoundError(f"put_file: no local file {local}")
    if is_local(url):
        dst = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        tmp = dst + ".tmp-put"
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)
        return
    fs = filesystem(url, cfg)
    with_retries(lambda: fs.put_file(local, url), "upload", url, cfg)


def get_file(url: str, local: str, cfg: Optional[StorageConfig] = None) -> None:
    """Download ``url`` to the local path ``local`` (parents created; atomic rename at the end)."""
    os.makedirs(os.path.dirname(os.path.abspath(local)) or ".", exist_ok=True)
    tmp = local + ".tmp-get"
    if is_local(url):
        src = local_path(url)
        if not os.path.exists(src):
            raise FileNotFoundError(f"get_file: not found: {src}")
        shutil.copyfile(src, tmp)
    else:
        fs = filesystem(url, cfg)
        with_retries(lambda: fs.get_file(url, tmp), "download", url, cfg)
    os.replace(tmp, local)


def put_dir(local_dir: str, url: str, cfg: Optional[StorageConfig] = None) -> List[str]:
    """Upload every file under ``local_dir`` to ``url`` keeping relative paths; returns the URLs written."""
    if not os.path.isdir(local_dir):
        raise NotADirectoryError(f"put_dir: {local_dir} is not a directory")
    written = []
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            dst = join(url, rel)
            put_file(src, dst, cfg)
            written.append(dst)
    return written


def get_dir(url: str, local_dir: str, cfg: Optional[StorageConfig] = None) -> List[str]:
    """Download every object under the prefix ``url`` into ``local_dir``; returns the local paths."""
    base = url.rstrip("/")
    if is_local(url):
        files = [os.path.join(r, f) for r, _, fs_ in os.walk(local_path(base)) for f in fs_]
        rels = [os.path.relpath(f, local_path(base)) for f in files]
        srcs = files
    else:
        fs = filesystem(url, cfg)
        found = with_retries(lambda: fs.find(base), "list", url, cfg)
        root = fs._strip_protocol(base)
        srcs = [fs.unstrip_protocol(p) for p in found]
        rels = [p[len(root):].lstrip("/") for p in found]
    out = []
    for src, rel in zip(srcs, rels):
        dst = os.path.join(local_dir, rel)
        get_file(src, dst, cfg)
        out.append(dst)
    return sorted(out)
