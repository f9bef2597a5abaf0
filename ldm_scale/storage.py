"""The one module that knows what a URL means: local paths, ``file://``, ``s3://``, ``gs://``, ``http(s)://``.

Everything else in ldm_scale (data pipeline, checkpoints, sampling, eval) calls these functions with
plain strings. Filesystems come from fsspec; S3 goes through s3fs with a configurable endpoint so
S3-compatible stores (MinIO, SeaweedFS, Ceph, moto in tests) work the same as AWS.

Retries: every call is retried with exponential backoff on transient errors (connection refused or
reset, timeouts, 5xx), as configured by :class:`StorageConfig`. s3fs's and botocore's own retry loops
are switched off so the configured number is the real number. Reads through :func:`open_url` are
resumable: a stream that breaks mid-way is reopened at the byte it had reached, so a long tar shard
survives a short outage. A missing object or a denied request is not retried.

Credentials never come from the config: s3fs/botocore read the environment (``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, ...), the ``~/.aws`` profile that ``storage.profile`` names, or the instance role; gcsfs uses Google's default credentials
(``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's login, the metadata server), or none with
``anon=True`` (public buckets, emulators). :func:`redact` strips secrets from any text before it is
logged or raised, and :func:`redact_config` from every copy of the resolved config that is written
out (URL userinfo, presigned-URL signatures, credential-named keys, secret environment values).

GCS goes through gcsfs's JSON-API client with its endpoint configurable (``gcs_endpoint_url`` or
``STORAGE_EMULATOR_HOST``), so emulators and gateways work like Google. gcsfs's internal retry
loop (6 tries, sleeps up to 32 s, ~30 s before a refused connection surfaces) is bypassed like
s3fs's, and its experimental gRPC layer is not used: its bucket-type probe waits 60 s per bucket
on any endpoint that is not Google's.

One storage block: ``storage.*`` (:class:`StorageConfig`) is what every component uses:
checkpoints, exports, first-stage loading, eval tools and, through :func:`resolve`, the data loader
and its workers. ``data.storage.*`` (:class:`StorageOverrides`) fields default to None, meaning
"the value of ``storage.*``"; a field set there applies to the shards only. Every error names the
config key (or environment variable) behind the endpoint it could not reach (:func:`endpoint_of`).

Filesystem objects are created lazily per process (fsspec drops its instance cache when the PID
changes), so DataLoader workers never share an s3fs client with their parent: s3fs is not fork-safe.
"""
from __future__ import annotations

import dataclasses
import glob as _pyglob
import io
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

import fsspec
from braceexpand import braceexpand

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class StorageConfig:
    """How to reach object storage (the ``storage`` block). Never holds credentials."""

    endpoint_url: Optional[str] = None  # S3-compatible endpoint; None: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / AWS
    region: Optional[str] = None
    profile: Optional[str] = None  # AWS shared-config profile name (credentials stay in ~/.aws); None: AWS_PROFILE / default
    anon: bool = False  # unsigned requests (public buckets; GCS emulators)
    retries: int = 3  # extra attempts after the first failure of one call (0 = fail at once)
    backoff_s: float = 0.5  # first sleep; doubles per attempt, with +-25% jitter
    max_backoff_s: float = 20.0
    connect_timeout_s: float = 10.0  # TCP connect of one request: bounds how long an unreachable endpoint takes
    timeout_s: float = 60.0  # read timeout of one request
    gcs_endpoint_url: Optional[str] = None  # GCS JSON-API endpoint; None: STORAGE_EMULATOR_HOST / Google

    def key(self, name: str) -> str:
        """The config key that set field ``name`` (for messages): ``storage.<name>`` here."""
        return f"storage.{name}"


@dataclass
class ResolvedStorageConfig(StorageConfig):
    """A :class:`StorageConfig` that remembers which key set each field (``data.storage.retries``,
    ``--endpoint-url``, ...): made by :func:`resolve`, so that errors name the right key."""

    keys: Dict[str, str] = field(default_factory=dict)

    def key(self, name: str) -> str:
        return self.keys.get(name, f"storage.{name}")


@dataclass
class StorageOverrides:
    """``data.storage``: per-field overrides of ``storage.*`` for the shards only; None = inherit
    (see :class:`StorageConfig` for each field's meaning)."""

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    profile: Optional[str] = None
    anon: Optional[bool] = None
    retries: Optional[int] = None
    backoff_s: Optional[float] = None
    max_backoff_s: Optional[float] = None
    connect_timeout_s: Optional[float] = None
    timeout_s: Optional[float] = None
    gcs_endpoint_url: Optional[str] = None


