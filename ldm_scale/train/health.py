"""Step health: one collective decision per optimizer step, and the optional loss-spike rule.

Why this module exists: DeepSpeed skips an optimizer step on its own when the gradients overflow
(a non-finite gradient norm, an fp16 loss-scale overflow) but still counts it in
``engine.global_steps``. A loop that trusts that counter advances the EMA, ``samples_seen`` and the
checkpoint cadence on steps that changed nothing, and a run whose every step overflows "finishes"
with exit code 0. So the loop counts *healthy* steps itself, and every rank takes the same
decision from one small all-reduce per optimizer step (:meth:`StepHealth.decide`).

The rule (docs/checkpoints.md, "Step health"):

- a step is *unhealthy* when, on any rank, a micro-batch loss was non-finite, DeepSpeed did not
  apply the update (``engine.was_step_applied()``), or the global gradient norm is non-finite;
- an unhealthy step is skipped: it does not advance the step counter, the EMA, the LR schedule
  (DeepSpeed does not step the scheduler on an overflow), ``samples_seen`` or the checkpoint
  cadence; it is counted under ``train/skipped_steps/<reason>``;
- ``max_consecutive_unhealthy`` unhealthy steps in a row stop the run (:class:`UnhealthyRunError`,
  exit code != 0). An fp16 overflow while the loss scale is still above its floor does not count
  toward the streak: that is DeepSpeed searching for a scale, as designed;
- a step DeepSpeed *applied* although it was unhealthy (the weights were touched by a non-finite
  step) stops the run at once.

The spike rule (:class:`LossSpikeDetector`, off by default): a loss above ``factor`` x the
running median of the last ``window`` healthy losses for ``patience`` steps in a row rolls the
run back to the newest complete checkpoint from before the spike began and skips the data the
run consumed since that checkpoint (deterministic: the skip is a count of micro-batches).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any, Deque, Dict, List, Optional, Tuple

import torch

from ldm_scale import dist


LOSS_SCALE_KEY = "debug_loss_scale"
"""Batch key the loop sets on the micro-batches of an injected loss spike (``train.debug_spike``)."""


@dataclass
class StepOutput:
    """What a task's ``train_step`` hands the loop, all on the device: metric name -> (sum, count)
    over the step's micro-batches, and this rank's health vector (:func:`local_health`)."""

    metrics: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    health: torch.Tensor


@dataclass
class DebugSpikeConfig:
    """Fault injection for testing the spike rule: micro-batches ``start_batch`` ..
    ``start_batch + num_batches - 1`` of the data stream (counted from the start of the run, per
    rank) have their loss multiplied by ``factor`` (the gradients too). None: off."""

    start_batch: Optional[int] = None
    num_batches: int = 4
    factor: float = 50.0

    def loss_scale(self, position: int) -> float:
        if self.start_batch is None or not self.start_batch <= position < self.start_batch + self.num_batches:
            return 1.0
        return self.factor


class SkipReason(str, Enum):
    NONFINITE_LOSS = "nonfinite_loss"
    GRAD_OVERFLOW = "grad_overflow"  # DeepSpeed skipped the update (non-finite gradients / fp16 overflow)
    NONFINITE_GRAD_NORM = "nonfinite_grad_norm"


@dataclass
class SpikeRuleConfig:
    """Loss-spike rollback (off by default). A step's loss is a spike when it exceeds
    ``factor`` x the median of the last ``window`` healthy step losses; ``patience`` spikes in a
    row roll back to the last good checkpoint and skip the data consumed since it."""

    enabled: bool = False
    factor: float = 3.0
    window: int = 50
    patience: int = 3
    max_rollbacks: int = 3


class UnhealthyRunError(RuntimeError):
    """Training stopped because its steps kept failing (or a spike could not be rolled back)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: Optional[SkipReason]
    loss: float  # mean loss over every rank's micro-batches of this step (nan when unhealthy)
    counts_toward_streak: bool


