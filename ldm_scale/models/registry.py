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
from typing import Any, Dict, Optional, Tuple, Union

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
from ldm_scale.choices import Choice

from .dit import DiT, DiTConfig, dit_config
from .encoder_decoder import EncoderDecoderConfig
from .ldm import LatentDiffusion
from .tokenizers import TokenizerConfig
from .unet import UNetConfig, UNetModel


class Backbone(Choice):
    """``model.ldm.backbone``: the denoiser network. unet (the LDM paper's, ``unet``) | dit (latent
    patch transformer, ``dit``; models/dit.py). The other field is ignored."""

    unet = "unet"
    dit = "dit"


# Conditioner kinds whose output is a token context [B, L, D] (cross-attention / joint attention).
CONTEXT_CONDITIONERS = ("text", "openclip", "class")


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
    backbone: Backbone = "unet"
    unet: UNetConfig = field(default_factory=UNetConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
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

    @property
    def is_dit(self) -> bool:
        return self.backbone == "dit"

    @property
    def micro_conditioned(self) -> bool:
        """Whether the denoiser takes SDXL's size / crop conditioning (``micro_conditioning``)."""
        return bool(self.dit.micro_conditioning if self.is_dit else self.unet.micro_conditioning)

    @property
    def denoiser_downsampling(self) -> int:
        """Latent sides must be multiples of this: the UNet's total downsampling or the patch size."""
        return self.dit.patch_size if self.is_dit else 2 ** (len(self.unet.channel_mult) - 1)

    @property
    def context_dim(self) -> Optional[int]:
        """Width of the token context the denoiser attends to (None: it takes none)."""
        if self.is_dit:
            return self.dit.context_dim if self.dit.text != "none" else None
        return self.unet.context_dim if self.unet.use_spatial_transformer else None

    @property
    def denoiser_classes(self) -> Optional[int]:
        """Rows of the denoiser's own label table (``y``), or None."""
        return self.dit.num_classes if self.is_dit else self.unet.num_classes

    def validate(self) -> None:
        f = self.first_stage.downsample_factor
        if self.image_size % f:
            raise ValueError(f"image_size {self.image_size} is not divisible by the first stage's factor f={f}")
        Backbone(self.backbone)
        if self.is_dit:
            self._validate_dit()
            return
        levels = 2 ** (len(self.unet.channel_mult) - 1)
        if self.latent_size % levels:
            raise ValueError(f"latent size {self.latent_size} is not divisible by the UNet's total "
                             f"downsampling {levels} (channel_mult={self.unet.channel_mult})")
        concat = self.cond_stage.concat_channels if self.cond_stage.kind == "concat" else 0
        if self.unet.in_channels != self.first_stage.latent_channels + concat:
            raise ValueError(f"unet.in_channels={self.unet.in_channels} but latents have "
                             f"{self.first_stage.latent_channels} channels (+{concat} concat)")
        if self.unet.use_spatial_transformer and self.cond_stage.kind not in CONTEXT_CONDITIONERS:
            raise ValueError(f"the UNet has cross-attention but cond_stage.kind={self.cond_stage.kind!r} "
                             "gives no context; set unet.use_spatial_transformer=False")

    def _validate_dit(self) -> None:
        d, kind = self.dit, self.cond_stage.kind
        d.validate()
        if d.input_size != self.latent_size:
            raise ValueError(f"dit.input_size={d.input_size} but image_size {self.image_size} gives {self.latent_size}"
                             f"-pixel latents: set model.ldm.dit.input_size={self.latent_size}")
        if self.latent_size % d.patch_size:
            raise ValueError(f"latent size {self.latent_size} is not divisible by dit.patch_size={d.patch_size}")
        concat = self.cond_stage.concat_channels if kind == "concat" else 0
        if d.in_channels != self.first_stage.latent_channels + concat:
            raise ValueError(f"dit.in_channels={d.in_channels} but latents have "
                             f"{self.first_stage.latent_channels} channels (+{concat} concat)")
        if (d.text != "none") != (kind in CONTEXT_CONDITIONERS):
            raise ValueError(f"dit.text={d.text!r} with cond_stage.kind={kind!r}: text/openclip/class conditioners "
                             "give a token context (set dit.text=cross or joint and dit.context_dim); label and "
                             "none give none (dit.text=none)")
        if (kind == "label") != (d.num_classes is not None):
            raise ValueError(f"dit.num_classes={d.num_classes} with cond_stage.kind={kind!r}: label conditioning "
                             f"needs dit.num_classes = n_classes + 1 (the null class), other kinds leave it unset")
        if kind == "label" and d.num_classes != self.cond_stage.classes.n_classes + 1:
            raise ValueError(f"dit.num_classes={d.num_classes} but cond_stage.classes.n_classes="
                             f"{self.cond_stage.classes.n_classes}: set dit.num_classes="
                             f"{self.cond_stage.classes.n_classes + 1} (the last row is the null class)")


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
# Latent diffusion transformers (models/dit.py)

def _tiny_dit(**kw) -> DiTConfig:
    return DiTConfig(input_size=8, patch_size=2, in_channels=4, out_channels=4, hidden_size=64, depth=4,
                     num_heads=4, **kw)


def _dit_cin(size: str, patch: int) -> LDMSpec:
    """DiT-<size>/<patch> on ImageNet 256 (Peebles & Xie 2023): KL-f8 latents (their sd-vae-ft), label
    conditioning with the null class 1000, ADM's linear schedule, and the release layout
    (learn_sigma: 8 outputs, the variance half unused here) so the public checkpoints load."""
    return LDMSpec(name=f"dit_{size.lower()}{patch}_kl8_cin", backbone="dit",
                   dit=dit_config(size, patch, input_size=32, num_classes=1001, learn_sigma=True),
                   first_stage=AUTOENCODERS["kl_f8"],
                   cond_stage=ConditionerConfig(kind="label", classes=ClassEmbedderConfig(1000, 0)),
                   image_size=256, scale_factor=0.18215, linear_start=0.0001, linear_end=0.02)


FLAVOURS.update({
    # Tiny transformers over kl_tiny latents (8x8x4 -> 16 tokens of patch 2), for tests and the
    # quickstart: class labels (the synthetic data's 15), PixArt-style cross-attention with
    # adaLN-single to the tiny text transformer, and MMDiT joint attention to it.
    "dit_tiny_cin": LDMSpec(name="dit_tiny_cin", backbone="dit", dit=_tiny_dit(num_classes=16),
                            first_stage=AUTOENCODERS["kl_tiny"],
                            cond_stage=ConditionerConfig(kind="label", classes=ClassEmbedderConfig(15, 0)),
                            image_size=32, linear_start=0.0015, linear_end=0.0195),
    "dit_tiny": LDMSpec(name="dit_tiny", backbone="dit", dit=_tiny_dit(text="cross", context_dim=64, adaln="single"),
                        first_stage=AUTOENCODERS["kl_tiny"], cond_stage=ConditionerConfig(kind="text", text=_TINY_TEXT),
                        image_size=32),
    "dit_tiny_mmdit": LDMSpec(name="dit_tiny_mmdit", backbone="dit", dit=_tiny_dit(text="joint", context_dim=64),
                              first_stage=AUTOENCODERS["kl_tiny"],
                              cond_stage=ConditionerConfig(kind="text", text=_TINY_TEXT), image_size=32),
    **{f"dit_{size.lower()}{patch}_kl8_cin": _dit_cin(size, patch) for size in ("S", "B", "L", "XL") for patch in (2, 4, 8)},
    # PixArt-α's 0.6B layout (Chen et al. 2023): DiT-XL/2 with cross-attention to the text tokens and
    # adaLN-single, on KL-f8 latents at 256 px, conditioned on the frozen OpenCLIP ViT-H-14 text tower
    # (penultimate layer, width 1024; PixArt uses T5-XXL, which is not on the conditioner list).
    "pixart_xl2_openclip_kl8": LDMSpec(
        name="pixart_xl2_openclip_kl8", backbone="dit",
        dit=dit_config("XL", 2, input_size=32, text="cross", context_dim=1024, adaln="single"),
        first_stage=AUTOENCODERS["kl_f8"],
        cond_stage=ConditionerConfig(kind="openclip", openclip=OpenCLIPConfig(arch="ViT-H-14", layer="penultimate")),
        image_size=256, scale_factor=0.18215),
})


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


def build_denoiser(spec: LDMSpec) -> nn.Module:
    """The spec's denoiser network (UNet or DiT), randomly initialised, on the current device."""
    return DiT(copy.deepcopy(spec.dit)) if spec.is_dit else UNetModel(copy.deepcopy(spec.unet))


def build_ldm(spec_or_name: Union[str, LDMSpec], device: Optional[Union[str, torch.device]] = None) -> LatentDiffusion:
    """Build a LatentDiffusion (randomly initialised) from a flavour name or an :class:`LDMSpec`.

    ``device="meta"`` allocates nothing (parameter counting, or before loading a checkpoint /
    ``deepspeed.zero.Init``).
    """
    spec = get_spec(spec_or_name) if isinstance(spec_or_name, str) else copy.deepcopy(spec_or_name)
    spec.validate()
    with torch.device(device) if device is not None else contextlib.nullcontext():
        unet = build_denoiser(spec)
        first_stage = build_autoencoder(spec.first_stage)
        cond_stage = build_conditioner(spec.cond_stage)
        model = LatentDiffusion(unet, first_stage, cond_stage, spec.scale_factor, spec.parameterization)
    if getattr(cond_stage, "output_dim", 0) and spec.context_dim is not None \
            and cond_stage.output_dim != spec.context_dim:
        where = "dit.context_dim" if spec.is_dit else "unet.context_dim"
        raise ValueError(f"conditioner output_dim={cond_stage.output_dim} != {where}={spec.context_dim}")
    return model


def denoiser_inputs(spec: LDMSpec, latent_size: Optional[int] = None, batch: int = 1, device: str = "meta",
                    requires_grad: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Example ``(x, t, kwargs)`` for the spec's denoiser (FLOP counting, tracing): latents at
    ``latent_size`` (default: the training size), a token context of the conditioner's length and the
    denoiser's width, labels when it has a label table, the six size / crop values when it is
    micro-conditioned."""
    h = latent_size or spec.latent_size
    channels = spec.dit.in_channels if spec.is_dit else spec.unet.in_channels
    x = torch.empty(batch, channels, h, h, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    kwargs: Dict[str, torch.Tensor] = {}
    if spec.context_dim is not None:
        kind = spec.cond_stage.kind
        tokens = {"text": spec.cond_stage.text.max_length, "openclip": spec.cond_stage.openclip.max_length}.get(kind, 1)
        kwargs["context"] = torch.empty(batch, tokens, spec.context_dim, device=device, requires_grad=requires_grad)
    if spec.denoiser_classes is not None:
        kwargs["y"] = torch.zeros(batch, dtype=torch.long, device=device)
    if spec.micro_conditioned:
        kwargs["micro"] = torch.zeros(batch, 6, device=device)
    return x, t, kwargs


def denoiser_forward_flops(spec: LDMSpec, latent_size: Optional[int] = None) -> float:
    """FLOPs (2 per multiply-add) of one image through the denoiser's forward, counted on ``meta``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_denoiser(spec)
    x, t, kwargs = denoiser_inputs(spec, latent_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, t, **kwargs)
    return float(counter.get_total_flops())


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
    # "denoiser": the UNet or DiT; GFLOPs: one image through its forward at the training size
    # (2 FLOPs per multiply-add; the DiT paper's "Gflops" count multiply-adds, i.e. half of these).
    print(f"{'flavour':<25}{'backbone':>9}{'denoiser':>11}{'first_stage':>13}{'cond_stage':>12}{'trainable':>12}"
          f"{'total':>11}{'GFLOPs/img':>12}  latent")
    for name, spec in FLAVOURS.items():
        model = build_ldm(name, device="meta")
        c = parameter_counts(model)
        latent = f"{spec.first_stage.latent_channels}x{spec.latent_size}x{spec.latent_size}"
        gflops = denoiser_forward_flops(spec) / 1e9
        print(f"{name:<25}{spec.backbone:>9}{_format_count(c['unet']):>11}{_format_count(c['first_stage']):>13}"
              f"{_format_count(c['cond_stage']):>12}{_format_count(c['trainable']):>12}"
              f"{_format_count(c['total']):>11}{gflops:>12.2f}  {latent}")
    print()
    print(f"{'autoencoder':<16}{'params':>11}  f  latent channels")
    for name, cfg in AUTOENCODERS.items():
        ae = build_autoencoder(name, device="meta")
        print(f"{name:<16}{_format_count(count_parameters(ae)):>11}  {cfg.downsample_factor:<2} {cfg.latent_channels}")


if __name__ == "__main__":
    main()
    sys.exit(0)