def resolve(override: Union[StorageOverrides, StorageConfig, None], base: Optional[StorageConfig] = None,
            key: str = "data.storage") -> StorageConfig:
    """The storage settings a component uses: each field of ``override`` that is set (not None),
    else ``base``'s (default: the process-wide block from :func:`configure`, i.e. ``storage.*``).
    ``key`` names ``override`` in messages. A complete :class:`StorageConfig` given in code is
    used whole. Call it in the parent process: workers receive the result, not the global."""
    if isinstance(override, StorageConfig):
        return override
    base = base if base is not None else _default_cfg
    values: Dict[str, Any] = {}
    keys: Dict[str, str] = {}
    for f in dataclasses.fields(StorageConfig):
        own = getattr(override, f.name, None)
        values[f.name] = getattr(base, f.name) if own is None else own
        keys[f.name] = base.key(f.name) if own is None else f"{key}.{f.name}"
    return ResolvedStorageConfig(**values, keys=keys)


def config_problems(block: Union[StorageConfig, StorageOverrides], key: str) -> List[str]:
    """One message per out-of-range field of a ``storage`` / ``data.storage`` block (None: unset)."""
    out = []
    for name, ok, need in (("retries", lambda v: v >= 0, ">= 0"), ("backoff_s", lambda v: v >= 0, ">= 0"),
                           ("max_backoff_s", lambda v: v >= 0, ">= 0"), ("connect_timeout_s", lambda v: v > 0, "> 0"),
                           ("timeout_s", lambda v: v > 0, "> 0")):
        value = getattr(block, name)
        if value is not None and not ok(value):
            out.append(f"{key}.{name}={value}: must be {need}")
    return out


class StorageError(OSError):
    """A storage call failed after its retries; the message names the (redacted) URL."""


_default_cfg = StorageConfig()
_cfg_lock = threading.Lock()


def configure(cfg: StorageConfig) -> None:
    """Set the process-wide default used when a call passes no ``cfg`` (the launcher calls this once)."""
    global _default_cfg
    with _cfg_lock:
        _default_cfg = cfg


def get_config() -> StorageConfig:
    return _default_cfg


def _effective(cfg: Union[StorageConfig, StorageOverrides, None]) -> StorageConfig:
    """What a call runs with: ``cfg``, or the process-wide block; overrides (``data.storage``
    passed as is) are resolved over that block."""
    if cfg is None:
        return _default_cfg
    return cfg if isinstance(cfg, StorageConfig) else resolve(cfg)


# ---------------------------------------------------------------------------------------------
# Redaction
# ---------------------------------------------------------------------------------------------
REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<secret>[^/@\s:]+:[^/@\s]+)@")
# Query parameters that carry signatures, tokens or keys (S3/GCS presigned URLs, Azure SAS, OAuth).
# The name must not continue an identifier, so ``image_key=jpg`` or ``monkey=`` are left alone.
_SECRET_QUERY = re.compile(
    r"(?i)(?<![A-Za-z0-9_.])(?:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)|"
    r"signature|awsaccesskeyid|googleaccessid|sig|token|access_token|id_token|refresh_token|client_secret|"
    r"secret|password|api_key|apikey|key)=(?P<secret>[^&\s\"']+)"
)
_BEARER = re.compile(r"(?i)bearer\s+(?P<secret>[A-Za-z0-9._~+/=-]+)")
# Always secret when set (4+ characters); any other variable whose name reads as a secret (see
# is_secret_name, e.g. HF_TOKEN, OPENAI_API_KEY) counts from 8 characters, so that a short value
# such as ``1`` is never replaced wherever it occurs.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
               "GOOGLE_OAUTH_ACCESS_TOKEN", "WANDB_API_KEY")
_SECRET_WORDS = frozenset({"secret", "password", "passwd", "token", "apikey", "signature"})
_KEY_QUALIFIERS = frozenset({"api", "access", "secret", "private", "account", "auth", "session", "signing"})


