"""Named model flavours (typed configs) and builders.

``FLAVOURS``: LDM name -> :class:`LDMSpec`; ``AUTOENCODERS``: first-stage name ->
:class:`FirstStageConfig`. Big flavours are built on the ``meta`` device (no memory) for
parameter counts: ``python -m ldm_scale.models.registry`` prints every flavour by component.

Hyper-parameters of the non-tiny flavours come from the public CompVis latent-diffusion configs
(``configs/autoencoder/*.yaml``, ``configs/latent-diffusion/cin-ldm-vq-f8.yaml``,
``txt2img-1p4B-eval.yaml``); see docs/models.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .autoencoder import AutoencoderConfig, AutoencoderKL, VQConfig, VQModel
from .conditioners import (
    ClassEmbedderConfig,
    ConditionerConfig,
    OpenCLIPConfig,
    TextEmbedderConfig,
    build_conditioner,
)
from .encoder_decoder import EncoderDecoderConfig
from .ldm import LatentDiffusion
from .tokenizers import TokenizerConfig
from .unet import UNetConfig, UNetModel


@dataclass
class FirstStageConfig:
    """A first stage: ``kind`` "kl" uses ``kl``, "vq" uses ``vq`` (the other is ignored)."""

    kind: str = "kl"
    kl: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    vq: VQConfig = field(default_factory=VQConfig)

    @property
    def latent_channels(self) -> int:
        return self.kl.embed_dim if self.kind == "kl" else self.vq.embed_dim

    @property
    def downsample_factor(self) -> int:
        return (self.kl if self.kind == "kl" else self.vq).ddconfig.downsample_factor


@dataclass
class LDMSpec:
    """Everything needed to build a :class:`LatentDiffusion` (stored in exported checkpoints).

    ``scale_factor`` is the flavour's default latent scaling; the training task may recompute it
    from the first batch (1 / std of the latents, paper Sec. 4.3.2). ``linear_start`` /
    ``linear_end`` / ``num_timesteps`` are the CompVis schedule defaults for this flavour.
    """

    name: str = "tiny"
    unet: UNetConfig = field(default_factory=UNetConfig)
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    cond_stage: ConditionerConfig = field(default_factory=ConditionerConfig)
    image_size: int = 256
    scale_factor: float = 1.0
    parameterization: str = "eps"
    linear_start: float = 0.00085
    linear_end: float = 0.012
    num_timesteps: int = 1000

    @property
    def latent_size(self) -> int:
        return self.image_size // self.first_stage.downsample_factor

    def validate(self) -> None:
        f = self.first_stage.downsample_factor
        if self.image_size % f:
            raise ValueError(f"image_size {self.image_size} is not divisible by the first stage's factor f={f}")
        levels = 2 ** (len(self.unet.channel_mult) - 1)
        if self.latent_size % levels:
            raise ValueError(f"latent size {self.latent_size} is not divisible by the UNet's total "
                             f"downsampling {levels} (channel_mult={self.unet.channel_mult})")
        concat = self.cond_stage.concat_channels if self.cond_stage.kind == "concat" else 0
        if self.unet.in_channels != self.first_stage.latent_channels + concat:
            raise ValueError(f"unet.in_channels={self.unet.in_channels} but latents have "
                             f"{self.first_stage.latent_channels} channels (+{concat} concat)")
        if self.unet.use_spatial_transformer and self.cond_stage.kind not in ("text", "openclip", "class"):
            raise ValueError(f"the UNet has cross-attention but cond_stage.kind={self.cond_stage.kind!r} "
                             "gives no context; set unet.use_spatial_transformer=False")


# --------------------------------------------------------------------------------------------
# First stages (CompVis configs/autoencoder/* and the model zoo table of the README)

def _kl(ch_mult, z, attn=(), ch=128, num_res_blocks=2, resolution=256) -> FirstStageConfig:
    dd = EncoderDecoderConfig(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                              attn_resolutions=list(attn), resolution=resolution, z_channels=z, double_z=True)
    return FirstStageConfig(kind="kl", kl=AutoencoderConfig(ddconfig=dd, embed_dim=z))


def _vq(ch_mult, z, n_embed, attn=(), ch=128, num_res_blocks=2, resolution=256) -> FirstStageConfig:
    dd = EncoderDecoderConfig(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                              attn_resolutions=list(attn), resolution=resolution, z_channels=z, double_z=False)
    return FirstStageConfig(kind="vq", vq=VQConfig(ddconfig=dd, embed_dim=z, n_embed=n_embed))


AUTOENCODERS: Dict[str, FirstStageConfig] = {
    # Tiny f=4 autoencoders for tests and the CPU quickstart (32x32 images -> 8x8 latents).
    "kl_tiny": _kl([1, 2, 2], z=4, ch=32, num_res_blocks=1, resolution=32),
    "vq_tiny": _vq([1, 2, 2], z=4, n_embed=256, ch=32, num_res_blocks=1, resolution=32),
    "kl_f4": _kl([1, 2, 4], z=3),
    "kl_f8": _kl([1, 2, 4, 4], z=4),
    "kl_f16": _kl([1, 1, 2, 2, 4], z=16, attn=[16]),
    "kl_f32": _kl([1, 1, 2, 2, 4, 4], z=64, attn=[16, 8]),
    "vq_f4": _vq([1, 2, 4], z=3, n_embed=8192),
    "vq_f8": _vq([1, 2, 2, 4], z=4, n_embed=16384, attn=[32]),
}


# --------------------------------------------------------------------------------------------
# Latent diffusion models

def _tiny_unet(context_dim: Optional[int], spatial_transformer: bool = True) -> UNetConfig:
    return UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2],
                      num_res_blocks=1, attention_resolutions=[1, 2, 4], num_heads=-1, num_head_channels=32,
                      use_spatial_transformer=spatial_transformer, transformer_depth=1, context_dim=context_dim)


_TINY_TEXT = TextEmbedderConfig(vocab_size=49408, width=64, depth=2, heads=4, dim_head=16,
                                tokenizer=TokenizerConfig(kind="bpe", max_length=77))

FLAVOURS: Dict[str, LDMSpec] = {
    # Tiny text-to-image LDM over kl_tiny: the test and quickstart flavour.
    "tiny": LDMSpec(name="tiny", unet=_tiny_unet(64), first_stage=AUTOENCODERS["kl_tiny"],
                    cond_stage=ConditionerConfig(kind="text", text=_TINY_TEXT), image_size=32),
    # 15 classes: the synthetic .cls shards label 5 colours x 3 shapes (ldm_scale.data.synthetic).
    "tiny_cin": LDMSpec(name="tiny_cin", unet=_tiny_unet(64), first_stage=AUTOENCODERS["kl_tiny"],
                        cond_stage=ConditionerConfig(kind="class", classes=ClassEmbedderConfig(15, 64)),
                        image_size=32, linear_start=0.0015, linear_end=0.0195),
    "tiny_uncond": LDMSpec(name="tiny_uncond", unet=_tiny_unet(None, spatial_transformer=False),
                           first_stage=AUTOENCODERS["kl_tiny"], cond_stage=ConditionerConfig(kind="none"),
                           image_size=32, linear_start=0.0015, linear_end=0.0195),
    # Tiny inpainting LDM: the UNet sees [z_t | masked-image latent (4) | mask (1)] = 9 channels.
    "tiny_inpaint": LDMSpec(name="tiny_inpaint", unet=dataclasses.replace(_tiny_unet(None, spatial_transformer=False),
                                                                          in_channels=9),
                            first_stage=AUTOENCODERS["kl_tiny"],
                            cond_stage=ConditionerConfig(kind="concat", concat_channels=5), image_size=32,
                            linear_start=0.0015, linear_end=0.0195),
    # Class-conditional ImageNet LDM: UNet of CompVis cin-ldm-vq-f8.yaml on the KL-f8 first stage.
    "ldm_kl8_cin": LDMSpec(
        name="ldm_kl8_cin",
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=256, channel_mult=[1, 2, 4],
                        num_res_blocks=2, attention_resolutions=[4, 2, 1], num_heads=-1, num_head_channels=32,
                        use_spatial_transformer=True, transformer_depth=1, context_dim=512),
        first_stage=AUTOENCODERS["kl_f8"],
        cond_stage=ConditionerConfig(kind="class", classes=ClassEmbedderConfig(1000, 512)),
        image_size=256, scale_factor=0.18215, linear_start=0.0015, linear_end=0.0195),
    # Unconditional LDM on KL-f8 latents (modelled on CompVis lsun_churches-ldm-kl-8).
    "ldm_uncond_kl8": LDMSpec(
        name="ldm_uncond_kl8",
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=192, channel_mult=[1, 2, 2, 4, 4],
                        num_res_blocks=2, attention_resolutions=[1, 2, 4], num_heads=-1, num_head_channels=24,
                        use_spatial_transformer=False, context_dim=None),
        first_stage=AUTOENCODERS["kl_f8"], cond_stage=ConditionerConfig(kind="none"),
        image_size=256, scale_factor=0.22765929, linear_start=0.0015, linear_end=0.0155),
    # The paper's 1.45B text-to-image model (CompVis txt2img-1p4B-eval.yaml): KL-f8 latents,
    # 320-channel UNet with cross-attention to a 32-layer, 1280-wide BERT-tokenised transformer.
    "txt2img_kl8": LDMSpec(
        name="txt2img_kl8",
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4],
                        num_res_blocks=2, attention_resolutions=[4, 2, 1], num_heads=8, num_head_channels=-1,
                        use_spatial_transformer=True, transformer_depth=1, context_dim=1280),
        first_stage=AUTOENCODERS["kl_f8"],
        cond_stage=ConditionerConfig(kind="text", text=TextEmbedderConfig(
            vocab_size=30522, width=1280, depth=32, heads=8, dim_head=64, max_length=77,
            tokenizer=TokenizerConfig(kind="wordpiece", vocab_path=None, max_length=77))),
        image_size=256, scale_factor=0.18215, linear_start=0.00085, linear_end=0.012),
    # Stable Diffusion 2 (512-base) layout: linear-projection transformers with 64-channel heads,
    # cross-attention to the frozen OpenCLIP ViT-H-14 text tower (penultimate layer, width 1024).
    # Set cond_stage.openclip.pretrained to a local OpenCLIP checkpoint; v-prediction for the 768 model.
    "txt2img_openclip_kl8": LDMSpec(
        name="txt2img_openclip_kl8",
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4],
                        num_res_blocks=2, attention_resolutions=[4, 2, 1], num_heads=-1, num_head_channels=64,
                        use_spatial_transformer=True, transformer_depth=1, context_dim=1024,
                        use_linear_in_transformer=True),
        first_stage=AUTOENCODERS["kl_f8"],
        cond_stage=ConditionerConfig(kind="openclip", openclip=OpenCLIPConfig(arch="ViT-H-14", layer="penultimate")),
        image_size=512, scale_factor=0.18215, linear_start=0.00085, linear_end=0.012),
}


# --------------------------------------------------------------------------------------------
# Builders

def get_spec(name: str) -> LDMSpec:
    if name not in FLAVOURS:
        raise KeyError(f"unknown LDM flavour {name!r}; available: {sorted(FLAVOURS)}")
    return copy.deepcopy(FLAVOURS[name])


def build_autoencoder(cfg_or_name: Union[str, FirstStageConfig, AutoencoderConfig, VQConfig],
                      device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Build an AutoencoderKL / VQModel from a name in ``AUTOENCODERS`` or a config."""
    cfg = cfg_or_name
    if isinstance(cfg, str):
        if cfg not in AUTOENCODERS:
            raise KeyError(f"unknown autoencoder {cfg!r}; available: {sorted(AUTOENCODERS)}")
        cfg = AUTOENCODERS[cfg]
    if isinstance(cfg, FirstStageConfig):
        if cfg.kind not in ("kl", "vq"):
            raise ValueError(f"first_stage.kind must be 'kl' or 'vq', got {cfg.kind!r}")
        cfg = cfg.kl if cfg.kind == "kl" else cfg.vq
    cfg = copy.deepcopy(cfg)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if isinstance(cfg, AutoencoderConfig):
            return AutoencoderKL(cfg)
        if isinstance(cfg, VQConfig):
            return VQModel(cfg)
    raise TypeError(f"cannot build an autoencoder from {type(cfg_or_name).__name__}")


