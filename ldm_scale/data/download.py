"""Build shards from a LAION-style parquet (url / caption / metadata columns) with img2dataset.

img2dataset downloads, resizes and writes the webdataset layout our loader reads: ``<id>.tar``
(key.jpg / key.txt / key.json with url, width, height, original_width/height, status, sha256 and
the extra columns of the input, see :func:`extra_columns`), ``<id>.parquet`` and ``<id>_stats.json``.
Failed URLs are counted in the stats, not written. Afterwards we write ``sizes.json`` so the loader
knows epoch lengths.

img2dataset is an optional extra (``pip install ldm_scale[img2dataset]``); it pins webdataset<0.3,
which is fine: our pipeline does not use webdataset.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from ldm_scale import storage
from ldm_scale.choices import Choice
from ldm_scale.data.shard_stats import summarise_download_stats
from ldm_scale.data.shard_writer import write_sizes

log = logging.getLogger(__name__)

# Fields img2dataset writes into every sample's JSON itself; it refuses them as extra columns
# (img2dataset/main.py, ``forbidden_columns``).
IMG2DATASET_FIELDS = frozenset({"key", "caption", "url", "width", "height", "original_width", "original_height",
                                "status", "error_message", "exif", "md5", "sha256", "sha512"})


class ResizeMode(Choice):
    """img2dataset's ``resize_mode``."""

    no = "no"
    border = "border"
    keep_ratio = "keep_ratio"
    keep_ratio_largest = "keep_ratio_largest"
    center_crop = "center_crop"


@dataclass
class DownloadConfig:
    """img2dataset's settings (the fields of ``data_tools/download.py``'s command line)."""

    image_size: int = 256
    resize_mode: ResizeMode = "keep_ratio"  # type: ignore[assignment]
    resize_only_if_bigger: bool = True
    min_image_size: int = 0
    encode_quality: int = 95
    samples_per_shard: int = 10000
    processes: int = 1
    threads: int = 32
    timeout_s: int = 10
    retries: int = 0
    url_col: str = "url"
    caption_col: str = "caption"
    # Input columns copied into each sample's JSON (and the shard parquet): "all" (every column but
    # the url / caption columns and img2dataset's own fields), "none", or comma-separated names
    # ("label,aesthetic"). One string, not a list: a command-line value, typed for Hydra.
    extra_columns: str = "all"
    # Honour sites' "noai"/"noimageai" opt-outs (X-Robots-Tag) by default.
    disallowed_header_directives: List[str] = field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])

    def extra_column_choice(self) -> Union[str, List[str]]:
        """``extra_columns`` parsed: ``"all"``, ``"none"`` or the list of names."""
        return parse_extra_columns(self.extra_columns)


def _parquet_columns(parquet_url: str, cfg: Optional[storage.StorageConfig]) -> List[str]:
    import pyarrow.parquet as pq

    with storage.open_url(parquet_url, "rb", cfg) as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


def parse_extra_columns(spec: str) -> Union[str, List[str]]:
    """An ``extra_columns`` value: ``all``, ``none`` or comma-separated names."""
    spec = spec.strip()
    if spec in ("all", "none"):
        return spec
    names = [c.strip() for c in spec.split(",") if c.strip()]
    if not names:
        raise ValueError(f"extra_columns={spec!r}: give all, none, or comma-separated column names")
    return names


def extra_columns(available: Sequence[str], choice: Union[str, Sequence[str]], url_col: str = "url",
                  caption_col: str = "caption") -> List[str]:
    """The input columns to pass as img2dataset's ``save_additional_columns``.

    ``"all"``: every column except ``url_col`` / ``caption_col`` and the fields img2dataset writes
    itself (:data:`IMG2DATASET_FIELDS`: a ``width`` column would collide with the image's width);
    ``"none"``: no extra column; a list: exactly those, each of which must exist and must not be one
    of img2dataset's fields (a ``ValueError`` names the problem and the available columns)."""
    own = {url_col, caption_col}
    if choice == "none":
        return []
    if choice == "all":
        return [c for c in available if c not in own and c not in IMG2DATASET_FIELDS]
    if isinstance(choice, str):
        raise ValueError(f"extra columns must be 'all', 'none' or a list of names, got {choice!r}")
    missing = [c for c in choice if c not in available]
    if missing:
        raise ValueError(f"extra columns {missing} are not in the input (its columns: {list(available)})")
    reserved = [c for c in choice if c in IMG2DATASET_FIELDS or c in own]
    if reserved:
        raise ValueError(f"extra columns {reserved} cannot be kept under their own name: img2dataset writes "
                         f"{sorted(IMG2DATASET_FIELDS)} itself and {sorted(own)} are the url / caption columns")
    return list(dict.fromkeys(choice))


def download_shards(parquet_url: str, out_url: str, dl: DownloadConfig = DownloadConfig(),
                    cfg: Optional[storage.StorageConfig] = None) -> Dict[str, Any]:
    """Run img2dataset on ``parquet_url`` writing webdataset shards to ``out_url`` (local or
    ``s3://``; an S3 endpoint comes from ``cfg.endpoint_url`` or AWS_ENDPOINT_URL). Returns totals
    from the shards' stats (``shard_stats.summarise_download_stats``: ``attempted``, ``successes``,
    ``failed``, ``failed_by_error``, ...) plus ``shards`` and the ``extra_columns`` kept."""
    # Columns first: a wrong name fails before img2dataset's slow imports.
    available = _parquet_columns(parquet_url, cfg)
    choice = dl.extra_column_choice()
    extra = extra_columns(available, choice, dl.url_col, dl.caption_col)
    shadowed = sorted(IMG2DATASET_FIELDS.intersection(available) - {dl.url_col, dl.caption_col})
    if choice == "all" and shadowed:
        log.warning("input columns %s are not kept: img2dataset writes fields of these names itself", shadowed)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import otherwise
    try:
        import img2dataset
    except ImportError as e:
        raise ImportError("download needs img2dataset: pip install 'ldm_scale[img2dataset]'") from e
    if cfg is not None and cfg.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = cfg.endpoint_url  # img2dataset builds its own fsspec filesystem
    img2dataset.download(
        url_list=parquet_url, input_format="parquet", url_col=dl.url_col, caption_col=dl.caption_col,
        save_additional_columns=extra or None, output_format="webdataset", output_folder=out_url,
        image_size=dl.image_size, resize_mode=dl.resize_mode, resize_only_if_bigger=dl.resize_only_if_bigger,
        min_image_size=dl.min_image_size, encode_quality=dl.encode_quality,
        number_sample_per_shard=dl.samples_per_shard, processes_count=dl.processes, thread_count=dl.threads,
        timeout=dl.timeout_s, retries=dl.retries, enable_wandb=False, distributor="multiprocessing",
        disallowed_header_directives=dl.disallowed_header_directives,
    )
    stats_urls = storage.glob(storage.join(out_url, "*_stats.json"), cfg)
    if not stats_urls:
        raise RuntimeError(f"img2dataset wrote no shards to {storage.redact(out_url)}")
    sizes: Dict[str, int] = {}
    all_stats = []
    for su in stats_urls:
        stats = json.loads(storage.read_text(su, cfg))
        sizes[su.rsplit("/", 1)[-1][: -len("_stats.json")] + ".tar"] = int(stats["successes"])
        all_stats.append(stats)
    write_sizes(out_url, sizes, cfg)
    return {"shards": len(stats_urls), **summarise_download_stats(all_stats), "extra_columns": extra}
