"""FID during training (``eval.fid.*``) through exactly the code of ``eval/fid.py``.

:func:`fid_eval_config` turns a training run's config into the :class:`FIDEvalConfig` that
``eval/fid.py`` would be given for the same evaluation (sampler ``eval.sampler``, seed ``eval.seed``,
the run's precision and storage), and :func:`run_in_training_fid` hands the live model to
:func:`~ldm_scale.evaluation.evaluate.run_fid_eval` as its model sampler. Conditions, per-sample
noise, chunking, features, the cached reference and the metrics are therefore those of the offline
command: ``tests/integration/test_in_training_fid.py`` checks that the number equals
``eval/fid.py`` on the run's export. Each evaluation writes its samples, features and
``results.json`` under ``<run dir>/fid/step_<N>/``; the reference statistics are computed once (next
to the reference shards) and reused.

Every rank must call it (generation and feature extraction are split over ranks). ZeRO-3 is
refused by ``validate()``: there the forward passes gather parameters collectively, and the offline
chunk split gives ranks unequal numbers of batches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from ldm_scale.evaluation.config import ExtractorConfig, FIDEvalConfig, MetricsConfig


def fid_eval_config(cfg, out: str) -> FIDEvalConfig:
    """``eval/fid.py``'s config for the training run ``cfg``'s in-training FID, writing to ``out``."""
    f = cfg.eval.fid
    extractor = ExtractorConfig(name=f.extractor, weights=f.extractor_weights, sha256=f.extractor_sha256,
                                input_size=f.extractor_input_size,
                                allow_download=False)
    metrics = MetricsConfig(fid=True, inception_score=False, precision_recall=f.precision_recall, kid=f.kid,
                            kid_subset_size=f.kid_subset_size)
    fcfg = FIDEvalConfig(ckpt=f"live model of run {cfg.run_id or cfg.name}", ref=f.ref, out=out, n_samples=f.n_samples, batch_size=f.batch_size,
                         sampler=cfg.eval.sampler, seed=cfg.eval.seed, extractor=extractor, metrics=metrics,
                         precision=cfg.deepspeed.precision, storage=cfg.storage, keep_samples=False)
    fcfg.logger.backend = "none"  # the training run logs the numbers (eval/fid, eval/kid, ...)
    return fcfg


def run_in_training_fid(task, cfg, step: int, run_dir: Path) -> Dict[str, Any]:
    """``{"eval/fid": ..., "eval/kid": ...}`` for the weights now in ``task`` (collective)."""
    from ldm_scale import dist
    from ldm_scale.evaluation.evaluate import run_fid_eval

    fcfg = fid_eval_config(cfg, str(run_dir / "fid" / f"step_{step}"))
    record = run_fid_eval(fcfg, model_sampler=task.model_sampler(fcfg.sampler, fcfg.precision, step=step))
    metrics = dist.broadcast_object(record["metrics"] if record is not None else None)
    return {f"eval/{k}": float(v) for k, v in metrics.items()}