def is_secret_name(name: str) -> bool:
    """Whether a config key or environment variable name denotes a credential: one of its words
    (split at ``_``, ``-``, ``.`` and camelCase) is secret/password/token/apikey/signature, or it
    has an api/access/private/... ``key`` (``WANDB_API_KEY``, ``aws_secret_access_key``, ``accessKey``).
    ``tokenizer``, ``max_tokens``, ``image_key`` and ``TOKENIZERS_PARALLELISM`` are not."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(a in _KEY_QUALIFIERS and b == "key" for a, b in zip(words, words[1:]))


def environment_secrets() -> List[str]:
    """Values of the secret environment variables of this process, longest first."""
    values = set()
    for name, value in os.environ.items():
        if value and ((name in _SECRET_ENV and len(value) >= 4) or (is_secret_name(name) and len(value) >= 8)):
            values.add(value)
    return sorted(values, key=len, reverse=True)


def replace_secrets(text: str, replace: Callable[[str], str]) -> str:
    """``text`` with every credential in it replaced by ``replace(credential)``: the password part
    of URL userinfo (with its user), signed-URL and OAuth query values, bearer tokens, and the values
    of secret environment variables. :func:`redact` masks them; launch/slurm.py swaps them for
    environment references so that a rendered script never holds one."""
    def sub(m: "re.Match[str]") -> str:
        start, end = m.span("secret")
        return m.group(0)[:start - m.start()] + replace(m.group("secret")) + m.group(0)[end - m.start():]

    for pattern in (_USERINFO, _SECRET_QUERY, _BEARER):
        text = pattern.sub(sub, text)
    for value in environment_secrets():
        if value in text:
            text = text.replace(value, replace(value))
    return text


def redact(text: Any) -> str:
    """``text`` with credentials removed (see :func:`replace_secrets`): for logs and error messages."""
    return replace_secrets(str(text), lambda _secret: REDACTED)


def is_redacted(value: Any) -> bool:
    """Whether a persisted config value had a credential masked (it cannot be used to connect)."""
    return isinstance(value, str) and REDACTED in value


def redact_config(obj: Any) -> Any:
    """A copy of a config tree (dicts, lists, tuples, scalars) that is safe to persist: every string
    goes through :func:`redact`, and a non-empty string under a key that names a credential
    (:func:`is_secret_name`: ``password``, ``api_key``, ``aws_secret_access_key``, ...) is masked
    whole. The one function behind every copy of the resolved config that leaves the process
    (run directory, checkpoints, exports, W&B); the running process keeps the real values."""
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(v, str) and v and isinstance(k, str) and is_secret_name(k)
                    else redact_config(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_config(v) for v in obj)
    if isinstance(obj, str):
        return redact(obj)
    return obj


# ---------------------------------------------------------------------------------------------
# URL helpers and filesystems
# ---------------------------------------------------------------------------------------------
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def protocol(url: str) -> str:
    """``"file"`` for local paths, else the URL scheme (``s3``, ``gs``, ``http``, ...)."""
    m = _SCHEME.match(url)
    if not m:
        return "file"
    scheme = m.group(1).lower()
    return {"s3a": "s3", "gcs": "gs", "local": "file"}.get(scheme, scheme)


def is_local(url: str) -> bool:
    return protocol(url) == "file"


def local_path(url: str) -> str:
    """The filesystem path of a local URL (``file:///x`` or ``/x``)."""
    if not is_local(url):
        raise ValueError(f"not a local path: {redact(url)}")
    return url[len("file://"):] if url.startswith("file://") else url


def join(base: str, *parts: str) -> str:
    """Join path components onto a URL or path with ``/`` (no normalisation of the scheme part)."""
    out = base
    for part in parts:
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


_S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_GCS_ENDPOINT_ENV = "STORAGE_EMULATOR_HOST"


def endpoint_of(url: str, cfg: Optional[StorageConfig] = None) -> Tuple[Optional[str], str]:
    """``(endpoint, origin)`` that calls on ``url`` go to: the endpoint (None: the provider's own)
    and what chose it, a config key (``storage.endpoint_url``, ``data.storage.endpoint_url``, ...)
    or an environment variable. ``(None, "")`` for schemes without a configurable endpoint."""
    cfg = _effective(cfg)
    proto = protocol(url)
    if proto == "s3":
        field_name, env_names, provider = "endpoint_url", _S3_ENDPOINT_ENV, "AWS"
    elif proto == "gs":
        field_name, env_names, provider = "gcs_endpoint_url", (_GCS_ENDPOINT_ENV,), "Google"
    else:
        return None, ""
    endpoint, origin = getattr(cfg, field_name), cfg.key(field_name)
    for name in env_names:
        if endpoint:
            break
        endpoint, origin = os.environ.get(name), name
    if not endpoint:
        return None, f"{provider}'s default (none of {', '.join((cfg.key(field_name),) + env_names)} is set)"
    if proto == "gs" and "://" not in endpoint:  # STORAGE_EMULATOR_HOST is often host:port
        endpoint = "http://" + endpoint
    return endpoint, origin


def describe_endpoint(url: str, cfg: Optional[StorageConfig] = None) -> str:
    """``S3 endpoint http://host:9000 (set by storage.endpoint_url)`` for messages; "" when ``url``
    has no configurable endpoint."""
    endpoint, origin = endpoint_of(url, cfg)
    if not origin:
        return ""
    kind = "S3" if protocol(url) == "s3" else "GCS"
    return f"{kind} endpoint {redact(endpoint)} (set by {origin})" if endpoint else f"{kind} endpoint: {origin}"


def _s3_options(cfg: StorageConfig) -> dict:
    endpoint, _ = endpoint_of("s3://", cfg)
    # botocore's own retry loop would multiply ours; one attempt per call, bounded timeouts.
    config_kwargs = {
        "connect_timeout": cfg.connect_timeout_s,
        "read_timeout": cfg.timeout_s,
        "retries": {"max_attempts": 1, "mode": "standard"},
    }
    opts: dict = {"anon": cfg.anon, "config_kwargs": config_kwargs}
    if endpoint:
        opts["endpoint_url"] = endpoint
    if cfg.profile:
        opts["profile"] = cfg.profile
    if cfg.region:
        opts["client_kwargs"] = {"region_name": cfg.region}
    return opts


def _fs_options(proto: str, cfg: StorageConfig) -> dict:
    if proto == "s3":
        return _s3_options(cfg)
    if proto in ("http", "https"):
        import aiohttp  # fsspec's http implementation depends on it

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s,
                                                                   sock_read=cfg.timeout_s)}}
    if proto == "gs":
        return _gs_options(cfg)
    return {}


