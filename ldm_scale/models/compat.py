"""CompVis latent-diffusion checkpoint layout <-> ldm_scale layout.

Our module attribute names follow CompVis, so the mapping is by prefix:

=====================================  ===========================
CompVis (``LatentDiffusion`` ckpt)     ldm_scale (``LatentDiffusion``)
=====================================  ===========================
``model.diffusion_model.*``            ``unet.*``
``first_stage_model.*``                ``first_stage.*``
``cond_stage_model.*``                 ``cond_stage.*``
``scale_factor``                       ``scale_factor``
``model_ema.<diffusion_model name      EMA of ``unet.<name>``
without dots>``
=====================================  ===========================

The exception is the paper's text transformer, which CompVis built from a vendored copy of
lucidrains' x-transformers (``cond_stage_model.transformer.*``); its layers are renamed:

- ``transformer.token_emb`` -> ``token_emb``; ``transformer.pos_emb.emb`` -> ``pos_emb``;
  ``transformer.norm`` -> ``final_norm``;
- ``transformer.attn_layers.layers.{2i}.0`` (LayerNorm) -> ``blocks.{i}.norm1``,
  ``...layers.{2i}.1.to_{q,k,v}`` -> ``blocks.{i}.attn.to_{q,k,v}``,
  ``...layers.{2i}.1.to_out`` -> ``blocks.{i}.attn.to_out.0``;
- ``...layers.{2i+1}.0`` -> ``blocks.{i}.norm2``, ``...layers.{2i+1}.1.net.*`` -> ``blocks.{i}.ff.net.*``.

Keys that carry no model state for us are dropped on import: the diffusion schedule buffers
(``betas``, ``alphas_cumprod``, ...; ``ldm_scale.diffusion`` recomputes them), ``model_ema.decay`` /
``model_ema.num_updates``, ``first_stage_model.loss.*`` and the x-transformers language-model head
``cond_stage_model.transformer.to_logits.*`` (never used: CompVis calls the transformer with
``return_embeddings=True``; 39.1M parameters for the 1.45B model). CompVis' own loader uses
``strict=False``, so checkpoints exported by :func:`ldm_to_compvis_state_dict` load there as well.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

log = logging.getLogger(__name__)

PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("model.diffusion_model.", "unet."),
    ("first_stage_model.", "first_stage."),
    ("cond_stage_model.", "cond_stage."),
)
EMA_PREFIX = "model_ema."
# LatentDiffusion / DDPM buffers in CompVis checkpoints that ldm_scale keeps out of the model.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "cond_ids",
})
_XT = "cond_stage_model.transformer."
_XT_LAYER = re.compile(r"^cond_stage_model\.transformer\.attn_layers\.layers\.(\d+)\.(0|1)\.(.+)$")
_OUR_BLOCK = re.compile(r"^cond_stage\.blocks\.(\d+)\.(norm1|norm2|attn|ff)\.(.+)$")


class CompVisKeyMismatch(ValueError):
    """Raised by :func:`load_compvis_checkpoint` when keys or shapes do not match the model."""


def _is_dropped(key: str) -> bool:
    return (key in SCHEDULE_BUFFERS or key in ("model_ema.decay", "model_ema.num_updates")
            or key.startswith("first_stage_model.loss.") or key.startswith(_XT + "to_logits."))


def _xtransformer_to_ours(key: str) -> Optional[str]:
    """Rename one CompVis x-transformers key; None if it is not one."""
    simple = {"token_emb.": "token_emb.", "pos_emb.emb.": "pos_emb.", "norm.": "final_norm."}
    for theirs, ours in simple.items():
        if key.startswith(_XT + theirs):
            return "cond_stage." + ours + key[len(_XT + theirs):]
    m = _XT_LAYER.match(key)
    if m is None:
        return None
    layer, slot, rest = int(m.group(1)), m.group(2), m.group(3)
    block, is_ff = divmod(layer, 2)
    if slot == "0":
        return f"cond_stage.blocks.{block}.{'norm2' if is_ff else 'norm1'}.{rest}"
    if is_ff:
        return f"cond_stage.blocks.{block}.ff.{rest}"
    if rest.startswith("to_out."):
        rest = "to_out.0." + rest[len("to_out."):]
    return f"cond_stage.blocks.{block}.attn.{rest}"


def _ours_to_xtransformer(key: str) -> Optional[str]:
    simple = {"cond_stage.token_emb.": "token_emb.", "cond_stage.pos_emb.": "pos_emb.emb.",
              "cond_stage.final_norm.": "norm."}
    for ours, theirs in simple.items():
        if key.startswith(ours):
            return _XT + theirs + key[len(ours):]
    m = _OUR_BLOCK.match(key)
    if m is None:
        return None
    block, part, rest = int(m.group(1)), m.group(2), m.group(3)
    base = _XT + "attn_layers.layers."
    if part == "norm1":
        return f"{base}{2 * block}.0.{rest}"
    if part == "norm2":
        return f"{base}{2 * block + 1}.0.{rest}"
    if part == "ff":
        return f"{base}{2 * block + 1}.1.{rest}"
    if rest.startswith("to_out.0."):
        rest = "to_out." + rest[len("to_out.0."):]
    return f"{base}{2 * block}.1.{rest}"


def _uses_xtransformer(keys) -> bool:
    return any(k.startswith(_XT + "attn_layers.") or k.startswith(_XT + "token_emb.") for k in keys)


def _ema_key(unet_name: str) -> str:
    """CompVis LitEma buffer name for a UNet parameter (dots removed, ``diffusion_model`` prefix)."""
    return EMA_PREFIX + ("diffusion_model." + unet_name).replace(".", "")


def compvis_to_ldm_state_dict(sd: Mapping[str, torch.Tensor], use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """CompVis LatentDiffusion state dict -> ldm_scale ``LatentDiffusion`` state dict.

    With ``use_ema`` the UNet weights are taken from the ``model_ema.*`` buffers (LitEma). A
    checkpoint without any EMA keys (pruned / EMA-merged releases) is loaded as is, with a warning.
    Keys that are neither mapped nor known-droppable are passed through unchanged so that loading
    reports them as unexpected.
    """
    xt = _uses_xtransformer(sd.keys())
    out: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if _is_dropped(key) or key.startswith(EMA_PREFIX):
            continue
        new = _xtransformer_to_ours(key) if xt and key.startswith(_XT) else None
        if new is None:
            for theirs, ours in PREFIXES:
                if key.startswith(theirs):
                    new = ours + key[len(theirs):]
                    break
        out[new if new is not None else key] = value
    if use_ema:
        ema_keys = [k for k in sd if k.startswith(EMA_PREFIX) and k not in ("model_ema.decay", "model_ema.num_updates")]
        if not ema_keys:
            log.warning("use_ema=True but the checkpoint has no model_ema.* weights (pruned or EMA-merged "
                        "release?): loading model.diffusion_model.* as is")
        else:
            unet_names = [k[len("unet."):] for k in out if k.startswith("unet.")]
            missing = [n for n in unet_names if _ema_key(n) not in sd]
            if missing:
                raise CompVisKeyMismatch(f"checkpoint has EMA weights but {len(missing)} UNet parameters have no "
                                         f"model_ema entry (first: {missing[:5]}); load with use_ema=False")
            for name in unet_names:
                out["unet." + name] = sd[_ema_key(name)]
    return out


def _has_text_transformer(keys) -> bool:
    keys = list(keys)
    has_blocks = any(k.startswith("cond_stage.blocks.") for k in keys)
    return has_blocks and any(k.startswith("cond_stage.token_emb.") for k in keys)


def _to_compvis_key(key: str, text_transformer: bool) -> Optional[str]:
    """CompVis name of one of our keys (None if it has no CompVis counterpart)."""
    if key == "scale_factor":
        return key
    if text_transformer and key.startswith("cond_stage."):
        new = _ours_to_xtransformer(key)
        if new is not None:
            return new
    for theirs, ours in PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return None


def ldm_to_compvis_state_dict(sd: Mapping[str, torch.Tensor],
                              ema_sd: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """ldm_scale ``LatentDiffusion`` state dict (+ optional UNet EMA weights, keyed by UNet
    parameter name with or without the ``unet.`` prefix) -> CompVis layout."""
    xt = _has_text_transformer(sd.keys())
    out: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _to_compvis_key(key, xt)
        if new is None:
            raise ValueError(f"unexpected key {key!r} in an ldm_scale LatentDiffusion state dict")
        out[new] = value
    if ema_sd is not None:
        seen: Dict[str, str] = {}
        for name, value in ema_sd.items():
            name = name[len("unet."):] if name.startswith("unet.") else name
            ema_key = _ema_key(name)
            if ema_key in seen:
                raise ValueError(f"EMA names {seen[ema_key]!r} and {name!r} collide once dots are removed")
            seen[ema_key] = name
            out[ema_key] = value
    return out


def describe_compvis_checkpoint(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Infer the main hyper-parameters of a CompVis LatentDiffusion state dict from its shapes."""
    info: Dict[str, Any] = {}
    conv_in = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None:
        info["model_channels"], info["in_channels"] = int(conv_in.shape[0]), int(conv_in.shape[1])
    for key, value in sd.items():
        if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight"):
            info["context_dim"] = int(value.shape[1])
            break
    if "model.diffusion_model.label_emb.weight" in sd:
        info["num_classes"] = int(sd["model.diffusion_model.label_emb.weight"].shape[0])
    if _uses_xtransformer(sd.keys()):
        layers = {int(m.group(1)) for k in sd if (m := _XT_LAYER.match(k))}
        emb = sd.get(_XT + "token_emb.weight")
        info["cond_stage"] = "text (x-transformers)"
        info["text_depth"] = (max(layers) + 1) // 2 if layers else 0
        if emb is not None:
            info["text_vocab_size"], info["text_width"] = int(emb.shape[0]), int(emb.shape[1])
    elif "cond_stage_model.embedding.weight" in sd:
        info["cond_stage"] = "class"
        info["n_class_rows"] = int(sd["cond_stage_model.embedding.weight"].shape[0])
    elif any(k.startswith("cond_stage_model.model.") for k in sd):
        info["cond_stage"] = "openclip"
    else:
        info["cond_stage"] = "none"
    post_quant = sd.get("first_stage_model.post_quant_conv.weight")
    if post_quant is not None:
        info["latent_channels"] = int(post_quant.shape[1])
        info["first_stage"] = "vq" if "first_stage_model.quantize.embedding.weight" in sd else "kl"
    return info


