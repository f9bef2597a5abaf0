"""Diffusion transformers over latent patches: DiT, PixArt-α-style cross-attention, MMDiT.

One module, three ways to condition the same patch transformer (``DiTConfig.text``):

- **DiT** (Peebles & Xie 2023, Sec. 3.2): the latent is cut into p x p patches (a stride-p
  convolution), fixed 2-D sin-cos positions are added, and N blocks of self-attention + MLP are
  modulated by **adaLN-Zero** from c = t_emb (+ class embedding): each block regresses
  (shift, scale, gate) for both of its residual branches from c, with the regressing linear layer
  zero-initialised so that every block starts as the identity. A final adaLN layer and a linear
  layer map tokens back to p x p x C patches (unpatchify). Module and parameter names are those of
  facebookresearch/DiT ``models.py`` (``x_embedder.proj``, ``t_embedder.mlp``,
  ``y_embedder.embedding_table``, ``blocks.N.{norm1,attn.qkv,attn.proj,mlp.fc1,mlp.fc2,
  adaLN_modulation.1}``, ``final_layer``), so the public release checkpoints load by name
  (:func:`load_dit_release`; ``learn_sigma=True`` keeps their 2C output channels and this module
  returns the first C, the mean prediction).
- **cross** (PixArt-α, Chen et al. 2023, Sec. 2.3): a cross-attention layer to the text tokens
  between self-attention and MLP in each block (unmodulated, output projection zero-initialised);
  the caption tokens pass through a 2-layer MLP first (``caption_projection``). With
  ``adaln="single"`` the per-block modulation MLPs are replaced by one shared ``t_block`` plus a
  learned [6, D] table per block (adaLN-single), which is what brings an XL/2 text model to ~0.6B.
- **joint** (MMDiT of SD3, Esser et al. 2024, Sec. 4): image and text tokens keep separate weights
  (norms, qkv, projections, MLPs, adaLN-Zero modulation) and attend jointly over the concatenated
  sequence [text; image]. The last block only reads the text stream (SD3's ``context_pre_only``),
  so it has no text-side projection or MLP. SD3 adds a pooled text vector to c; the conditioners
  here emit tokens, so c gets an MLP of the token mean instead.

Timesteps enter through the same sinusoidal embedding as the UNet (``[cos | sin]``,
max period 10^4, 256 frequencies: DiT's ``TimestepEmbedder``). The diffusion objectives pass
integer timesteps 0..T-1; rectified flow passes 1000 t for t in [0, 1] (SD3's convention), so one
network serves both.

Non-square latents (aspect buckets, sampling at another size) work with the sin-cos positions,
which are computed for the actual patch grid (cached per grid); learned positions exist only for the
training grid. Written here rather than taken from timm/diffusers because the layout must equal the
DiT release keys, ZeRO-3 must see plain submodules, and activation checkpointing and per-block
``torch.compile`` are applied to these blocks from outside (``train/compile.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_scale.choices import Choice

from .attention import multihead_attention
from .micro_conditioning import MicroConditioning
from .embeddings import timestep_embedding

FREQUENCY_DIM = 256  # sinusoidal frequencies of the timestep embedding (DiT's frequency_embedding_size)
LN_EPS = 1e-6  # DiT / PixArt / SD3 LayerNorm epsilon


class TextMode(Choice):
    """``dit.text``: how text tokens (``context``) reach the transformer."""

    none = "none"
    cross = "cross"  # PixArt-α cross-attention
    joint = "joint"  # SD3 MMDiT joint attention


class AdaLN(Choice):
    """``dit.adaln``: zero = a modulation MLP per block (DiT); single = one shared MLP + a learned
    table per block (PixArt-α adaLN-single)."""

    zero = "zero"
    single = "single"


class PosEmbed(Choice):
    """``dit.pos_embed``: fixed 2-D sin-cos (DiT, any grid) | learned (training grid only)."""

    sincos = "sincos"
    learned = "learned"


@dataclass
class DiTConfig:
    """Hyper-parameters of :class:`DiT` (names follow facebookresearch/DiT where it has them)."""

    input_size: int = 32  # latent side at the training size (the learned position table's grid)
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    # Rows of the label table (n_classes + 1: the last is the null class), as the UNet's num_classes.
    num_classes: Optional[int] = None
    text: TextMode = "none"
    context_dim: Optional[int] = None  # width of the text tokens for text=cross|joint
    adaln: AdaLN = "zero"
    pos_embed: PosEmbed = "sincos"
    # DiT release checkpoints predict a variance too (2C outputs); only the first C are returned.
    learn_sigma: bool = False
    # SDXL's size and crop conditioning (bucketed training), added to the adaLN vector as PixArt-α
    # adds its size / aspect embeddings; adds ``micro_embed.*`` weights.
    micro_conditioning: bool = False

    def validate(self) -> None:
        TextMode(self.text), AdaLN(self.adaln), PosEmbed(self.pos_embed)  # noqa: B018 - raise on a bad name
        if self.patch_size < 1 or self.input_size % self.patch_size:
            raise ValueError(f"dit.input_size={self.input_size} is not divisible by dit.patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"dit.hidden_size={self.hidden_size} is not divisible by dit.num_heads={self.num_heads}")
        if self.hidden_size % 4 and self.pos_embed == "sincos":
            raise ValueError(f"dit.hidden_size={self.hidden_size} must be a multiple of 4 for 2-D sin-cos positions")
        if (self.text != "none") != (self.context_dim is not None):
            raise ValueError(f"dit.text={self.text!r} with dit.context_dim={self.context_dim}: text=cross|joint "
                             "needs context_dim (the text encoder's width), text=none must leave it unset")
        if self.adaln == "single" and self.text == "joint":
            raise ValueError("dit.adaln=single is PixArt-α's scheme for text=none|cross; MMDiT (text=joint) "
                             "modulates each stream with its own adaLN-Zero")

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


# --------------------------------------------------------------------------------------------
# Positions and patches

def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin | cos] of positions at frequencies 10^-4k/(dim/2) (float64): DiT's 1-D rule."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[grid_h * grid_w, dim] fixed positions of a row-major patch grid (float32).

    The first dim/2 channels encode the column, the last dim/2 the row: DiT's
    ``get_2d_sincos_pos_embed`` (its ``np.meshgrid(grid_w, grid_h)`` puts the column first), so a
    square grid gives its table exactly; other grids extend it.
    """
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64)[None, :].expand(grid_h, grid_w)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def unpatchify(tokens: torch.Tensor, grid_h: int, grid_w: int, patch: int, channels: int) -> torch.Tensor:
    """[B, h*w, p*p*C] (each token's patch in (p, q, c) order, DiT's) -> [B, C, h*p, w*p]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, grid_h, grid_w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid_h * patch, grid_w * patch)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, per sample ([B, D] broadcast over tokens)."""
    return x * (1 + scale[:, None]) + shift[:, None]


