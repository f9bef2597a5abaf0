"""benchmarks/gpu_check.py and benchmarks/gpu_wheelhouse.sh, as far as a CPU machine can take them:
the refusal without CUDA, the dry run, the phase runner's failure and time-out handling, the probe's
OOM logic, the numbers read from docs/scaling.md, the kl8 probe's process on the tiny flavour,
the imports of the check's runs with only the GPU image's packages and the wheelhouse, and the
wheelhouse's offline install into a Python 3.12 venv."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fixtures.torchrun import REPO_ROOT, child_env, run_python

CHECK = REPO_ROOT / "benchmarks" / "gpu_check.py"
WHEELHOUSE_SCRIPT = REPO_ROOT / "benchmarks" / "gpu_wheelhouse.sh"
IMAGE_ONLY = REPO_ROOT / "tests" / "unit" / "_gpu_image_only.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ the command

def test_refuses_without_cuda_in_one_line_with_exit_status_2(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = run_python([str(CHECK), "--out", str(out)], env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: refused: no CUDA device"), result.stderr
    assert "--dry-run" in lines[0] and result.stdout == ""
    assert not out.exists()


def test_dry_run_validates_every_phase_and_prints_the_plan(tmp_path, gpu_check):
    out = tmp_path / "gpu_check.json"
    result = run_python([str(CHECK), "--dry-run", "--work", str(tmp_path / "work"), "--out", str(out)], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    for phase in gpu_check.PHASES:
        assert re.search(rf"^  {phase.name}\s+limit\s+{phase.limit_s:.0f} s", result.stdout, re.M), phase.name
    assert "INVALID" not in result.stdout
    # The four training configurations composed and validated: quickstart x2, kl8 x2.
    assert result.stdout.count("global batch") == 4
    assert "zero 3, bf16, activation checkpointing True" in result.stdout
    assert "tests/gpu/test_cuda_paths.py" in result.stdout
    assert not out.exists()  # a dry run writes nothing


def test_unknown_phase_is_refused_and_needed_phases_are_added(gpu_check):
    with pytest.raises(SystemExit, match="unknown phase"):
        gpu_check.select_phases(["kl9_train"])
    assert [p.name for p in gpu_check.select_phases(["kl8_train"])] == ["wheelhouse", "data", "kl8_train"]


def test_phase_limits_fit_the_eight_minute_budget(gpu_check):
    assert gpu_check.DEFAULT_BUDGET_S + 15 < 8 * 60  # start-up and the final JSON around the phases
    assert all(p.limit_s <= gpu_check.DEFAULT_BUDGET_S for p in gpu_check.PHASES)


# ------------------------------------------------------------------------------------------ phase runner

def test_failures_and_time_outs_are_recorded_and_the_check_goes_on(tmp_path, gpu_check, monkeypatch):
    G = gpu_check
    monkeypatch.setattr(G, "MIN_PHASE_S", 1.0)  # lets phase c start with its 2 s limit
    ctx = G.Context(work=tmp_path, env=child_env())
    grandchild = tmp_path / "grandchild.pid"

    def fails(ctx, limit):
        raise G.PhaseFailed("wrong number", {"measured": 1})

    def crashes(ctx, limit):
        raise ZeroDivisionError("bug")

    def hangs(ctx, limit):
        # The child starts a grandchild in a session of its own (as torchrun starts its workers):
        # the time-out must reach it too.
        script = (f"import subprocess, sys, time; p = subprocess.Popen(['sleep', '60'], start_new_session=True); "
                  f"open({str(grandchild)!r}, 'w').write(str(p.pid)); time.sleep(60)")
        return G.child_outcome(G.run_child([sys.executable, "-c", script], limit_s=limit,
                                           log_path=tmp_path / "hang.log", env=ctx.env, poll_memory=False), "hang")

    def works(ctx, limit):
        return {"value": 42}

    phases = [G.Phase("a", 30, (), fails, ""), G.Phase("b", 30, (), crashes, ""),
              G.Phase("c", 2, (), hangs, ""), G.Phase("d", 30, ("a",), works, ""),
              G.Phase("e", 30, (), works, ""), G.Phase("f", 300, (), works, "")]
    written = []
    started = time.monotonic()
    results = G.run_phases(phases, ctx, deadline=started + G.RESERVE_S + 60, on_phase_done=lambda: written.append(1))
    assert time.monotonic() - started < 40
    assert results["a"]["status"] == "failed" and results["a"]["measured"] == 1 and results["a"]["error"] == "wrong number"
    assert results["b"]["status"] == "failed" and "ZeroDivisionError: bug" in results["b"]["error"]
    assert results["c"]["status"] == "failed" and results["c"]["timed_out"] is True
    assert results["d"]["status"] == "skipped" and "needs a" in results["d"]["reason"]
    assert results["e"] == {"limit_s": results["e"]["limit_s"], "value": 42, "status": "ok",
                            "elapsed_s": results["e"]["elapsed_s"]}
    assert results["f"]["limit_s"] < 60  # capped by what was left of the budget
    assert len(written) == len(phases)
    pid = int(grandchild.read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_phase_without_budget_left_is_skipped(tmp_path, gpu_check):
    G = gpu_check
    ctx = G.Context(work=tmp_path, env={})
    results = G.run_phases([G.Phase("late", 100, (), lambda c, l: {}, "")], ctx, deadline=time.monotonic() + 5)
    assert results["late"]["status"] == "skipped" and "budget left" in results["late"]["reason"]


# ------------------------------------------------------------------------------------------ measurements

def test_probe_stops_at_the_first_oom_and_keeps_the_last_size_that_ran(gpu_check):
    class OOM(RuntimeError):
        pass

    def measure(size):
        if size > 16:
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return 0.1 * size, None

    out = gpu_check.probe_micro_batches(measure, [32, 8, 16, 64], capacity_bytes=None, headroom=0.9, oom_errors=(OOM,))
    assert out["micro_batch"] == 16 and out["oom_seen"]
    assert [r["micro_batch"] for r in out["tried"]] == [8, 16, 32]  # increasing, nothing after the OOM
    assert out["tried"][-1]["oom"] == "CUDA out of memory. Tried to allocate 2.00 GiB"


def test_probe_skips_sizes_predicted_not_to_fit(gpu_check):
    gib = 2**30
    calls = []

    def measure(size):  # 20 GiB of states + 1 GiB per image
        calls.append(size)
        return 0.01 * size, (20 + size) * gib

    out = gpu_check.probe_micro_batches(measure, [8, 16, 32, 64, 128], capacity_bytes=100 * gib, headroom=0.88,
                                        oom_errors=(MemoryError,))
    assert calls == [8, 16, 32, 64] and out["micro_batch"] == 64 and not out["oom_seen"]
    assert out["tried"][-1] == {"micro_batch": 128, "skipped": out["stopped_by"]}
    assert "148.0 GiB > 88% of 100.0 GiB" in out["stopped_by"]


def test_top_kernels_ranks_cuda_kernels_by_self_device_time(gpu_check):
    import torch

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(key, us, device, count=1):
        return SimpleNamespace(key=key, self_device_time_total=us, device_type=device, count=count)

    events = [event("aten::mm", 900.0, cpu), event("sm90_xmma_gemm_bf16", 600.0, cuda, 12),
              event("flash_fwd_kernel", 300.0, cuda, 4), event("idle", 0.0, cuda)]
    out = gpu_check.top_kernels(events, n=5)
    assert out["kernel_time_us"] == 900.0
    assert [(k["name"], k["calls"], k["share"]) for k in out["kernels"]] == [
        ("sm90_xmma_gemm_bf16", 12, 0.6667), ("flash_fwd_kernel", 4, 0.3333)]


def test_pytest_outcomes_are_read_from_the_log_of_a_killed_run(gpu_check):
    log = ("tests/unit/test_engine_kernels.py::test_fused_adamw_runs_on_cuda PASSED [ 10%]\n"
           "tests/gpu/test_cuda_paths.py::test_bf16_steps_of_the_tiny_ldm_through_build_task[3] FAILED [ 20%]\n"
           "tests/gpu/test_cuda_paths.py::test_tiny_unet_compiles_to_one_graph_with_inductor_and_matches_eager \n")
    out = gpu_check.parse_pytest_log(log)
    assert out["passed"] == 1 and out["skipped"] == []
    assert out["failed"] == [{"test": "tests/gpu/test_cuda_paths.py::test_bf16_steps_of_the_tiny_ldm_through_build_task[3]"}]
    files = gpu_check.gpu_test_files()
    assert files[-1].parent.name == "gpu"  # the slow compile test runs last


def test_steady_perf_leaves_out_the_first_logged_interval(gpu_check):
    rows = [{"step": 5, "perf/samples_per_s": 10.0, "train/loss": 1.0},
            {"step": 10, "perf/samples_per_s": 100.0, "perf/mfu": 0.3},
            {"step": 15, "perf/samples_per_s": 110.0, "perf/mfu": 0.32}, {"step": 20, "perf/samples_per_s": 90.0}]
    out = gpu_check.steady_perf(rows)
    assert out["perf/samples_per_s"] == 100.0 and out["perf/mfu"] == pytest.approx(0.31) and out["intervals"] == 3


DOC_EXCERPT = """
| **trainable** | **1415.2M** | |