def closest_flavour(info: Mapping[str, Any]) -> Optional[str]:
    """Name of the registry flavour whose configuration matches most inferred properties."""
    from .registry import FLAVOURS

    kind_of = {"text": "text (x-transformers)", "class": "class", "openclip": "openclip", "none": "none",
               "label": "none", "concat": "none"}
    best, best_score = None, 0
    for name, spec in FLAVOURS.items():
        if spec.is_dit:  # CompVis checkpoints hold UNets
            continue
        candidate = {
            "model_channels": spec.unet.model_channels, "in_channels": spec.unet.in_channels,
            "context_dim": spec.unet.context_dim if spec.unet.use_spatial_transformer else None,
            "cond_stage": kind_of[spec.cond_stage.kind], "latent_channels": spec.first_stage.latent_channels,
            "first_stage": spec.first_stage.kind,
        }
        if spec.cond_stage.kind == "text":
            candidate.update(text_width=spec.cond_stage.text.width, text_depth=spec.cond_stage.text.depth,
                             text_vocab_size=spec.cond_stage.text.vocab_size)
        score = sum(1 for k, v in candidate.items() if info.get(k) == v)
        if score > best_score:
            best, best_score = name, score
    return best


def _read_state_dict(path_or_sd: Union[str, os.PathLike, Mapping[str, Any]], weights_only: bool) -> Dict[str, Any]:
    if isinstance(path_or_sd, Mapping):
        sd = dict(path_or_sd)
    else:
        path = os.fspath(path_or_sd)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CompVis checkpoint not found: {path!r}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as exc:  # noqa: BLE001 - re-raised with the fix
            if weights_only:
                raise RuntimeError(f"could not load {path!r} with weights_only=True ({exc}); Lightning checkpoints "
                                   "may pickle extra objects: pass weights_only=False for a file you trust") from exc
            raise
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = dict(sd["state_dict"])
    return sd


