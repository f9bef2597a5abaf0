"""The precision policy of a training run: one table, read by the engine adapter and the tasks.

For ``deepspeed.precision`` = p, the policy says (docs/architecture.md, "Precision"):

=================  ==========================  ==========================  ==================
                   fp32                        bf16                        fp16
=================  ==========================  ==========================  ==================
trainable weights  fp32 (the module)           bf16 (DeepSpeed's module)   fp16 (DeepSpeed's)
master weights     the weights themselves      fp32, in the ZeRO           fp32, in the ZeRO
                                               optimizer partitions        optimizer, dynamic
                                                                           loss scaling
forward passes     fp32                        ``torch.autocast(bf16)``    ``autocast(fp16)``
first stage        fp32                        fp32 storage, computes      as bf16
                                               under the autocast
frozen text        fp32                        bf16 on CUDA, fp32 on CPU   fp16 on CUDA,
encoder                                        (CPU bf16 is slow), under   fp32 on CPU
                                               the same autocast
=================  ==========================  ==========================  ==================

Why autocast on top of DeepSpeed's half-precision weights rather than one or the other: DeepSpeed
owns the weight and master copies (and their sharding), but the inputs a forward meets are fp32
(latents, timestep and position embeddings, the frozen parts' outputs); autocast casts them at the
op that needs it and runs the reductions autocast keeps in fp32 (group/layer norm, softmax,
losses) in fp32, so no model code carries dtype logic.

Why the frozen text encoder is stored in half precision but the first stage is not: a frozen
encoder has no master copy to keep and is never exported (it is rebuilt from its pretrained
weights), so half-precision storage only saves memory and bandwidth (OpenCLIP ViT-H's text tower:
354M parameters, 1.4 GB in fp32, 0.7 GB in bf16). The first stage is written into every LDM
export and decodes every sample, so rounding its weights would silently change the exported model;
in training its convolutions already run in bf16 under autocast, and its fp32 storage costs 335 MB
(KL-f8, 83.7M parameters) on an 80 GB card; pre-encoded latent shards remove it from training
altogether. ``deepspeed.frozen_precision`` overrides the text encoder's dtype (``bf16`` on CPU, as
the tests do; ``fp32`` to rule it out when debugging).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ldm_scale.choices import Choice


class Precision(Choice):
    """``deepspeed.precision`` (and the sampling/eval ``precision``): the table above."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class FrozenPrecision(Choice):
    """``deepspeed.frozen_precision``: ``auto`` (the table above) or a fixed dtype."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}
FROZEN_PRECISIONS = tuple(FrozenPrecision.values())


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype forward passes autocast to under ``deepspeed.precision`` (None: no autocast)."""
    if precision not in DTYPES:
        raise ValueError(f"deepspeed.precision={precision!r}: expected one of {sorted(DTYPES)}")
    return None if precision == "fp32" else DTYPES[precision]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def frozen_dtype(precision: str, frozen_precision: str, device: torch.device) -> torch.dtype:
    """The dtype the frozen parts are stored in (see the module docstring)."""
    if frozen_precision not in FROZEN_PRECISIONS:
        raise ValueError(f"deepspeed.frozen_precision={frozen_precision!r}: expected one of {FROZEN_PRECISIONS}")
    if frozen_precision != "auto":
        return DTYPES[frozen_precision]
    if torch.device(device).type == "cuda":
        return DTYPES[precision]
    return torch.float32