def device_scalar(value: Any, device: torch.device) -> torch.Tensor:
    """``value`` (a Python number or a tensor) as a 0-dim float tensor on ``device`` without a
    blocking host-to-device copy: ``torch.tensor(x, device=cuda)`` copies from pageable memory and
    waits for the stream (a host sync); a fill kernel does not."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, torch.float32, non_blocking=True).reshape(())
    return torch.full((), float(value), dtype=torch.float32, device=device)


def local_health(loss_sum: torch.Tensor, loss_count: int, nonfinite_losses: torch.Tensor,
                 grad_norm: Any, applied: bool, scale_searching: bool) -> torch.Tensor:
    """This rank's health vector, on the device, with no host sync:
    ``[non-finite losses, not applied, non-finite grad norm, loss sum (finite part), loss count,
    fp16 scale still searching]``."""
    device = loss_sum.device
    norm = device_scalar(grad_norm if grad_norm is not None else 0.0, device)
    finite_sum = torch.where(torch.isfinite(loss_sum), loss_sum, torch.zeros_like(loss_sum))
    measured = torch.stack([nonfinite_losses.double().reshape(()), (~torch.isfinite(norm)).double(),
                            finite_sum.double().reshape(())])
    # The host-known entries in one non-blocking copy (from pageable memory the bytes are staged
    # at once; nothing waits for the device).
    known = torch.tensor([0.0 if applied else 1.0, float(loss_count), 1.0 if scale_searching else 0.0],
                         dtype=torch.float64).to(device, non_blocking=True)
    return torch.stack([measured[0], known[0], measured[1], measured[2], known[1], known[2]])


class StepHealth:
    """Counts skipped steps and decides, identically on every rank, whether a step counts."""

    def __init__(self, max_consecutive_unhealthy: int):
        if max_consecutive_unhealthy < 1:
            raise ValueError("train.max_consecutive_unhealthy must be >= 1")
        self.limit = max_consecutive_unhealthy
        self.in_a_row = 0
        self.skipped: Dict[str, int] = {r.value: 0 for r in SkipReason}

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def decide(self, vector: torch.Tensor, step: int) -> Verdict:
        """All-reduce ``vector`` (from :func:`local_health`) and judge the step; raises
        :class:`UnhealthyRunError` when the streak reaches the limit or a bad step was applied."""
        dist.all_reduce_sum(vector)  # the one collective of the step
        # The one host sync of the step: the loop must know now whether to count it.
        nonfinite, not_applied, bad_norm, loss_sum, count, searching = vector.tolist()
        world = max(dist.get_dist_info().world_size, 1)
        if nonfinite == 0 and not_applied == 0 and bad_norm == 0:
            self.in_a_row = 0
            return Verdict(True, None, loss_sum / max(count, 1.0), False)
        reason = (SkipReason.NONFINITE_LOSS if nonfinite > 0 else
                  SkipReason.GRAD_OVERFLOW if not_applied > 0 else SkipReason.NONFINITE_GRAD_NORM)
        if not_applied == 0:
            # DeepSpeed applied an update the step's numbers say is bad: the weights may be ruined.
            raise UnhealthyRunError(
                f"optimizer step {step + 1} was applied although {reason.value} (on "
                f"{int(nonfinite)} micro-batches): the weights may be damaged, so training stopped. Resume from the "
                "last checkpoint with a lower optim.lr / more optim.warmup_steps, or check the data", reason.value)
        self.skipped[reason.value] += 1
        # fp16: overflows while the scale is above its floor are the loss scaler's search, by design.
        counts = not (reason is SkipReason.GRAD_OVERFLOW and nonfinite == 0 and searching >= world)
        if counts:
            self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise UnhealthyRunError(
                f"{self.in_a_row} optimizer steps in a row were unhealthy (last: {reason.value}) after step {step}; "
                f"skipped so far: {self.skipped}. Training stopped and no checkpoint was written after the streak "
                "began. Lower optim.lr, raise optim.warmup_steps, use deepspeed.precision=bf16 instead of fp16, or "
                "check the data; resume from the last checkpoint (train.max_consecutive_unhealthy sets the limit)",
                reason.value)
        return Verdict(False, reason, math.nan, counts)

    def metrics(self) -> Dict[str, float]:
        out = {f"train/skipped_steps/{k}": float(v) for k, v in self.skipped.items()}
        out["train/skipped_steps"] = float(self.total_skipped)
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"skipped": dict(self.skipped)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.skipped.update({k: int(v) for k, v in state.get("skipped", {}).items()})


@dataclass(frozen=True)
class Spike:
    start_step: int  # first optimizer step (1-based step number it produced) of the spike
    end_step: int
    loss: float
    median: float


class LossSpikeDetector:
    """``patience`` losses in a row above ``factor`` x the running median of the last ``window``
    normal losses. Pure host arithmetic on the loss :class:`StepHealth` already brought back."""

    def __init__(self, cfg: SpikeRuleConfig):
        if cfg.factor <= 1.0 or cfg.window < 1 or cfg.patience < 1 or cfg.max_rollbacks < 0:
            raise ValueError("train.spike needs factor > 1, window >= 1, patience >= 1, max_rollbacks >= 0")
        self.cfg = cfg
        self.history: Deque[float] = deque(maxlen=cfg.window)
        self.streak: List[int] = []  # step numbers of the spike in progress
        self.rollbacks = 0
        self.events: List[Dict[str, Any]] = []  # one record per rollback (result.json)

    @property
    def suspicious(self) -> bool:
        """A spike may be under way: the loop must not checkpoint these weights as good."""
        return bool(self.streak)

    def median(self) -> float:
        values = sorted(self.history)
        n = len(values)
        return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])

    def update(self, step: int, loss: float) -> Optional[Spike]:
        """Feed the loss of healthy step ``step``; returns a :class:`Spike` when the rule fires."""
        if not self.cfg.enabled:
            return None
        if len(self.history) == self.cfg.window and loss > self.cfg.factor * self.median():
            self.streak.append(step)
            if len(self.streak) >= self.cfg.patience:
                spike = Spike(self.streak[0], step, loss, self.median())
                self.streak = []
                return spike
            return None
        self.streak = []
        self.history.append(loss)
        return None

    def state_dict(self) -> Dict[str, Any]:
        return {"history": list(self.history), "rollbacks": self.rollbacks, "events": list(self.events)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.history = deque(state.get("history", []), maxlen=self.cfg.window)
        self.rollbacks = int(state.get("rollbacks", 0))
        self.events = list(state.get("events", []))
        self.streak = []
