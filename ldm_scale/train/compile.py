"""``torch.compile`` applied from outside the single-device model code (``train.compile``).

Where it sits (STYLE.md principle 2, the order documented in ``train/engine.py``): build the
trainable modules (inside ``zero.Init`` under ZeRO-3) -> activation checkpointing -> **compile** ->
``deepspeed.initialize``. Compiling is lazy: :func:`apply_compile` only installs compiled calls and
tracing happens at the first forward, so the trace sees the weights in the dtype and memory format
DeepSpeed and ``deepspeed.channels_last`` gave them afterwards.

Modes (:class:`CompileMode`):

- ``off``: eager.
- ``unet``: each trainable network as one graph: the UNet or DiT; the jointly trained text transformer's
  token path ``encode_tokens`` (its ``forward`` tokenises strings in Python, which stays outside
  any graph); for ``task=autoencoder`` the autoencoder's encoder and decoder conv stacks.
- ``blocks``: every residual / transformer block of more than one layer as its own graph
  (:data:`BLOCK_TYPES`: a UNet block, a DiT / MMDiT block, a text-transformer block, an autoencoder ResnetBlock /
  AttnBlock), as torchtitan compiles each TransformerBlock. A block is the unit of activation
  checkpointing (its checkpoint is traced inside its graph) and, under ZeRO-3, the unit DeepSpeed
  gathers parameters for (:func:`zero3_leaf_modules`); blocks of one structure share one graph.

What stays eager, and why: the diffusion objective, posterior sampling and the VQ lookup (they draw
from the global RNG or make data-dependent statistics: compiled, inductor's own random kernels would
change the loss and the random stream a checkpoint resumes); tokenisation; the discriminator and
LPIPS. The frozen first stage's **encoder** (images -> latents, every step of an LDM trained on
images) is compiled as one graph in both modes (:func:`apply_frozen_compile`): it holds no
checkpointing and no ZeRO hooks, so per-block compilation buys it nothing. Its decoder (sampling
only) and a frozen OpenCLIP text tower stay eager.

State-dict keys are unchanged: ``nn.Module.compile()`` installs the compiled call on the module
itself instead of wrapping it in an ``OptimizedModule`` (whose keys gain an ``_orig_mod.`` prefix),
so DeepSpeed's parameter names, checkpoints, the EMA and exports see the same names as in eager.

ZeRO-3 hooks every submodule with parameter gathers that DeepSpeed marks
``torch.compiler.disable``: inside a compiled graph each one is a graph break. So under ZeRO-3 only
``blocks`` is allowed; each compiled block becomes a DeepSpeed "leaf" (hooks on the block only, set
by ``engine.initialize_engine``) and its ``forward`` is compiled rather than its call, so those
hooks run eagerly around the graph.
"""
from __future__ import annotations

import logging
import types
from typing import Any, Dict, List, Tuple, Type

import torch
from torch import nn

from ldm_scale.choices import Choice
from ldm_scale.models.conditioners import TransformerBlock, TransformerEmbedder
from ldm_scale.models.dit import DiT, DiTBlock, JointBlock
from ldm_scale.models.encoder_decoder import AttnBlock, Decoder, Encoder, ResnetBlock
from ldm_scale.models.unet import TimestepEmbedSequential, UNetModel

log = logging.getLogger(__name__)


class CompileMode(Choice):
    """``train.compile``. Member names are the config strings (OmegaConf matches enum names)."""

    off = "off"
    unet = "unet"
    blocks = "blocks"


# Whole networks compiled as one graph in mode ``unet``: type -> the method that is the graph
# ("forward": the module's own call, via nn.Module.compile).
WHOLE_NETWORKS: Dict[Type[nn.Module], str] = {
    UNetModel: "forward",
    DiT: "forward",
    TransformerEmbedder: "encode_tokens",
    Encoder: "forward",
    Decoder: "forward",
}
# Blocks compiled one by one in mode ``blocks``.
BLOCK_TYPES: Tuple[Type[nn.Module], ...] = (TimestepEmbedSequential, DiTBlock, JointBlock, TransformerBlock, ResnetBlock,
                                            AttnBlock)

# Compiled regions of one class share a code object and with it dynamo's cache of graphs, whose
# default limit (8) the 13-25 blocks of a UNet exceed: past the limit the remaining blocks would
# silently run eager. Each region may need this many graphs: training, no-grad sampling, and a
# sampling batch of another size or two.
GRAPHS_PER_REGION = 4
_regions_compiled = 0  # in this process