def _gs_options(cfg: StorageConfig) -> dict:
    import aiohttp  # gcsfs's transport

    opts: dict = {"session_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s,
                                                                      sock_read=cfg.timeout_s)}}
    endpoint, _ = endpoint_of("gs://", cfg)
    if endpoint:
        opts["endpoint_url"] = endpoint
    if cfg.anon:
        opts["token"] = "anon"
    return opts


_GCS_CLASS = None


def _gcs_class():
    """gcsfs's JSON-API filesystem with its retry decorators unwrapped (see the module docstring):
    ``with_retries`` and the resumable reader do the retrying, as configured."""
    global _GCS_CLASS
    if _GCS_CLASS is None:
        from gcsfs.core import GCSFileSystem

        unwrapped = {name: getattr(GCSFileSystem, name).__wrapped__
                     for name in ("_request", "_get_file_request", "_get_file_concurrent")
                     if hasattr(getattr(GCSFileSystem, name, None), "__wrapped__")}
        _GCS_CLASS = type("SingleTryGCSFileSystem", (GCSFileSystem,), {"__module__": __name__, **unwrapped})
    return _GCS_CLASS


def __getattr__(name: str):
    # Lets pickle find the lazily built class by name (gcsfs is imported only when gs:// is used).
    if name == "SingleTryGCSFileSystem":
        return _gcs_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def filesystem(url: str, cfg: Optional[StorageConfig] = None) -> "fsspec.AbstractFileSystem":
    """The fsspec filesystem for ``url``'s scheme, built in (and cached for) the calling process."""
    cfg = _effective(cfg)
    proto = protocol(url)
    try:
        opts = _fs_options(proto, cfg)
        fs = _gcs_class()(**opts) if proto == "gs" else fsspec.filesystem(proto, **opts)
    except ImportError as e:
        extra = {"gs": "gcsfs", "s3": "s3fs", "http": "aiohttp", "https": "aiohttp"}.get(proto, proto)
        raise StorageError(f"no filesystem for {proto}:// URLs ({e}); install `{extra}`") from e
    except ValueError as e:
        raise StorageError(f"unsupported URL scheme {proto}:// in {redact(url)}: {e}") from e
    if proto == "s3":
        fs.retries = 1  # s3fs's internal loop: one try, ours does the retrying
    return fs


def _fs_path(url: str) -> str:
    return local_path(url) if is_local(url) else url


