"""Training in stages: progressive resolution and batch schedules within one run.

Stable Diffusion trained at 256² and then 512² (the v1 model card; MosaicML's SD2 recipe does the
same), each phase with its own data pipeline, batch size and learning rate. ``train.stages`` says
it in the run's configuration::

    train:
      max_steps: 200000
      stages:
        - {start_step: 0, overrides: []}
        - {start_step: 150000, overrides: [data.resolution=512, model.ldm.image_size=512,
                                           train.micro_batch_size=8, optim.lr=5e-5]}

Stage ``k`` runs optimizer steps ``[start_k, start_{k+1})`` (the last one up to ``train.max_steps``)
with the base configuration and its overrides. What may change is what can change between two
optimizer steps without touching the weights' layout: everything under ``data.`` and ``eval.``, the
batch arithmetic, the learning-rate settings and the model's image size (the UNet is
convolutional; a DiT needs sin-cos positions, which extend to any grid). Anything else is refused
up front, with the key.

How a stage ends and the next begins (``train/loop.py``): at the boundary step the loop saves a
checkpoint, rebuilds the task (engines with the stage's batch) and the loader for the new stage,
and resumes from that checkpoint: weights, optimizer, EMA and RNG carry over, the data of the new
stage starts at its epoch 0 (the loader's state records its stage, ``ShardLoader.stage``). A restart
lands in the stage of the checkpoint it resumes from (:func:`stage_at`). The learning-rate schedule
is the formula over the run's global step with the stage's settings (a stage sets its peak rate).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm_scale.config.schema import Config, ConfigError

# Keys a stage may override: a prefix ending in "." covers a whole group.
STAGE_KEYS = ("data.", "eval.", "model.ldm.image_size", "train.micro_batch_size", "train.global_batch_size",
              "train.gradient_accumulation_steps", "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio",
              "optim.scale_lr", "optim.schedule")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _allowed(key: str) -> bool:
    return any(key.startswith(k) if k.endswith(".") else key == k for k in STAGE_KEYS)


def stage_problems(cfg: Config) -> List[str]:
    """What is wrong with ``train.stages`` itself (not the stages' configurations), one line each."""
    stages, problems = cfg.train.stages, []
    if not stages:
        return problems
    starts = [s.start_step for s in stages]
    if starts[0] != 0:
        problems.append(f"train.stages[0].start_step={starts[0]}: the first stage starts at step 0")
    for i in range(1, len(starts)):
        if starts[i] <= starts[i - 1]:
            problems.append(f"train.stages[{i}].start_step={starts[i]} is not after stage {i - 1}'s {starts[i - 1]}: "
                            "list the stages in order of their start steps")
    if starts[-1] >= cfg.train.max_steps:
        problems.append(f"train.stages[{len(starts) - 1}].start_step={starts[-1]} is not before "
                        f"train.max_steps={cfg.train.max_steps}: a stage must run at least one step")
    for i, stage in enumerate(stages):
        for override in stage.overrides:
            if "=" not in override:
                problems.append(f"train.stages[{i}].overrides: {override!r} is not key=value")
            elif not _allowed(_key(override)):
                problems.append(f"train.stages[{i}].overrides: {_key(override)} cannot change between stages (the "
                                f"weights, engine and run identity stay); a stage may set {', '.join(STAGE_KEYS)}")
    return problems


def stage_configs(cfg: Config) -> List[Tuple[int, int, Config]]:
    """``(start_step, end_step, config)`` of every stage (one, the configuration itself, without
    ``train.stages``); each config has ``train.stages`` emptied. ConfigError when an override does
    not parse or has the wrong type (its key named)."""
    if not cfg.train.stages:
        return [(0, cfg.train.max_steps, cfg)]
    problems = stage_problems(cfg)
    if problems:
        raise ConfigError.of(problems)
    from ldm_scale.choices import plain_choices

    base = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stages=[]))
    starts = [s.start_step for s in cfg.train.stages] + [cfg.train.max_steps]
    out = []
    for i, stage in enumerate(cfg.train.stages):
        try:
            tree = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(list(stage.overrides)))
            stage_cfg = OmegaConf.to_object(tree)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None)
            raise ConfigError(f"train.stages[{i}].overrides: {str(exc).strip().splitlines()[0]}"
                              + (f" (key {key})" if key else "")) from None
        plain_choices(stage_cfg)
        out.append((starts[i], starts[i + 1], stage_cfg))
    return out


def stage_at(starts: Sequence[int], step: int) -> int:
    """Index of the stage that runs optimizer step ``step + 1`` (the next one) given the stages'
    start steps: a checkpoint saved at a boundary resumes into the stage that starts there."""
    return max(i for i, start in enumerate(starts) if start <= step)


def describe(stages: Sequence[Tuple[int, int, Config]], index: Optional[int] = None) -> str:
    parts = [f"stage {i}: steps {a}-{b}" + (" (now)" if i == index else "") for i, (a, b, _) in enumerate(stages)]
    return "; ".join(parts)


def stage_data_seed(seed: int, stage: int) -> int:
    """The data loader's seed in ``stage``: the run's seed in the first, a derived one after, so a
    later stage reading the same shards does not replay the first stage's sample order."""
    if stage == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed % (1 << 63), stage, 0x57A6E]).generate_state(1)[0])
