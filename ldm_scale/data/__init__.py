"""Streaming shard pipeline with exact resume, and the synthetic LAION-shaped dataset.

Public surface (docs/architecture.md): `DataConfig`, `FilterConfig`, `build_loader`, `ShardLoader`;
`ldm_scale.data.synthetic` for the procedural dataset and the prompt-adherence detector.
"""
from ldm_scale.data.config import DataConfig, FilterConfig
from ldm_scale.data.loader import ShardLoader, build_loader

__all__ = ["DataConfig", "FilterConfig", "ShardLoader", "build_loader"]
