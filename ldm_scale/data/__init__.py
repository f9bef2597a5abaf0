"""Streaming shard pipeline with exact resume, and the synthetic LAION-shaped dataset.

Public surface (docs/architecture.md): `DataConfig`, `FilterConfig`, `build_loader`, `ShardLoader`;
`ldm_scale.data.synthetic` for the procedural dataset and the prompt-adherence detector.
The loader (and torch) is imported on first use, so shard tools that only read or write tars start fast.
"""
from ldm_scale.data.config import DataConfig, FilterConfig

__all__ = ["DataConfig", "FilterConfig", "ShardLoader", "build_loader"]


def __getattr__(name: str):
    if name in ("ShardLoader", "build_loader"):
        from ldm_scale.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'ldm_scale.data' has no attribute {name!r}")