# ---------------------------------------------------------------------------------------------
# Retry
# ---------------------------------------------------------------------------------------------
def _is_permanent(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError, ValueError, TypeError, StorageError)):
        return True
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError"):
        return True
    msg = str(exc)
    return any(s in msg for s in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                  "NoSuchBucket", "NoSuchKey", " 404", "403 Forbidden"))


def _sleep_for(attempt: int, cfg: StorageConfig) -> float:
    base = min(cfg.max_backoff_s, cfg.backoff_s * (2 ** attempt))
    return base * random.uniform(0.75, 1.25)


def _endpoint_hint(url: str, cfg: StorageConfig) -> str:
    where = describe_endpoint(url, cfg)
    return f" [{where}]" if where else ""


def with_retries(fn: Callable[[], T], what: str, url: str, cfg: Optional[StorageConfig] = None) -> T:
    """Call ``fn`` with the configured retries; a final failure raises :class:`StorageError`
    naming ``what``, the redacted URL and, for object stores, the endpoint with the config key or
    environment variable that set it (the original exception is chained)."""
    cfg = _effective(cfg)
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if _is_permanent(exc):
                if isinstance(exc, FileNotFoundError):
                    raise FileNotFoundError(f"{what}: not found: {redact(url)}") from exc
                if isinstance(exc, StorageError):
                    raise
                if isinstance(exc, (ValueError, TypeError)):
                    raise
                raise StorageError(f"{what} failed for {redact(url)}{_endpoint_hint(url, cfg)}: {redact(exc)}") from exc
            if attempt >= cfg.retries:
                endpoint, origin = endpoint_of(url, cfg)
                setting = f" ({origin}={redact(endpoint)})" if endpoint else ""
                raise StorageError(
                    f"{what} failed for {redact(url)}{_endpoint_hint(url, cfg)} after {attempt + 1} attempt(s) "
                    f"({cfg.key('retries')}={cfg.retries}): {type(exc).__name__}: {redact(exc)}. "
                    f"Check that the endpoint is reachable{setting} and the credentials in the environment."
                ) from exc
            delay = _sleep_for(attempt, cfg)
            log.warning("%s failed for %s (%s: %s); retry %d/%d in %.2fs", what, redact(url),
                        type(exc).__name__, redact(exc), attempt + 1, cfg.retries, delay)
            time.sleep(delay)
            attempt += 1


# ---------------------------------------------------------------------------------------------
# Resumable reads
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Whole-object operations
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Shard lists
# ---------------------------------------------------------------------------------------------
_RANGE = re.compile(r"\{(\d+\.\.\d+(?:\.\.\d+)?)\}")
_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> List[str]:
    """Expand ``{a,b}`` alternatives (nested too) and ``{000..041}`` zero-padded ranges, as bash and
    webdataset do (the ``braceexpand`` package: a maintained implementation of exactly that). A
    descending range (``{5..1}``) is refused: bash would count down, but in a shard list it is a
    typo far more often than an intent, and it would silently reverse the shard order."""
    for body in _RANGE.findall(pattern):
        lo, hi = (int(x) for x in body.split("..")[:2])
        if hi < lo:
            raise ValueError(f"brace range {{{body}}} is descending in {redact(pattern)}")
    return list(braceexpand(pattern))


def _has_glob(url: str) -> bool:
    """Glob characters in the path; in http(s) URLs ``?`` starts the query (a presigned URL's signature)."""
    path = url.split("://", 1)[-1]
    if protocol(url) in ("http", "https"):
        path = path.split("?", 1)[0]
    return bool(_GLOB_CHARS.search(path))


def expand_urls(pattern_or_list: Union[str, Sequence[str]], cfg: Optional[StorageConfig] = None) -> List[str]:
    """Shard URLs from a brace pattern, a ``::``-separated string, a list of either, or globs.

    Brace patterns expand without touching storage (41k shard names cost nothing); entries with
    glob characters are listed on their filesystem and must match at least one object.
    Order is preserved (no sorting of brace expansions), duplicates are kept.
    """
    if isinstance(pattern_or_list, str):
        items: Iterable[str] = pattern_or_list.split("::")
    else:
        items = list(pattern_or_list)
    urls: List[str] = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        for url in expand_braces(item):
            if _has_glob(url):
                matched = glob(url, cfg)
                if not matched:
                    raise FileNotFoundError(f"no objects match {redact(url)}")
                urls.extend(matched)
            else:
                urls.append(url)
    if not urls:
        raise ValueError(f"no shard URLs in {redact(pattern_or_list)!r}")
    return urls
