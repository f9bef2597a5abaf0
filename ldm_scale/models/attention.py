"""Attention layers of the LDM UNet (Rombach et al. 2022, Sec. 3.3 and Appendix D.1).

All multi-head attention goes through :func:`multihead_attention`, which calls
``torch.nn.functional.scaled_dot_product_attention`` so that the fused (flash / memory-efficient)
kernels are used on GPUs; on CPU it falls back to the math kernel. Module and parameter names follow
CompVis ``ldm/modules/attention.py`` and ``openaimodel.py`` so that checkpoints map by prefix only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V with ``heads`` heads (Vaswani et al. 2017, Eq. 1).

    ``q``: [B, N, H*d], ``k``/``v``: [B, M, H*d] -> [B, N, H*d].
    """
    b, n, inner = q.shape
    if inner % heads != 0:
        raise ValueError(f"attention width {inner} is not divisible by heads={heads}")
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference softmax attention written out explicitly; used by tests to check the SDPA path."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, n, inner)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (CompVis ``GroupNorm32``): mixed-precision safe statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The affine parameters are upcast too: DeepSpeed bf16/fp16 converts every parameter, and
        # CPU group_norm refuses a float32 input with low-precision weights.
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters: residual branches start as the identity (as in CompVis / ADM).

    The module is tagged (``_zero_init``) so that :func:`reapply_zero_init` can zero it again where
    the construction-time zeroing could not act: under ZeRO-3's ``zero.Init`` a parameter is already
    an empty local shard when its module's ``__init__`` returns, so ``zeros_`` here changes nothing.
    """
    for p in module.parameters():
        nn.init.zeros_(p)
    module._zero_init = True
    return module


def reapply_zero_init(root: nn.Module) -> None:
    """Zero every :func:`zero_module`-tagged submodule of ``root`` (on whole, gathered parameters)."""
    for m in root.modules():
        if getattr(m, "_zero_init", False):
            for p in m.parameters():
                nn.init.zeros_(p)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): ``proj`` yields value and gate halves."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP ``net = [GEGLU | Linear+GELU, Dropout, Linear]`` (CompVis key layout)."""

    def __init__(self, dim: int, mult: int = 4, glu: bool = True, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` to ``context`` (self-attention when ``context`` is None).

    Implements Eq. 4 of the LDM paper: Q = W_Q phi(z_t), K = W_K tau(y), V = W_V tau(y).
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.context_dim = context_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context has width {context.shape[-1]} but this attention layer expects "
                f"{self.context_dim}; check the conditioner's output_dim against unet.context_dim")
        out = multihead_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: Optional[int],
                 dropout: float = 0.0, gated_ff: bool = True):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, glu=gated_ff, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on ``context`` [B, L, D].

    CompVis ``SpatialTransformer``: GroupNorm -> proj_in (1x1 conv, or Linear for the SD 2 variant
    ``use_linear``) -> ``depth`` transformer blocks -> zero-initialised proj_out -> residual.
    """

    def __init__(self, in_channels: int, heads: int, dim_head: int, depth: int = 1,
                 context_dim: Optional[int] = None, dropout: float = 0.0, use_linear: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth))
        proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)
        self.proj_out = zero_module(proj_out)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if self.use_linear:
            x = self.proj_in(x.flatten(2).transpose(1, 2))
        else:
            x = self.proj_in(x).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x).transpose(1, 2).reshape(b, c, h, w)
        else:
            x = self.proj_out(x.transpose(1, 2).reshape(b, -1, h, w))
        return x + x_in


class AttentionBlock(nn.Module):
    """Unconditional spatial self-attention of the ADM UNet (``openaimodel.AttentionBlock``).

    Used where the UNet has no context (``use_spatial_transformer=False``). The fused ``qkv`` 1x1
    convolution keeps the legacy CompVis ordering: channels are grouped per head as [q | k | v].
    """

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads != 0:
            raise ValueError(f"channels={channels} not divisible by heads={heads}")
        self.heads = heads
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x_flat))  # [B, 3C, T]
        d = c // self.heads
        # Legacy order: [B, H, 3*d, T]. One copy to [B, H, T, 3*d], then q, k, v are [B, H, T, d] views
        # with a contiguous last dimension, as the flash / memory-efficient SDPA kernels require
        # (transposed views, last-dimension stride T, send them to the slow math path).
        q, k, v = qkv.reshape(b, self.heads, 3 * d, -1).transpose(-1, -2).contiguous().split(d, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, -1)
        return (x_flat + self.proj_out(out)).reshape(b, c, *spatial)
