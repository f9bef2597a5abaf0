"""Read one tar shard as a stream of samples (members grouped by key), never crashing on bad data.

A sample is a dict ``{"__key__", "__url__", "__shard__", "__index__", "<ext>": bytes, ...}`` where the
key is a member name up to the first dot of its basename and ``ext`` the rest (``jpg``, ``txt``,
``json``, ``latent.npy``), as in webdataset. A corrupt tar header or a truncated member ends the
shard (the partial sample is dropped) and is counted, and so is a missing shard; storage failures that outlast their retries are
not data errors and propagate as :class:`ldm_scale.storage.StorageError`, naming the URL.
"""
from __future__ import annotations

import logging
import tarfile
import zlib
from typing import MutableMapping
from typing import Dict, Iterator, Optional

from ldm_scale import storage

log = logging.getLogger(__name__)


def _split_name(name: str):
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def iter_tar_samples(url: str, shard_index: int, counters: MutableMapping[str, int],
                     cfg: Optional[storage.StorageConfig] = None) -> Iterator[Dict]:
    """Samples of the tar at ``url`` in file order; ``counters`` gets ``skip/corrupt_tar`` and
    ``skip/truncated_member`` for damaged shards and ``members`` per member read."""
    try:
        stream = storage.open_url(url, "rb", cfg)
    except FileNotFoundError:
        # One lost shard among thousands (e.g. an img2dataset job that failed) should not end a
        # week-long run; it is counted and logged. A wrong pattern fails at start-up instead,
        # where the loader checks that the first shard exists.
        counters["skip/missing_shard"] += 1
        log.error("shard %s does not exist; skipped", storage.redact(url))
        return
    with stream:
        mode = "r|gz" if url.endswith((".tar.gz", ".tgz")) else "r|"
        try:
            tar = tarfile.open(fileobj=stream, mode=mode)
        except (tarfile.ReadError, EOFError, zlib.error, OSError) as exc:
            if isinstance(exc, storage.StorageError):
                raise
            counters["skip/corrupt_tar"] += 1
            return
        current: Optional[Dict] = None
        index = 0
        while True:
            try:
                member = tar.next()
                if member is None:
                    break
                if not member.isfile():
                    continue
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise EOFError("member shorter than its header says")
            except storage.StorageError:
                raise
            except (tarfile.ReadError, tarfile.HeaderError, EOFError, zlib.error) as exc:
                # A header that fails its checksum is corruption; running out of bytes inside a
                # member (or right after its header) is truncation. Either way the shard ends here.
                truncated = isinstance(exc, EOFError) or "unexpected end" in str(exc).lower()
                counters["skip/truncated_member" if truncated else "skip/corrupt_tar"] += 1
                current = None
                break
            counters["members"] += 1
            key, ext = _split_name(member.name)
            if current is not None and current["__key__"] != key:
                yield current
                index += 1
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url, "__shard__": shard_index, "__index__": index}
            current[ext] = data
        if current is not None:
            yield current
