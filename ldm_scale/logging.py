"""Experiment tracking: W&B on rank 0 (offline unless configured), console, throughput and MFU.

The console (:func:`setup_console`, called once at start-up by the entry point): warnings raised
inside our dependencies (torch's deprecations, DeepSpeed's, ...) and their known start-up chatter
are filtered unless ``logger.show_library_warnings=true`` or ``LDM_SCALE_SHOW_LIBRARY_WARNINGS=1``;
ranks other than 0 print warnings and errors only; the progress bar is rank 0's; compiler output
of DeepSpeed's op builds goes to a log file (``ldm_scale.train.ds_ops``).

Every ``log`` call passes the optimizer step explicitly (``step=global_step``): after a restart W&B
resumes the same run id (offline runs get a new directory with the same id, wandb #4624, and are
merged by ``wandb sync --id``), and an explicit step keeps the curves aligned either way.
This is the only module that imports ``wandb`` (lazily, on rank 0).
"""
from __future__ import annotations

import contextlib
import json
import logging
import netrc
import os
import re
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from ldm_scale import dist, storage
from ldm_scale.config import LoggerConfig
from ldm_scale.images import captioned_grid, save_png

# Dense bf16/fp16 tensor-core peak per device (vendor data sheets), for MFU. Matched by substring
# of torch.cuda.get_device_name(); unknown devices report no MFU unless logger.peak_tflops is set.
PEAK_TFLOPS_BF16: Dict[str, float] = {
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0,
}


# ------------------------------------------------------------------------------------------
# Console

SHOW_LIBRARY_WARNINGS_ENV = "LDM_SCALE_SHOW_LIBRARY_WARNINGS"
# Top-level packages whose warnings are theirs to fix, not ours: filtered by the module a warning
# is attributed to, so one that points at a line of ldm_scale (stacklevel) is still shown.
LIBRARY_PACKAGES = (
    "torch", "torchvision", "deepspeed", "webdataset", "wandb", "hydra", "omegaconf", "fsspec", "s3fs",
    "gcsfs", "botocore", "aiobotocore", "boto3", "aiohttp", "urllib3", "google", "open_clip", "timm",
    "lpips", "PIL", "numpy", "scipy", "pyarrow", "tqdm", "pydantic", "transformers", "huggingface_hub",
    "diffusers", "torch_fidelity", "torchmetrics", "img2dataset", "albumentations", "distutils", "setuptools",
)
# Start-up log records of dependencies that nobody can act on: logger name -> message prefixes.
LIBRARY_NOISE = {
    "DeepSpeed": ("Setting accelerator to CPU",),  # a CPU-only machine is expected here
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}
_LIBRARY_MODULES = r"(?:" + "|".join(map(re.escape, LIBRARY_PACKAGES)) + r")(?:\.|$)"


