"""Worker for tests/unit/test_compile.py: builds tasks through ``build_task`` in a world-1 process
(plain python: ``dist.init_distributed()`` makes a one-process group) and reports, per run, which
modules ``train.compile`` compiled, which became ZeRO-3 leaves, the engines' state-dict keys and,
for ``steps`` > 0, the losses of that many optimizer steps on fixed synthetic batches together with
dynamo's graph and graph-break counts. Prints ``RESULT {json}``.

argv[1]: JSON list of runs ``{"experiment", "stage", "compile", "steps"}``.
"""
from __future__ import annotations

import json
import sys

import torch

from ldm_scale import config as config_lib
from ldm_scale import dist
from ldm_scale.train.compile import is_compiled
from ldm_scale.train.tasks import build_task

CAPTIONS = ["a red circle on a blue background", "a white triangle on a green background"]


def batches(steps: int, size: int = 2):
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator),
             "caption": CAPTIONS[:size]} for _ in range(steps)]


def run(spec: dict) -> dict:
    overrides = [f"experiment={spec['experiment']}", "data.urls=['/tmp/unused/{0..3}.tar']", "data.num_workers=0",
                 "train.micro_batch_size=2", "train.gradient_accumulation_steps=1",
                 f"deepspeed.zero.stage={spec['stage']}", "checkpoint.root=/tmp/unused", "logger=none",
                 f"train.compile={spec['compile']}", "model.activation_checkpointing=true"]
    if spec["experiment"] == "quickstart":
        overrides += ["model.allow_random_first_stage=true", "model.scale_factor_mode=spec",
                      "deepspeed.zero.stage3_param_persistence_threshold=0"]
    else:
        overrides += ["autoencoder_loss.disc_start=0"]  # the adaptive GAN weight from the first step
    cfg = config_lib.to_object(config_lib.compose(overrides))
    plan = config_lib.validate(cfg, 1, check_files=False)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    task = build_task(cfg, plan, device=torch.device("cpu"), total_steps=100)
    out: dict = {"compiled": {}, "keys": {}, "leaves": []}
    for name, engine in task.engines.items():
        out["compiled"][name] = [n for n, m in engine.module.named_modules() if is_compiled(m)]
        out["keys"][name] = list(engine.module.state_dict())
        out["leaves"] += [f"{name}:{n}" for n, m in engine.module.named_modules() if getattr(m, "_z3_leaf", False)]
    if hasattr(task, "ldm"):
        out["compiled"]["first_stage"] = [n for n, m in task.ldm.first_stage.named_modules() if is_compiled(m)]
    losses = []
    for step, batch in enumerate(batches(spec.get("steps", 0))):
        metrics = task.train_step([batch], step).metrics
        losses.append(float(metrics["loss"][0]))
    out["losses"] = losses
    out["graph_breaks"] = sum(counters["graph_break"].values())
    out["graphs"] = counters["stats"]["unique_graphs"]
    return out


def main() -> int:
    dist.init_distributed()
    results = [run(spec) for spec in json.loads(sys.argv[1])]
    print("RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