def _format_keys(kind: str, keys: List[str], limit: int) -> str:
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"{len(keys)} {kind} key(s): {shown}"


def load_compvis_checkpoint(model: nn.Module, path_or_sd: Union[str, os.PathLike, Mapping[str, Any]],
                            use_ema: bool = True, strict: bool = True, weights_only: bool = True,
                            show: int = 10) -> Dict[str, List[str]]:
    """Load a CompVis LatentDiffusion checkpoint (file or state dict) into our ``LatentDiffusion``.

    Returns ``{"missing": [our names], "unexpected": [CompVis names], "mismatched": [...]}`` (keys
    not loaded). With ``strict`` any missing or unexpected
    key or shape mismatch raises :class:`CompVisKeyMismatch`, listing the first ``show`` keys of
    each kind, their counts, the hyper-parameters inferred from the checkpoint and the registry
    flavour they look like. A checkpoint without ``scale_factor`` keeps the model's value.
    A CompVis class embedding without the null row (n rows for our n+1) keeps our null row.
    """
    raw = _read_state_dict(path_or_sd, weights_only)
    ours = compvis_to_ldm_state_dict(raw, use_ema=use_ema)
    target = model.state_dict()
    if "scale_factor" not in ours and "scale_factor" in target:
        ours["scale_factor"] = target["scale_factor"]
    emb_key = "cond_stage.embedding.weight"
    if emb_key in ours and emb_key in target and ours[emb_key].shape[0] + 1 == target[emb_key].shape[0]:
        log.warning("checkpoint class embedding has %d rows, model has %d (last = null class): keeping the "
                    "model's null-class row", ours[emb_key].shape[0], target[emb_key].shape[0])
        ours[emb_key] = torch.cat([ours[emb_key], target[emb_key][-1:].to(ours[emb_key])], dim=0)
    missing = sorted(set(target) - set(ours))
    xt = _uses_xtransformer(raw.keys())
    # Unexpected keys are reported under the checkpoint's own (CompVis) names.
    unexpected = sorted(_to_compvis_key(k, xt) or k for k in set(ours) - set(target))
    mismatched = sorted(f"{k} {tuple(ours[k].shape)} vs model {tuple(target[k].shape)}"
                        for k in set(ours) & set(target) if ours[k].shape != target[k].shape)
    if strict and (missing or unexpected or mismatched):
        info = describe_compvis_checkpoint(raw)
        parts = ["CompVis checkpoint does not match this model."]
        if missing:
            parts.append(_format_keys("missing", missing, show))
        if unexpected:
            parts.append(_format_keys("unexpected", unexpected, show))
        if mismatched:
            parts.append(_format_keys("shape-mismatched", mismatched, show))
        parts.append(f"The checkpoint looks like: {info}; closest registry flavour: {closest_flavour(info)!r}.")
        raise CompVisKeyMismatch("\n".join(parts))
    loadable = {k: v for k, v in ours.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(loadable, strict=False)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def load_compvis_autoencoder(autoencoder: nn.Module, path_or_sd: Union[str, os.PathLike, Mapping[str, Any]],
                             strict: bool = True, weights_only: bool = True) -> None:
    """Load a CompVis / taming first-stage checkpoint (``encoder.*``, ``decoder.*``, ``quant_conv``,
    ...; ``loss.*`` discriminator/LPIPS weights are dropped) into an AutoencoderKL / VQModel.
    A full LDM checkpoint's ``first_stage_model.*`` keys are accepted as well."""
    sd = _read_state_dict(path_or_sd, weights_only)
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    result = autoencoder.load_state_dict(sd, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        parts = ["autoencoder checkpoint does not match this model."]
        if result.missing_keys:
            parts.append(_format_keys("missing", sorted(result.missing_keys), 10))
        if result.unexpected_keys:
            parts.append(_format_keys("unexpected", sorted(result.unexpected_keys), 10))
        raise CompVisKeyMismatch("\n".join(parts))
