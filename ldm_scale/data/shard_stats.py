"""Look inside shards: sample counts, bytes, member types, damaged members, caption and metadata
histograms, and what img2dataset's ``<shard>_stats.json`` files say about the downloads (attempted,
written, failed by error); write ``sizes.json`` (samples per shard) that the loader uses to size
its epochs.

Image sizes come from the image header (PIL reads it without decoding the pixels), so a full
inspection costs about one read of the data.

The samples in a shard only show what was written (their JSON ``status`` is always ``success``):
failed URLs appear only in the stats file next to the shard, which is why the report reads both.
"""
from __future__ import annotations

import bisect
import io
import json
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from ldm_scale import storage
from ldm_scale.data.filters import IMAGE_EXTS, LATENT_EXT, clean_caption
from ldm_scale.data.shards import _stats_url as stats_url_of  # the one place the naming rule lives
from ldm_scale.data.buckets import aspect_bin
from ldm_scale.data.shard_writer import write_aspects, write_sizes
from ldm_scale.data.tar_stream import iter_tar_samples

CAPTION_BINS = [0, 1, 10, 20, 40, 80, 160, 320]
SIZE_BINS = [0, 64, 128, 256, 512, 1024, 2048, 4096]
UNIT_BINS = [i / 10 for i in range(11)]  # punsafe, pwatermark, similarity in [0, 1]
AESTHETIC_BINS = list(range(11))
_META_BINS = {"aesthetic": AESTHETIC_BINS, "punsafe": UNIT_BINS, "pwatermark": UNIT_BINS, "similarity": UNIT_BINS}


def _bin_label(bins: Sequence[float], value: float) -> str:
    i = max(0, bisect.bisect_right(bins, value) - 1)
    return f">={bins[i]}" if i == len(bins) - 1 else f"[{bins[i]},{bins[i + 1]})"


def _histogram(bins: Sequence[float], values: List[float]) -> Dict[str, int]:
    counts = Counter(_bin_label(bins, v) for v in values)
    ordered = [f"[{bins[i]},{bins[i + 1]})" for i in range(len(bins) - 1)] + [f">={bins[-1]}"]
    return {label: counts.get(label, 0) for label in ordered}


