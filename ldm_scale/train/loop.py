"""The training spine: build -> resume -> loop { batch -> step -> log -> maybe sample -> maybe
checkpoint } -> final checkpoint.

``train(cfg)`` is the whole program behind ``launch/train.py``. It reads top to bottom; everything
a step computes lives in the task (``train/tasks.py``), everything DeepSpeed in
``train/engine.py``, everything about checkpoints in ``train/checkpoint/``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional


from ldm_scale import config as config_lib
from ldm_scale.config import stages as stage_lib
from ldm_scale import dist, preemption, storage
from ldm_scale.config import Config
from ldm_scale.data import build_loader
from ldm_scale.data.device import DeviceHandoff
from ldm_scale.evaluation.run_hooks import end_of_run_hooks
from ldm_scale.evaluation.in_training import run_in_training_fid
from ldm_scale.evaluation.val_loss import FixedTimestepValidation
from ldm_scale.logging import (METRICS_FILE, MetricMeter, RunLogger, Throughput, console_line, history_step,
                               peak_flops_per_device, sum_over_ranks, truncate_metrics)
from ldm_scale.train.checkpoint import CheckpointError, CheckpointManager, standard_states
from ldm_scale.train import engine as ds_engine
from ldm_scale.train.ema import CpuEma
from ldm_scale.train.health import LOSS_SCALE_KEY, LossSpikeDetector, Spike, StepHealth, UnhealthyRunError
from ldm_scale.train.lease import LeaseHeldError, RunLease
from ldm_scale.train.run_records import STOP_COMPLETED, RunSummary, record_event, write_run_report
from ldm_scale.train.tasks import build_task

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    step: int
    samples_seen: int
    final_metrics: Dict[str, float] = field(default_factory=dict)
    stop_reason: str = "completed"


def _progress_bar(enabled: bool, initial: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")


class GarbageCollection:
    """``train.gc_every``: Python's cyclic collector off inside the loop, generation 1 collected every
    N optimizer steps on every rank at once (the full collection runs at each checkpoint)."""

    def __init__(self, every: int):
        self.every = every
        if every > 0:
            gc.collect()
            gc.freeze()  # start-up objects (modules, configs) never need scanning again
            gc.disable()

    def after_step(self, step: int) -> None:
        if self.every > 0 and step % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        if self.every > 0:
            gc.unfreeze()
            gc.enable()


RUN_REFUSED_OR_STOPPED = (LeaseHeldError, CheckpointError, UnhealthyRunError, storage.StorageError)
"""Errors that end a run by design, with a message that says what to do (launch/train.py prints
them as one line)."""


def _take_ownership(cfg: Config, checkpoints, run_dir: Path, info: dist.DistInfo) -> Optional[RunLease]:
    """Rank 0 takes the run lease and checks the run directory's history against the checkpoint
    store, before anything is written; every rank raises the same error if either fails."""
    lease, error = None, None
    if info.is_main:
        try:
            if cfg.checkpoint.lease.enabled:
                lease = RunLease(cfg.checkpoint.lease, checkpoints.run_url, cfg.storage)
                lease.acquire()
            checkpoints.refuse_lost_history(history_step(run_dir / METRICS_FILE))
        except (LeaseHeldError, CheckpointError, storage.StorageError) as exc:
            error = (type(exc).__name__, storage.redact(exc))
            if lease is not None and not isinstance(exc, LeaseHeldError):
                lease.release()
    error = dist.broadcast_object(error)
    if error is not None:
        kind, message = error
        raise (LeaseHeldError if kind == "LeaseHeldError" else CheckpointError)(message)
    return lease


def train(cfg: Config) -> TrainResult:
    """Run (or resume) one training run; the run lease is held for exactly its lifetime."""
    info = dist.init_distributed(timeout_s=cfg.train.collective_timeout_s)
    plan = config_lib.validate(cfg, info.world_size)  # before anything is allocated (every stage)
    storage.configure(cfg.storage)
    preemption.install(cfg.preemption)
    run_id = config_lib.resolve_run_id(cfg)
    run_dir = Path(cfg.output_dir) / run_id
    checkpoints = CheckpointManager(cfg.checkpoint, run_id=run_id, storage_cfg=cfg.storage)
    lease = _take_ownership(cfg, checkpoints, run_dir, info)
    try:
        if not cfg.train.stages:
            return _train(cfg, plan, info, run_id, run_dir, checkpoints, lease)
        return _train_stages(cfg, info, run_id, run_dir, checkpoints, lease)
    finally:
        if lease is not None:
            lease.release()


def _train_stages(cfg: Config, info: dist.DistInfo, run_id: str, run_dir: Path, checkpoints,
                  lease: Optional[RunLease]) -> TrainResult:
    """``train.stages`` (config/stages.py): the stage the resumed checkpoint is in, then each next
    one, every stage a :func:`_train` up to its end step over a task and loader built for it, joined
    by the checkpoint saved at the boundary (resumed with ``resume=auto``, whatever the first
    stage's ``checkpoint.resume`` said)."""
    stages = stage_lib.stage_configs(cfg)
    index = stage_lib.stage_at([start for start, _, _ in stages], checkpoints.resume_step() or 0)
    while True:
        start, end, stage_cfg = stages[index]
        if info.is_main:
            log.info("training in stages: %s", stage_lib.describe(stages, index))
        plan = config_lib.validate(stage_cfg, info.world_size, check_files=False)  # checked in train()
        last = index == len(stages) - 1
        result = _train(stage_cfg, plan, info, run_id, run_dir, checkpoints, lease,
                        stage=index, stage_start=start, until=end, last_stage=last)
        if last or result.stop_reason != STOP_COMPLETED:
            return result
        index += 1
        checkpoints = CheckpointManager(dataclasses.replace(cfg.checkpoint, resume="auto"), run_id=run_id,
                                        storage_cfg=cfg.storage)


def _train(cfg: Config, plan, info: dist.DistInfo, run_id: str, run_dir: Path, checkpoints,
           lease: Optional[RunLease], *, stage: int = 0, stage_start: int = 0, until: Optional[int] = None,
           last_stage: bool = True) -> TrainResult:
    """The run, or with ``train.stages`` one stage of it: optimizer steps up to ``until`` (default
    ``train.max_steps``); a stage that is not the last ends with its boundary checkpoint only."""
    until = cfg.train.max_steps if until is None else until
    # --- 1. Data first (unreadable shards fail before anything is written), run identity -------
    loader = build_loader(cfg.data, info, batch_size=plan.batch.micro_batch_size,
                          seed=stage_lib.stage_data_seed(cfg.seed, stage), uint8_images=True)
    loader.stage = stage
    if info.is_main:
        config_lib.write_resolved(cfg, plan, run_dir)
        log.info("run %s in %s: %s", run_id, run_dir, plan.describe())
    resolved = config_lib.resolved_dict(cfg)
    device = dist.default_device(info)
    accumulation = plan.batch.gradient_accumulation_steps

    # --- 2. Task (models + engines), EMA -----------------------------------------------------
    task = build_task(cfg, plan, device=device, total_steps=cfg.train.max_steps)
    ema = (CpuEma(task.ema_module.named_parameters(), cfg.ema, info)
           if cfg.ema.enabled and task.ema_module is not None else None)
    if ema is not None:  # its device->host copies must finish before the next step writes the weights
        for engine in task.engines.values():
            ema.attach_to(ds_engine.inner_optimizer(engine))
    health = StepHealth(cfg.train.max_consecutive_unhealthy)
    spikes = LossSpikeDetector(cfg.train.spike)

    # --- 3. Resume (all ranks): engines, EMA, data position, task state, RNG ------------------
    states = standard_states(engines=task.engines, ema=ema, loader=loader, task=task)  # what a checkpoint holds
    resumed = checkpoints.resume(states) or {}
    step = int(resumed.get("step", 0))  # healthy optimizer steps: the run's clock
    resumed_from = step if resumed else None
    samples_seen = int(resumed.get("samples_seen", 0))
    data_position = int(resumed.get("data_position", step * accumulation))  # micro-batches drawn, this rank
    health.load_state_dict(resumed.get("health", {}))
    spikes.load_state_dict(resumed.get("spike", {}))
    if resumed:
        record_event(info, run_dir, "resume", step=step, saved_world_size=int(resumed.get("world_size", 0)),
                     world_size=info.world_size)

    # --- 4. Tracking ------------------------------------------------------------------------
    wandb_run_id = resumed.get("wandb_run_id", run_id)
    logger = RunLogger(cfg.logger, run_id=wandb_run_id, name=cfg.name, run_dir=run_dir, resolved_config=resolved,
                       start_step=step)
    throughput = Throughput(info.world_size, task.train_flops_per_sample(), peak_flops_per_device(cfg.logger.peak_tflops))
    meter = MetricMeter()
    progress = _progress_bar(info.is_main and cfg.train.progress_bar, step, cfg.train.max_steps)

    def client_state() -> Dict[str, Any]:
        return {"step": step, "samples_seen": samples_seen, "data_position": data_position,
                "wandb_run_id": wandb_run_id, "config": resolved, "health": health.state_dict(),
                "spike": spikes.state_dict()}

    slow_phase = functools.partial(dist.collective_timeout, cfg.train.collective_timeout_s)

    def save_checkpoint() -> None:
        if lease is not None:
            lease.check()  # a run that lost its lease writes nothing more
        with slow_phase():
            checkpoints.save(step, states, client_state=client_state())
            gc.collect()  # the full collection that gc_every leaves out, in a phase that is slow anyway

    sample_with_ema = ema is not None and cfg.eval.use_ema

    def sampling_weights():
        """EMA weights in the model while sampling (restored after), or the raw ones."""
        return ema.swapped_in() if sample_with_ema else contextlib.nullcontext()

    def log_samples() -> None:
        with slow_phase(), sampling_weights():
            images = task.log_images(step)
        for key, grid, captions in images:
            logger.log_images(key, grid, step, captions)

    validation = FixedTimestepValidation.for_run(cfg) if cfg.eval.val_every > 0 else None
    last_validation: Dict[str, Any] = {}

    def validate_now() -> None:
        """The fixed-timestep validation loss with the grids' weights (EMA when sampling uses it)."""
        with slow_phase(), sampling_weights():
            values = validation.run(task)
        logger.log(values, step=step)
        last_validation.clear()
        last_validation.update(values, step=step)

    last_fid: Dict[str, Any] = {}

    def fid_now() -> None:
        """eval/fid.py's evaluation of the weights the grids use (evaluation/in_training.py)."""
        with slow_phase(), sampling_weights():
            values = run_in_training_fid(task, cfg, step, run_dir)
        logger.log(values, step=step)
        last_fid.clear()
        last_fid.update(values, step=step)

    # Captions are tokenised in the data workers with the text encoder's own tokenizer (set before
    # the workers start: they receive it with their plan).
    loader.tokenize = getattr(task, "caption_tokenizer", lambda: None)()
    batches = loader.infinite()
    to_device = DeviceHandoff(device)  # uint8 images -> device (side stream on CUDA) -> [-1, 1] there

    def next_micro_batches() -> List[Dict[str, Any]]:
        nonlocal data_position
        out = []
        for _ in range(accumulation):
            batch = to_device(next(batches))
            scale = cfg.train.debug_spike.loss_scale(data_position)
            if scale != 1.0:
                batch[LOSS_SCALE_KEY] = scale
            data_position += 1
            out.append(batch)
        return out

    def roll_back(spike: Spike) -> None:
        """Reload the newest complete checkpoint from before the spike and skip the data the
        run consumed since it (health.py, the spike rule)."""
        nonlocal step, samples_seen, batches
        with slow_phase():
            _roll_back(spike)

    def _roll_back(spike: Spike) -> None:
        nonlocal step, samples_seen, batches
        checkpoints.wait()
        # Within this stage: an earlier stage's checkpoint holds another data pipeline's position.
        good = [s for s in dist.broadcast_object(checkpoints.complete_steps() if info.is_main else None)
                if stage_start <= s < spike.start_step]
        if not good or spikes.rollbacks >= cfg.train.spike.max_rollbacks:
            why = ("no complete checkpoint precedes it" if not good else
                   f"train.spike.max_rollbacks={cfg.train.spike.max_rollbacks} rollbacks were already made")
            raise UnhealthyRunError(
                f"loss spike at steps {spike.start_step}-{spike.end_step} (loss {spike.loss:.4g} > "
                f"{cfg.train.spike.factor:g} x median {spike.median:.4g}) cannot be rolled back: {why}. Lower "
                "optim.lr or check the data around this position", "loss_spike")
        target = good[-1]
        rollbacks = spikes.rollbacks + 1
        batches.close()  # stops this epoch's data workers before the loader position is replaced
        state = checkpoints.resume(states, url=checkpoints.step_url(target))
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
        events = spikes.events
        spikes.load_state_dict(state.get("spike", {}))
        skip = data_position - int(state.get("data_position", step * accumulation))
        spikes.rollbacks = rollbacks
        spikes.events = events + [{"spike_start": spike.start_step, "spike_end": spike.end_step,
                                   "loss": spike.loss, "median": spike.median, "rolled_back_to": step,
                                   "skipped_micro_batches": skip}]
        batches = loader.infinite()
        for _ in range(skip):  # deterministic: the same count on every rerun of this history
            next(batches)
        meter.clear()
        if info.is_main:
            truncate_metrics(run_dir / METRICS_FILE, step)
        log.warning("loss spike at steps %d-%d (loss %.4g > %g x median %.4g): rolled back to step %d and skipped "
                    "the %d micro-batches per rank consumed since it (rollback %d of at most %d)",
                    spike.start_step, spike.end_step, spike.loss, cfg.train.spike.factor, spike.median, step, skip,
                    rollbacks, cfg.train.spike.max_rollbacks)

    # --- 5. The loop: one iteration = one optimizer step -----------------------------------
    stop_reason = STOP_COMPLETED
    save_wanted = False
    first_step = step
    gc_control = GarbageCollection(cfg.train.gc_every)
    try:
        while step < until:
            out = task.train_step(next_micro_batches(), step)
            verdict = health.decide(out.health, step)  # one collective; raises on a streak
            if step == first_step + 1 and cfg.train.step_collective_timeout_s:
                dist.set_collective_timeout(cfg.train.step_collective_timeout_s)  # warm-up is over
            gc_control.after_step(step)
            if not verdict.healthy:
                if info.is_main:
                        log.warning("optimizer step %d skipped: %s (%d in a row, %d skipped in all)", step + 1,
                                verdict.reason.value, health.in_a_row, health.total_skipped)
                continue  # not counted: no EMA update, no LR step, no samples, no checkpoint
            step += 1
            samples_seen += plan.batch.global_batch_size
            spike = spikes.update(step, verdict.loss)
            if spike is not None:
                roll_back(spike)
                continue
            meter.add(out.metrics)
            throughput.add(plan.batch.global_batch_size)
            if ema is not None:
                ema.update(step)
            if progress is not None:
                progress.update(1)

            if step % cfg.train.log_every == 0:
                values = {f"train/{k}": v for k, v in meter.reduce().items()}
                values.update(task.optimizer_stats())
                values.update(throughput.read())
                values.update({f"data/{k}": v for k, v in sum_over_ranks(loader.metrics()).items()})
                values.update(health.metrics())
                values["train/rollbacks"] = float(spikes.rollbacks)
                values["train/samples_seen"] = float(samples_seen)
                if ema is not None:
                    values["ema/decay"] = float(ema.decay_at(step))
                logger.log(values, step=step)
                if progress is not None:
                    progress.set_postfix_str(console_line(step, cfg.train.max_steps, values,
                                                          ["train/loss", "lr", "grad_norm", "perf/samples_per_s"]))
            if cfg.eval.sample_every and step % cfg.eval.sample_every == 0:
                log_samples()
            if validation is not None and step % cfg.eval.val_every == 0:
                validate_now()
            if cfg.eval.fid.every and step % cfg.eval.fid.every == 0:
                fid_now()
            # Never checkpoint weights a spike in progress may have damaged: wait for it to clear.
            save_wanted = save_wanted or checkpoints.due(step)
            if save_wanted and not spikes.suspicious:
                save_checkpoint()
                save_wanted = False
            if preemption.requested(step):
                if checkpoints.last_saved_step != step:
                    save_checkpoint()
                with slow_phase():
                    checkpoints.wait()
                preemption.acknowledge(step, storage.redact(checkpoints.step_url(step)))
                stop_reason = f"preempted:{preemption.signal_received()}"
                break
    except UnhealthyRunError as exc:
        # Every rank raised at the same step: earlier checkpoints still finish uploading (a
        # collective, safe here); nothing is saved after the streak began.
        checkpoints.close()
        RunSummary(run_id, step, samples_seen, f"unhealthy:{exc.reason}", resumed_from,
                   rollbacks=spikes.events).write(info, run_dir)
        logger.finish(exit_code=1)
        raise
    except BaseException:
        logger.finish(exit_code=1)  # local only: other ranks may not have failed
        raise

    # --- 6. The end: final checkpoint, samples, export ----------------------------------------
    batches.close()
    loader.close()  # persistent data workers would go on decoding the next batches meanwhile
    gc_control.close()
    dist.set_collective_timeout(cfg.train.collective_timeout_s)  # the rest is slow collectives
    if progress is not None:
        progress.close()
    if stop_reason == STOP_COMPLETED and not last_stage:
        # A stage boundary: the checkpoint the next stage resumes from, and nothing of a run's end.
        if checkpoints.last_saved_step != step:
            save_checkpoint()
        checkpoints.wait()
        checkpoints.close()
        if ema is not None:
            ema.close()
        logger.finish()
        dist.barrier()
        return TrainResult(run_id=run_id, run_dir=run_dir, step=step, samples_seen=samples_seen, final_metrics={},
                           stop_reason=stop_reason)
    final: Dict[str, float] = {}
    skipped_evals: Dict[str, str] = {}
    if stop_reason == STOP_COMPLETED:
        if cfg.checkpoint.save_final and checkpoints.last_saved_step != step:
            save_checkpoint()
        if cfg.eval.sample_at_end:
            log_samples()
        if validation is not None and last_validation.get("step") != step:
            validate_now()
        if cfg.eval.fid.every and last_fid.get("step") != step:
            fid_now()
        for hook in end_of_run_hooks(cfg):  # dataset-specific scores live behind the hooks
            skip_reason = hook.skip_reason(cfg, info)  # collective: the same answer on every rank
            if skip_reason is None:
                with sampling_weights():
                    final.update(hook.run(task, cfg))
            else:
                skipped_evals[hook.name] = skip_reason
                if info.is_main:
                    log.warning("%s", hook.skip_notice(cfg, skip_reason))
        if final:
            logger.log(final, step=step)
            logger.summary(final)
        for last in (last_validation, last_fid):  # logged at their step already: summary and result.json
            values = {k: v for k, v in last.items() if k != "step"}
            logger.summary(values)
            final.update(values)
        if cfg.checkpoint.export_final:
            task.export(storage.join(cfg.checkpoint.root, run_id, "export.pt"), ema=ema, config=resolved, step=step)
        checkpoints.wait()
    checkpoints.close()
    if ema is not None:
        ema.close()
    RunSummary(run_id, step, samples_seen, stop_reason, resumed_from, final, "ema" if sample_with_ema else "raw",
               spikes.events, skipped_evals).write(info, run_dir)
    logger.finish()
    if info.is_main and cfg.logger.report:
        write_run_report(run_dir)
    dist.barrier()
    return TrainResult(run_id=run_id, run_dir=run_dir, step=step, samples_seen=samples_seen, final_metrics=final,
                       stop_reason=stop_reason)
