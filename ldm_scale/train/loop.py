"""The training spine: build -> resume -> loop { batch -> step -> log -> maybe sample -> maybe
checkpoint } -> final checkpoint.

``train(cfg)`` is the whole program behind ``launch/train.py``. It reads top to bottom; everything
a step computes lives in the task (``train/tasks.py``), everything DeepSpeed in
``train/engine.py``, everything about checkpoints in ``train/checkpoint.py``.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

import numpy as np

from ldm_scale import config as config_lib
from ldm_scale import dist, preemption, storage
from ldm_scale.config import Config
from ldm_scale.data import build_loader
from ldm_scale.logging import MetricMeter, RunLogger, Throughput, console_line, peak_flops_per_device, sum_over_ranks
from ldm_scale.train.ema import CpuEma
from ldm_scale.train.tasks import build_task

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when the loss stayed NaN/inf for too many consecutive micro-batches."""


class NonFiniteGuard:
    """Counts skipped micro-batches; K in a row stops training (the weights were never touched by
    the bad batches, and no checkpoint is written on this path)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def update(self, metrics: Dict[str, float], step: int) -> None:
        if metrics.get("nonfinite", 0.0) > 0:
            self.in_a_row += 1
            self.total += 1
            if self.in_a_row >= self.limit:
                raise NonFiniteLossError(
                    f"the loss was NaN/inf on {self.in_a_row} consecutive micro-batches at optimizer step {step} "
                    f"({self.total} skipped in all); training stopped without saving these weights. Lower "
                    "optim.lr, raise optim.warmup_steps, use deepspeed.precision=bf16 instead of fp16, or check the "
                    "data; resume from the last checkpoint (train.max_consecutive_nonfinite sets the limit)")
        else:
            self.in_a_row = 0


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    step: int
    samples_seen: int
    final_metrics: Dict[str, float] = field(default_factory=dict)


def _progress_bar(enabled: bool, initial: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")


def prompt_adherence_eval(task, num_samples: int, seed: int, sampler) -> Dict[str, float]:
    """Generate ``num_samples`` images for random synthetic-shapes prompts and score them with the
    dataset's attribute detector (chance level is ``CHANCE_ADHERENCE``). Collective."""
    from ldm_scale.data.synthetic import CHANCE_ADHERENCE, prompt_adherence, random_attributes

    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(num_samples):
        a = random_attributes(rng)
        prompts.append(f"a {a.colour} {a.shape} on a {a.background} background")
    images = task.generate(prompts, seed=seed, sampler=sampler)
    return {"eval/prompt_adherence": prompt_adherence(images, prompts),
            "eval/prompt_adherence_chance": CHANCE_ADHERENCE}