# --------------------------------------------------------------------------------------------
# Layers

class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features (256) -> Linear -> SiLU -> Linear (DiT's keys ``mlp.0`` / ``mlp.2``)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, FREQUENCY_DIM).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors (DiT's ``embedding_table``; the last row is the null class)."""

    def __init__(self, rows: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(rows, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, as DiT / PixArt / SD3) -> fc2 (timm's ``Mlp`` keys)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: Optional[int] = None):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.fc2 = nn.Linear(hidden, dim_out or dim_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Fused qkv projection, SDPA, output projection (timm's ``Attention`` keys ``qkv`` / ``proj``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(multihead_attention(q, k, v, self.heads))


class CrossAttention(nn.Module):
    """Image tokens attend to text tokens (PixArt-α's ``q_linear`` / ``kv_linear`` / ``proj``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.kv_linear(context).chunk(2, dim=-1)
        return self.proj(multihead_attention(self.q_linear(x), k, v, self.heads))


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=LN_EPS)


class _Checkpointed(nn.Module):
    """A block whose activations may be recomputed in backward (``checkpointing``, set by
    :meth:`DiT.set_activation_checkpointing`; non-reentrant, as the UNet's blocks)."""

    checkpointing: bool = False

    def forward(self, *args):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._run, *args, use_reentrant=False)
        return self._run(*args)