def summarise_download_stats(stats: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    """Totals of img2dataset ``_stats.json`` records (one per shard).

    ``attempted`` (img2dataset's ``count``: input rows), ``successes`` (samples written),
    ``failed`` (= attempted - successes), ``failed_to_download`` / ``failed_to_resize``,
    ``status`` (its ``status_dict`` summed: ``success`` and one entry per error message, e.g.
    ``"HTTP Error 404: File not found"``) and ``failed_by_error`` (the same without ``success``).
    """
    totals: Dict[str, Any] = {"attempted": 0, "successes": 0, "failed": 0, "failed_to_download": 0,
                              "failed_to_resize": 0}
    status: Counter = Counter()
    for st in stats:
        count, successes = int(st.get("count", 0)), int(st.get("successes", 0))
        totals["attempted"] += count
        totals["successes"] += successes
        totals["failed"] += count - successes
        totals["failed_to_download"] += int(st.get("failed_to_download", 0))
        totals["failed_to_resize"] += int(st.get("failed_to_resize", 0))
        status.update({str(k): int(v) for k, v in (st.get("status_dict") or {}).items()})
    totals["status"] = dict(status.most_common())
    totals["failed_by_error"] = {k: v for k, v in status.most_common() if k != "success"}
    return totals


def read_download_stats(url: str, cfg: Optional[storage.StorageConfig] = None) -> Optional[Dict[str, Any]]:
    """The img2dataset stats record next to the shard at ``url`` (``00000.tar`` ->
    ``00000_stats.json``), or None when there is none (shards not made by img2dataset)."""
    su = stats_url_of(url)
    try:
        text = storage.read_text(su, cfg)
    except FileNotFoundError:
        return None
    try:
        stats = json.loads(text)
    except ValueError:
        return {"unreadable": True}
    return stats if isinstance(stats, dict) else {"unreadable": True}


def format_downloads(downloads: Mapping[str, Any]) -> str:
    """One line for people: ``downloads: 15 attempted, 12 written, 3 failed (HTTP Error 404: ...: 3)``."""
    if not downloads.get("stats_files"):
        return "downloads: no img2dataset _stats.json next to the shards (failed downloads unknown)"
    errors = ", ".join(f"{k}: {v}" for k, v in downloads["failed_by_error"].items())
    line = (f"downloads: {downloads['attempted']} attempted, {downloads['successes']} written, "
            f"{downloads['failed']} failed" + (f" ({errors})" if errors else ""))
    missing = downloads.get("shards_without_stats", 0)
    if missing:
        line += f"; {missing} shard(s) without a _stats.json"
    return line


def inspect_shard(url: str, cfg: Optional[storage.StorageConfig] = None) -> Dict[str, Any]:
    """Statistics of one shard (raw values; :func:`inspect_shards` turns them into histograms)."""
    from PIL import Image

    counters: Counter = Counter()
    exts: Counter = Counter()
    captions: List[int] = []
    widths: List[int] = []
    heights: List[int] = []
    meta_values: Dict[str, List[float]] = defaultdict(list)
    status: Counter = Counter()
    samples = 0
    for raw in iter_tar_samples(url, 0, counters, cfg):
        samples += 1
        exts.update(k for k in raw if not k.startswith("__"))
        if "txt" in raw:
            try:
                captions.append(len(clean_caption(raw["txt"].decode("utf-8"))))
            except UnicodeDecodeError:
                counters["bad_caption_encoding"] += 1
        image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if image_ext is not None:
            try:
                with Image.open(io.BytesIO(raw[image_ext])) as im:
                    widths.append(im.width)
                    heights.append(im.height)
            except Exception:  # noqa: BLE001 - counted: an image PIL cannot even identify
                counters["undecodable_image"] += 1
        elif LATENT_EXT not in raw:
            counters["missing_image"] += 1
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except ValueError:
                counters["bad_metadata"] += 1
                continue
            status[str(meta.get("status", "unknown"))] += 1
            for name, keys in (("aesthetic", ("aesthetic", "AESTHETIC_SCORE")), ("punsafe", ("punsafe",)),
                               ("pwatermark", ("pwatermark",)), ("similarity", ("similarity",))):
                value = next((meta[k] for k in keys if meta.get(k) is not None), None)
                if value is not None:
                    meta_values[name].append(float(value))
    try:
        nbytes = storage.size(url, cfg)
    except FileNotFoundError:
        nbytes = 0  # counted as skip/missing_shard by the reader
    return {"url": url, "samples": samples, "bytes": nbytes, "members": dict(exts),
            "damage": {k: v for k, v in counters.items() if k != "members"}, "caption_lengths": captions,
            "widths": widths, "heights": heights, "meta": dict(meta_values), "status": dict(status),
            "download_stats": read_download_stats(url, cfg)}


def inspect_shards(urls: Sequence[str] | str, cfg: Optional[storage.StorageConfig] = None, *,
                   threads: int = 8, write_sizes_json: bool = True) -> Dict[str, Any]:
    """Inspect every shard (in parallel threads) and summarise; writes ``sizes.json`` and
    ``aspects.json`` (the per-shard aspect histogram of the image headers, for ``data.buckets``) into
    each shard directory when ``write_sizes_json`` (merging with existing ones).

    ``status`` counts the JSON ``status`` of the samples found (written samples only); ``downloads``
    sums the img2dataset stats files of the shards (:func:`summarise_download_stats`, plus
    ``stats_files``, ``shards_without_stats``, ``unreadable_stats`` and ``shards_differing_from_stats``:
    shards whose sample count is not the stats' ``successes``, e.g. cut short)."""
    shard_urls = storage.expand_urls(urls, cfg)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        per_shard = list(pool.map(lambda u: inspect_shard(u, cfg), shard_urls))
    captions = [n for s in per_shard for n in s["caption_lengths"]]
    widths = [w for s in per_shard for w in s["widths"]]
    heights = [h for s in per_shard for h in s["heights"]]
    damage: Counter = Counter()
    members: Counter = Counter()
    status: Counter = Counter()
    for s in per_shard:
        damage.update(s["damage"])
        members.update(s["members"])
        status.update(s["status"])
    with_stats = [s for s in per_shard if s["download_stats"] is not None and not s["download_stats"].get("unreadable")]
    downloads = {"stats_files": len(with_stats),
                 "shards_without_stats": sum(s["download_stats"] is None for s in per_shard),
                 "unreadable_stats": sum(bool(s["download_stats"] and s["download_stats"].get("unreadable"))
                                         for s in per_shard),
                 **summarise_download_stats(s["download_stats"] for s in with_stats),
                 "shards_differing_from_stats": [
                     storage.redact(s["url"]) for s in with_stats
                     if int(s["download_stats"].get("successes", -1)) != s["samples"]]}
    report = {
        "num_shards": len(per_shard),
        "num_samples": sum(s["samples"] for s in per_shard),
        "total_bytes": sum(s["bytes"] for s in per_shard),
        "members": dict(sorted(members.items())),
        "damage": dict(sorted(damage.items())),
        "status": dict(sorted(status.items())),
        "downloads": downloads,
        "caption_length_chars": _histogram(CAPTION_BINS, captions),
        "width": _histogram(SIZE_BINS, widths),
        "height": _histogram(SIZE_BINS, heights),
        "metadata": {name: _histogram(bins, [v for s in per_shard for v in s["meta"].get(name, [])])
                     for name, bins in _META_BINS.items()},
        "shards": [{"url": storage.redact(s["url"]), "samples": s["samples"], "bytes": s["bytes"],
                    "damage": s["damage"], "download_stats": s["download_stats"]} for s in per_shard],
    }
    if write_sizes_json:
        by_dir: Dict[str, Dict[str, int]] = defaultdict(dict)
        aspects_by_dir: Dict[str, Dict[str, Dict[int, int]]] = defaultdict(dict)
        for s in per_shard:
            name = s["url"].rsplit("/", 1)[-1]
            by_dir[storage.parent(s["url"])][name] = s["samples"]
            aspects_by_dir[storage.parent(s["url"])][name] = dict(Counter(
                aspect_bin(w, h) for w, h in zip(s["widths"], s["heights"])))
        for d, sizes in by_dir.items():
            for file_name, table, write in (("sizes.json", sizes, write_sizes),
                                            ("aspects.json", aspects_by_dir[d], write_aspects)):
                existing_url = storage.join(d, file_name)
                merged = json.loads(storage.read_text(existing_url, cfg)) if storage.exists(existing_url, cfg) else {}
                merged.update(table)
                write(d, merged, cfg)
        report["sizes_json"] = sorted(storage.join(d, "sizes.json") for d in by_dir)
        report["aspects_json"] = sorted(storage.join(d, "aspects.json") for d in by_dir)
    return report