Training FLOPs per 256x256 image: **779.9 GFLOP** for the UNet and text transformer
**364 MiB per image without activation checkpointing**, 120 MiB with activation checkpointing.

| GPUs | ZeRO-1 | ZeRO-2 | ZeRO-3 |
|---|---|---|---|
| 8 | 7.25 | 4.94 | 2.64 |

| GPUs | ZeRO-1 | ZeRO-2 | ZeRO-3 | activation peak | frozen AE |
|---|---|---|---|---|---|
| 8 | 14.0 | 11.7 | 9.4 | 6.04 | 0.31 |

images/s = MFU x peak FLOP/s / 779.9 GFLOP, at a stated MFU of **0.35** (typical)

| GPU | per GPU | 8 GPUs |
|---|---|---|
| A100 (312 TFLOPS bf16 dense) | 140 | 1,120 |
| H100 SXM (989 TFLOPS bf16 dense) | 444 | 3,551 |
"""


def test_doc_predictions_and_the_comparison(gpu_check):
    predicted = gpu_check.doc_predictions(DOC_EXCERPT)
    assert predicted["not_found"] == []
    assert (predicted["trainable_parameters_m"], predicted["train_gflop_per_image"],
            predicted["activation_mib_per_image"], predicted["stated_mfu"],
            predicted["h100_images_per_s_per_gpu"], predicted["frozen_first_stage_gib"]) == (
        1415.2, 779.9, 364.0, 0.35, 444.0, 0.31)
    assert predicted["table_row_8_gpus"] == "| 8 | 14.0 | 11.7 | 9.4 | 6.04 | 0.31 |"
    probe = {"micro_batch": 64, "loader_steps": {"peak_gib": 40.5, "data_wait_share": 0.02,
                                                 "perf": {"perf/images_per_s_per_device": 300.0, "perf/mfu": 0.24}}}
    train = {"micro_batch": 64, "perf": {"perf/images_per_s_per_device": 280.0, "perf/mfu": 0.22}}
    out = gpu_check.compare_with_doc(predicted, probe, train, "NVIDIA H200")
    # 16 B x 1415.2M + 64 x 364 MiB + 0.31 GiB
    assert out["predicted_memory_gib"] == pytest.approx(16 * 1415.2e6 / 2**30 + 64 * 364 / 1024 + 0.31, abs=0.01)
    assert (out["measured_peak_memory_gib"], out["predicted_images_per_s_per_gpu"], out["measured_images_per_s_per_gpu"],
            out["measured_mfu"], out["measured_mfu_in_process"], out["measured_data_wait_share"]) == (
        40.5, 444.0, 280.0, 0.22, 0.24, 0.02)


def test_the_real_doc_is_read_without_error(gpu_check):
    """docs/scaling.md is rewritten as measurements arrive: whatever it says, the check reads it and
    names what it did not find (then the comparison leaves those numbers out)."""
    predicted = gpu_check.doc_predictions(gpu_check.SCALING_DOC.read_text())
    assert set(predicted["not_found"]) <= {k for k in predicted if k not in ("not_found", "table_row_8_gpus")}
    assert predicted["not_found"] == [], predicted  # today's doc states every number the check compares
    gpu_check.compare_with_doc(predicted, {}, {}, None)


def test_vocab_tokenizes_every_synthetic_caption_without_unk(tmp_path, gpu_check):
    from ldm_scale.data.synthetic import make_sample
    from ldm_scale.models.tokenizers import WordPieceTokenizer

    tokenizer = WordPieceTokenizer(str(gpu_check.write_vocab(tmp_path / "vocab.txt")), max_length=77)
    for index in range(20):
        caption = make_sample(0, index, min_size=8, max_size=8)[1]
        ids = tokenizer.encode(caption)
        assert tokenizer.unk_id not in ids, caption
    assert tokenizer.unk_id not in tokenizer.encode("Zebra-42, a word we never wrote!")


# ------------------------------------------------------------------------------------------ GPU image

def gpu_image_blocklist(gpu_check) -> list[str]:
    """Top-level modules of this venv whose distributions the GPU machine would not have: neither
    in its image, nor in the wheelhouse, nor required by one of those (an image package's own
    dependencies are installed there with it, whatever their names are here)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = subprocess.run(["bash", str(WHEELHOUSE_SCRIPT), "--list"], capture_output=True, text=True, check=True)
    allowed = {canonicalize_name(n) for n in gpu_check.GPU_IMAGE_PACKAGES}
    allowed |= {canonicalize_name(Requirement(line).name) for line in pins.stdout.split()}
    installed = {canonicalize_name(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    todo = list(allowed)
    while todo:
        dist = installed.get(todo.pop())
        for text in (dist.requires or []) if dist else []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name not in allowed:
                allowed.add(name)
                todo.append(name)
    # Never the standard library's names or ours (ldm_scale itself; a `dataclasses` backport and
    # torch_fidelity's top-level `tests` share such names). ldm_scale's own requirements are not
    # followed: they are what the GPU image lacks.
    ours = {p.name for p in REPO_ROOT.iterdir()} | set(sys.stdlib_module_names)
    # Distributions vendored inside another package's folder (setuptools/_vendor/jaraco_*.dist-info,
    # seen once setuptools is imported and has put _vendor on sys.path) travel with that package:
    # allowed when their owner is. Without this, whether `jaraco` was blocked depended on whether an
    # earlier test in the same pytest process had imported setuptools.
    tops = importlib.metadata.packages_distributions()
    for dist in installed.values():
        base = Path(dist.locate_file("")).resolve()
        for folder in base.parents:
            owners = [installed.get(canonicalize_name(o)) for o in tops.get(folder.name, [])]
            if any(o is not None and canonicalize_name(o.metadata["Name"]) in allowed
                   and Path(o.locate_file("")).resolve() == folder.parent for o in owners):
                allowed.add(canonicalize_name(dist.metadata["Name"]))
                break
    blocked = []
    for top, dists in tops.items():
        if top not in ours and not any(canonicalize_name(d) in allowed for d in dists):
            blocked.append(top)
    return sorted(blocked)


@pytest.fixture(scope="module")
def blocklist(gpu_check, tmp_path_factory):
    blocked = gpu_image_blocklist(gpu_check)
    assert {"wandb", "lpips", "s3fs", "gcsfs", "webdataset"} <= set(blocked)  # what the brief says the image lacks
    assert not {"deepspeed", "hydra", "omegaconf", "open_clip", "torch"} & set(blocked)
    path = tmp_path_factory.mktemp("gpu_image") / "blocked.json"
    path.write_text(json.dumps(blocked))
    return path


def image_only(blocklist: Path, args: list[str], log: Path, timeout: float = 300, env: dict | None = None):
    return run_python([str(IMAGE_ONLY), str(blocklist), *args], env={"GPU_IMAGE_ONLY_LOG": str(log), **(env or {})},
                      timeout=timeout)


def tiny_shards(root: Path) -> str:
    from ldm_scale.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(str(root), num_samples=32, samples_per_shard=8, seed=0, min_size=32, max_size=40)
    return f"{root}/{{00000..00003}}.tar"


@pytest.mark.slow
def test_quickstart_run_imports_only_what_the_gpu_machine_has(tmp_path, blocklist):
    """launch/train.py as the quickstart phases run it (checkpoint, export, sample grid), 2 steps on
    CPU, with every package outside the GPU image and the wheelhouse refused."""
    url = tiny_shards(tmp_path / "shards")
    log = tmp_path / "blocked.log"
    result = image_only(blocklist, [str(REPO_ROOT / "launch" / "train.py"), "experiment=quickstart",
                                    "model.allow_random_first_stage=true", f"data.urls=['{url}']", "data.num_workers=1",
                                    "data.pin_memory=true", "train.micro_batch_size=2", "train.max_steps=2",
                                    "train.log_every=1", "train.progress_bar=false", "checkpoint=local",
                                    f"checkpoint.root={tmp_path / 'ckpt'}", "checkpoint.every_steps=0",
                                    "eval.sample_at_end=true", "eval.sampler.steps=2", "eval.prompt_adherence_samples=0",
                                    "logger=none", f"output_dir={tmp_path / 'runs'}", "run_id=image-only"], log)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "runs" / "image-only" / "result.json").read_text())["stop_reason"] == "completed"
    assert list((tmp_path / "runs" / "image-only" / "samples").glob("*.png"))


