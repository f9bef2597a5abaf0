"""Worker for tests/integration/test_generation_seeding.py: one tiny text-to-image model, sampled by
every entry point with a stochastic sampler (DDIM eta=1, so the sampler's own draws matter too).

A plain ``python`` process (world of one) builds ``experiment=quickstart``'s task, exports it, then
makes the same four prompts at seed 5 through: the training grid (``LDMTask.generate``) in batches
of 4 and of 3, ``sampling.generate`` on the export in batches of 1, ``launch/sample.py``'s ``run``
(PNGs), and the FID generator (``evaluation.generate.generate_samples``) with chunks of 2 and 3.
Writes ``<out>/images.pt`` (float images by route) for the test to compare.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_scale import config as config_lib
from ldm_scale import dist
from ldm_scale.diffusion import SamplerConfig
from ldm_scale.diffusion.noise import PerSampleGenerators, initial_noise
from ldm_scale.evaluation.config import FIDEvalConfig
from ldm_scale.evaluation.generate import generate_samples, load_samples
from ldm_scale.evaluation.model_sampler import load_model_sampler
from ldm_scale.sampling import SampleConfig, generate, load_checkpoint, run
from ldm_scale.train.tasks import build_task

PROMPTS = ["a red circle", "a blue square on green", "two white triangles", "a yellow star"]
SEED = 5
SAMPLER = SamplerConfig(name="ddim", steps=3, eta=1.0, guidance_scale=3.0)


def main() -> int:
    out = Path(sys.argv[1])
    dist.init_distributed()
    cfg = config_lib.to_object(config_lib.compose([
        "experiment=quickstart", "model.allow_random_first_stage=true", "data.urls=['unused.tar']",
        "checkpoint.root=/tmp/unused", "logger=none", "deepspeed.precision=fp32", "model.scale_factor_mode=spec"]))
    plan = config_lib.validate(cfg, 1, check_files=False)
    task = build_task(cfg, plan, device=torch.device("cpu"), total_steps=10)
    with torch.no_grad():  # non-zero output convs, so samples depend on the weights and the noise
        for p in task.ldm.unet.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
    export = str(out / "export.pt")
    task.export(export, ema=None, config=config_lib.resolved_dict(cfg), step=1)
    routes = {
        "grid_batch4": task.generate(PROMPTS, seed=SEED, sampler=SAMPLER, batch_size=4),
        "grid_batch3": task.generate(PROMPTS, seed=SEED, sampler=SAMPLER, batch_size=3),
    }
    loaded = load_checkpoint(export, use_ema=False, device=torch.device("cpu"))
    shape = (plan.latent_channels, plan.latent_size, plan.latent_size)
    routes["sampling_batch1"] = torch.cat([
        generate(loaded, [prompt], 1, SAMPLER, height=plan.image_size, width=plan.image_size,
                 generator=PerSampleGenerators(SEED, [i]), x_T=initial_noise(shape, [i], SEED))
        for i, prompt in enumerate(PROMPTS)])
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    summary = run(SampleConfig(ckpt=export, from_file=str(prompts_file), n_samples=4, seed=SEED, use_ema=False,
                               sampler=SAMPLER, outdir=str(out / "sample_cli"),
                               progress=False))
    routes["sample_cli_png"] = torch.stack([
        torch.from_numpy(np.asarray(Image.open(s["path"]))).permute(2, 0, 1) for s in summary["samples"]])
    for chunk in (2, 3):
        fid = FIDEvalConfig(ckpt=export, n_samples=4, batch_size=chunk, sampler=SAMPLER, seed=SEED, use_ema=False)
        sampler = load_model_sampler(fid, torch.device("cpu"))
        url = str(out / f"fid_chunk{chunk}")
        generate_samples(sampler.sample_batch, samples_url=url, n_samples=4, chunk_size=chunk, seed=SEED,
                         latent_shape=sampler.latent_shape, conditions=PROMPTS)
        routes[f"fid_chunk{chunk}_uint8"] = torch.from_numpy(load_samples(url, 4, chunk)["images"]).permute(0, 3, 1, 2)
    torch.save({k: v.contiguous() for k, v in routes.items()}, out / "images.pt")
    print("RESULT ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
