"""End-of-run evaluations the training loop runs on the trained model, behind one interface, so the
spine (``train/loop.py``) knows no dataset: it asks :func:`end_of_run_hooks` what to run, asks each
hook whether it applies to this run, and logs what it returns.

A hook has a ``name`` (the key in ``result.json``'s ``skipped_evals``), ``skip_reason(cfg, info)``
(None: run it; else why not, the same on every rank: a collective; ``skip_notice(cfg, reason)`` is
the console line that says so) and ``run(task, cfg)`` (metrics
``{"eval/...": value}``; collective: every rank generates its share). The loop runs hooks under the
weights the run samples with (the EMA when there is one).

The one hook today scores prompt adherence on the synthetic shapes dataset (its attribute detector
is the only caption-image checker that needs no downloaded model); in-training FID and others
belong here too.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol

import numpy as np

from ldm_scale import dist


class EvalHook(Protocol):
    name: str

    def skip_reason(self, cfg: Any, info: dist.DistInfo) -> Optional[str]: ...

    def skip_notice(self, cfg: Any, reason: str) -> str: ...

    def run(self, task: Any, cfg: Any) -> Dict[str, float]: ...


class ShapesPromptAdherence:
    """``eval.prompt_adherence_samples`` images for random synthetic-shapes prompts, scored by the
    dataset's attribute detector (chance level ``CHANCE_ADHERENCE``)."""

    name = "prompt_adherence"

    def skip_reason(self, cfg: Any, info: dist.DistInfo) -> Optional[str]:
        """The shapes detector scores shapes prompts: on other shards (an experiment used as a
        template) the number would look like a result and mean nothing, so the training data must
        carry the synthetic dataset's card (``ldm_scale.data.synthetic.not_synthetic_reason``)."""
        from ldm_scale.data.synthetic import not_synthetic_reason

        # Rank 0 reads the cards and every rank follows its answer: the scoring that follows is collective.
        return dist.broadcast_object(not_synthetic_reason(cfg.data.urls, cfg.data.storage) if info.is_main else None)

    def skip_notice(self, cfg: Any, reason: str) -> str:
        return (f"eval.prompt_adherence_samples={cfg.eval.prompt_adherence_samples}: not scored, the "
                f"synthetic-shapes detector applies only to the synthetic shapes data and {reason} (set "
                "eval.prompt_adherence_samples=0 to silence this)")

    def run(self, task: Any, cfg: Any) -> Dict[str, float]:
        from ldm_scale.data.synthetic import CHANCE_ADHERENCE, prompt_adherence, random_attributes

        rng = np.random.default_rng(cfg.eval.seed)
        prompts = []
        for _ in range(cfg.eval.prompt_adherence_samples):
            a = random_attributes(rng)
            prompts.append(f"a {a.colour} {a.shape} on a {a.background} background")
        images = task.generate(prompts, seed=cfg.eval.seed, sampler=cfg.eval.sampler)
        return {"eval/prompt_adherence": prompt_adherence(images, prompts),
                "eval/prompt_adherence_chance": CHANCE_ADHERENCE}


def end_of_run_hooks(cfg: Any) -> List[EvalHook]:
    """The evaluations ``cfg`` asks for at the end of a completed run, in order."""
    hooks: List[EvalHook] = []
    if cfg.eval.prompt_adherence_samples > 0:
        hooks.append(ShapesPromptAdherence())
    return hooks