class DiTBlock(_Checkpointed):
    """Self-attention (+ cross-attention to text) + MLP, modulated by adaLN-Zero or adaLN-single.

    ``c`` is [B, D] for adaLN-Zero (this block regresses its 6 vectors from it) and [B, 6, D] for
    adaLN-single (the shared ``t_block`` output, to which this block adds its learned table).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = _layer_norm(d)
        self.attn = SelfAttention(d, cfg.num_heads)
        if cfg.text == "cross":
            self.cross_attn = CrossAttention(d, cfg.num_heads)
        self.norm2 = _layer_norm(d)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        if cfg.adaln == "single":
            self.scale_shift_table = nn.Parameter(torch.randn(6, d) / math.sqrt(d))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def _modulation(self, c: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if hasattr(self, "scale_shift_table"):
            return tuple((self.scale_shift_table[None] + c).unbind(dim=1))
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def _run(self, x: torch.Tensor, c: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulation(c)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if hasattr(self, "cross_attn"):
            x = x + self.cross_attn(x, context)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(_Checkpointed):
    """MMDiT block: separate weights per modality, one attention over [text; image] tokens.

    ``pre_only`` (the last block): the text stream is only normalised, modulated (shift, scale) and
    projected to k, v for the image stream's attention; its own update would never be read.
    """

    def __init__(self, cfg: DiTConfig, pre_only: bool):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.pre_only = cfg.num_heads, pre_only
        self.norm1 = _layer_norm(d)
        self.attn = SelfAttention(d, cfg.num_heads)
        self.norm2 = _layer_norm(d)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.context_norm1 = _layer_norm(d)
        self.context_qkv = nn.Linear(d, 3 * d)
        self.context_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, (2 if pre_only else 6) * d))
        if not pre_only:
            self.context_proj = nn.Linear(d, d)
            self.context_norm2 = _layer_norm(d)
            self.context_mlp = Mlp(d, cfg.mlp_hidden)

    def _run(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        ctx_mod = self.context_adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=1)
        q_x, k_x, v_x = self.attn.qkv(modulate(self.norm1(x), shift_msa, scale_msa)).chunk(3, dim=-1)
        q_c, k_c, v_c = self.context_qkv(modulate(self.context_norm1(context), ctx_mod[0], ctx_mod[1])).chunk(3, dim=-1)
        n_text = context.shape[1]
        joint = multihead_attention(torch.cat([q_c, q_x], 1), torch.cat([k_c, k_x], 1), torch.cat([v_c, v_x], 1),
                                    self.heads)
        attn_c, attn_x = joint[:, :n_text], joint[:, n_text:]
        x = x + gate_msa[:, None] * self.attn.proj(attn_x)
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.pre_only:
            return x, context
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = ctx_mod
        context = context + c_gate_msa[:, None] * self.context_proj(attn_c)
        context = context + c_gate_mlp[:, None] * self.context_mlp(
            modulate(self.context_norm2(context), c_shift_mlp, c_scale_mlp))
        return x, context


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear to p*p*C per token (DiT's ``final_layer``; PixArt's T2IFinalLayer
    with a learned [2, D] table added to the timestep embedding for adaLN-single)."""

    def __init__(self, cfg: DiTConfig, out_channels: int):
        super().__init__()
        d = cfg.hidden_size
        self.norm_final = _layer_norm(d)
        self.linear = nn.Linear(d, cfg.patch_size ** 2 * out_channels)
        if cfg.adaln == "single":
            self.scale_shift_table = nn.Parameter(torch.randn(2, d) / math.sqrt(d))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "scale_shift_table"):
            shift, scale = (self.scale_shift_table[None] + c[:, None]).unbind(dim=1)
        else:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------
# The network