@pytest.mark.slow
def test_kl8_probe_process_on_the_tiny_flavour_with_only_the_gpu_image(tmp_path, gpu_check, blocklist):
    """The probe's own process end to end on CPU (sizes, loader steps, profiler, result file), with
    the quickstart experiment standing in for txt2img_kl8, under the GPU image's packages."""
    G = gpu_check
    url = tiny_shards(tmp_path / "shards")
    ctx = G.Context(work=tmp_path, env={})
    overrides = G.train_overrides(ctx, "quickstart", "probe", [f"data.urls=['{url}']", "data.num_workers=1",
                                                               "train.micro_batch_size=4", "deepspeed.precision=fp32"])
    args = {"overrides": overrides, "sizes": [2, 4], "steps": 2, "profile_steps": 1, "headroom": 0.9,
            "result": str(tmp_path / "probe.json")}
    (tmp_path / "args.json").write_text(json.dumps(args))
    result = image_only(blocklist, [str(CHECK), "--driver", "kl8_probe", str(tmp_path / "args.json")],
                        tmp_path / "blocked.log")
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads((tmp_path / "probe.json").read_text())
    assert out["stage"] == "done" and out["micro_batch"] == 4, out
    assert [r["micro_batch"] for r in out["probe"]["tried"]] == [2, 4]
    loader = out["loader_steps"]
    assert loader["steps"] == 2 and 0 <= loader["data_wait_share"] < 1 and loader["perf"]["perf/samples_per_s"] > 0
    assert out["profile"]["kernels"] == []  # no CUDA here: the profiler saw CPU ops only
    assert out["trainable_parameters"] > 0 and out["flops_per_image"] > 0


