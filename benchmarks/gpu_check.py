"""The GPU check: CUDA branches, the quickstart model under ZeRO-2/3, and the 1.45B model on one GPU.

    python benchmarks/gpu_check.py [--out FILE] [--budget-s 450] [--phases a,b,...] [--dry-run]

One command for the first GPU machine (one H200: under 8 minutes). Without CUDA it refuses with
one line and exit status 2; ``--dry-run`` (any machine) composes and validates every phase's
configuration and prints the plan instead of running it. The phases run in this order, each under
its own time limit, capped by what is left of the budget; a phase that fails or runs out of time is
recorded and the next one runs (a phase whose inputs failed is skipped, saying which):

  wheelhouse        deepspeed / hydra / omegaconf / open_clip not importable: install
                    benchmarks/wheelhouse offline (``bash benchmarks/gpu_wheelhouse.sh`` makes it
                    on a machine with the registries) with ``pip --no-index --no-deps --target``
  data              synthetic shards with the project's writer: 32 px for the quickstart, 256-320 px
                    LAION-shaped (captions, json metadata, parquet, sizes.json) for txt2img_kl8, and
                    a small WordPiece vocabulary for its BERT-style tokenizer
  gpu_tests         ``pytest -m gpu`` over the test files that have such tests
  kl8_probe         one process, the real task (``build_task``) of experiment=txt2img_kl8 with a
                    random first stage: micro-batches probed upwards (OOM caught, sizes predicted
                    not to fit skipped), then at the largest that fits: steps on the real loader
                    with the time in ``next(batches)`` vs the step, peak memory, in-process
                    images/s and MFU, and the profiler's top CUDA kernels over a few steps
  kl8_train         ``torchrun --nproc_per_node 1 launch/train.py experiment=txt2img_kl8`` for 20
                    steps at that micro-batch; images/s and MFU read from the run's metrics.jsonl
  quickstart_zero2  ``launch/train.py experiment=quickstart`` in bf16 under ZeRO-2 / ZeRO-3 with
  quickstart_zero3  activation checkpointing, 40 steps, final checkpoint, export and sample grid

It writes one JSON: ``--out``, else ``$OUT/gpu_check.json`` when ``$OUT`` is set, else
``benchmarks/gpu_check.json`` (rewritten after every phase, so a killed check keeps what it
measured), with the predictions of docs/scaling.md next to the measured numbers.
``--driver kl8_probe ARGS.json`` is the probe's own process (internal; it runs on CPU too, which
tests/unit/test_gpu_check.py uses with the tiny flavour).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
import math
import os
import re
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.procs import kill_marked  # noqa: E402  (standard library only, like this script)

WHEELHOUSE = REPO / "benchmarks" / "wheelhouse"
SCALING_DOC = REPO / "docs" / "scaling.md"
SCHEMA = "ldm_scale/gpu_check-v1"
DEFAULT_BUDGET_S = 450.0  # the whole check: under 8 minutes with interpreter start-up and the JSON
RESERVE_S = 8.0  # kept back from the last phase: stopping children and writing the JSON
MIN_PHASE_S = 15.0  # a phase with less left is skipped rather than started to be killed
CHILD_MARKER = "LDM_SCALE_GPU_CHECK_CHILD"

# Imports the phases need beyond the GPU image (what benchmarks/gpu_wheelhouse.sh provides).
NEEDED_MODULES = ("deepspeed", "hydra", "omegaconf", "open_clip")

# The GPU machine's Python 3.12 environment (its image's package list as read on 2026-11-17).
# gpu_wheelhouse.sh carries what the check needs beyond these; the CI test checks that every
# requirement of the wheels is met by the wheelhouse or by this list.
GPU_IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py
hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# What the phases train on. The probe's sizes go up to what one 139 GiB H200 may hold at ZeRO-2
# with checkpointing; sizes predicted not to fit are skipped, so the list may run past the card.
QUICKSTART_STEPS = 40
KL8_STEPS = 20
KL8_LOG_EVERY = 5
KL8_PROBE_SIZES = (16, 32, 64, 128, 256, 384)
KL8_FALLBACK_MICRO_BATCH = 16  # docs/scaling.md's table, used when the probe gave no answer
PROBE_MEMORY_HEADROOM = 0.88  # of the card's memory: allocator fragmentation and NCCL buffers
LAION_PARTS, LAION_SAMPLES_PER_PART, LAION_SAMPLES_PER_SHARD = 4, 256, 32
QUICKSTART_SAMPLES, QUICKSTART_SAMPLES_PER_SHARD = 256, 16
EPOCH_SAMPLES = 10_000_000  # no epoch boundary (and no worker re-start) inside the check


# ---------------------------------------------------------------------------------------------
# Child processes: time limits, kills that reach torchrun's workers, device memory while they run

@dataclass
class ChildResult:
    returncode: Optional[int]
    timed_out: bool
    elapsed_s: float
    log_path: Path
    device_memory_peak_mib: Optional[int] = None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class PhaseFailed(Exception):
    """A phase ran and its result is wrong; ``details`` (what it did measure) go into the JSON."""

    def __init__(self, message: str, details: Optional[Dict[str, Any]] = None):
        super().__init__(message)
        self.details = details or {}


_child_numbers = itertools.count()


class DeviceMemoryPoller:
    """Peak of ``nvidia-smi``'s used memory (MiB, whole device, every process, allocator caches and
    CUDA contexts included) while a child runs. Polled from outside so this process never creates a
    CUDA context of its own on the device the children measure. None without nvidia-smi."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.peak_mib: Optional[int] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            used = nvidia_smi(["memory.used"])
            if used:
                try:
                    value = int(float(used[0]))
                    self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)
                except ValueError:
                    return
            else:
                return
            self._stop.wait(self.every_s)

    def __enter__(self) -> "DeviceMemoryPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def nvidia_smi(fields: Sequence[str]) -> Optional[List[str]]:
    """The first GPU's ``fields`` from ``nvidia-smi --query-gpu``, or None."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[:1]
    return [v.strip() for v in first[0].split(",")] if first else None


def run_child(cmd: Sequence[str], *, limit_s: float, log_path: Path, env: Dict[str, str],
              poll_memory: bool = True) -> ChildResult:
    """Run ``cmd`` from the repository root with its output in ``log_path``, for at most ``limit_s``.
    On time-out: SIGTERM (torchrun passes it on to its workers), 10 s, then SIGKILL to every process
    that carries this child's marker, so nothing keeps the GPU for the next phase."""
    marker = f"{os.getpid()}-{next(_child_numbers)}"
    started = time.monotonic()
    poller = DeviceMemoryPoller() if poll_memory else None
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(str(c) for c in cmd) + "\n")
        log.flush()
        if poller is not None:
            poller.__enter__()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env={**env, CHILD_MARKER: marker}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(limit_s, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        finally:
            # torchrun starts its workers in new sessions: a signal to the agent's process group
            # would not reach them, their inherited marker does.
            try:
                kill_marked(CHILD_MARKER, marker, timeout=15.0)
            except RuntimeError as e:  # reported, not fatal: the next phase then shows the held memory
                print(f"gpu_check: {e}", file=sys.stderr, flush=True)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if poller is not None:
                poller.__exit__()
    return ChildResult(None if timed_out else proc.returncode, timed_out, time.monotonic() - started, log_path,
                       poller.peak_mib if poller is not None else None)


def child_outcome(result: ChildResult, what: str) -> Dict[str, Any]:
    """The JSON fields of a finished child; raises :class:`PhaseFailed` unless it exited 0."""
    details: Dict[str, Any] = {"returncode": result.returncode, "child_elapsed_s": round(result.elapsed_s, 1),
                               "log": str(result.log_path)}
    if result.device_memory_peak_mib is not None:
        details["device_memory_used_peak_mib"] = result.device_memory_peak_mib
    if result.timed_out:
        raise PhaseFailed(f"{what} ran out of its time limit ({result.elapsed_s:.0f} s)",
                          {**details, "timed_out": True, "log_tail": result.tail()})
    if result.returncode != 0:
        raise PhaseFailed(f"{what} exited with status {result.returncode}", {**details, "log_tail": result.tail()})
    return details


# ---------------------------------------------------------------------------------------------
# Phases

@dataclass
class Context:
    work: Path  # scratch: shards, run directories, logs, the wheelhouse's --target
    env: Dict[str, str]  # children's environment
    results: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # finished phases, by name
    python: str = sys.executable

    def result(self, phase: str) -> Dict[str, Any]:
        return self.results.get(phase, {})


@dataclass(frozen=True)
class Phase:
    name: str
    limit_s: float
    needs: Tuple[str, ...]
    run: Callable[[Context, float], Dict[str, Any]]
    summary: str


def missing_modules(modules: Optional[Iterable[str]] = None) -> List[str]:
    """Which of ``modules`` (default: :data:`NEEDED_MODULES`) cannot be imported here."""
    importlib.invalidate_caches()
    return [m for m in (NEEDED_MODULES if modules is None else modules) if importlib.util.find_spec(m) is None]


def phase_wheelhouse(ctx: Context, limit_s: float) -> Dict[str, Any]:
    missing = missing_modules()
    if not missing:
        return {"installed": [], "note": f"{', '.join(NEEDED_MODULES)} already importable"}
    wheels = sorted(WHEELHOUSE.glob("*.whl"))
    if not wheels:
        raise PhaseFailed(f"{missing} not importable and no wheels in {WHEELHOUSE}: run `bash benchmarks/"
                          "gpu_wheelhouse.sh` where the package registries are reachable and bring the folder along")
    site = ctx.work / "site"
    cmd = [ctx.python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-cache-dir",
           "--disable-pip-version-check", "--find-links", str(WHEELHOUSE), "--target", str(site), *map(str, wheels)]
    details = child_outcome(run_child(cmd, limit_s=limit_s, log_path=ctx.work / "wheelhouse.log", env=ctx.env,
                                      poll_memory=False), "pip install from the wheelhouse")
    sys.path.insert(0, str(site))
    ctx.env["PYTHONPATH"] = os.pathsep.join([str(site), ctx.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    details["installed"] = [w.name for w in wheels]
    details["target"] = str(site)
    still = missing_modules()
    if still:
        raise PhaseFailed(f"{still} still not importable after installing the wheelhouse", details)
    return details


def shard_urls(root: Path, parts: int, samples: int, per_shard: int) -> List[str]:
    last = -(-samples // per_shard) - 1
    return [f"{root}/part{p}/{{00000..{last:05d}}}.tar" for p in range(parts)]


def _write_part(args: Tuple[str, int, int, int, int, int]) -> None:
    from ldm_scale.data.synthetic import write_synthetic_dataset

    url, seed, samples, per_shard, min_size, max_size = args
    write_synthetic_dataset(url, num_samples=samples, samples_per_shard=per_shard, seed=seed, min_size=min_size,
                            max_size=max_size)


VOCAB_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_vocab(path: Path) -> Path:
    """A WordPiece vocabulary for txt2img_kl8's BERT-style tokenizer (the GPU machine has no
    bert-base-uncased): the synthetic captions' words, ASCII punctuation (split off as BERT does),
    and every letter and digit as a word start and as a ``##`` continuation, so any ASCII caption
    tokenizes without [UNK]."""
    from ldm_scale.data.synthetic import COLOUR_NAMES, SHAPES

    chars = string.ascii_lowercase + string.digits
    words = [*COLOUR_NAMES, *SHAPES, "a", "photo", "of", "on", "background", *string.punctuation]
    tokens = list(dict.fromkeys([*VOCAB_SPECIAL, *words, *chars, *(f"##{c}" for c in chars)]))
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


def phase_data(ctx: Context, limit_s: float) -> Dict[str, Any]:
    laion, quick = ctx.work / "shards_laion256", ctx.work / "shards_quickstart"
    jobs = [(f"{laion}/part{p}", 100 + p, LAION_SAMPLES_PER_PART, LAION_SAMPLES_PER_SHARD, 256, 320)
            for p in range(LAION_PARTS)]
    jobs.append((f"{quick}/part0", 0, QUICKSTART_SAMPLES, QUICKSTART_SAMPLES_PER_SHARD, 32, 40))
    with ProcessPoolExecutor(max_workers=len(jobs)) as pool:
        for future in [pool.submit(_write_part, job) for job in jobs]:
            future.result(timeout=limit_s)
    return {"laion_urls": shard_urls(laion, LAION_PARTS, LAION_SAMPLES_PER_PART, LAION_SAMPLES_PER_SHARD),
            "quickstart_urls": shard_urls(quick, 1, QUICKSTART_SAMPLES, QUICKSTART_SAMPLES_PER_SHARD),
            "vocab": str(write_vocab(ctx.work / "vocab.txt")),
            "laion_samples": LAION_PARTS * LAION_SAMPLES_PER_PART, "laion_image_px": "256-320",
            "quickstart_samples": QUICKSTART_SAMPLES}


def gpu_test_files() -> List[Path]:
    """Test files that hold a ``pytest.mark.gpu`` test: only these are collected on the GPU machine
    (other test modules import packages the image lacks, such as moto or webdataset). tests/gpu/
    goes last: its compile test is the slowest, and a phase cut short keeps the others' results."""
    files = [p for p in (REPO / "tests").rglob("test_*.py") if "pytest.mark.gpu" in p.read_text()]
    return sorted(files, key=lambda p: (p.parent.name == "gpu", str(p)))


PYTEST_OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def parse_pytest_log(text: str) -> Dict[str, Any]:
    """Outcomes from ``pytest -v`` lines: what a run that was killed before writing its junit XML
    had finished."""
    outcomes = dict(PYTEST_OUTCOME.findall(text))
    return {"passed": sum(v == "PASSED" for v in outcomes.values()),
            "failed": [{"test": t} for t, v in outcomes.items() if v in ("FAILED", "ERROR")],
            "skipped": [{"test": t} for t, v in outcomes.items() if v == "SKIPPED"], "from": "log"}


def parse_junit(path: Path) -> Dict[str, Any]:
    """passed count, failed/skipped test ids with their first message line, from a junit XML."""
    import xml.etree.ElementTree as ET

    passed, failed, skipped = 0, [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        skip = case.find("skipped")
        if problem is not None:
            failed.append({"test": name, "message": (problem.get("message") or "").splitlines()[:1]})
        elif skip is not None:
            skipped.append({"test": name, "reason": skip.get("message", "")})
        else:
            passed += 1
    return {"passed": passed, "failed": failed, "skipped": skipped}


# ``-o addopts=``: the project's addopts spread tests over xdist workers (one per core); the GPU
# tests share one device and run in one process, with or without pytest-xdist installed.
GPU_PYTEST_ARGS = ["-m", "pytest", "-o", "addopts=", "-m", "gpu", "-p", "no:cacheprovider"]


def phase_gpu_tests(ctx: Context, limit_s: float) -> Dict[str, Any]:
    files = gpu_test_files()
    junit = ctx.work / "gpu_tests.xml"
    per_test = int(max(min(limit_s - 10, 240), 30))
    cmd = [ctx.python, *GPU_PYTEST_ARGS, "-v", f"--timeout={per_test}", f"--junitxml={junit}",
           f"--basetemp={ctx.work / 'pytest'}", *map(str, files)]
    result = run_child(cmd, limit_s=limit_s, log_path=ctx.work / "gpu_tests.log", env=ctx.env)
    details: Dict[str, Any] = {"files": [str(f.relative_to(REPO)) for f in files], "per_test_timeout_s": per_test}
    if junit.exists():
        details.update(parse_junit(junit))
    else:
        details.update(parse_pytest_log(result.log_path.read_text(errors="replace")))
    try:
        details.update(child_outcome(result, "pytest -m gpu"))
    except PhaseFailed as exc:
        raise PhaseFailed(str(exc), {**details, **exc.details}) from None
    if not details.get("passed"):
        raise PhaseFailed("pytest -m gpu passed no test", details)
    return details


def train_overrides(ctx: Context, experiment: str, run_id: str, extra: Sequence[str]) -> List[str]:
    """launch/train.py overrides shared by the training phases: local checkpoints under the scratch
    directory, no logging backend, no epoch boundary, pinned batches."""
    return [f"experiment={experiment}", "model.allow_random_first_stage=true", "logger=none",
            "checkpoint=local", f"checkpoint.root={ctx.work / 'checkpoints'}", f"output_dir={ctx.work / 'runs'}",
            f"run_id={run_id}", "train.progress_bar=false", "data.pin_memory=true",
            f"data.samples_per_epoch={EPOCH_SAMPLES}", *extra]


def quickstart_overrides(ctx: Context, stage: int) -> List[str]:
    urls = ctx.result("data").get("quickstart_urls", ["<data phase>"])
    return train_overrides(ctx, "quickstart", f"gpu-check-quickstart-zero{stage}", [
        f"data.urls={json.dumps(urls)}", "data.num_workers=2", f"deepspeed=zero{stage}", "deepspeed.precision=bf16",
        "model.activation_checkpointing=true", f"train.max_steps={QUICKSTART_STEPS}", "train.log_every=10",
        "checkpoint.every_steps=0", "eval.sample_at_end=true", "eval.prompt_adherence_samples=0"])


def kl8_overrides(ctx: Context, run_id: str, micro_batch: int, extra: Sequence[str] = ()) -> List[str]:
    data = ctx.result("data")
    return train_overrides(ctx, "txt2img_kl8", run_id, [
        f"data.urls={json.dumps(data.get('laion_urls', ['<data phase>']))}",
        f"model.ldm.cond_stage.text.tokenizer.vocab_path={data.get('vocab', '<data phase>')}",
        f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={micro_batch}", *extra])


def torchrun(ctx: Context, overrides: Sequence[str]) -> List[str]:
    return [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(REPO / "launch" / "train.py"), *overrides]


def read_metrics(run_dir: Path) -> List[Dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def steady_perf(rows: List[Dict[str, float]], skip_first: int = 1) -> Dict[str, float]:
    """Medians of the loop's ``perf/*`` numbers over the logged intervals after the first
    ``skip_first`` (the first interval holds the first steps' kernel autotuning and warm-up)."""
    rows = [r for r in rows if any(k.startswith("perf/") for k in r)]
    steady = rows[skip_first:] or rows
    keys = sorted({k for r in steady for k in r if k.startswith("perf/")})
    out = {k: statistics.median(r[k] for r in steady if k in r) for k in keys}
    if steady:
        out["intervals"] = len(steady)
    return out


def training_run_details(ctx: Context, run_id: str, result: ChildResult, what: str) -> Dict[str, Any]:
    run_dir = ctx.work / "runs" / run_id
    rows = read_metrics(run_dir)
    details: Dict[str, Any] = {"run_dir": str(run_dir), "logged_steps": [int(r.get("step", 0)) for r in rows]}
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    if losses:
        details["loss_first_logged"], details["loss_last_logged"] = losses[0], losses[-1]
    details["perf"] = steady_perf(rows)
    result_file = run_dir / "result.json"
    if result_file.exists():
        details["result"] = json.loads(result_file.read_text())
    try:
        details.update(child_outcome(result, what))
    except PhaseFailed as exc:
        raise PhaseFailed(str(exc), {**details, **exc.details}) from None
    stop = details.get("result", {}).get("stop_reason")
    if stop != "completed":
        raise PhaseFailed(f"{what}: stop_reason {stop!r} (result.json), expected 'completed'", details)
    if losses and not all(map(math.isfinite, losses)):
        raise PhaseFailed(f"{what}: non-finite logged loss {losses}", details)
    return details


def phase_quickstart(stage: int) -> Callable[[Context, float], Dict[str, Any]]:
    def run(ctx: Context, limit_s: float) -> Dict[str, Any]:
        overrides = quickstart_overrides(ctx, stage)
        result = run_child(torchrun(ctx, overrides), limit_s=limit_s, log_path=ctx.work / f"quickstart_zero{stage}.log",
                           env=ctx.env)
        details = training_run_details(ctx, f"gpu-check-quickstart-zero{stage}", result,
                                       f"quickstart ZeRO-{stage} bf16 with activation checkpointing")
        run_dir = Path(details["run_dir"])
        details["sample_grids"] = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
        details["checkpoints"] = sorted(p.name for p in (ctx.work / "checkpoints" / f"gpu-check-quickstart-zero{stage}")
                                        .glob("*"))
        return details

    return run


def phase_kl8_probe(ctx: Context, limit_s: float) -> Dict[str, Any]:
    args_path, result_path = ctx.work / "kl8_probe_args.json", ctx.work / "kl8_probe_result.json"
    args = {"overrides": kl8_overrides(ctx, "gpu-check-kl8-probe", max(KL8_PROBE_SIZES)),
            "sizes": list(KL8_PROBE_SIZES), "steps": 6, "profile_steps": 3, "headroom": PROBE_MEMORY_HEADROOM,
            "result": str(result_path)}
    args_path.write_text(json.dumps(args, indent=1))
    result = run_child([ctx.python, str(Path(__file__).resolve()), "--driver", "kl8_probe", str(args_path)],
                       limit_s=limit_s, log_path=ctx.work / "kl8_probe.log", env=ctx.env)
    details: Dict[str, Any] = json.loads(result_path.read_text()) if result_path.exists() else {}
    try:
        details.update(child_outcome(result, "the kl8 probe"))
    except PhaseFailed as exc:
        raise PhaseFailed(str(exc), {**details, **exc.details}) from None
    if details.get("error"):
        raise PhaseFailed(details["error"], details)
    return details


def chosen_micro_batch(ctx: Context) -> Tuple[int, str]:
    probe = ctx.result("kl8_probe")
    chosen = probe.get("micro_batch")
    if chosen:
        return int(chosen), "the largest micro-batch the kl8_probe phase fitted"
    return KL8_FALLBACK_MICRO_BATCH, f"kl8_probe gave no size ({probe.get('status', 'not run')}): docs/scaling.md's 16"


def phase_kl8_train(ctx: Context, limit_s: float) -> Dict[str, Any]:
    micro_batch, why = chosen_micro_batch(ctx)
    run_id = "gpu-check-kl8-train"
    overrides = kl8_overrides(ctx, run_id, micro_batch, [
        f"train.max_steps={KL8_STEPS}", f"train.log_every={KL8_LOG_EVERY}", "checkpoint.every_steps=0",
        "checkpoint.save_final=false", "checkpoint.export_final=false", "eval.sample_every=0",
        "eval.sample_at_end=false"])
    result = run_child(torchrun(ctx, overrides), limit_s=limit_s, log_path=ctx.work / "kl8_train.log", env=ctx.env)
    details = {"micro_batch": micro_batch, "micro_batch_from": why, "steps": KL8_STEPS,
               "note": "the loop as launched: CPU EMA on (async lerp), one health collective per step, no "
                       "checkpoint or sampling; perf/* are medians of the intervals after the first"}
    try:
        details.update(training_run_details(ctx, run_id, result, f"txt2img_kl8 at micro-batch {micro_batch}"))
    except PhaseFailed as exc:
        raise PhaseFailed(str(exc), {**details, **exc.details}) from None
    return details


# bench_dit.py on the GPU: a PixArt-style DiT of DiT-XL width at the UNet's FLOPs, bf16, 32x32 latents.
DIT_BENCH_ARGS = ("--device", "cuda", "--dtype", "bf16", "--latent", "32", "--batch", "64", "--width", "1152",
                  "--rounds", "3", "--steps", "3", "--peak-tflops", "989")


def phase_dit_bench(ctx: Context, limit_s: float) -> Dict[str, Any]:
    out = ctx.work / "dit_bench.json"
    cmd = [ctx.python, str(REPO / "benchmarks" / "bench_dit.py"), *DIT_BENCH_ARGS, "--json", str(out)]
    details = child_outcome(run_child(cmd, limit_s=limit_s, log_path=ctx.work / "dit_bench.log", env=ctx.env),
                            "benchmarks/bench_dit.py")
    if not out.exists():
        raise PhaseFailed("bench_dit.py exited 0 without its JSON", details)
    return {**details, **json.loads(out.read_text())}


PHASES: Tuple[Phase, ...] = (
    Phase("wheelhouse", 45, (), phase_wheelhouse, "pip install --no-index --no-deps --target from benchmarks/wheelhouse "
          "if deepspeed/hydra/omegaconf/open_clip are not importable"),
    Phase("data", 45, ("wheelhouse",), phase_data, "synthetic shards: quickstart 32 px, LAION-shaped 256-320 px; a vocab"),
    Phase("gpu_tests", 120, ("wheelhouse",), phase_gpu_tests, "pytest -m gpu over the files with gpu tests"),
    Phase("kl8_probe", 170, ("wheelhouse", "data"), phase_kl8_probe,
          "txt2img_kl8 in one process: micro-batch probe, data wait, peak memory, profiler"),
    Phase("kl8_train", 130, ("wheelhouse", "data"), phase_kl8_train,
          f"torchrun launch/train.py experiment=txt2img_kl8, {KL8_STEPS} steps"),
    Phase("quickstart_zero2", 60, ("wheelhouse", "data"), phase_quickstart(2),
          f"torchrun launch/train.py experiment=quickstart bf16 ZeRO-2 + checkpointing, {QUICKSTART_STEPS} steps"),
    Phase("quickstart_zero3", 60, ("wheelhouse", "data"), phase_quickstart(3),
          f"torchrun launch/train.py experiment=quickstart bf16 ZeRO-3 + checkpointing, {QUICKSTART_STEPS} steps"),
    Phase("dit_bench", 60, (), phase_dit_bench,
          "benchmarks/bench_dit.py: DiT vs UNet training step at equal FLOPs, bf16, images/s and MFU"),
)
PHASE_NAMES = tuple(p.name for p in PHASES)


def select_phases(names: Optional[Sequence[str]]) -> List[Phase]:
    """The named phases and the phases they need, in the check's order."""
    if not names:
        return list(PHASES)
    by_name = {p.name: p for p in PHASES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"gpu_check.py: unknown phase(s) {unknown}; expected some of {list(PHASE_NAMES)}")
    wanted = set(names)
    for name in names:
        wanted.update(by_name[name].needs)
    return [p for p in PHASES if p.name in wanted]


def run_phases(phases: Sequence[Phase], ctx: Context, *, deadline: float,
               on_phase_done: Callable[[], None] = lambda: None) -> Dict[str, Dict[str, Any]]:
    """Run ``phases`` in order, each under min(its limit, what is left before ``deadline``); every
    outcome (ok, failed, skipped) lands in ``ctx.results``; nothing a phase raises stops the rest."""
    for phase in phases:
        left = deadline - time.monotonic() - RESERVE_S
        limit = min(phase.limit_s, left)
        record: Dict[str, Any] = {"limit_s": round(limit, 1)}
        not_ok = [n for n in phase.needs if n in ctx.results and ctx.results[n].get("status") != "ok"]
        started = time.monotonic()
        if not_ok:
            record.update(status="skipped", reason=f"needs {', '.join(not_ok)}, which did not succeed")
        elif limit < MIN_PHASE_S:
            record.update(status="skipped", reason=f"{max(left, 0):.0f} s of the budget left (< {MIN_PHASE_S:.0f} s)")
        else:
            try:
                record.update(phase.run(ctx, limit))
                record["status"] = "ok"
            except PhaseFailed as exc:
                record.update(exc.details)
                record.update(status="failed", error=str(exc))
            except Exception as exc:  # noqa: BLE001 - a broken phase is a result, not the end of the check
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                              traceback=traceback.format_exc().splitlines()[-12:])
        record["elapsed_s"] = round(time.monotonic() - started, 1)
        ctx.results[phase.name] = record
        line = f"gpu_check: {phase.name:<17} {record['status']:<7} {record['elapsed_s']:6.1f} s (limit {limit:.0f} s)"
        detail = record.get("error") or record.get("reason")
        print(line + (f": {detail}" if detail else ""), flush=True)
        on_phase_done()
    return ctx.results


# ---------------------------------------------------------------------------------------------
# The kl8 probe's process

def top_kernels(events: Iterable[Any], n: int = 15) -> Dict[str, Any]:
    """The ``n`` CUDA kernels with the most self device time in ``prof.key_averages()``, with their
    share of all kernel time (microseconds, as the profiler counts)."""
    import torch

    def device_us(evt: Any) -> float:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            value = getattr(evt, attr, None)
            if value is not None:
                return float(value)
        return 0.0

    cuda = getattr(torch.autograd.DeviceType, "CUDA", None)
    kernels = [e for e in events if getattr(e, "device_type", None) == cuda and device_us(e) > 0]
    total = sum(device_us(e) for e in kernels)
    kernels.sort(key=device_us, reverse=True)
    return {"kernel_time_us": round(total, 1), "kernels": [
        {"name": e.key[:160], "self_us": round(device_us(e), 1), "calls": int(e.count),
         "share": round(device_us(e) / total, 4) if total else None} for e in kernels[:n]]}


def linear_fit(points: Sequence[Tuple[float, float]]) -> Optional[Tuple[float, float]]:
    """(intercept, slope) of the least-squares line through ``points``; None with fewer than two x."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, slope


def probe_micro_batches(measure: Callable[[int], Tuple[float, Optional[int]]], sizes: Sequence[int], *,
                        capacity_bytes: Optional[int], headroom: float,
                        oom_errors: Tuple[type, ...]) -> Dict[str, Any]:
    """Try ``sizes`` in increasing order with ``measure(size) -> (seconds per step, peak bytes)``.

    Stops at the first out-of-memory error (``oom_errors``), or before a size whose peak, extrapolated
    linearly from the sizes measured so far, exceeds ``headroom`` x ``capacity_bytes``: an OOM inside
    DeepSpeed's backward can leave its gradient buckets half filled, so the probe avoids causing one
    where it can predict it. ``micro_batch`` is the largest size that ran."""
    tried: List[Dict[str, Any]] = []
    best, stopped = None, None
    for size in sorted(sizes):
        fit = linear_fit([(r["micro_batch"], r["peak_bytes"]) for r in tried if r.get("peak_bytes")])
        if fit is not None and capacity_bytes:
            predicted = fit[0] + fit[1] * size
            if predicted > headroom * capacity_bytes:
                stopped = (f"micro-batch {size} predicted to peak at {predicted / 2**30:.1f} GiB > {headroom:.0%} of "
                           f"{capacity_bytes / 2**30:.1f} GiB")
                tried.append({"micro_batch": size, "skipped": stopped})
                break
        try:
            seconds, peak = measure(size)
        except oom_errors as exc:
            stopped = f"micro-batch {size}: out of memory"
            tried.append({"micro_batch": size, "oom": str(exc).splitlines()[0][:300]})
            break
        tried.append({"micro_batch": size, "step_s": round(seconds, 4), "images_per_s": round(size / seconds, 2),
                      "peak_bytes": peak, "peak_gib": round(peak / 2**30, 2) if peak else None})
        best = size
    return {"tried": tried, "micro_batch": best, "stopped_by": stopped or "end of the size list",
            "oom_seen": any("oom" in r for r in tried)}


def fake_batch(size: int, image_size: int) -> Dict[str, Any]:
    """A host batch in the loader's hand-over form (uint8 images, pinned when CUDA is there, and
    captions), so the probe measures the step alone, data-independent."""
    import torch

    from ldm_scale.data.synthetic import COLOUR_NAMES, SHAPES

    generator = torch.Generator().manual_seed(size)
    image = torch.randint(0, 256, (size, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    if torch.cuda.is_available():
        image = image.pin_memory()
    captions = [f"a {COLOUR_NAMES[i % 5]} {SHAPES[i % 3]} on a {COLOUR_NAMES[(i + 1) % 5]} background"
                for i in range(size)]
    return {"image": image, "caption": captions, "key": [str(i) for i in range(size)]}


def kl8_probe_driver(args: Dict[str, Any]) -> Dict[str, Any]:
    """The probe's measurements in this process (see the module docstring); the result also goes
    to ``args["result"]`` after each stage, so a process killed half-way leaves what it measured."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    import torch

    from ldm_scale import config as config_lib
    from ldm_scale import dist
    from ldm_scale.data import build_loader
    from ldm_scale.data.device import DeviceHandoff
    from ldm_scale.logging import Throughput, peak_flops_per_device
    from ldm_scale.train.ema import CpuEma
    from ldm_scale.train.health import StepHealth
    from ldm_scale.train.tasks import build_task

    out: Dict[str, Any] = {"stage": "start"}
    result_path = Path(args["result"])

    def save(stage: str) -> None:
        out["stage"] = stage
        result_path.write_text(json.dumps(out, indent=1, default=str))

    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    info = dist.init_distributed()
    device = dist.default_device(info)
    to_device = DeviceHandoff(device)  # as the loop: uint8 -> device on a side stream -> [-1, 1] there
    if cuda:
        props = torch.cuda.get_device_properties(device)
        out["device"] = {"name": props.name, "total_memory_gib": round(props.total_memory / 2**30, 2),
                         "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                         "torch": torch.__version__, "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version(), "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    cfg = config_lib.to_object(config_lib.compose(args["overrides"]))
    plan = config_lib.validate(cfg, info.world_size)
    started = time.perf_counter()
    task = build_task(cfg, plan, device=device, total_steps=10_000)
    sync()
    out["build_s"] = round(time.perf_counter() - started, 1)
    out["trainable_parameters"] = sum(p.numel() for p in task.engine.module.parameters() if p.requires_grad)
    out["flops_per_image"] = task.train_flops_per_sample()
    out["memory_allocated_after_build_bytes"] = _allocated()  # weights, fp32 masters, frozen parts
    save("built")
    health = StepHealth(cfg.train.max_consecutive_unhealthy)
    step = 0

    def one_step(batch: Dict[str, Any]) -> None:
        nonlocal step
        health.decide(task.train_step([batch], step).health, step)  # the loop's one host sync per step
        step += 1

    class OutOfMemory(RuntimeError):
        """torch's OutOfMemoryError, or a library's "CUDA error: out of memory" (cuBLAS workspace,
        NCCL buffers), which arrives as a plain RuntimeError."""

    def measure(size: int) -> Tuple[float, Optional[int]]:
        batch = fake_batch(size, plan.image_size)
        _reset_peak()
        try:
            one_step(to_device(batch))  # this size's first step: cudnn autotuning, allocator growth
            sync()
            reps = 2
            t0 = time.perf_counter()
            for _ in range(reps):
                one_step(to_device(batch))
            sync()
        except RuntimeError as exc:
            if "out of memory" in str(exc).lower():
                raise OutOfMemory(str(exc)) from exc
            raise
        return (time.perf_counter() - t0) / reps, _peak()

    capacity = torch.cuda.get_device_properties(device).total_memory if cuda else None
    out["probe"] = probe_micro_batches(measure, args["sizes"], capacity_bytes=capacity,
                                       headroom=float(args.get("headroom", PROBE_MEMORY_HEADROOM)),
                                       oom_errors=(OutOfMemory,))
    chosen = out["probe"]["micro_batch"]
    out["micro_batch"] = chosen
    save("probed")
    if chosen is None:
        out["error"] = "no micro-batch size ran: " + out["probe"]["stopped_by"]
        save("done")
        return out
    if out["probe"]["oom_seen"]:
        # The engine may hold half-reduced gradient buckets from the failed backward.
        out["note"] = "an OOM was caught during the probe: the steps below ran on the same engine afterwards"
    if cuda:
        torch.cuda.empty_cache()

    # Real loader at the chosen size (as the loop builds it): the time in next(batches) against the
    # whole step; the hand-off to the device is timed apart (it only queues the copy).
    loader = build_loader(cfg.data, info, batch_size=chosen, seed=cfg.seed, uint8_images=True)
    batches = loader.infinite()
    t0 = time.perf_counter()
    first = next(batches)
    out["first_batch_s"] = round(time.perf_counter() - t0, 2)  # worker start and first decode
    first_pinned = bool(first["image"].is_pinned()) if "image" in first else None
    one_step(to_device(first))
    ema = CpuEma(task.ema_module.named_parameters(), cfg.ema, info) if cfg.ema.enabled else None
    _reset_peak()
    sync()
    waits, handoffs, emas = [], [], []
    throughput = Throughput(info.world_size, out["flops_per_image"], peak_flops_per_device(cfg.logger.peak_tflops))
    t_start = time.perf_counter()
    for _ in range(int(args["steps"])):
        t0 = time.perf_counter()
        host_batch = next(batches)
        t1 = time.perf_counter()
        batch = to_device(host_batch)
        t2 = time.perf_counter()
        one_step(batch)
        t3 = time.perf_counter()
        if ema is not None:
            ema.update(step)
        waits.append(t1 - t0)
        handoffs.append(t2 - t1)
        emas.append(time.perf_counter() - t3)
        throughput.add(chosen * info.world_size)
    sync()
    wall = time.perf_counter() - t_start
    out["loader_steps"] = {
        "steps": len(waits), "wall_s": round(wall, 3), "data_wait_s": round(sum(waits), 4),
        "data_wait_share": round(sum(waits) / wall, 4), "data_wait_max_s": round(max(waits), 4),
        "handoff_host_s": round(sum(handoffs), 4),
        "ema_update_host_s": round(sum(emas), 4), "ema_share": round(sum(emas) / wall, 4),
        "peak_bytes": _peak(), "peak_gib": round((_peak() or 0) / 2**30, 2) or None,
        "perf": throughput.read(), "num_workers": cfg.data.num_workers, "pin_memory": cfg.data.pin_memory,
        "first_batch_pinned": first_pinned}
    save("loader")

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(int(args["profile_steps"])):
            one_step(to_device(next(batches)))
        sync()
    out["profile"] = {"steps": int(args["profile_steps"]), "micro_batch": chosen, **top_kernels(prof.key_averages())}
    if ema is not None:
        ema.close()
    save("done")
    return out


def _allocated() -> Optional[int]:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> Optional[int]:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------
# docs/scaling.md's predictions, next to the measurements

def doc_predictions(text: str) -> Dict[str, Any]:
    """The numbers docs/scaling.md states for txt2img_kl8, each None (listed under ``not_found``)
    where the doc no longer says it in the form read here."""
    def number(pattern: str) -> Optional[float]:
        match = re.search(pattern, text, flags=re.S | re.M)
        return float(match.group(1).replace(",", "")) if match else None

    found = {
        "trainable_parameters_m": number(r"\*\*trainable\*\*\s*\|\s*\*\*([\d.]+)M\*\*"),
        "train_gflop_per_image": number(r"\*\*([\d.]+) GFLOP\*\* for the UNet"),
        # The kl8 experiment trains without activation checkpointing (docs/scaling.md, "The default").
        "activation_mib_per_image": number(r"\*\*(\d+(?:\.\d+)?) MiB per image without activation checkpointing"),
        "stated_mfu": number(r"stated MFU of \*\*([\d.]+)\*\*"),
        "h100_images_per_s_per_gpu": number(r"\|\s*H100[^|\n]*\|\s*([\d,]+)\s*\|"),
        "frozen_first_stage_gib": number(r"^\|\s*8\s*\|(?:[^|\n]*\|){4}\s*([\d.]+)\s*\|"),
    }
    row8 = re.search(r"^\|\s*8\s*\|(?:[^|\n]*\|){5}\s*$", text, flags=re.M)  # the micro-batch-17 table
    return {**found, "table_row_8_gpus": row8.group(0).strip() if row8 else None,
            "not_found": sorted(k for k, v in found.items() if v is None)}


def compare_with_doc(predicted: Dict[str, Any], probe: Dict[str, Any], train: Dict[str, Any],
                     device_name: Optional[str]) -> Dict[str, Any]:
    """Measured kl8 numbers beside the doc's, for the micro-batch the check ran (one GPU, ZeRO-2:
    model states 2P + 14P/N with N = 1, i.e. 16 bytes per trainable parameter)."""
    micro = train.get("micro_batch") or probe.get("micro_batch")
    out: Dict[str, Any] = {"micro_batch": micro, "gpus": 1, "zero_stage": 2}
    p_m, act, frozen = (predicted.get("trainable_parameters_m"), predicted.get("activation_mib_per_image"),
                        predicted.get("frozen_first_stage_gib"))
    if p_m and act and micro:
        states = 16 * p_m * 1e6
        out["predicted_memory_gib"] = round((states + micro * act * 2**20) / 2**30 + (frozen or 0.0), 2)
        out["predicted_memory_basis"] = (f"docs/scaling.md: 16 B x {p_m}M trainable (ZeRO-2, N=1) + {micro} x "
                                         f"{act:.0f} MiB activations + {frozen or 0} GiB frozen AE; excludes the CUDA "
                                         "context, allocator fragmentation and communication buckets")
    loader = probe.get("loader_steps", {})
    if loader.get("peak_gib"):
        out["measured_peak_memory_gib"] = loader["peak_gib"]
    if probe.get("memory_allocated_after_build_bytes"):
        out["measured_memory_after_build_gib"] = round(probe["memory_allocated_after_build_bytes"] / 2**30, 2)
    if predicted.get("h100_images_per_s_per_gpu"):
        out["predicted_images_per_s_per_gpu"] = predicted["h100_images_per_s_per_gpu"]
        out["predicted_images_per_s_basis"] = (f"docs/scaling.md's H100 SXM row (989 TFLOPS bf16 dense, as the H200) at "
                                               f"MFU {predicted.get('stated_mfu')}, training FLOPs only")
    perf = train.get("perf", {})
    if "perf/images_per_s_per_device" in perf:
        out["measured_images_per_s_per_gpu"] = round(perf["perf/images_per_s_per_device"], 2)
    if "perf/mfu" in perf:
        out["measured_mfu"] = round(perf["perf/mfu"], 4)
    in_process = loader.get("perf", {})
    if "perf/images_per_s_per_device" in in_process:
        out["measured_images_per_s_per_gpu_in_process"] = round(in_process["perf/images_per_s_per_device"], 2)
        if "perf/mfu" in in_process:
            out["measured_mfu_in_process"] = round(in_process["perf/mfu"], 4)
    out["stated_mfu"] = predicted.get("stated_mfu")
    if "data_wait_share" in loader:
        out["measured_data_wait_share"] = loader["data_wait_share"]
    out["device"] = device_name
    return out


# ---------------------------------------------------------------------------------------------
# The command

def default_out_path() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return REPO / "benchmarks" / "gpu_check.json"


def child_env(work: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", WANDB_MODE="disabled", DS_ACCELERATOR="cuda",
               NO_ALBUMENTATIONS_UPDATE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(work / "torch_extensions"))  # DeepSpeed's JIT ops, if any
    return env


def host_facts() -> Dict[str, Any]:
    import torch

    gpu = nvidia_smi(["name", "memory.total", "driver_version"])
    return {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "gpu": {"name": gpu[0], "memory_total_mib": gpu[1], "driver": gpu[2]} if gpu and len(gpu) == 3 else None,
            "cpus": os.cpu_count()}


def summarize(ctx: Context) -> Dict[str, Any]:
    probe, train = ctx.result("kl8_probe"), ctx.result("kl8_train")
    predicted = doc_predictions(SCALING_DOC.read_text()) if SCALING_DOC.exists() else {"not_found": ["docs/scaling.md"]}
    device = probe.get("device", {}).get("name")
    return {"phases": {name: r.get("status") for name, r in ctx.results.items()},
            "kl8_vs_docs_scaling": compare_with_doc(predicted, probe, train, device),
            "docs_scaling_predictions": predicted,
            "kl8_top_kernels": probe.get("profile", {}).get("kernels", [])[:10],
            "quickstart": {f"zero{s}": {k: ctx.result(f"quickstart_zero{s}").get(k) for k in
                                        ("status", "loss_first_logged", "loss_last_logged", "device_memory_used_peak_mib")}
                           for s in (2, 3)},
            "gpu_tests": {k: ctx.result("gpu_tests").get(k) for k in ("status", "passed", "failed")}}


def dry_run(phases: Sequence[Phase], ctx: Context, out_path: Path, budget_s: float) -> int:
    """Validate every training phase's configuration (compose + typed + ``validate``) and print the
    plan; nothing is installed, written or run."""
    from ldm_scale import config as config_lib

    ctx.results["data"] = {"status": "ok", "laion_urls": shard_urls(ctx.work / "shards_laion256", LAION_PARTS,
                                                                  LAION_SAMPLES_PER_PART, LAION_SAMPLES_PER_SHARD),
                           "quickstart_urls": shard_urls(ctx.work / "shards_quickstart", 1, QUICKSTART_SAMPLES,
                                                         QUICKSTART_SAMPLES_PER_SHARD),
                           "vocab": str(ctx.work / "vocab.txt")}
    configs = {"quickstart_zero2": quickstart_overrides(ctx, 2), "quickstart_zero3": quickstart_overrides(ctx, 3),
               "kl8_probe": kl8_overrides(ctx, "gpu-check-kl8-probe", max(KL8_PROBE_SIZES)),
               "kl8_train": kl8_overrides(ctx, "gpu-check-kl8-train", KL8_FALLBACK_MICRO_BATCH)}
    print(f"gpu_check: dry run, budget {budget_s:.0f} s, JSON to {out_path}")
    problems = 0
    for phase in phases:
        print(f"  {phase.name:<17} limit {phase.limit_s:4.0f} s  {phase.summary}")
        if phase.name in configs:
            try:
                cfg = config_lib.to_object(config_lib.compose(configs[phase.name]))
                plan = config_lib.validate(cfg, 1, check_files=False)
                print(f"    {plan.describe()}; zero {cfg.deepspeed.zero.stage}, {cfg.deepspeed.precision}, "
                      f"activation checkpointing {cfg.model.activation_checkpointing}")
            except Exception as exc:  # noqa: BLE001 - report every phase's problem, then fail
                problems += 1
                print(f"    INVALID: {type(exc).__name__}: {exc}")
        if phase.name == "gpu_tests":
            print(f"    files: {', '.join(str(f.relative_to(REPO)) for f in gpu_test_files())}")
        if phase.name == "wheelhouse":
            wheels = sorted(WHEELHOUSE.glob("*.whl"))
            missing = missing_modules()
            print(f"    not importable here: {missing or 'none'}; {len(wheels)} wheels in {WHEELHOUSE}")
    print(f"  kl8 probe sizes {list(KL8_PROBE_SIZES)} (headroom {PROBE_MEMORY_HEADROOM:.0%}), "
          f"train {KL8_STEPS} steps; quickstart {QUICKSTART_STEPS} steps")
    print(f"  docs/scaling.md: {doc_predictions(SCALING_DOC.read_text())}")
    return 1 if problems else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default: $OUT/gpu_check.json, else "
                                                                 "benchmarks/gpu_check.json)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="the whole check's time budget")
    parser.add_argument("--phases", default="", help=f"comma-separated subset of {','.join(PHASE_NAMES)} (the phases "
                                                     "they need are added)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new one in /tmp)")
    parser.add_argument("--dry-run", action="store_true", help="validate the phases' configs and print the plan")
    parser.add_argument("--driver", choices=["kl8_probe"], help=argparse.SUPPRESS)
    parser.add_argument("driver_args", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.driver:
        kl8_probe_driver(json.loads(Path(args.driver_args).read_text()))
        return 0
    try:
        import torch
    except ImportError:
        print("gpu_check.py: refused: torch is not importable here", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: refused: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU "
              "machine (benchmarks/RESULTS.md, 'GPU check'), or pass --dry-run to validate its phases", file=sys.stderr)
        return 2

    started_at, started = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    deadline = started + args.budget_s
    work = args.work or Path(tempfile.mkdtemp(prefix="ldm_scale_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    out_path = args.out or default_out_path()
    ctx = Context(work=work, env=child_env(work))
    phases = select_phases([p for p in args.phases.split(",") if p])
    if args.dry_run:
        return dry_run(phases, ctx, out_path, args.budget_s)

    report: Dict[str, Any] = {"schema": SCHEMA, "started": started_at.isoformat(timespec="seconds"),
                              "budget_s": args.budget_s, "work": str(work), "host": host_facts(),
                              "phases": ctx.results}

    def write() -> None:
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        report["summary"] = summarize(ctx)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
        os.replace(tmp, out_path)

    print(f"gpu_check: budget {args.budget_s:.0f} s, scratch {work}, JSON {out_path}", flush=True)
    run_phases(phases, ctx, deadline=deadline, on_phase_done=write)
    write()
    failed = [n for n, r in ctx.results.items() if r.get("status") != "ok"]
    print(f"gpu_check: {len(ctx.results) - len(failed)} of {len(ctx.results)} phases ok in "
          f"{report['elapsed_s']:.0f} s{'; not ok: ' + ', '.join(failed) if failed else ''}; wrote {out_path}")
    print(json.dumps(report["summary"], indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
