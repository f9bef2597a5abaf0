"""Write shards in the img2dataset "webdataset" layout to any storage URL.

One shard is ``<dir>/<id>.tar`` (members ``<key>.<ext>`` grouped by key, in key order) plus
``<id>.parquet`` (one row per sample: key, caption, metadata, status) and ``<id>_stats.json``
(counts). :func:`write_sizes` writes ``sizes.json`` ({shard file name: samples}) next to the shards,
which the loader reads to know how many batches an epoch has without opening every shard;
:func:`write_aspects` writes ``aspects.json`` ({tar file name: {aspect bin: samples}}, bins of
``data/buckets.aspect_bin``), from which a bucketed loader plans its epochs.

Tar members are written with fixed mode / owner / mtime so that the same samples give the same bytes
(datasets are reproducible artefacts, and checksums stay stable across re-runs).
"""
from __future__ import annotations

import io
import json
import tarfile
import time
from typing import Any, Dict, List, Mapping, Optional

from ldm_scale import storage

Sample = Mapping[str, Any]  # {"__key__": str, "<ext>": bytes | str | dict | int, ...}


def _encode_member(ext: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value).encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True).encode("utf-8")
    raise TypeError(f"cannot store {type(value).__name__} as member .{ext}; pass bytes, str, int or dict")


def tar_bytes(samples: List[Sample]) -> bytes:
    """The bytes of a tar holding ``samples`` (members in the order given, extensions sorted)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            if "." in key.rsplit("/", 1)[-1]:
                raise ValueError(f"sample key {key!r} contains a dot; keys must not (the first dot starts the extension)")
            for ext in sorted(k for k in sample if not k.startswith("__")):
                data = _encode_member(ext, sample[ext])
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0
                info.uname = info.gname = "ldm_scale"
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(
    url_dir: str,
    shard_id: int,
    samples: List[Sample],
    *,
    parquet_rows: Optional[List[Dict[str, Any]]] = None,
    stats_extra: Optional[Dict[str, Any]] = None,
    digits: int = 5,
    cfg: Optional[storage.StorageConfig] = None,
) -> str:
    """Write ``<url_dir>/<shard_id>.tar`` (+ .parquet and _stats.json); returns the tar URL."""
    name = f"{shard_id:0{digits}d}"
    tar_url = storage.join(url_dir, name + ".tar")
    storage.write_bytes(tar_url, tar_bytes(samples), cfg)
    if parquet_rows is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(parquet_rows), out)
        storage.write_bytes(storage.join(url_dir, name + ".parquet"), out.getvalue(), cfg)
    stats = {
        "count": len(samples),
        "successes": len(samples),
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "start_time": time.time(),
        "end_time": time.time(),
        "status_dict": {"success": len(samples)},
    }
    stats.update(stats_extra or {})
    storage.write_text(storage.join(url_dir, name + "_stats.json"), json.dumps(stats, indent=1), cfg)
    return tar_url


def write_sizes(url_dir: str, sizes: Mapping[str, int], cfg: Optional[storage.StorageConfig] = None) -> str:
    """Write ``sizes.json`` ({tar file name: number of samples}) into ``url_dir``."""
    url = storage.join(url_dir, "sizes.json")
    storage.write_text(url, json.dumps(dict(sorted(sizes.items())), indent=1), cfg)
    return url


def write_aspects(url_dir: str, aspects: Mapping[str, Mapping[int, int]],
                  cfg: Optional[storage.StorageConfig] = None) -> str:
    """Write ``aspects.json`` ({tar file name: {aspect bin: samples}}) into ``url_dir``."""
    url = storage.join(url_dir, "aspects.json")
    table = {name: {str(b): int(n) for b, n in sorted(hist.items(), key=lambda kv: int(kv[0]))}
             for name, hist in sorted(aspects.items())}
    storage.write_text(url, json.dumps(table, indent=1), cfg)
    return url
