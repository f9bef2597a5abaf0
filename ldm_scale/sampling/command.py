"""``launch/sample.py``: ``run(SampleConfig)`` loads an export, samples every prompt batch
``n_iter`` times, writes ``samples/*.png``, a grid and ``samples.json``. Conventions: docs/sampling.md."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ldm_scale import dist, storage
from ldm_scale.diffusion import SamplerConfig, num_sampling_steps
from ldm_scale.diffusion.noise import PerSampleGenerators, initial_noise
from ldm_scale.images import image_grid, load_image, save_png, to_uint8_hwc
from ldm_scale.sampling.checkpoints import CheckpointSource
from ldm_scale.sampling.generate import (check_size, condition_kind, generate, prepare_inpainting,
                                         raw_conditions)


@dataclass
class SampleConfig(CheckpointSource):
    """``launch/sample.py`` (``conf/commands/sample.yaml``): the checkpoint block, the prompts, the sampler."""

    prompt: Optional[str] = None  # text models: the prompt; class models: a class index
    from_file: Optional[str] = None  # one prompt (or class index) per line, batched by n_samples
    n_samples: int = 4  # batch size = columns of the grid
    n_iter: int = 1  # batches per prompt = rows of the grid
    # The sampler (conf/commands/sampler/: sampler=plms); guidance_scale 1 = no guidance.
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    H: Optional[int] = None  # image height; default: the flavour's training size
    W: Optional[int] = None
    seed: int = 42
    init_image: Optional[str] = None  # img2img / inpainting source image
    strength: float = 0.8  # img2img: fraction of the steps run from the noised init image (not with mask=)
    mask: Optional[str] = None  # inpainting mask image: white = repaint, black = keep
    outdir: str = "outputs"
    progress: bool = True  # tqdm progress bar

    def check(self) -> None:
        """Everything the settings alone decide, before the checkpoint is read."""
        if not self.ckpt:
            raise ValueError("ckpt= is required: the path or URL of an exported checkpoint")
        if self.n_samples < 1 or self.n_iter < 1:
            raise ValueError(f"n_samples and n_iter must be >= 1, got {self.n_samples} and {self.n_iter}")
        if self.mask is not None and self.init_image is None:
            raise ValueError("mask= needs init_image= (the image to inpaint)")
        if self.init_image is not None and self.mask is None and not 0.0 < self.strength < 1.0:
            raise ValueError(f"img2img strength must be in (0, 1), got {self.strength}")
        self.sampler.validate()


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
    """:meth:`SampleConfig.check` (composition runs it; a config built in code is checked here)."""
    cfg.check()


def run(cfg: SampleConfig) -> Dict[str, Any]:
    """Load the checkpoint, sample every batch n_iter times, write samples/ and a grid to ``outdir``.

    Returns a summary (also written as ``<outdir>/samples.json``).
    """
    validate(cfg)
    loaded = cfg.load(dist.resolve_device(cfg.device))
    height = cfg.H or loaded.spec.image_size
    width = cfg.W or loaded.spec.image_size
    check_size(loaded, height, width)
    sampler_cfg = cfg.sampler
    sampler_cfg.check_model(loaded.spec.parameterization)  # before any prompt is read or sampled
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
            for image, prompt in zip(to_uint8_hwc(images), prompts):
                path = storage.join(sample_dir, f"{count:05d}.png")
                save_png(image, path)
                written.append({"path": path, "prompt": prompt})
                count += 1
            all_images.append(images.cpu())
    bar.close()

    grid = image_grid(torch.cat(all_images), ncols=cfg.n_samples)  # uint8 [H', W', 3]
    grid_count = len(storage.glob(storage.join(cfg.outdir, "grid-*.png")))
    grid_path = storage.join(cfg.outdir, f"grid-{grid_count:04d}.png")
    save_png(grid, grid_path)
    summary = {"ckpt": storage.redact(cfg.ckpt), "step": loaded.step, "use_ema": loaded.used_ema,
               "experiment": loaded.experiment, "run_id": loaded.run_id, "flavour": loaded.spec.name, "height": height, "width": width, "strength": strength,
               "sampler": asdict(sampler_cfg), "seed": cfg.seed, "precision": cfg.precision,
               "grid": grid_path, "grid_shape": [grid.shape[2], grid.shape[0], grid.shape[1]],  # C, H, W
               "samples": written}
    storage.write_text(storage.join(cfg.outdir, "samples.json"), json.dumps(summary, indent=2))
    return summary


def _progress(enabled: bool, total: int):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True, desc="sampling")
