"""Build shards from a LAION-style parquet (url / caption / metadata columns) with img2dataset.

img2dataset downloads, resizes and writes the webdataset layout our loader reads: ``<id>.tar``
(key.jpg / key.txt / key.json with url, width, height, original_width/height, status, sha256 and
the extra metadata columns), ``<id>.parquet`` and ``<id>_stats.json``. Failed URLs are counted in
the stats, not written. Afterwards we write ``sizes.json`` so the loader knows epoch lengths.

img2dataset is an optional extra (``pip install ldm_scale[img2dataset]``); it pins webdataset<0.3,
which is fine: our pipeline does not use webdataset.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ldm_scale import storage
from ldm_scale.data.shard_writer import write_sizes

LAION_METADATA_COLUMNS = ["similarity", "punsafe", "pwatermark", "aesthetic", "AESTHETIC_SCORE", "LICENSE", "NSFW",
                          "WIDTH", "HEIGHT"]


@dataclass
class DownloadConfig:
    image_size: int = 256
    resize_mode: str = "keep_ratio"  # img2dataset: no, border, keep_ratio, keep_ratio_largest, center_crop
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
    metadata_columns: List[str] = field(default_factory=lambda: list(LAION_METADATA_COLUMNS))
    # Honour sites' "noai"/"noimageai" opt-outs (X-Robots-Tag) by default.
    disallowed_header_directives: List[str] = field(default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"])


def _present_columns(parquet_url: str, wanted: List[str], cfg: Optional[storage.StorageConfig]) -> List[str]:
    import pyarrow.parquet as pq

    with storage.open_url(parquet_url, "rb", cfg) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return [c for c in wanted if c in names]


def download_shards(parquet_url: str, out_url: str, dl: DownloadConfig = DownloadConfig(),
                    cfg: Optional[storage.StorageConfig] = None) -> Dict[str, Any]:
    """Run img2dataset on ``parquet_url`` writing webdataset shards to ``out_url`` (local or
    ``s3://``; an S3 endpoint comes from ``cfg.endpoint_url`` or AWS_ENDPOINT_URL). Returns totals
    from the shards' stats: ``shards``, ``successes``, ``failed`` and the status breakdown."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import otherwise
    try:
        import img2dataset
    except ImportError as e:
        raise ImportError("download needs img2dataset: pip install 'ldm_scale[img2dataset]'") from e
    if cfg is not None and cfg.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = cfg.endpoint_url  # img2dataset builds its own fsspec filesystem
    extra = _present_columns(parquet_url, dl.metadata_columns, cfg)
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
    totals: Dict[str, Any] = {"shards": 0, "successes": 0, "failed": 0, "status": {}}
    for su in stats_urls:
        stats = json.loads(storage.read_text(su, cfg))
        name = su.rsplit("/", 1)[-1][: -len("_stats.json")] + ".tar"
        sizes[name] = int(stats["successes"])
        totals["shards"] += 1
        totals["successes"] += int(stats["successes"])
        totals["failed"] += int(stats["count"]) - int(stats["successes"])
        for k, v in stats.get("status_dict", {}).items():
            totals["status"][k] = totals["status"].get(k, 0) + int(v)
    write_sizes(out_url, sizes, cfg)
    return totals
