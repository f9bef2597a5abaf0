"""Sample images from an exported LDM checkpoint: text/class/unconditional, img2img, inpainting.

``launch/sample.py`` is a thin command line over ``run(SampleConfig)``; evaluation code uses
``load_checkpoint`` + ``generate`` directly. The maths (samplers, guidance) live in
``ldm_scale.diffusion``; this module adds checkpoint loading (through ``ldm_scale.storage``, so
``s3://`` works), image I/O, precision and batching. Conventions are in docs/sampling.md.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ldm_scale import storage
from ldm_scale.formats import AUTOENCODER_FORMAT, LDM_FORMAT
from ldm_scale.train import precision as precision_policy
from ldm_scale.diffusion import (
    NoiseSchedule,
    SamplerConfig,
    classifier_free,
    make_schedule,
    num_sampling_steps,
    sample,
)
from ldm_scale.diffusion.noise import Generator, PerSampleGenerators, initial_noise, randn

PRECISIONS = precision_policy.DTYPES  # sampling autocasts as training's forward passes do (train/precision.py)


@dataclass
class SampleConfig:
    """Options of ``launch/sample.py`` (``key=value`` on the command line, names as CompVis' scripts)."""

    ckpt: Optional[str] = None  # required: exported checkpoint: local path or URL (s3://, gs://, https://)
    prompt: Optional[str] = None  # text models: the prompt; class models: a class index
    from_file: Optional[str] = None  # one prompt (or class index) per line, batched by n_samples
    n_samples: int = 4  # batch size = columns of the grid
    n_iter: int = 1  # batches per prompt = rows of the grid
    scale: float = 5.0  # classifier-free guidance scale (1 = no guidance)
    sampler: str = "ddim"  # ddim | plms | ddpm
    ddim_steps: int = 50  # sampling steps (ddpm: 0 = all training timesteps)
    ddim_eta: float = 0.0
    spacing: str = "uniform"  # uniform (CompVis, +1 offset) | quadratic | trailing
    H: Optional[int] = None  # image height; default: the flavour's training size
    W: Optional[int] = None
    seed: int = 42
    init_image: Optional[str] = None  # img2img / inpainting source image
    strength: float = 0.8  # img2img: fraction of the steps run from the noised init image (not with mask=)
    mask: Optional[str] = None  # inpainting mask image: white = repaint, black = keep
    use_ema: bool = True  # sample with the EMA UNet weights (use_ema=false: the raw weights)
    flavour: Optional[str] = None  # required for CompVis-layout .ckpt files (no stored model config)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast for the networks; sampler state stays fp32)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    outdir: str = "outputs"
    trust_checkpoint: bool = False  # allow arbitrary pickles in the checkpoint (CompVis Lightning .ckpt)
    progress: bool = True  # tqdm progress bar

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(sampler=self.sampler, steps=self.ddim_steps, eta=self.ddim_eta,
                             spacing=self.spacing, guidance_scale=self.scale)


@dataclass
class LoadedModel:
    model: Any  # ldm_scale.models.LatentDiffusion, eval mode
    spec: Any  # ldm_scale.models.registry.LDMSpec
    schedule: NoiseSchedule  # float32 on the model's device
    step: Optional[int]
    used_ema: bool  # the UNet holds the EMA weights (a jointly trained encoder is raw: see ema_coverage)
    # The resolved training config stored in the file (ldm_scale exports, CompVis-layout exports
    # written by ldm_scale), or None (e.g. CompVis' own Lightning checkpoints).
    config: Optional[Dict[str, Any]] = None
    # What the file records about its weights (train/export.py): {"ema": [...], "raw": [...],
    # "frozen": [...]} by top-level part, or None for files written without it.
    ema_coverage: Optional[Dict[str, List[str]]] = None

    @property
    def device(self) -> torch.device:
        return self.model.scale_factor.device

    @property
    def scale_factor(self) -> float:
        return float(self.model.scale_factor)

    @property
    def experiment(self) -> Optional[str]:
        """The training run's experiment name (config ``name``), when the file has a config."""
        return (self.config or {}).get("name")

    @property
    def run_id(self) -> Optional[str]:
        return (self.config or {}).get("run_id")

    def training_sampler(self) -> Optional[SamplerConfig]:
        """The sampler settings the run used for its own sample grids (config ``eval.sampler``), or None."""
        stored = ((self.config or {}).get("eval") or {}).get("sampler")
        if not isinstance(stored, dict):
            return None
        known = {f.name for f in fields(SamplerConfig)}
        return SamplerConfig(**{k: v for k, v in stored.items() if k in known})

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this: first-stage factor x UNet downsampling."""
        return self.spec.first_stage.downsample_factor * 2 ** (len(self.spec.unet.channel_mult) - 1)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} requested but CUDA is not available: use device=cpu or device=auto")
    return device


def read_checkpoint(url: str, trust: bool = False) -> Dict[str, Any]:
    """``torch.load`` a checkpoint through the storage seam, with clear errors."""
    shown = storage.redact(url)
    if not storage.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {shown} (ckpt= takes a local path or an s3:// / gs:// / "
                                "https:// URL of an exported checkpoint)")
    if storage.is_local(url):
        ckpt = _torch_load(storage.local_path(url), shown, trust, mmap=True)
    else:
        # One download, then a local load: torch.load seeks record by record, which over a ranged
        # object-store stream would be one request per tensor.
        with tempfile.TemporaryDirectory(prefix="ldm_scale_ckpt_") as tmp:
            path = os.path.join(tmp, "checkpoint.pt")
            storage.get_file(url, path)
            ckpt = _torch_load(path, shown, trust, mmap=False)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{shown} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _torch_load(path: str, shown: str, trust: bool, mmap: bool) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (legacy format: a raw pickle, protocol byte 0x80 first).
    is_zip = head.startswith(b"PK\x03\x04")
    if not (is_zip or head[:1] == b"\x80"):
        raise ValueError(f"{shown} is not a readable torch checkpoint (neither a torch.save zip archive nor a pickle)")
    try:
        # mmap (zip only): tensors are paged in from the file instead of read into memory first.
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap and is_zip)
    except pickle.UnpicklingError as exc:
        if trust:
            raise ValueError(f"{shown} is not a readable torch checkpoint: {exc}") from exc
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{shown} holds objects beyond tensors and plain containers (typical of Lightning "
                         f"checkpoints: {reason}); if you trust its origin, pass trust_checkpoint=true") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{shown} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc


def _strip_prefix(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_strict(module: torch.nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:3]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")
    if problems:
        raise ValueError(f"{what} does not fit the model: " + "; ".join(problems))


def _schedule_kind(ckpt: Dict[str, Any]) -> str:
    """The forward-process schedule kind recorded in the training config (LDMSpec stores only its
    numbers); checkpoints without one used the LDM default."""
    config = ckpt.get("config") or {}
    diffusion = config.get("diffusion") if isinstance(config, dict) else None
    return (diffusion or {}).get("schedule", "scaled_linear")


def load_checkpoint(url: str, *, use_ema: bool = True, flavour: Optional[str] = None,
                    device: torch.device | str = "cpu", trust: bool = False) -> LoadedModel:
    """Build the LatentDiffusion an exported checkpoint describes and load its (EMA) weights.

    Exported checkpoints (``format`` = ``ldm_scale/ldm-v1``, docs/architecture.md) carry their
    model config. CompVis-layout checkpoints (``state_dict`` with ``model.diffusion_model.*`` keys)
    need ``flavour`` and are mapped by ``ldm_scale.models.compat``.
    """
    from ldm_scale.models.registry import build_ldm, get_spec, spec_from_dict

    ckpt = read_checkpoint(url, trust)
    shown = storage.redact(url)
    fmt = ckpt.get("format")
    if fmt == AUTOENCODER_FORMAT:
        raise ValueError(f"{shown} is an autoencoder export; sampling needs an LDM export ({LDM_FORMAT})")
    if fmt == LDM_FORMAT:
        spec = spec_from_dict(ckpt["model_config"])
        if flavour is not None and flavour != spec.name:
            raise ValueError(f"flavour={flavour} given but {shown} holds a {spec.name!r} model: drop flavour=")
        ema = ckpt.get("ema_state_dict")
        if use_ema and not ema:
            raise ValueError(f"{shown} has no EMA weights: pass use_ema=false to sample with the raw weights")
        model = build_ldm(spec)
        _load_strict(model, ckpt["state_dict"], f"state_dict of {shown}")
        if use_ema:
            _load_strict(model.unet, _strip_prefix(ema, "unet."), f"ema_state_dict of {shown}")
        if ckpt.get("scale_factor") is not None:
            model.scale_factor.fill_(float(ckpt["scale_factor"]))
        step = ckpt.get("step")
    elif fmt is None and isinstance(ckpt.get("state_dict"), dict):
        # CompVis layout: no model config inside, so the flavour names the architecture.
        if flavour is None:
            raise ValueError(f"{shown} has no model config (CompVis layout?): pass flavour=<name> "
                             "naming the registered flavour it was trained as")
        from ldm_scale.models import compat

        state = ckpt["state_dict"]
        if use_ema and not any(k.startswith(compat.EMA_PREFIX) for k in state):
            raise ValueError(f"{shown} has no EMA weights (no {compat.EMA_PREFIX}* keys): pass use_ema=false")
        spec = get_spec(flavour)
        model = build_ldm(spec)
        compat.load_compvis_checkpoint(model, state, use_ema=use_ema, strict=True)
        step = ckpt.get("global_step")
    else:
        raise ValueError(f"{shown}: unknown checkpoint format {fmt!r}; expected {LDM_FORMAT} "
                         "(ldm_scale export) or a CompVis checkpoint with flavour=")
    model.to(device).eval().requires_grad_(False)
    schedule = make_schedule(_schedule_kind(ckpt), spec.num_timesteps, spec.linear_start, spec.linear_end)
    config = ckpt.get("config")
    coverage = ckpt.get("ema_coverage", ckpt.get("ldm_scale_ema_coverage"))
    return LoadedModel(model, spec, schedule.to(device), step, use_ema,
                       config=dict(config) if isinstance(config, dict) else None, ema_coverage=coverage)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def load_image(url: str, size: Tuple[int, int], mode: str = "RGB") -> torch.Tensor:
    """Image at ``url`` resized to ``size`` = (H, W) -> [1, C, H, W] in [0, 1]."""
    from PIL import Image

    if not storage.exists(url):
        raise FileNotFoundError(f"image not found: {storage.redact(url)}")
    with storage.open_url(url, "rb") as f:
        img = Image.open(io.BytesIO(f.read())).convert(mode)
    img = img.resize((size[1], size[0]), resample=Image.Resampling.LANCZOS)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float() / 255.0
    return x.reshape(size[0], size[1], len(mode)).permute(2, 0, 1)[None]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_png(image_hwc: torch.Tensor, path: str) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_hwc.numpy()).save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())


def make_grid(images: torch.Tensor, ncols: int, padding: int = 2) -> torch.Tensor:
    """[N, 3, H, W] -> one [3, rows (H + p) + p, ncols (W + p) + p] image (torchvision's layout)."""
    from torchvision.utils import make_grid as tv_make_grid

    return tv_make_grid(images, nrow=ncols, padding=padding)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
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

    Any H, W that are multiples of ``loaded.size_multiple`` work: the UNet is convolutional, so
    sampling beyond the training size runs as is (global coherence degrades far beyond it).
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
                         f"{f} x UNet downsampling {m // f}); e.g. H={max(m, round(height / m) * m)}")


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def read_prompts(cfg: SampleConfig, spec: Any) -> List[List[str]]:
    """Batches of ``n_samples`` prompts: one prompt repeated, or the lines of ``from_file``."""
    kind = condition_kind(spec)
    if cfg.from_file:
        lines = [ln.strip() for ln in storage.read_text(cfg.from_file).splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"from_file={cfg.from_file} has no prompts")
        return [lines[i:i + cfg.n_samples] for i in range(0, len(lines), cfg.n_samples)]
    if kind in ("text", "class") and cfg.prompt is None:
        example = 'prompt="a painting of a fox"' if kind == "text" else "prompt=3"
        raise ValueError(f"{spec.name} is {kind}-conditional: give {example} or from_file=prompts.txt")
    return [[cfg.prompt if cfg.prompt is not None else ""] * cfg.n_samples]


def validate(cfg: SampleConfig) -> None:
    if not cfg.ckpt:
        raise ValueError("ckpt= is required: the path or URL of an exported checkpoint")
    if cfg.n_samples < 1 or cfg.n_iter < 1:
        raise ValueError(f"n_samples and n_iter must be >= 1, got {cfg.n_samples} and {cfg.n_iter}")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r}: choose one of {sorted(PRECISIONS)}")
    if cfg.mask is not None and cfg.init_image is None:
        raise ValueError("mask= needs init_image= (the image to inpaint)")
    if cfg.init_image is not None and cfg.mask is None and not 0.0 < cfg.strength < 1.0:
        raise ValueError(f"img2img strength must be in (0, 1), got {cfg.strength}")
    cfg.sampler_config().validate()


