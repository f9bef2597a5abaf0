"""Single-device networks of ldm_scale (import with torch alone; see docs/models.md)."""

from .autoencoder import AutoencoderConfig, AutoencoderKL, VQConfig, VQModel
from .conditioners import (
    ClassEmbedder,
    ClassEmbedderConfig,
    ClassLabelConditioner,
    ConcatConditioner,
    ConditionerConfig,
    FrozenOpenCLIPEmbedder,
    NullConditioner,
    OpenCLIPConfig,
    TextEmbedderConfig,
    TransformerEmbedder,
    build_conditioner,
)
from .distributions import DiagonalGaussianDistribution
from .encoder_decoder import Decoder, Encoder, EncoderDecoderConfig
from .ldm import LatentDiffusion
from .tokenizers import TokenizerConfig
from .unet import UNetConfig, UNetModel

_REGISTRY_NAMES = ("AUTOENCODERS", "FLAVOURS", "FirstStageConfig", "LDMSpec", "build_autoencoder", "build_ldm",
                   "get_spec", "parameter_counts", "spec_from_dict")


def __getattr__(name: str):
    # The registry is imported on first use so that `python -m ldm_scale.models.registry` runs it
    # as __main__ without a second copy in sys.modules.
    if name in _REGISTRY_NAMES:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AUTOENCODERS", "FLAVOURS", "AutoencoderConfig", "AutoencoderKL", "ClassEmbedder", "ClassEmbedderConfig",
    "ClassLabelConditioner", "ConcatConditioner", "ConditionerConfig", "Decoder", "DiagonalGaussianDistribution",
    "Encoder", "EncoderDecoderConfig", "FirstStageConfig", "FrozenOpenCLIPEmbedder", "LDMSpec", "LatentDiffusion",
    "NullConditioner", "OpenCLIPConfig", "TextEmbedderConfig", "TokenizerConfig", "TransformerEmbedder",
    "UNetConfig", "UNetModel", "VQConfig", "VQModel", "build_autoencoder", "build_conditioner", "build_ldm",
    "get_spec", "parameter_counts", "spec_from_dict",
]
