"""Worker for tests/integration/test_precomputed_text.py: the tiny LDM with a frozen OpenCLIP text
encoder trained for a few steps through ``build_task`` in a world of one on latent shards, once
encoding the captions in the step (tokens from the data workers) and once reading the shards'
precomputed outputs (``data.text_embeddings=true``), same seeds. Prints ``RESULT {json}``."""
from __future__ import annotations

import json
import sys

import torch

from ldm_scale import config as config_lib
from ldm_scale import dist
from ldm_scale.data import build_loader
from ldm_scale.train.health import StepHealth
from ldm_scale.train.tasks import build_task


def run(latent_url: str, clip_overrides: list, precomputed: bool, steps: int) -> dict:
    cfg = config_lib.to_object(config_lib.compose([
        "experiment=quickstart", "model.allow_random_first_stage=true", "model=tiny", *clip_overrides,
        "data.input=latent", f"data.text_embeddings={str(precomputed).lower()}", f"data.urls=['{latent_url}']",
        "data.num_workers=0", "train.micro_batch_size=4", "checkpoint.root=/tmp/unused", "logger=none",
        "deepspeed.zero.stage=0", "diffusion.cond_drop_prob=0.5", "model.scale_factor_mode=spec"]))
    plan = config_lib.validate(cfg, 1)
    loader = build_loader(cfg.data, dist.get_dist_info(), batch_size=4, seed=0)
    task = build_task(cfg, plan, device=torch.device("cpu"), total_steps=10)
    loader.tokenize = task.caption_tokenizer()
    batches, health = loader.infinite(), StepHealth(3)
    losses, keys = [], []
    for step in range(steps):
        batch = next(batches)
        keys.append(sorted(k for k in batch if k not in ("key", "caption")))
        losses.append(health.decide(task.train_step([batch], step).health, step).loss)
    prompt_grid = task.generate(["a red circle on a blue background"], seed=0, sampler=cfg.eval.sampler)
    return {"precomputed": precomputed, "losses": losses, "batch_keys": keys,
            "tokenizer_in_workers": loader.tokenize is not None,
            "cond_stage_params": sum(p.numel() for p in task.ldm.cond_stage.parameters()),
            "cond_stage": type(task.ldm.cond_stage).__name__, "grid_shape": list(prompt_grid.shape),
            "grid": prompt_grid.flatten()[:64].tolist()}


def main() -> int:
    dist.init_distributed()
    latent_url, overrides = sys.argv[1], json.loads(sys.argv[2])
    results = [run(latent_url, overrides, precomputed, steps=3) for precomputed in (False, True)]
    print("RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    dist.run_entry_point(main)