def build_ldm(spec_or_name: Union[str, LDMSpec], device: Optional[Union[str, torch.device]] = None) -> LatentDiffusion:
    """Build a LatentDiffusion (randomly initialised) from a flavour name or an :class:`LDMSpec`.

    ``device="meta"`` allocates nothing (parameter counting, or before loading a checkpoint /
    ``deepspeed.zero.Init``).
    """
    spec = get_spec(spec_or_name) if isinstance(spec_or_name, str) else copy.deepcopy(spec_or_name)
    spec.validate()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        unet = UNetModel(spec.unet)
        first_stage = build_autoencoder(spec.first_stage)
        cond_stage = build_conditioner(spec.cond_stage)
        model = LatentDiffusion(unet, first_stage, cond_stage, spec.scale_factor, spec.parameterization)
    if getattr(cond_stage, "output_dim", 0) and spec.unet.use_spatial_transformer \
            and cond_stage.output_dim != spec.unet.context_dim:
        raise ValueError(f"conditioner output_dim={cond_stage.output_dim} != unet.context_dim={spec.unet.context_dim}")
    return model


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_counts(model: LatentDiffusion) -> Dict[str, int]:
    """Parameters by component; ``trainable`` = UNet + jointly trained condition encoder."""
    return {
        "unet": count_parameters(model.unet),
        "first_stage": count_parameters(model.first_stage),
        "cond_stage": count_parameters(model.cond_stage),
        "trainable": count_parameters(model, trainable_only=True),
        "total": count_parameters(model),
    }


