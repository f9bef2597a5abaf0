"""The one generation function (``generate``): images for raw conditions from a loaded or live
LatentDiffusion, with classifier-free guidance, img2img and inpainting; callers seed it by the rule
of ``diffusion/noise.py``. The maths (samplers, guidance) live in ``ldm_scale.diffusion``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ldm_scale.diffusion import SamplerConfig, classifier_free, sample
from ldm_scale.diffusion.noise import Generator, PerSampleGenerators, randn
from ldm_scale.models.micro_conditioning import sampling_micro
from ldm_scale.sampling.checkpoints import LoadedModel
from ldm_scale.train import precision as precision_policy

PRECISIONS = precision_policy.DTYPES  # sampling autocasts as training's forward passes do (train/precision.py)


@dataclass
class Inpainting:
    """Inputs for img2img / inpainting, prepared once for a batch size."""

    image: torch.Tensor  # [B, 3, H, W] in [-1, 1]
    init_latent: torch.Tensor  # scaled latent of ``image``
    repaint: Optional[torch.Tensor] = None  # [B, 1, H, W], 1 = generate (pixel resolution)
    repaint_latent: Optional[torch.Tensor] = None  # the same at latent resolution
    concat: Optional[torch.Tensor] = None  # 9-channel models: [masked-image latent, mask]


def condition_kind(spec: Any) -> str:
    """``text`` | ``class`` | ``none`` | ``concat``: what a raw condition is for this model."""
    kind = spec.cond_stage.kind
    return {"text": "text", "openclip": "text", "class": "class", "label": "class"}.get(kind, kind)


def raw_conditions(spec: Any, prompts: Sequence[str]) -> Any:
    """Prompts from the command line -> the raw conditions the model's conditioner takes."""
    kind = condition_kind(spec)
    if kind == "text":
        return list(prompts)
    if kind == "class":
        try:
            return torch.tensor([int(p) for p in prompts], dtype=torch.long)
        except ValueError as exc:
            raise ValueError(f"{spec.name} is class-conditional: prompts must be class indices "
                             f"(e.g. prompt=3), got {list(prompts)[:3]}") from exc
    return None


def is_concat_inpainting(loaded: LoadedModel) -> bool:
    spec = loaded.spec
    return condition_kind(spec) == "concat" and spec.cond_stage.concat_channels == spec.first_stage.latent_channels + 1


def prepare_inpainting(loaded: LoadedModel, init_image: torch.Tensor, mask: Optional[torch.Tensor],
                       batch: int, generator: Generator) -> Inpainting:
    """Encode the init image (and mask) for ``batch`` samples.

    ``init_image`` [1, 3, H, W] in [0, 1]; ``mask`` [1, 1, H, W] in [0, 1], > 0.5 = repaint.
    9-channel models get ``concat = [E(image * keep), mask at latent size]`` (CompVis' LDM inpainting
    layout: masked-image latent first, then the mask).
    """
    model, device = loaded.model, loaded.device
    generator = _on_device(generator, device)
    image = (init_image.to(device) * 2 - 1).expand(batch, -1, -1, -1)
    init_latent = model.encode_images(image, generator=generator)
    if mask is None:
        return Inpainting(image, init_latent)
    repaint = (mask.to(device) > 0.5).float().expand(batch, -1, -1, -1)
    repaint_latent = F.interpolate(repaint, size=init_latent.shape[-2:], mode="nearest")
    concat = None
    if is_concat_inpainting(loaded):
        masked_latent = model.encode_images(image * (1 - repaint), generator=generator)
        concat = torch.cat([masked_latent, repaint_latent], dim=1)
    return Inpainting(image, init_latent, repaint, repaint_latent, concat)


