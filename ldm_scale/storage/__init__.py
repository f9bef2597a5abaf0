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
Modules, by job: ``config`` (the block, the shards' overrides, the process-wide default),
``redaction`` (secrets out of text and configs), ``urls`` (schemes, paths, endpoints),
``filesystems`` (fsspec per scheme, the retry loop, :class:`StorageError`), ``objects`` (resumable
reads, whole-object operations), ``patterns`` (shard lists). Callers use the names re-exported
here (``storage.read_text(url)``); the submodules import each other, never this package.
"""
from __future__ import annotations

from ldm_scale.storage.config import (  # noqa: F401
    StorageConfig,
    ResolvedStorageConfig,
    StorageOverrides,
    resolve,
    config_problems,
    configure,
    get_config,
)
from ldm_scale.storage.redaction import (  # noqa: F401
    REDACTED,
    is_secret_name,
    environment_secrets,
    replace_secrets,
    redact,
    is_redacted,
    redact_config,
)
from ldm_scale.storage.urls import (  # noqa: F401
    protocol,
    is_local,
    local_path,
    join,
    parent,
    endpoint_of,
    describe_endpoint,
)
from ldm_scale.storage.filesystems import (  # noqa: F401
    StorageError,
    filesystem,
    with_retries,
)
from ldm_scale.storage.objects import (  # noqa: F401
    open_url,
    read_bytes,
    read_text,
    write_bytes,
    write_text,
    exists,
    size,
    listdir,
    glob,
    makedirs,
    rm,
    put_file,
    get_file,
    put_dir,
    get_dir,
)
from ldm_scale.storage.patterns import (  # noqa: F401
    URL_LIST_SEPARATOR,
    expand_braces,
    expand_urls,
)

__all__ = [
    "StorageConfig",
    "ResolvedStorageConfig",
    "StorageOverrides",
    "resolve",
    "config_problems",
    "configure",
    "get_config",
    "REDACTED",
    "is_secret_name",
    "environment_secrets",
    "replace_secrets",
    "redact",
    "is_redacted",
    "redact_config",
    "protocol",
    "is_local",
    "local_path",
    "join",
    "parent",
    "endpoint_of",
    "describe_endpoint",
    "StorageError",
    "filesystem",
    "with_retries",
    "open_url",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
    "exists",
    "size",
    "listdir",
    "glob",
    "makedirs",
    "rm",
    "put_file",
    "get_file",
    "put_dir",
    "get_dir",
    "URL_LIST_SEPARATOR",
    "expand_braces",
    "expand_urls",
]