def train(cfg: Config) -> TrainResult:
    # --- 1. Topology, validated plan, run identity ------------------------------------------
    info = dist.init_distributed()
    plan = config_lib.validate(cfg, info.world_size)  # before anything is allocated
    storage.configure(cfg.storage)
    preemption.install(cfg.preemption)
    run_id = config_lib.resolve_run_id(cfg)
    run_dir = Path(cfg.output_dir) / run_id
    if info.is_main:
        config_lib.write_resolved(cfg, plan, run_dir)
        log.info("run %s in %s: %s", run_id, run_dir, plan.describe())
    resolved = config_lib.resolved_dict(cfg)
    device = dist.default_device(info)

    # --- 2. Data, task (models + engines), EMA ----------------------------------------------
    loader = build_loader(cfg.data, info, batch_size=plan.batch.micro_batch_size, seed=cfg.seed)
    task = build_task(cfg, plan, device=device, total_steps=cfg.train.max_steps)
    ema = (CpuEma(task.ema_module.named_parameters(), cfg.ema, info)
           if cfg.ema.enabled and task.ema_module is not None else None)

    # --- 3. Resume (all ranks): engines, EMA, data position, RNG, task state ------------------
    from ldm_scale.train.checkpoint import CheckpointManager

    checkpoints = CheckpointManager(cfg.checkpoint, run_id=run_id, storage_cfg=cfg.storage)
    resumed = checkpoints.resume(engines=task.engines, ema=ema, loader=loader) or {}
    task.load_client_state(resumed)
    samples_seen = int(resumed.get("samples_seen", 0))
    step = task.global_step

    # --- 4. Tracking ------------------------------------------------------------------------
    logger = RunLogger(cfg.logger, run_id=resumed.get("wandb_run_id", run_id), name=cfg.name, run_dir=run_dir,
                       resolved_config=resolved)
    throughput = Throughput(info.world_size, task.train_flops_per_sample(), peak_flops_per_device(cfg.logger.peak_tflops))
    meter = MetricMeter()
    guard = NonFiniteGuard(cfg.train.max_consecutive_nonfinite)
    progress = _progress_bar(info.is_main and cfg.train.progress_bar, step, cfg.train.max_steps)

    wandb_run_id = resumed.get("wandb_run_id", run_id)

    def client_state() -> Dict[str, Any]:
        return {"step": step, "samples_seen": samples_seen, "wandb_run_id": wandb_run_id, "config": resolved,
                **task.client_state()}

    def save_checkpoint() -> None:
        checkpoints.save(step, engines=task.engines, ema=ema, loader=loader, client_state=client_state())

    sample_with_ema = ema is not None and cfg.eval.use_ema

    def sampling_weights():
        """EMA weights in the model while sampling (restored after), or the raw ones."""
        return ema.swapped_in() if sample_with_ema else contextlib.nullcontext()

    def log_samples() -> None:
        with sampling_weights():
            images = task.log_images(step)
        for key, grid, captions in images:
            logger.log_images(key, grid, step, captions)

    # --- 5. The loop -------------------------------------------------------------------------
    batches = loader.infinite()
    stopped_early = False
    try:
        while step < cfg.train.max_steps:
            metrics = task.train_step(next(batches))
            guard.update(metrics, step)  # raises after K non-finite micro-batches in a row
            meter.add(metrics)
            if task.global_step == step:
                continue  # accumulating gradients (or a skipped micro-batch)
            step = task.global_step
            samples_seen += plan.batch.global_batch_size
            throughput.add(plan.batch.global_batch_size)
            if ema is not None:
                ema.update(step)
            if progress is not None:
                progress.update(1)

            if step % cfg.train.log_every == 0:
                values = {f"train/{k}": v for k, v in meter.reduce().items() if k != "nonfinite"}
                values.update(task.optimizer_stats())
                values.update(throughput.read())
                values.update({f"data/{k}": v for k, v in sum_over_ranks(loader.metrics()).items()})
                values["train/nonfinite_skipped_total"] = float(guard.total)
                values["train/samples_seen"] = float(samples_seen)
                if ema is not None:
                    values["ema/decay"] = float(ema.decay_at(step))
                logger.log(values, step=step)
                if progress is not None:
                    progress.set_postfix_str(console_line(step, cfg.train.max_steps, values,
                                                          ["train/loss", "lr", "grad_norm", "perf/samples_per_s"]))
            if cfg.eval.sample_every and step % cfg.eval.sample_every == 0:
                log_samples()
            if checkpoints.due(step):
                save_checkpoint()
            if preemption.requested(step):
                if not checkpoints.due(step):
                    save_checkpoint()
                checkpoints.wait()
                preemption.acknowledge(step, storage.redact(checkpoints.step_url(step)))
                stopped_early = True
                break
    except NonFiniteLossError:
        # Every rank raised at the same micro-batch: earlier checkpoints still finish uploading
        # (a collective, safe here); the bad weights were never stepped, and nothing is saved.
        checkpoints.close()
        logger.finish(exit_code=1)
        raise
    except BaseException:
        logger.finish(exit_code=1)  # local only: other ranks may not have failed
        raise

    # --- 6. The end: final checkpoint, samples, export ----------------------------------------
    if progress is not None:
        progress.close()
    final: Dict[str, float] = {}
    if not stopped_early:
        if cfg.checkpoint.save_final and checkpoints.last_saved_step != step:
            save_checkpoint()
        if cfg.eval.sample_at_end:
            log_samples()
        if cfg.eval.prompt_adherence_samples > 0:
            with sampling_weights():
                final.update(prompt_adherence_eval(task, cfg.eval.prompt_adherence_samples, cfg.eval.seed,
                                                   cfg.eval.sampler))
            logger.log(final, step=step)
            logger.summary(final)
        if cfg.checkpoint.export_final:
            task.export(storage.join(cfg.checkpoint.root, run_id, "export.pt"), ema=ema, config=resolved, step=step)
        checkpoints.wait()
    checkpoints.close()
    if ema is not None:
        ema.close()
    if info.is_main:
        summary = {"run_id": run_id, "step": step, "samples_seen": samples_seen,
                   "sample_weights": "ema" if sample_with_ema else "raw", **final}
        (run_dir / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("finished at step %d: %s", step, summary)
    logger.finish()
    dist.barrier()
    return TrainResult(run_id=run_id, run_dir=run_dir, step=step, samples_seen=samples_seen, final_metrics=final)
