"""Time-conditional UNet epsilon_theta(z_t, t, tau(y)) of the LDM paper (Sec. 3.3, Appendix D.1).

The architecture is the ADM UNet (Dhariwal & Nichol 2021) with SpatialTransformer cross-attention
layers, laid out exactly like CompVis ``ldm/modules/diffusionmodules/openaimodel.py`` so a CompVis
``model.diffusion_model.*`` state dict loads with a prefix rename (see ``compat.py``):
``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``.

Conditioning paths:
- cross-attention: ``context`` [B, L, context_dim] (text tokens, or a class embedding [B, 1, D]);
- class labels: ``y`` LongTensor[B] added to the timestep embedding (``num_classes`` set);
- SDXL's micro-conditioning: ``micro`` [B, 6] (original size, crop offset, target size), embedded
  and added to the timestep embedding (``micro_conditioning`` set; ``micro_conditioning.py``);
- concatenation: extra input channels (``in_channels`` > latent channels, e.g. 9 = 4+1+4 for
  inpainting); the caller concatenates (``LatentDiffusion.apply_model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionBlock, GroupNorm32, SpatialTransformer, reapply_zero_init, zero_module
from .encoder_decoder import Upsample  # nearest x2 + optional 3x3 conv: the autoencoder's, same keys
from .embeddings import timestep_embedding  # noqa: F401 - also the DiT's and the micro-conditioning's
from .micro_conditioning import MicroConditioning


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNetModel` (names follow the CompVis ``unet_config.params``)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    # Downsampling rates (1 = full latent resolution) at which attention layers are placed.
    attention_resolutions: List[int] = field(default_factory=lambda: [4, 2, 1])
    dropout: float = 0.0
    conv_resample: bool = True
    # Exactly one of num_heads / num_head_channels is used: num_head_channels=-1 means fixed heads.
    num_heads: int = 8
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    # Resample inside ResBlocks (BigGAN-style, ADM) instead of separate Downsample/Upsample blocks.
    resblock_updown: bool = False
    use_spatial_transformer: bool = True
    transformer_depth: int = 1
    context_dim: Optional[int] = 1280
    use_linear_in_transformer: bool = False
    num_classes: Optional[int] = None
    # SDXL's size and crop conditioning (bucketed training); adds ``micro_embed.*`` weights.
    micro_conditioning: bool = False

    def validate(self) -> None:
        if self.use_spatial_transformer and self.context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the conditioner's output_dim)")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels (both are -1)")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % 32 != 0:
                raise ValueError(
                    f"model_channels*mult = {self.model_channels * mult} must be a multiple of 32 "
                    "(GroupNorm with 32 groups)")


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (or 2x2 average pooling)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block with timestep embedding; ``use_scale_shift_norm`` gives the AdaGN variant
    h = GN(h) * (1 + scale) + shift of ADM. The last convolution is zero-initialised.
    ``up`` / ``down`` resample both branches (nearest / average pooling) before the first conv."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A UNet block: passes the timestep embedding to ResBlocks and the context to transformers.

    ``checkpointing`` (set by :meth:`UNetModel.set_activation_checkpointing`) recomputes the block's
    activations in backward (``torch.utils.checkpoint``, non-reentrant so it composes with
    autocast, ``torch.compile`` and parameters that do not require grad).
    """

    checkpointing: bool = False

    def _run(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._run, x, emb, context, use_reentrant=False)
        return self._run(x, emb, context)


class UNetModel(nn.Module):
    """The LDM denoiser: ``forward(x, timesteps, context=None, y=None) -> prediction`` (same shape
    as ``x`` but with ``out_channels`` channels)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mc = cfg.model_channels
        time_embed_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, time_embed_dim)
        if cfg.micro_conditioning:
            self.micro_embed = MicroConditioning(time_embed_dim)

        def attention(ch: int) -> nn.Module:
            if cfg.num_head_channels == -1:
                heads, dim_head = cfg.num_heads, ch // cfg.num_heads
            else:
                heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
            if cfg.use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                                          cfg.dropout, cfg.use_linear_in_transformer)
            return AttentionBlock(ch, heads)

        def resblock(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, cfg.dropout, ch_out, cfg.use_scale_shift_norm, up, down)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: List[nn.Module] = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = resblock(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, cfg.conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(mc, cfg.out_channels, 3, padding=1)))

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The initialisation applied after the layers were built: the zero-initialised output conv,
        ResBlock last convs and transformer ``proj_out`` (the rest is each layer's own default).
        Construction already did it; ``train/engine.py::initialize_partitioned`` calls it again on
        gathered ZeRO-3 shards, where construction could not."""
        reapply_zero_init(self)

    def blocks(self) -> List[TimestepEmbedSequential]:
        """Every block that can be activation-checkpointed, in execution order."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each UNet block's activations in backward instead of storing them."""
        for block in self.blocks():
            block.checkpointing = enabled

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, micro: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (micro is not None) != self.cfg.micro_conditioning:
            raise ValueError("pass micro [B, 6] exactly when the UNet has micro_conditioning set "
                             f"(micro_conditioning={self.cfg.micro_conditioning}, micro given: {micro is not None})")
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"UNet expects {self.cfg.in_channels} input channels, got {x.shape[1]} "
                             "(concat conditioning is concatenated by LatentDiffusion.apply_model)")
        if (y is not None) != (self.cfg.num_classes is not None):
            raise ValueError("pass y (class labels) exactly when the UNet has num_classes set "
                             f"(num_classes={self.cfg.num_classes}, y given: {y is not None})")
        if self.cfg.use_spatial_transformer and context is None:
            raise ValueError("this UNet has cross-attention layers: pass context [B, L, context_dim]")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        # Inputs follow the parameter dtype, so bf16/fp16 weights (DeepSpeed without autocast) accept
        # fp32 latents from the diffusion maths; under autocast the weights are fp32 and nothing changes.
        dtype = self.input_blocks[0][0].weight.dtype
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).to(dtype)
        emb = self.time_embed(t_emb)
        if y is not None:
            emb = emb + self.label_emb(y)
        if micro is not None:
            emb = emb + self.micro_embed(micro)
        if context is not None:
            context = context.to(dtype)
        skips = []
        h = x.to(dtype)
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
