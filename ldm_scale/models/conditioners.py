"""Condition encoders tau_theta(y) of the LDM paper (Sec. 3.3).

Every conditioner has the same interface (docs/architecture.md):

- ``forward(raw) -> dict`` of UNet keyword arguments: ``{"context": [B, L, D]}`` for cross-attention,
  ``{"y": LongTensor[B]}`` for label embeddings, ``{"concat": [B, C, h, w]}`` for channel
  concatenation (concatenated to the noisy latent by ``LatentDiffusion.apply_model``), ``{}``
  for unconditional models;
- ``null_raw(n)``: the raw "empty" condition for classifier-free guidance (n empty prompts, n null
  class labels, ``None``);
- ``output_dim``: width of ``context`` (UNet ``context_dim``), 0 when there is no context;
- ``trainable``: whether the conditioner is optimised jointly with the UNet (the paper trains its
  text transformer and class embedding jointly; pretrained CLIP text towers stay frozen).

Raw conditions: ``list[str]`` for text, ``LongTensor[B]`` for classes, ``None`` for unconditional,
a tensor for concat. Text conditioners also take the tokens themselves (``LongTensor[B, L]``): their
``caption_tokenizer`` is a picklable ``list[str] -> LongTensor[B, L]`` that the data workers run
(``data/loader.py``), and ``null_raw(n, tokens=True)`` gives the empty prompt's tokens.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import CrossAttention, FeedForward
from .tokenizers import TokenizerConfig, build_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TextEmbedderConfig:
    """The paper's text transformer (CompVis ``BERTEmbedder`` / ``TransformerEmbedder``)."""

    vocab_size: int = 49408
    width: int = 1280  # n_embed
    depth: int = 32  # n_layer
    heads: int = 8  # x-transformers defaults: 8 heads of 64 channels (inner width 512)
    dim_head: int = 64
    ff_mult: int = 4
    max_length: int = 77
    embedding_dropout: float = 0.0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class OpenCLIPConfig:
    """Frozen OpenCLIP text tower (Stable Diffusion 2: ViT-H-14, penultimate layer)."""

    arch: str = "ViT-H-14"
    # Local checkpoint file of the full CLIP model; None = RANDOM weights (a warning is logged).
    pretrained: Optional[str] = None
    layer: str = "penultimate"  # "penultimate" | "last"
    max_length: int = 77
    # Optional open_clip model-config JSON (registered under its file stem) for custom archs.
    model_config_path: Optional[str] = None


@dataclass
class ClassEmbedderConfig:
    n_classes: int = 1000
    embed_dim: int = 512


@dataclass
class ConditionerConfig:
    """Which conditioner to build: kind in {"text", "openclip", "class", "label", "none", "concat"}.

    ``label`` passes class indices as ``y`` to a UNet with ``num_classes = n_classes + 1``;
    ``concat_channels`` is the channel count of a ``concat`` condition.
    """

    kind: str = "text"
    text: TextEmbedderConfig = field(default_factory=TextEmbedderConfig)
    openclip: OpenCLIPConfig = field(default_factory=OpenCLIPConfig)
    classes: ClassEmbedderConfig = field(default_factory=ClassEmbedderConfig)
    concat_channels: int = 0