@pytest.mark.slow
def test_gpu_tests_collect_with_only_the_gpu_image(tmp_path, gpu_check, blocklist):
    files = [str(f) for f in gpu_check.gpu_test_files()]
    assert str(REPO_ROOT / "tests" / "gpu" / "test_cuda_paths.py") in files
    result = image_only(blocklist, [*gpu_check.GPU_PYTEST_ARGS, "--collect-only", "-q", *files], tmp_path / "blocked.log",
                        timeout=180,
                        env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTEST_ADDOPTS": "-p pytest_timeout"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"(\d+) tests? collected", result.stdout) or "test_cuda_paths.py::" in result.stdout


# ------------------------------------------------------------------------------------------ wheelhouse

def python_312() -> tuple[str, str]:
    """A Python 3.12 interpreter (the GPU image's version) that runs, else this one: (path, "X.Y").
    A pyenv shim may exist without the version being active, so each candidate is asked."""
    candidates = [*sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python")), shutil.which("python3.12")]
    for candidate in candidates:
        if not candidate:
            continue
        try:
            answer = subprocess.run([str(candidate), "-c", "import sys, venv; print(sys.version_info[:2])"],
                                    capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if answer.returncode == 0 and answer.stdout.strip() == "(3, 12)":
            return str(candidate), "3.12"
    return sys.executable, f"{sys.version_info.major}.{sys.version_info.minor}"


def index_unreachable() -> str | None:
    """Why pip cannot reach the package index (None when it can): DeepSpeed is not on this machine's
    local mirrors, so finding its versions needs the index itself."""
    try:
        probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "deepspeed", "--timeout", "15",
                                "--retries", "0", "--disable-pip-version-check"],
                               capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "pip index versions deepspeed did not answer within 60 s"
    if probe.returncode != 0:
        return f"pip cannot reach the package index: {(probe.stderr or probe.stdout).strip().splitlines()[-1:]}"
    return None


def target_environment(version: str) -> dict:
    return {"python_version": version, "python_full_version": f"{version}.3", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def unmet_requirements(wheels: list[Path], image: frozenset, version: str) -> list[str]:
    """Requirements of the wheels (their METADATA's Requires-Dist, for the target interpreter, no
    extras) that neither another wheel (in its version range) nor the GPU image (by name) meets."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    have = {}
    for wheel in wheels:
        name, wheel_version, _, _ = parse_wheel_filename(wheel.name)
        have[canonicalize_name(name)] = wheel_version
    on_image = {canonicalize_name(n) for n in image}
    env = target_environment(version)
    unmet = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = archive.read(metadata).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonicalize_name(req.name)
            if name in have:
                if not req.specifier.contains(have[name], prereleases=True):
                    unmet.append(f"{wheel.name}: {req} (wheelhouse has {have[name]})")
            elif name not in on_image:
                unmet.append(f"{wheel.name}: {req} (neither in the wheelhouse nor on the GPU image)")
    return unmet


def module_files(stdout: str) -> dict:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("FILES "))
    return json.loads(line[len("FILES "):])


@pytest.mark.slow
def test_wheelhouse_installs_offline_and_meets_its_own_requirements(tmp_path, gpu_check):
    reason = index_unreachable()
    if reason:
        pytest.skip(reason)
    python, version = python_312()
    wheelhouse = tmp_path / "wheelhouse"
    built = subprocess.run(["bash", str(WHEELHOUSE_SCRIPT), str(wheelhouse)], capture_output=True, text=True,
                           timeout=900, env={**os.environ, "PYTHON": sys.executable, "PYTHON_VERSION": version})
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels = sorted(wheelhouse.glob("*.whl"))
    pins = subprocess.run(["bash", str(WHEELHOUSE_SCRIPT), "--list"], capture_output=True, text=True, check=True)
    assert len(wheels) == len(pins.stdout.split())
    size = sum(w.stat().st_size for w in wheels)
    assert size < 48 * 2**20, f"{size / 2**20:.1f} MiB"
    assert f"{len(wheels)} wheels" in built.stdout
    assert unmet_requirements(wheels, gpu_check.GPU_IMAGE_PACKAGES, version) == []

    # A fresh venv of the GPU image's Python, installed from the folder alone (no index).
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    vpython = str(venv / "bin" / "python")
    install = subprocess.run([vpython, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                              "--disable-pip-version-check", "--find-links", str(wheelhouse), *map(str, wheels)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    # PyYAML and packaging stand in for the image's own copies (omegaconf and hydra import them).
    stand_ins = subprocess.run([vpython, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "pyyaml",
                                "packaging"], capture_output=True, text=True, timeout=600)
    assert stand_ins.returncode == 0, stand_ins.stderr[-3000:]
    code = ("import json, hydra, omegaconf, antlr4, hjson, pydantic, pydantic_core, ftfy; "
            "from hydra import compose, initialize_config_dir; "
            "print('FILES ' + json.dumps({m.__name__: m.__file__ for m in (hydra, omegaconf, pydantic_core)}))")
    imported = subprocess.run([vpython, "-c", code], capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert all(path.startswith(str(venv)) for path in module_files(imported.stdout).values())

    # DeepSpeed and open_clip import torch: check them from this venv, through a --target folder of
    # the pure wheels on PYTHONPATH (as gpu_check.py installs them on the GPU machine).
    target = tmp_path / "target"
    pure = [str(w) for w in wheels if w.name.endswith("-none-any.whl")]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), *pure], check=True, timeout=600)
    code = ("import json, deepspeed, hydra, omegaconf, open_clip; "
            "print('FILES ' + json.dumps({m.__name__: m.__file__ for m in (deepspeed, hydra, omegaconf, open_clip)}))")
    env = {**os.environ, "PYTHONPATH": str(target), "TORCH_EXTENSIONS_DIR": str(tmp_path / "tx")}
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert imported.returncode == 0, imported.stderr[-3000:]
    files = module_files(imported.stdout)  # DeepSpeed prints its accelerator notice on stdout too
    assert set(files) == {"deepspeed", "hydra", "omegaconf", "open_clip"}
    assert all(path.startswith(str(target)) for path in files.values()), files


# ------------------------------------------------------------------------------------------ CPU-runnable phases

def test_data_phase_writes_laion_shaped_shards_the_kl8_pipeline_reads(tmp_path, gpu_check, monkeypatch):
    """The kl8 phases' data through the real loader with txt2img_kl8's data config (LAION filters,
    256 px, uint8 hand-over) and its tokenizer with the written vocabulary."""
    G = gpu_check
    for name, value in (("LAION_PARTS", 2), ("LAION_SAMPLES_PER_PART", 16), ("LAION_SAMPLES_PER_SHARD", 8),
                        ("QUICKSTART_SAMPLES", 16), ("QUICKSTART_SAMPLES_PER_SHARD", 8)):
        monkeypatch.setattr(G, name, value)
    ctx = G.Context(work=tmp_path, env={})
    ctx.results["data"] = {"status": "ok", **G.phase_data(ctx, 120)}
    from ldm_scale import config as config_lib
    from ldm_scale.data import build_loader
    from ldm_scale.dist import DistInfo
    from ldm_scale.models.tokenizers import build_tokenizer

    cfg = config_lib.to_object(config_lib.compose(G.kl8_overrides(ctx, "data-check", 4, ["data.num_workers=0"])))
    plan = config_lib.validate(cfg, 1, check_files=True)
    assert plan.image_size == 256
    batches = build_loader(cfg.data, DistInfo(), batch_size=4, seed=0, uint8_images=True).infinite()
    batch = next(batches)
    batches.close()
    assert batch["image"].shape == (4, 3, 256, 256) and str(batch["image"].dtype) == "torch.uint8"
    tokenizer = build_tokenizer(plan.spec.cond_stage.text.tokenizer)
    assert all(tokenizer.unk_id not in tokenizer.encode(c) for c in batch["caption"])
    quick = ctx.results["data"]["quickstart_urls"]
    assert len(quick) == 1 and Path(quick[0].split("{")[0], "00001.tar").exists()


def test_wheelhouse_phase_installs_the_folder_offline_when_a_module_is_missing(tmp_path, gpu_check, monkeypatch):
    G = gpu_check
    ctx = G.Context(work=tmp_path, env=child_env())
    assert G.phase_wheelhouse(ctx, 60)["installed"] == []  # everything is importable in this venv

    monkeypatch.setattr(G, "NEEDED_MODULES", ("gpu_check_wheel_probe",))
    monkeypatch.setattr(G, "WHEELHOUSE", tmp_path / "empty")
    with pytest.raises(G.PhaseFailed, match="gpu_wheelhouse.sh"):
        G.phase_wheelhouse(ctx, 60)

    house = tmp_path / "wheelhouse"
    house.mkdir()
    wheel = house / "gpu_check_wheel_probe-1.0-py3-none-any.whl"
    info = "gpu_check_wheel_probe-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("gpu_check_wheel_probe.py", "VALUE = 7\n")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu-check-wheel-probe\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    monkeypatch.setattr(G, "WHEELHOUSE", house)
    monkeypatch.setattr(sys, "path", list(sys.path))
    details = G.phase_wheelhouse(ctx, 120)
    assert details["installed"] == [wheel.name]
    assert (Path(details["target"]) / "gpu_check_wheel_probe.py").exists()
    assert ctx.env["PYTHONPATH"].split(os.pathsep)[0] == details["target"]  # children see it first


def test_summary_puts_the_doc_next_to_the_measurements(tmp_path, gpu_check):
    G = gpu_check
    ctx = G.Context(work=tmp_path, env={})
    ctx.results.update({
        "kl8_probe": {"status": "ok", "micro_batch": 32, "device": {"name": "NVIDIA H200"},
                      "loader_steps": {"peak_gib": 50.0, "data_wait_share": 0.01, "perf": {}},
                      "profile": {"kernels": [{"name": "k", "self_us": 1.0}]}},
        "kl8_train": {"status": "ok", "micro_batch": 32, "perf": {"perf/images_per_s_per_device": 200.0}},
        "gpu_tests": {"status": "failed", "passed": 10, "failed": [{"test": "t"}]}})
    summary = G.summarize(ctx)
    json.dumps(summary)
    kl8 = summary["kl8_vs_docs_scaling"]
    assert kl8["micro_batch"] == 32 and kl8["measured_images_per_s_per_gpu"] == 200.0 and kl8["device"] == "NVIDIA H200"
    assert summary["kl8_top_kernels"] == [{"name": "k", "self_us": 1.0}]
    assert summary["phases"] == {"kl8_probe": "ok", "kl8_train": "ok", "gpu_tests": "failed"}


def test_dit_bench_runs_here_and_reports_the_ratio_and_mfu(tmp_path):
    """The dit_bench phase's script, shrunk to seconds on CPU: matched FLOPs, both timings, MFU."""
    out = tmp_path / "dit.json"
    run_python(["benchmarks/bench_dit.py", "--latent", "8", "--batch", "2", "--unet-channels", "32", "--width", "128",
                "--rounds", "2", "--steps", "1", "--warmup", "1", "--json", str(out)], timeout=300).check()
    record = json.loads(out.read_text())
    unet, dit = record["forward_gflop_per_image"]["unet"], record["forward_gflop_per_image"]["dit"]
    assert abs(dit - unet) / unet < 0.1  # the depth search matched the UNet's FLOPs
    assert record["dit_over_unet_images_per_s"] > 0 and all(0 < v < 1.5 for v in record["mfu"].values())
    assert len(record["per_round_step_s"]["dit"]) == 2