class _DropLibraryNoise(logging.Filter):
    def __init__(self, prefixes: Sequence[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def show_library_warnings(configured: bool = False) -> bool:
    """Whether library warnings are shown: ``LDM_SCALE_SHOW_LIBRARY_WARNINGS`` (1/0) if set, else
    ``configured`` (``logger.show_library_warnings``)."""
    env = os.environ.get(SHOW_LIBRARY_WARNINGS_ENV)
    if env is not None and env.strip():
        return env.strip().lower() in ("1", "true", "yes", "on")
    return configured


def setup_console(show_library_warnings_cfg: bool = False, rank: Optional[int] = None) -> bool:
    """Quiet the console once at start-up (idempotent: a later call with the composed config's
    ``logger.show_library_warnings`` replaces an earlier one). Python warnings attributed to
    :data:`LIBRARY_PACKAGES` and the records in :data:`LIBRARY_NOISE` are dropped unless shown
    (:func:`show_library_warnings`); ranks other than 0 log WARNING and above only (pass ``rank``
    once the logging handlers are final, e.g. after Hydra set them up). Returns whether library
    warnings are shown. Forked DataLoader workers inherit the filters."""
    show = show_library_warnings(show_library_warnings_cfg)
    # A filter entry is (action, message, category, module, lineno).
    ours = [f for f in warnings.filters
            if f[0] == "ignore" and f[2] is Warning and getattr(f[3], "pattern", None) == _LIBRARY_MODULES]
    for entry in ours:
        warnings.filters.remove(entry)
    if hasattr(warnings, "_filters_mutated"):
        warnings._filters_mutated()  # the filter list was edited in place: drop the caches
    for name, prefixes in LIBRARY_NOISE.items():
        logger = logging.getLogger(name)  # created here if the library is not imported yet: it keeps the filter
        for old in [f for f in logger.filters if isinstance(f, _DropLibraryNoise)]:
            logger.removeFilter(old)
        if not show:
            logger.addFilter(_DropLibraryNoise(prefixes))
    if not show:
        warnings.filterwarnings("ignore", category=Warning, module=_LIBRARY_MODULES)
    if rank is not None and rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return show


def resolve_wandb_mode(cfg: LoggerConfig) -> str:
    """online / offline / disabled. ``auto``: online only when an API key is configured.

    An explicit ``WANDB_MODE`` in the environment wins (CI and tests set ``offline``).
    """
    if cfg.backend == "none":
        return "disabled"
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        if netrc_path.exists() and netrc.netrc(str(netrc_path)).authenticators("api.wandb.ai"):
            return "online"
    except (netrc.NetrcParseError, OSError):
        pass
    return "offline"


def peak_flops_per_device(override_tflops: Optional[float]) -> Optional[float]:
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1e12
    return None


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` (forward and backward if ``fn`` does both), counted by
    ``torch.utils.flop_counter.FlopCounterMode``. Works on ``meta`` tensors: no memory, no time."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


class MetricMeter:
    """Means of metrics over a logging interval, accumulated on the device and reduced over ranks
    when read.

    ``add`` takes ``name -> (sum, count)`` pairs of device tensors (different steps may report
    different names, e.g. timestep buckets); nothing is copied to the host until :meth:`reduce`,
    which the loop calls only on log steps.
    """

    def __init__(self) -> None:
        self._sum: Dict[str, torch.Tensor] = {}
        self._count: Dict[str, torch.Tensor] = {}

    def add(self, metrics: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        for key, (total, count) in metrics.items():
            total, count = total.detach().double(), torch.as_tensor(count, device=total.device).double()
            if key in self._sum:
                self._sum[key] = self._sum[key] + total
                self._count[key] = self._count[key] + count
            else:
                self._sum[key], self._count[key] = total, count

    def clear(self) -> None:
        self._sum.clear()
        self._count.clear()

    def reduce(self) -> Dict[str, float]:
        """Means over every rank's values (a collective: every rank calls it at the same step)."""
        keys = sorted(self._sum)
        # Host sync, on log steps only: one copy of every accumulated sum and count.
        values = torch.stack([self._sum[k] for k in keys] + [self._count[k] for k in keys]).tolist() if keys else []
        local = ({k: values[i] for i, k in enumerate(keys)}, {k: values[len(keys) + i] for i, k in enumerate(keys)})
        gathered = dist.all_gather_object(local)
        total: Dict[str, float] = defaultdict(float)
        count: Dict[str, float] = defaultdict(float)
        for sums, counts in gathered:
            for key, value in sums.items():
                total[key] += value
                count[key] += counts[key]
        self._sum.clear()
        self._count.clear()
        return {key: total[key] / count[key] for key in total if count[key]}


def sum_over_ranks(values: Mapping[str, float]) -> Dict[str, float]:
    """Sum of per-rank counters with possibly different keys (e.g. loader skip reasons)."""
    out: Dict[str, float] = defaultdict(float)
    for part in dist.all_gather_object(dict(values)):
        for key, value in part.items():
            out[key] += float(value)
    return dict(out)


class Throughput:
    """Samples/s over the last interval, images/s per device, and MFU from counted FLOPs."""

    def __init__(self, world_size: int, flops_per_sample: Optional[float], peak_flops: Optional[float]):
        self.world_size = world_size
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops
        self._t0 = time.perf_counter()
        self._samples = 0

    def add(self, samples: int) -> None:
        self._samples += samples

    def read(self) -> Dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        rate = self._samples / elapsed
        out = {"perf/samples_per_s": rate, "perf/images_per_s_per_device": rate / self.world_size}
        if self.flops_per_sample:
            achieved = rate * self.flops_per_sample / self.world_size
            out["perf/tflops_per_device"] = achieved / 1e12
            if self.peak_flops:
                out["perf/mfu"] = achieved / self.peak_flops
        self._t0, self._samples = now, 0
        return out


@contextlib.contextmanager
def _redacted_argv() -> Iterator[None]:
    """``sys.argv`` with credentials masked while W&B records it (the ``args`` of the run's
    metadata): Hydra overrides such as ``data.urls=[https://...?X-Amz-Signature=...]`` are given on
    the command line. W&B reads it once, when the run starts."""
    saved = sys.argv
    sys.argv = [storage.redact(arg) for arg in saved]
    try:
        yield
    finally:
        sys.argv = saved


METRICS_FILE = "metrics.jsonl"


def truncate_metrics(path: Path, start_step: int) -> int:
    """Drop the rows of ``path`` logged after ``start_step``: a run that resumes there logs those
    steps again, so the file keeps exactly one row per logged step. Atomic (temp file + rename);
    returns the number of rows dropped. A torn last line (a crash mid-write) is dropped too."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if int(row.get("step", 0)) <= start_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def history_step(path: Path) -> Optional[int]:
    """The last step ``metrics.jsonl`` at ``path`` records, or None when it holds no row."""
    last = None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                last = max(int(json.loads(line).get("step", 0)), last or 0)
            except ValueError:
                continue
    return last


class RunLogger:
    """W&B run on rank 0 (resumed by id after a restart), plus ``metrics.jsonl`` and PNG grids in
    the run directory (readable without W&B)."""

    def __init__(self, cfg: LoggerConfig, *, run_id: str, name: str, run_dir: Path,
                 resolved_config: Dict[str, Any], start_step: int = 0):
        self.cfg = cfg
        self.run_dir = run_dir
        self.is_main = dist.get_dist_info().is_main
        if self.is_main:
            truncate_metrics(run_dir / METRICS_FILE, start_step)
        self.mode = resolve_wandb_mode(cfg)
        self._run = None
        if self.is_main and self.mode != "disabled":
            import wandb

            wandb_dir = Path(cfg.dir) if cfg.dir else run_dir
            wandb_dir.mkdir(parents=True, exist_ok=True)
            # id=run_id + resume="allow": a restarted job continues the same W&B run. W&B uploads
            # the config and the command line (wandb-metadata.json): both go in redacted.
            with _redacted_argv():
                self._run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group,
                                       tags=[storage.redact(t) for t in cfg.tags], name=f"{name}/{run_id}",
                                       id=run_id, resume="allow", dir=str(wandb_dir), mode=self.mode,
                                       config=storage.redact_config(resolved_config))

    @property
    def run_path(self) -> Optional[str]:
        """The local W&B run directory (rank 0), e.g. for tests and `wandb sync`."""
        return getattr(self._run, "dir", None)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.is_main:
            return
        if self._run is not None:
            self._run.log(dict(metrics), step=step)
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    def log_images(self, key: str, images: torch.Tensor, step: int, captions: Optional[Sequence[str]] = None,
                   ncols: int = 4) -> Optional[Path]:
        """Write ``<run_dir>/samples/<key>_step<N>.png`` and log the grid to W&B (rank 0): the
        readable grid (each sample enlarged, its prompt or class under it, ``images.captioned_grid``)."""
        if not self.is_main:
            return None
        # One caption per sample is printed under it; a single caption (the autoencoder's "input |
        # reconstruction" pairs) describes the whole grid and goes to W&B only.
        per_image = list(captions) if captions and len(captions) == len(images) else [""] * len(images)
        grid = captioned_grid(images, per_image, ncols=ncols)
        path = Path(save_png(grid, str(self.run_dir / "samples" / f"{key.replace('/', '_')}_step{step:07d}.png")))
        if self._run is not None:
            import wandb

            caption = " | ".join(captions) if captions else None
            self._run.log({key: wandb.Image(grid.numpy(), caption=caption)}, step=step)
        return path

    def summary(self, values: Mapping[str, float]) -> None:
        if self._run is not None:
            for key, value in values.items():
                self._run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None


def console_line(step: int, max_steps: int, metrics: Mapping[str, float], keys: List[str]) -> str:
    parts = [f"step {step}/{max_steps}"]
    for key in keys:
        if key in metrics:
            parts.append(f"{key.split('/')[-1]} {metrics[key]:.4g}")
    return " | ".join(parts)