def run(cfg: SampleConfig) -> Dict[str, Any]:
    """Load the checkpoint, sample every batch n_iter times, write samples/ and a grid to ``outdir``.

    Returns a summary (also written as ``<outdir>/samples.json``).
    """
    validate(cfg)
    device = resolve_device(cfg.device)
    loaded = load_checkpoint(cfg.ckpt, use_ema=cfg.use_ema, flavour=cfg.flavour, device=device,
                             trust=cfg.trust_checkpoint)
    height = cfg.H or loaded.spec.image_size
    width = cfg.W or loaded.spec.image_size
    check_size(loaded, height, width)
    sampler_cfg = cfg.sampler_config()
    batches = read_prompts(cfg, loaded.spec)
    f = loaded.spec.first_stage.downsample_factor
    latent_shape = (loaded.spec.first_stage.latent_channels, height // f, width // f)

    init = mask = None
    strength = 1.0
    if cfg.init_image is not None:
        init = load_image(cfg.init_image, (height, width))
        if cfg.mask is not None:
            mask = load_image(cfg.mask, (height, width), mode="L")
        else:
            strength = cfg.strength

    sample_dir = storage.join(cfg.outdir, "samples")
    storage.makedirs(sample_dir)
    count = len(storage.glob(storage.join(sample_dir, "*.png")))  # continue numbering, never overwrite
    steps = num_sampling_steps(sampler_cfg, loaded.schedule, strength)
    bar = _progress(cfg.progress, total=cfg.n_iter * len(batches) * steps)
    written, all_images = [], []
    index = 0  # sample i of this command: noise seeded by (seed, i), diffusion/noise.py
    for _ in range(cfg.n_iter):
        for prompts in batches:
            indices = range(index, index + len(prompts))
            index += len(prompts)
            generator = PerSampleGenerators(cfg.seed, indices)
            inpainting = (prepare_inpainting(loaded, init, mask, len(prompts), generator)
                          if init is not None else None)
            images = generate(loaded, raw_conditions(loaded.spec, prompts), len(prompts), sampler_cfg,
                              height=height, width=width, generator=generator, precision=cfg.precision,
                              inpainting=inpainting, strength=strength,
                              x_T=initial_noise(latent_shape, indices, cfg.seed, loaded.device),
                              on_step=lambda i, n, x, x0: bar.update(1))
            for image, prompt in zip(to_uint8(images), prompts):
                path = storage.join(sample_dir, f"{count:05d}.png")
                save_png(image, path)
                written.append({"path": path, "prompt": prompt})
                count += 1
            all_images.append(images.cpu())
    bar.close()

    grid = make_grid(torch.cat(all_images), ncols=cfg.n_samples)
    grid_count = len(storage.glob(storage.join(cfg.outdir, "grid-*.png")))
    grid_path = storage.join(cfg.outdir, f"grid-{grid_count:04d}.png")
    save_png(to_uint8(grid[None])[0], grid_path)
    summary = {"ckpt": storage.redact(cfg.ckpt), "step": loaded.step, "use_ema": loaded.used_ema,
               "experiment": loaded.experiment, "run_id": loaded.run_id, "flavour": loaded.spec.name, "height": height, "width": width, "strength": strength,
               "sampler": asdict(sampler_cfg), "seed": cfg.seed, "precision": cfg.precision,
               "grid": grid_path, "grid_shape": list(grid.shape), "samples": written}
    storage.write_text(storage.join(cfg.outdir, "samples.json"), json.dumps(summary, indent=2))
    return summary


def _progress(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True, desc="sampling")


def grid_size(rows: int, cols: int, height: int, width: int, padding: int = 2) -> Tuple[int, int]:
    """(height, width) in pixels of the ``make_grid`` image of rows x cols samples."""
    return rows * (height + padding) + padding, cols * (width + padding) + padding


__all__ = ["SampleConfig", "LoadedModel", "Inpainting", "load_checkpoint", "read_checkpoint", "generate",
           "prepare_inpainting", "run", "make_grid", "grid_size", "check_size"]