def config_from_dict(cls: type, data: Any) -> Any:
    """Rebuild a (nested) config dataclass from ``dataclasses.asdict`` output, e.g. the
    ``model_config`` stored in an exported checkpoint. Unknown keys raise."""
    if data is None or not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"expected a dict for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        target = args[0] if typing.get_origin(hint) is Union and len(args) == 1 else hint
        kwargs[name] = config_from_dict(target, value) if dataclasses.is_dataclass(target) else value
    return cls(**kwargs)


def spec_from_dict(data: Dict[str, Any]) -> LDMSpec:
    return config_from_dict(LDMSpec, data)


def _format_count(n: int) -> str:
    return f"{n / 1e6:9.2f}M"


def main() -> None:
    print(f"{'flavour':<22}{'unet':>11}{'first_stage':>13}{'cond_stage':>12}{'trainable':>12}{'total':>11}  latent")
    for name, spec in FLAVOURS.items():
        model = build_ldm(name, device="meta")
        c = parameter_counts(model)
        latent = f"{spec.first_stage.latent_channels}x{spec.latent_size}x{spec.latent_size}"
        print(f"{name:<22}{_format_count(c['unet']):>11}{_format_count(c['first_stage']):>13}"
              f"{_format_count(c['cond_stage']):>12}{_format_count(c['trainable']):>12}"
              f"{_format_count(c['total']):>11}  {latent}")
    print()
    print(f"{'autoencoder':<16}{'params':>11}  f  latent channels")
    for name, cfg in AUTOENCODERS.items():
        ae = build_autoencoder(name, device="meta")
        print(f"{name:<16}{_format_count(count_parameters(ae)):>11}  {cfg.downsample_factor:<2} {cfg.latent_channels}")


if __name__ == "__main__":
    main()
    sys.exit(0)
