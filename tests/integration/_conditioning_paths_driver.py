"""Worker for tests/integration/test_conditioning_paths.py: two optimizer steps of the tiny LDM with
each kind of conditioner, through ``build_task`` in a world of one, on synthetic shards: a jointly
trained text transformer and class embedding (inside the engine) and the unconditional model's null
conditioner (frozen: run by the task, outside the engine). Prints ``RESULT {json}``."""
from __future__ import annotations

import json
import sys

import torch

from ldm_scale import config as config_lib
from ldm_scale import dist
from ldm_scale.data import build_loader
from ldm_scale.train.health import StepHealth
from ldm_scale.train.tasks import build_task


def run(data_url: str, flavour: str, conditioning: str) -> dict:
    cfg = config_lib.to_object(config_lib.compose([
        "experiment=quickstart", "model.allow_random_first_stage=true", f"model={flavour}",
        f"data.conditioning={conditioning}", f"data.urls=['{data_url}']", "data.num_workers=0",
        "train.micro_batch_size=2", "checkpoint.root=/tmp/unused", "logger=none", "deepspeed.zero.stage=0"]))
    plan = config_lib.validate(cfg, 1, check_files=False)
    loader = build_loader(cfg.data, dist.get_dist_info(), batch_size=2, seed=0, uint8_images=True)
    task = build_task(cfg, plan, device=torch.device("cpu"), total_steps=10)
    loader.tokenize = task.caption_tokenizer()
    batches, health = loader.infinite(), StepHealth(3)
    verdicts = [health.decide(task.train_step([next(batches)], step).health, step) for step in range(2)]
    return {"flavour": flavour, "healthy": [v.healthy for v in verdicts], "losses": [v.loss for v in verdicts],
            "engine_submodules": sorted(task.engine.module._modules),
            "conditions_inside": task.train_module.conditions_inside}


def main() -> int:
    dist.init_distributed()
    results = [run(sys.argv[1], flavour, cond) for flavour, cond in
               [("tiny", "text"), ("tiny_cin", "class"), ("tiny_uncond", "none")]]
    print("RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