def apply_compile(module: nn.Module, mode: CompileMode, *, zero_stage: int = 0, **options: Any) -> List[str]:
    """Compile the trainable networks inside ``module`` in place for ``mode``; returns the names of
    the compiled regions (``"unet"``, ``"cond_stage.encode_tokens"``, ``"unet.input_blocks.1"``, ...).

    Call after ``set_activation_checkpointing`` and before ``deepspeed.initialize`` with the run's
    ZeRO stage. ``options`` go to ``torch.compile`` (``backend=``, ``fullgraph=``, ...); a region is
    compiled once, however often this is called.

    Shapes are static (``dynamic=False`` unless given): regions of one class share dynamo's
    per-code-object state, so its "automatic dynamic" rule would take two *different blocks* for one
    block whose input shape changed and trace every later block with symbolic shapes (slower
    kernels; inductor on CPU even fails on some). A run trains at fixed shapes.
    """
    mode = CompileMode(mode)
    if mode is CompileMode.off:
        return []
    if mode is CompileMode.unet and zero_stage == 3:
        raise ValueError("train.compile=unet under ZeRO-3 would break the graph at every layer's parameter "
                         "gather: use train.compile=blocks")
    options = {"dynamic": False, **options}
    regions: List[str] = []
    covered: List[str] = []  # prefixes of compiled regions: nothing inside them is compiled again
    for name, sub in module.named_modules():
        if any(name.startswith(prefix) for prefix in covered):
            continue
        if mode is CompileMode.unet and type(sub) in WHOLE_NETWORKS:
            method = WHOLE_NETWORKS[type(sub)]
        elif mode is CompileMode.blocks and isinstance(sub, BLOCK_TYPES) and _fusable(sub):
            method = "forward"
        else:
            continue
        covered.append(f"{name}." if name else "")
        if not is_compiled(sub):
            _compile_method(sub, method, options, hooks_outside=zero_stage == 3)
        label = name or type(sub).__name__
        regions.append(label if method == "forward" else f"{label}.{method}")
    return regions


def apply_frozen_compile(first_stage: nn.Module, mode: CompileMode, **options: Any) -> List[str]:
    """Compile the frozen first stage's encoder as one graph when ``mode`` is not ``off`` (see the
    module docstring); returns ``["encoder"]`` or ``[]``."""
    encoder = getattr(first_stage, "encoder", None)
    if CompileMode(mode) is CompileMode.off or not isinstance(encoder, Encoder):
        return []
    apply_compile(encoder, CompileMode.unet, **options)
    return ["encoder"]


def is_compiled(module: nn.Module) -> bool:
    """Whether :func:`apply_compile` compiled this module's call, forward or token path."""
    return getattr(module, "_compiled_call_impl", None) is not None or any(
        name in module.__dict__ for name in ("forward", "encode_tokens"))


def zero3_leaf_modules(module: nn.Module) -> List[nn.Module]:
    """The compiled blocks inside ``module``, to be made ZeRO-3 leaf modules before
    ``deepspeed.initialize``: one parameter gather per block and no ZeRO hook inside its graph."""
    return [sub for sub in module.modules() if isinstance(sub, BLOCK_TYPES) and is_compiled(sub)]


def log_compiled(what: str, regions: List[str]) -> None:
    if regions:
        shown = ", ".join(regions[:6]) + (f", ... ({len(regions)} in all)" if len(regions) > 6 else "")
        log.info("torch.compile (%s): %s", what, shown)


def _fusable(block: nn.Module) -> bool:
    """A block of more than one layer with weights. A lone convolution (the UNet's stem and its
    Downsample blocks) has nothing to fuse; as a ZeRO-3 leaf fed by the latents (no gradient) it
    would even lose its gradient, since DeepSpeed hangs a leaf's post-backward hook on its inputs."""
    return sum(1 for m in block.modules() if next(m.parameters(recurse=False), None) is not None) > 1


def _compile_method(module: nn.Module, method: str, options: Dict[str, Any], *, hooks_outside: bool) -> None:
    if method == "forward" and not hooks_outside:
        module.compile(**options)  # the module's call, its own hooks included
    else:
        # The class's function compiled and bound to this instance (an instance attribute: keys and
        # class untouched; a deepcopy rebinds the method to the copy). Hooks stay outside the graph.
        compiled = torch.compile(getattr(type(module), method), **options)
        setattr(module, method, types.MethodType(compiled, module))
    global _regions_compiled
    _regions_compiled += 1
    needed = GRAPHS_PER_REGION * _regions_compiled
    config = torch._dynamo.config  # process-wide; only ever raised
    config.recompile_limit = max(config.recompile_limit, needed)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)


__all__ = ["CompileMode", "apply_compile", "apply_frozen_compile", "is_compiled", "zero3_leaf_modules",
           "log_compiled", "WHOLE_NETWORKS", "BLOCK_TYPES"]