class DiT(nn.Module):
    """Latent patch transformer: ``forward(x, timesteps, context=None, y=None) -> prediction``, the
    UNet's signature (so objectives, samplers, guidance and ``apply_denoiser`` take either)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.out_channels = cfg.out_channels * (2 if cfg.learn_sigma else 1)
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        grid = cfg.input_size // p
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, d))
        else:
            # Fixed, so not state: a non-persistent buffer (the EMA and checkpoints hold parameters
            # only). The DiT release stores it as a frozen parameter; load_dit_release checks it.
            self.register_buffer("pos_embed", torch.zeros(1, grid * grid, d), persistent=False)
        self._positions: Dict[Tuple[int, int, str], torch.Tensor] = {}
        self.t_embedder = TimestepEmbedder(d)
        if cfg.num_classes is not None:
            self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        if cfg.micro_conditioning:
            self.micro_embed = MicroConditioning(d)
        if cfg.adaln == "single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if cfg.text == "cross":
            self.caption_projection = Mlp(cfg.context_dim, d, d)
        elif cfg.text == "joint":
            self.context_embedder = nn.Linear(cfg.context_dim, d)
            self.pooled_embedder = Mlp(cfg.context_dim, d, d)
        if cfg.text == "joint":
            self.blocks = nn.ModuleList(JointBlock(cfg, pre_only=i == cfg.depth - 1) for i in range(cfg.depth))
        else:
            self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg, self.out_channels)
        # On ``meta`` there is nothing to fill; under ZeRO-3's ``zero.Init`` every parameter is already
        # a partition here (an empty local tensor): the task gathers them and calls
        # initialize_weights() then (train/engine.py ``initialize_partitioned``).
        if self.pos_embed.device.type != "meta" and not any(hasattr(p_, "ds_id") for p_ in self.parameters()):
            self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation (models.py ``initialize_weights``): Xavier-uniform linears with zero
        bias, the patch projection Xavier-uniform as a linear, N(0, 0.02) label table and timestep MLP
        (and PixArt-α's shared ``t_block``),
        and **zero** for every adaLN modulation output, the final linear and PixArt's cross-attention
        output projection: a fresh model is the identity on its residual stream and predicts 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        grid = self.cfg.input_size // self.cfg.patch_size
        if self.cfg.pos_embed == "sincos":
            self.pos_embed.copy_(sincos_2d(self.cfg.hidden_size, grid, grid)[None])
        else:
            nn.init.normal_(self.pos_embed, std=0.02)
        if hasattr(self, "y_embedder"):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if hasattr(self, "t_block"):
            nn.init.normal_(self.t_block[1].weight, std=0.02)  # PixArt-α's rule for the shared modulation
        zeros: List[nn.Linear] = [self.final_layer.linear]
        if hasattr(self, "micro_embed"):
            zeros.append(self.micro_embed.linear_2)  # a new embedding changes nothing at first
        for block in self.blocks:
            for name in ("adaLN_modulation", "context_adaLN_modulation"):
                if hasattr(block, name):
                    zeros.append(getattr(block, name)[-1])
            if hasattr(block, "cross_attn"):
                zeros.append(block.cross_attn.proj)
        if hasattr(self.final_layer, "adaLN_modulation"):
            zeros.append(self.final_layer.adaLN_modulation[-1])
        for linear in zeros:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    # ------------------------------------------------------------------ structure
    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each transformer block's activations in backward instead of storing them."""
        for block in self.blocks:
            block.checkpointing = enabled

    def positions(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
        """[1, h*w, D] positions for a grid: the stored table at the training grid, the sin-cos rule
        extended to any other grid (computed once per grid and device)."""
        train = self.cfg.input_size // self.cfg.patch_size
        if grid_h == grid_w == train:
            return self.pos_embed.to(like.dtype)
        if self.cfg.pos_embed == "learned":
            raise ValueError(f"this DiT has learned positions for a {train}x{train} patch grid; a "
                             f"{grid_h}x{grid_w} grid needs dit.pos_embed=sincos (or the training size)")
        key = (grid_h, grid_w, str(like.device))
        if key not in self._positions:  # a plain dict: not a buffer, not in the state dict
            self._positions[key] = sincos_2d(self.cfg.hidden_size, grid_h, grid_w)[None].to(like.device)
        return self._positions[key].to(like.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, micro: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg, p = self.cfg, self.cfg.patch_size
        if (micro is not None) != cfg.micro_conditioning:
            raise ValueError("pass micro [B, 6] exactly when the DiT has micro_conditioning set "
                             f"(micro_conditioning={cfg.micro_conditioning}, micro given: {micro is not None})")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"DiT expects {cfg.in_channels} input channels, got {x.shape[1]}")
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        if (y is not None) != (cfg.num_classes is not None):
            raise ValueError("pass y (class labels) exactly when the DiT has num_classes set "
                             f"(num_classes={cfg.num_classes}, y given: {y is not None})")
        if (context is not None) != (cfg.text != "none"):
            raise ValueError(f"dit.text={cfg.text!r}: pass context [B, L, {cfg.context_dim}] exactly when text "
                             f"conditioning is on (context given: {context is not None})")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        # Inputs follow the parameter dtype (bf16 weights without autocast accept fp32 latents).
        dtype = self.x_embedder.proj.weight.dtype
        grid_h, grid_w = x.shape[-2] // p, x.shape[-1] // p
        h = self.x_embedder.proj(x.to(dtype)).flatten(2).transpose(1, 2)
        h = h + self.positions(grid_h, grid_w, h)
        t_emb = self.t_embedder(timesteps)
        c = t_emb
        if y is not None:
            c = c + self.y_embedder(y)
        if micro is not None:
            c = c + self.micro_embed(micro)
        if context is not None:
            context = context.to(dtype)
            if cfg.text == "joint":
                c = c + self.pooled_embedder(context.mean(dim=1))
                context = self.context_embedder(context)
            else:
                context = self.caption_projection(context)
        if cfg.adaln == "single":
            block_c, final_c = self.t_block(c).unflatten(1, (6, cfg.hidden_size)), c
        else:
            block_c = final_c = c
        for block in self.blocks:
            if cfg.text == "joint":
                h, context = block(h, block_c, context)
            else:
                h = block(h, block_c, context)
        out = unpatchify(self.final_layer(h, final_c), grid_h, grid_w, p, self.out_channels)
        return out[:, :cfg.out_channels] if cfg.learn_sigma else out


# --------------------------------------------------------------------------------------------
# The paper's flavours (DiT Table 1) and the public release layout

DIT_SIZES: Dict[str, Tuple[int, int, int]] = {  # name -> (depth, hidden, heads)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def dit_config(size: str, patch: int, **overrides) -> DiTConfig:
    """The DiT paper's ``DiT-<size>/<patch>`` (Table 1) with any other field overridden."""
    if size not in DIT_SIZES:
        raise KeyError(f"unknown DiT size {size!r}; available: {sorted(DIT_SIZES)}")
    depth, hidden, heads = DIT_SIZES[size]
    return DiTConfig(patch_size=patch, depth=depth, hidden_size=hidden, num_heads=heads, **overrides)


def load_dit_release(model: DiT, state: Dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load a facebookresearch/DiT state dict (``DiT-XL-2-256x256.pt`` and its siblings, or a
    training checkpoint's ``"ema"`` / ``"model"`` entry) into ``model`` by name.

    Any missing or unexpected key, or a shape that differs, is an error that lists them all and names
    the config fields that decide them (a release model needs ``learn_sigma=True`` and
    ``num_classes=1001`` for ImageNet).
    """
    if "model" in state and isinstance(state["model"], dict):
        state = state.get("ema", state["model"])
    state = dict(state)
    if model.cfg.pos_embed == "sincos" and "pos_embed" in state:
        # DiT saves its fixed sin-cos table; this module computes it. They must agree.
        table = state.pop("pos_embed")
        if tuple(table.shape) != tuple(model.pos_embed.shape) or not torch.allclose(
                table.float().cpu(), model.pos_embed.float().cpu(), atol=1e-5):
            raise ValueError(f"{source}: its pos_embed {tuple(table.shape)} is not DiT's 2-D sin-cos table for a "
                             f"{model.cfg.input_size // model.cfg.patch_size}-patch grid of width "
                             f"{model.cfg.hidden_size}: a learned table needs dit.pos_embed=learned")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        def show(keys: List[str]) -> str:
            return ", ".join(keys[:12]) + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "") if keys else "none"
        raise ValueError(
            f"{source} does not match this DiT ({model.cfg.depth} blocks, width {model.cfg.hidden_size}, patch "
            f"{model.cfg.patch_size}, learn_sigma={model.cfg.learn_sigma}, num_classes={model.cfg.num_classes}): "
            f"missing keys: {show(missing)}; unexpected keys: {show(unexpected)}; shape mismatches: {show(shapes)}. "
            "DiT's release checkpoints need dit.learn_sigma=true and dit.num_classes=1001 with the flavour's size")
    model.load_state_dict(state, strict=True)


__all__ = ["DiT", "DiTConfig", "DiTBlock", "JointBlock", "DIT_SIZES", "dit_config", "load_dit_release",
           "sincos_2d", "unpatchify", "TextMode", "AdaLN", "PosEmbed"]