def _on_device(generator: Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` for code that draws there (the first stage's posterior sample of
    an init image), seeded from ``generator`` so runs stay reproducible."""
    if isinstance(generator, PerSampleGenerators):
        generator = generator.torch_generator()
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


@torch.no_grad()
def generate(
    loaded: LoadedModel,
    raw: Any,
    batch: int,
    cfg: SamplerConfig,
    *,
    height: int,
    width: int,
    generator: Generator,
    precision: str = "fp32",
    inpainting: Optional[Inpainting] = None,
    strength: float = 1.0,
    x_T: Optional[torch.Tensor] = None,
    on_step: Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """``batch`` images [B, 3, H, W] in [-1, 1] for the raw conditions ``raw`` (None: unconditional).

    The initial noise is drawn from ``generator`` unless ``x_T`` is given. Every entry point passes
    ``x_T = initial_noise(..., indices, seed)`` and ``generator = PerSampleGenerators(seed,
    indices)``: the seeding rule of ``diffusion/noise.py``, under which an image does not depend on
    the batch, the world size or the entry point.

    Any H, W that are multiples of ``loaded.size_multiple`` work: the UNet is convolutional and the
    DiT's sin-cos positions extend to any patch grid, so sampling beyond the training size runs as is
    (global coherence degrades far beyond it; a DiT with learned positions refuses other sizes).
    """
    model, device = loaded.model, loaded.device
    check_size(loaded, height, width)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {sorted(PRECISIONS)}")
    autocast = precision_policy.autocast(precision, device)

    if condition_kind(loaded.spec) == "concat":
        if not is_concat_inpainting(loaded):
            raise ValueError(f"{loaded.spec.name} takes a {loaded.spec.cond_stage.concat_channels}-channel concat "
                             "condition that is not an inpainting mask + image latent (super-resolution?): "
                             "sampling supports concat models only for inpainting")
        if inpainting is None or inpainting.concat is None:
            raise ValueError(f"{loaded.spec.name} is a concat-conditioned inpainting model: pass init_image= and mask=")
        cond, uncond = {"concat": inpainting.concat}, None  # no droppable condition: no guidance
    else:
        if isinstance(raw, torch.Tensor):
            raw = raw.to(device)
        with autocast:
            cond = model.condition(raw)
            null = model.cond_stage.null_raw(batch)
            null = null.to(device) if isinstance(null, torch.Tensor) else null
            uncond = model.condition(null) if cond and cfg.guidance_scale != 1.0 else None
        if inpainting is not None and inpainting.concat is not None:
            cond["concat"] = inpainting.concat
            if uncond is not None:
                uncond["concat"] = inpainting.concat

    if loaded.spec.micro_conditioned:  # SDXL's sampling default: uncropped, at the size asked for
        micro = sampling_micro(batch, height, width, device)
        cond = {**cond, "micro": micro}
        uncond = None if uncond is None else {**uncond, "micro": micro}

    def denoise(x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast:
            return model.apply_model(x, t, c).float()

    model_fn = classifier_free(denoise, cond, uncond if uncond is not None else cond,
                               cfg.guidance_scale if uncond is not None else 1.0)
    f = loaded.spec.first_stage.downsample_factor
    shape = (batch, loaded.spec.first_stage.latent_channels, height // f, width // f)
    if x_T is None:
        x_T = randn(shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape} for {height}x{width} images")
    x_T = x_T.to(device=device, dtype=torch.float32)

    init_latent = mask = None
    if inpainting is not None:
        init_latent = inpainting.init_latent.float()
        if inpainting.repaint_latent is not None and inpainting.concat is None:
            mask = 1 - inpainting.repaint_latent  # samplers paste where mask = 1 (known)
    if init_latent is not None and init_latent.shape != x_T.shape:
        raise ValueError(f"init image latent {tuple(init_latent.shape)} does not match {tuple(x_T.shape)}")
    z = sample(model_fn, x_T, loaded.schedule, cfg, parameterization=model.parameterization, generator=generator,
               init_latent=init_latent if (strength < 1.0 or mask is not None) else None,
               strength=strength, inpaint_mask=mask, on_step=on_step)
    with autocast:
        images = model.decode_latents(z).float().clamp(-1, 1)
    if inpainting is not None and inpainting.repaint is not None:
        # Keep the known pixels exactly (the decoder is not an identity on them).
        images = inpainting.repaint * images + (1 - inpainting.repaint) * inpainting.image
    return images


def check_size(loaded: LoadedModel, height: int, width: int) -> None:
    m = loaded.size_multiple
    if height <= 0 or width <= 0 or height % m or width % m:
        f = loaded.spec.first_stage.downsample_factor
        raise ValueError(f"H={height}, W={width}: both must be positive multiples of {m} (first-stage factor "
                         f"{f} x denoiser downsampling {m // f}); e.g. H={max(m, round(height / m) * m)}")