class TransformerBlock(nn.Module):
    """Pre-LN transformer encoder block (x-transformers ``Encoder`` layer pair 'a', 'f')."""

    def __init__(self, width: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CrossAttention(width, None, heads, dim_head)
        self.norm2 = nn.LayerNorm(width)
        self.ff = FeedForward(width, mult=ff_mult, glu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class TransformerEmbedder(nn.Module):
    """tau_theta for text (paper Sec. 3.3 / Appendix E.2): token + learned absolute position
    embedding, ``depth`` pre-LN transformer blocks, final LayerNorm -> context [B, 77, width].

    As in CompVis, padding tokens are not masked (the model learns to ignore them) and the empty
    prompt "" is the null condition for classifier-free guidance.
    """

    trainable = True
    checkpointing = False

    def __init__(self, cfg: TextEmbedderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = nn.Embedding(cfg.max_length, cfg.width)
        self.emb_dropout = nn.Dropout(cfg.embedding_dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg.width, cfg.heads, cfg.dim_head, cfg.ff_mult)
                                    for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.width)
        self.initialize_weights()
        self._tokenizer = None  # built on first use: needs files, and big flavours build on meta

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """N(0, 0.02) token and position embeddings (x-transformers' rule). Called at construction
        and, on gathered shards, by ``train/engine.py::initialize_partitioned`` under ZeRO-3 (where
        the construction-time call finds empty local tensors and changes nothing)."""
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    @property
    def output_dim(self) -> int:
        return self.cfg.width

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tok_cfg = self.cfg.tokenizer
            if tok_cfg.max_length != self.cfg.max_length:
                raise ValueError(f"tokenizer.max_length={tok_cfg.max_length} != text max_length={self.cfg.max_length}")
            self._tokenizer = build_tokenizer(tok_cfg)
            if self._tokenizer.vocab_size > self.cfg.vocab_size:
                raise ValueError(f"tokenizer vocab ({self._tokenizer.vocab_size}) is larger than the embedding "
                                 f"table (vocab_size={self.cfg.vocab_size})")
        return self._tokenizer

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each transformer block in backward (non-reentrant ``torch.utils.checkpoint``)."""
        self.checkpointing = enabled

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.cfg.max_length:
            raise ValueError(f"{tokens.shape[1]} tokens exceed max_length={self.cfg.max_length}")
        x = self.token_emb(tokens) + self.pos_emb(torch.arange(tokens.shape[1], device=tokens.device))[None]
        x = self.emb_dropout(x)
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.final_norm(x)

    @property
    def caption_tokenizer(self):
        """Captions -> LongTensor[B, max_length]; a plain object (pickled to data workers)."""
        return self.tokenizer

    def forward(self, raw: Union[List[str], torch.Tensor]) -> Dict[str, torch.Tensor]:
        tokens = raw if isinstance(raw, torch.Tensor) else self.tokenizer(list(raw))
        return {"context": self.encode_tokens(tokens.to(self.token_emb.weight.device))}

    def null_raw(self, n: int, tokens: bool = False) -> Union[List[str], torch.Tensor]:
        return _null_tokens(self, n) if tokens else [""] * n


class FrozenOpenCLIPEmbedder(nn.Module):
    """Frozen OpenCLIP text transformer (Stable Diffusion 2's text encoder): token states of the
    penultimate (or last) residual block after ``ln_final`` -> context [B, 77, width]."""

    trainable = False

    def __init__(self, cfg: OpenCLIPConfig):
        super().__init__()
        import open_clip  # lazy: models import with torch alone

        if cfg.layer not in ("penultimate", "last"):
            raise ValueError(f"openclip.layer must be 'penultimate' or 'last', got {cfg.layer!r}")
        if cfg.model_config_path is not None:
            open_clip.add_model_config(cfg.model_config_path)
        # Build where the caller builds (e.g. inside `with torch.device("meta")` for counting).
        device = torch.empty(0).device
        on_meta = device.type == "meta"
        if cfg.pretrained is not None and not os.path.isfile(cfg.pretrained):
            raise FileNotFoundError(f"OpenCLIP checkpoint not found: {cfg.pretrained!r} (openclip.pretrained must "
                                    "be a local file; download it before training)")
        if on_meta:
            log.info("FrozenOpenCLIPEmbedder(arch=%s) built on meta: no weights are loaded", cfg.arch)
        elif cfg.pretrained is None:
            log.warning("FrozenOpenCLIPEmbedder(arch=%s): no pretrained checkpoint given, the text encoder "
                        "has RANDOM weights. Set cond_stage.openclip.pretrained to a local checkpoint file "
                        "for real conditioning.", cfg.arch)
        model = open_clip.create_model(cfg.arch, pretrained=None if on_meta else cfg.pretrained, device=device)
        if not hasattr(model, "transformer") or not hasattr(model, "token_embedding"):
            raise ValueError(f"open_clip arch {cfg.arch!r} has no built-in CLIP text transformer "
                             "(custom/HF text towers are not supported)")
        del model.visual  # only the text tower is used
        self.cfg = cfg
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(cfg.arch)
        self.layer_idx = 1 if cfg.layer == "penultimate" else 0
        self.freeze()

    def freeze(self) -> None:
        self.model.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenOpenCLIPEmbedder":
        # Always stays in eval mode: it is never trained, whatever the parent module does.
        return super().train(False)

    @property
    def output_dim(self) -> int:
        return self.model.transformer.width

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens_and_pooled(tokens, pooled=False)[0]

    @property
    def pooled_dim(self) -> int:
        projection = self.model.text_projection
        if projection is None:
            return self.output_dim
        return projection.out_features if isinstance(projection, nn.Linear) else int(projection.shape[1])

    def encode_tokens_and_pooled(self, tokens: torch.Tensor,
                                 pooled: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(context [B, L, width] of the configured layer, pooled [B, P] or None).

        The pooled vector is open_clip's own ``encode_text`` (unnormalised): the last block's
        states after ``ln_final``, pooled at the end-of-text token by open_clip's pooling rule, then
        projected. With ``layer=penultimate`` the context is read one block earlier on the way.
        """
        model = self.model
        x = model.token_embedding(tokens) + model.positional_embedding
        transformer = model.transformer
        seq_first = not transformer.batch_first
        if seq_first:
            x = x.transpose(0, 1)
        n_context = len(transformer.resblocks) - self.layer_idx
        blocks = transformer.resblocks if pooled else transformer.resblocks[:n_context]
        context = x
        for i, block in enumerate(blocks):
            x = block(x, attn_mask=model.attn_mask)
            if i == n_context - 1:
                context = x
        if seq_first:
            context, x = context.transpose(0, 1), x.transpose(0, 1)
        context = model.ln_final(context)
        if not pooled:
            return context, None
        from open_clip.transformer import text_global_pool

        vector = text_global_pool(model.ln_final(x), tokens, model.text_pool_type,
                                  eos_token_id=getattr(model, "text_eos_id", None))
        projection = model.text_projection
        if projection is not None:
            vector = projection(vector) if isinstance(projection, nn.Linear) else vector @ projection
        return context, vector

    @property
    def caption_tokenizer(self):
        """Captions -> LongTensor[B, max_length] (open_clip's tokenizer object; picklable)."""
        return functools.partial(self.tokenizer, context_length=self.cfg.max_length)

    def forward(self, raw: Union[List[str], torch.Tensor]) -> Dict[str, torch.Tensor]:
        tokens = raw if isinstance(raw, torch.Tensor) else self.caption_tokenizer(list(raw))
        with torch.no_grad():
            return {"context": self.encode_tokens(tokens.to(self.model.token_embedding.weight.device))}

    def null_raw(self, n: int, tokens: bool = False) -> Union[List[str], torch.Tensor]:
        return _null_tokens(self, n) if tokens else [""] * n


class HostConditioner(nn.Module):
    """A frozen conditioner kept on the host while the rest of the model is on the accelerator.

    For runs that read precomputed text embeddings (``data.text_embeddings``): the training step
    never calls the encoder, so it stays out of GPU memory; only sample grids and in-training
    evaluation encode prompts, on the host, and their outputs are moved to ``device``. The encoder
    is held outside the module tree (``.to()``, ``state_dict()`` and ``parameters()`` skip it), so
    moving the LatentDiffusion container to the GPU leaves it where it is.
    """

    trainable = False

    def __init__(self, inner: nn.Module, device: torch.device):
        super().__init__()
        self.__dict__["inner"] = inner  # not a registered submodule: see the class doc
        self.__dict__["device"] = torch.device(device)

    @property
    def output_dim(self) -> int:
        return self.inner.output_dim

    @property
    def caption_tokenizer(self):
        return self.inner.caption_tokenizer

    def forward(self, raw: Any) -> Dict[str, torch.Tensor]:
        if isinstance(raw, torch.Tensor):
            raw = raw.cpu()
        return {k: v.to(self.device) for k, v in self.inner(raw).items()}

    def null_raw(self, n: int, tokens: bool = False):
        return self.inner.null_raw(n, tokens=tokens)


class ClassEmbedder(nn.Module):
    """Learned class embedding used as a one-token context [B, 1, D] (CompVis cin models).

    The table has ``n_classes + 1`` rows: index ``n_classes`` is the null class used for
    classifier-free guidance.
    """

    trainable = True

    def __init__(self, cfg: ClassEmbedderConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.n_classes + 1, cfg.embed_dim)

    @property
    def output_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def null_class(self) -> int:
        return self.cfg.n_classes

    def forward(self, raw: torch.Tensor) -> Dict[str, torch.Tensor]:
        labels = _check_labels(raw, self.cfg.n_classes).to(self.embedding.weight.device)
        return {"context": self.embedding(labels)[:, None, :]}

    def null_raw(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.null_class, dtype=torch.long)


class ClassLabelConditioner(nn.Module):
    """Class labels passed as ``y`` to a UNet with ``num_classes = n_classes + 1`` (label_emb
    added to the timestep embedding); label ``n_classes`` is the null class."""

    trainable = False  # no parameters of its own: the embedding lives in the UNet

    def __init__(self, cfg: ClassEmbedderConfig):
        super().__init__()
        self.cfg = cfg

    @property
    def output_dim(self) -> int:
        return 0

    def forward(self, raw: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"y": _check_labels(raw, self.cfg.n_classes)}

    def null_raw(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.cfg.n_classes, dtype=torch.long)


class NullConditioner(nn.Module):
    """Unconditional models: no UNet kwargs; the raw condition is ``None``."""

    trainable = False

    @property
    def output_dim(self) -> int:
        return 0

    def forward(self, raw: Any = None) -> Dict[str, torch.Tensor]:
        if raw is not None:
            raise ValueError("unconditional model: the raw condition must be None")
        return {}

    def null_raw(self, n: int) -> None:
        return None


class ConcatConditioner(nn.Module):
    """Spatial conditions concatenated to the noisy latent along channels (inpainting: masked-image
    latent + mask; super-resolution: low-resolution image). Returns ``{"concat": raw}``;
    ``LatentDiffusion.apply_model`` does ``unet(cat([z_t, concat], 1), ...)``, so the UNet's
    ``in_channels`` = latent channels + ``channels``."""

    trainable = False

    def __init__(self, channels: int):
        super().__init__()
        if channels <= 0:
            raise ValueError("ConcatConditioner needs concat_channels > 0")
        self.channels = channels

    @property
    def output_dim(self) -> int:
        return 0

    def forward(self, raw: torch.Tensor) -> Dict[str, torch.Tensor]:
        if raw.ndim != 4 or raw.shape[1] != self.channels:
            raise ValueError(f"concat condition must be [B, {self.channels}, h, w], got {tuple(raw.shape)}")
        return {"concat": raw}

    def null_raw(self, n: int) -> torch.Tensor:
        raise ValueError("a concat condition has no null value: classifier-free guidance keeps the same "
                         "concat input in both branches (drop only the text/class condition)")


def _null_tokens(conditioner: nn.Module, n: int) -> torch.Tensor:
    """The empty prompt's tokens [n, L] (CPU), tokenised once per conditioner."""
    cached = getattr(conditioner, "_null_token_row", None)  # a plain attribute: not a buffer, not saved
    if cached is None:
        cached = conditioner.caption_tokenizer([""]).to(torch.long)
        conditioner._null_token_row = cached
    return cached.expand(n, -1)


def _check_labels(raw: torch.Tensor, n_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(raw, dtype=torch.long)
    if labels.ndim != 1:
        raise ValueError(f"class labels must be a 1-D LongTensor [B], got shape {tuple(labels.shape)}")
    if not labels.numel():
        return labels
    in_range = (labels.min() >= 0) & (labels.max() <= n_classes)
    if labels.device.type == "cpu":
        if not bool(in_range):
            raise ValueError(f"class labels must lie in [0, {n_classes}] ({n_classes} = null class)")
    else:
        # On the device a Python check would wait for the GPU (a host sync per forward); the
        # asynchronous assert fails the step on the device instead.
        torch._assert_async(in_range, f"class labels must lie in [0, {n_classes}] ({n_classes} = null class)")
    return labels


def build_conditioner(cfg: ConditionerConfig) -> nn.Module:
    if cfg.kind == "text":
        return TransformerEmbedder(cfg.text)
    if cfg.kind == "openclip":
        return FrozenOpenCLIPEmbedder(cfg.openclip)
    if cfg.kind == "class":
        return ClassEmbedder(cfg.classes)
    if cfg.kind == "label":
        return ClassLabelConditioner(cfg.classes)
    if cfg.kind == "none":
        return NullConditioner()
    if cfg.kind == "concat":
        return ConcatConditioner(cfg.concat_channels)
    raise ValueError(f"unknown conditioner kind {cfg.kind!r}; expected one of "
                     "text, openclip, class, label, none, concat")
