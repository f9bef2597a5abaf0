"""Worker for tests/integration/test_val_loss.py: the fixed-timestep validation loss of a freshly
built quickstart task (same seed, so the same weights on any world size and ZeRO stage), twice in
a row, for each ZeRO stage given. Prints ``RESULT {json}`` (``{stage: record}``) on rank 0.

    torchrun --nproc_per_node N _val_loss_driver.py <train urls> <val urls> <zero stage>[,<zero stage>...]
"""
from __future__ import annotations

import json
import sys

import torch

from ldm_scale import config as config_lib
from ldm_scale import dist
from ldm_scale.evaluation.val_loss import FixedTimestepValidation
from ldm_scale.train.tasks import build_task


def measure(train_url: str, val_url: str, stage: int) -> dict:
    overrides = ["experiment=quickstart", "model.allow_random_first_stage=true", f"data.urls=['{train_url}']",
                 "data.num_workers=0", "train.micro_batch_size=2", f"deepspeed.zero.stage={stage}",
                 "checkpoint.root=/tmp/unused", "logger=none", "eval.val_every=1", f"eval.val_data=['{val_url}']",
                 "eval.val_samples=20", "eval.val_batch_size=6", "model.scale_factor_mode=spec"]
    cfg = config_lib.to_object(config_lib.compose(overrides))
    plan = config_lib.validate(cfg, dist.get_dist_info().world_size, check_files=False)
    task = build_task(cfg, plan, device=torch.device("cpu"), total_steps=10)
    validation = FixedTimestepValidation.for_run(cfg)
    first, second = validation.run(task), validation.run(task)
    return {"first": first, "second": second, "n": len(validation._held["index"])}


def main() -> int:
    train_url, val_url, stages = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
    dist.init_distributed()
    results = {str(stage): measure(train_url, val_url, stage) for stage in stages}
    if dist.get_dist_info().is_main:
        print("RESULT " + json.dumps(results), flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
