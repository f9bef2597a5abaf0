"""Where a pretrained extractor's weights file comes from, and how it is checked: one rule for every
extractor with published weights (the FID Inception, DINOv2).

A :class:`WeightsFile` names the file as its publisher does (so a copy already in the torch hub cache
from pytorch-fid, torch-fidelity or ``torch.hub.load`` is found), its download URL, an environment
variable, and the SHA-256 to pin. Files are looked for in this order: an explicit path or URL (the
extractor's ``weights``); the environment variable; the torch hub cache
(``<torch.hub.get_dir()>/checkpoints/``, under each known file name); then a download from the URL
when allowed. A URL (``s3://``, ``gs://``, ``https://``) is fetched into the hub cache through
``ldm_scale.storage``.

Pinning: a file is checked against ``sha256`` (a full digest or a prefix of >= 8 hex digits) when one
is known: the spec's own pin or the user's ``extractor.sha256``. Where the publisher gives no digest
and none was given (DINOv2's ``*_pretrain.pth`` files carry none), the file's digest is computed,
recorded with the results and logged, so a number can still be traced to the exact file.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch


@dataclass(frozen=True)
class WeightsFile:
    label: str  # what the messages call it, e.g. "FID Inception weights"
    filename: str  # the publisher's file name, as the torch hub cache holds it
    url: str
    env_var: Optional[str] = None
    sha256: Optional[str] = None  # the pinned digest; None where none is published
    alt_filenames: Tuple[str, ...] = ()
    offline_hint: str = ""  # what runs without the file (and what its numbers are worth)


def sha256_of_file(path: str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


class WeightsHashError(ValueError):
    """A weights file whose SHA-256 is not the expected one (a ``ValueError``: input the run cannot
    use, reported in one line by the entry points)."""

    def __init__(self, message: str, *, path: str, expected: str, actual: str):
        super().__init__(message)
        self.path, self.expected, self.actual = path, expected, actual


def check_sha256(path: str, expected: str, *, source: Optional[str] = None, hash_key: str = "extractor.sha256",
                 url: str = "") -> str:
    """The file's SHA-256; raise :class:`WeightsHashError` unless it starts with ``expected`` (a full
    digest or >= 8 hex digits). The one-line message names ``source`` (where the file came from,
    e.g. ``extractor.weights=/data/pt_inception.pth``; default: the path), the ``hash_key`` that
    holds the expected digest, the expected and the actual digest, and ``url`` to fetch it again."""
    expected = expected.strip().lower()
    if len(expected) < 8 or any(c not in "0123456789abcdef" for c in expected):
        raise ValueError(f"{hash_key}={expected!r}: a SHA-256 to check against needs at least 8 hex digits")
    actual = sha256_of_file(path)
    if not actual.startswith(expected):
        where = source if source and path in source else (f"{source} ({path})" if source else f"weights file {path}")
        again = f"fetch {url} again" if url else "fetch it again"
        raise WeightsHashError(
            f"{where} has SHA-256 {actual}, but {hash_key} expects {expected}: the file is corrupt or a "
            f"different network; delete it and {again} (docs/evaluation.md), or set "
            f"{hash_key} to the digest of a file you trust", path=path, expected=expected, actual=actual)
    return actual


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def where_to_put_it(spec: WeightsFile) -> str:
    env = f"set {spec.env_var}=/path/to/{spec.filename}, " if spec.env_var else ""
    return (
        f"Download {spec.url} on a machine with internet access and either put it at "
        f"{hub_checkpoint_dir() / spec.filename} (the torch hub cache; set TORCH_HOME to move it), "
        f"{env}or pass the path (or an s3:// URL) as the extractor weights (extractor.weights=...)."
        + (f" {spec.offline_hint}" if spec.offline_hint else "")
    )


def resolve(spec: WeightsFile, weights: Optional[str] = None, *, allow_download: bool = True,
            storage_cfg=None) -> str:
    """Local path of ``spec``'s file (see the module docstring for the search order); a URL is
    fetched into the hub cache with ``storage_cfg`` or the process-wide storage settings."""
    from ldm_scale import storage

    if weights is None and spec.env_var:
        weights = os.environ.get(spec.env_var) or None
    if weights is not None:
        if storage.is_local(weights):
            path = storage.local_path(weights)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{spec.label} not found at {path}. {where_to_put_it(spec)}")
            return path
        target = hub_checkpoint_dir() / os.path.basename(weights.rstrip("/"))
        if not target.is_file():
            storage.get_file(weights, str(target), storage_cfg)
        return str(target)
    looked: List[str] = []
    for name in (spec.filename, *spec.alt_filenames):
        candidate = hub_checkpoint_dir() / name
        looked.append(str(candidate))
        if candidate.is_file():
            return str(candidate)
    if allow_download:
        target = hub_checkpoint_dir() / spec.filename
        try:
            storage.get_file(spec.url, str(target))
            return str(target)
        except Exception as exc:  # offline machines fail here in many different ways
            raise FileNotFoundError(
                f"{spec.label} are not in {looked} and downloading {spec.url} failed "
                f"({type(exc).__name__}: {storage.redact(exc)}). {where_to_put_it(spec)}"
            ) from exc
    raise FileNotFoundError(f"{spec.label} are not in {looked} (download disabled). {where_to_put_it(spec)}")


def source_of(spec: WeightsFile, weights: Optional[str], prefix: str = "extractor") -> str:
    """Where :func:`resolve` takes the file from, in the words of the setting that chose it."""
    env = os.environ.get(spec.env_var) if spec.env_var else None
    if weights:
        return f"{prefix}.weights={weights}"
    if env:
        return f"${spec.env_var}={env}"
    return "the torch hub cache"


def verify(spec: WeightsFile, path: str, sha256: Optional[str], *, source: Optional[str] = None,
           hash_key: str = "extractor.sha256") -> str:
    """The file's digest, checked against ``sha256`` (the user's) or else the spec's pin; with
    neither, computed only (the caller records it)."""
    expected = sha256 or spec.sha256
    if expected:
        return check_sha256(path, expected, source=source, hash_key=hash_key, url=spec.url)
    return sha256_of_file(path)
