"""Shared fixtures. Each tier adds its own in tests/fixtures/ and lists it here."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402


# The modules that take minutes, longest first (seconds per module, both tiers, ``--durations=0`` on
# 2 cores under xdist, 2026-12-04; test_slurm's, ~2 min in CI, needs SLURM, which not every machine has).
# pyproject's addopts run the tests on xdist workers with ``--dist loadscope``: a module stays on one
# worker (its module-scoped fixtures, e.g. the quickstart run, are built once) and modules are handed
# out in collection order. Starting the longest first (list scheduling, longest job first) keeps one
# worker from still running a 15-minute module when the other has run out of work. An unlisted or
# renamed module only loses its early start.
LONGEST_MODULES = (
    "tests/unit/test_compile.py",  # 930 s: cold inductor builds
    "tests/integration/test_quickstart.py",  # 540 s: README's quickstart, then the bucketed one
    "tests/integration/test_slurm.py",
    "tests/integration/test_run_safety.py",  # 200 s
    "tests/integration/test_dit_train.py",  # 155 s
    "tests/integration/test_multinode.py",  # 150 s
    "tests/integration/test_own_data.py",  # 145 s
    "tests/integration/test_autoencoder_train.py",  # 110 s
    "tests/integration/test_console.py",  # 108 s
    "tests/integration/test_eval_fid.py",  # 97 s
    "tests/integration/test_precomputed_text.py",  # 89 s
    "tests/integration/test_training_stages.py",  # 79 s
    "tests/integration/test_resume_train.py",  # 76 s
)


@pytest.hookimpl(optionalhook=True)  # xdist's hook: pytest without xdist loaded (the GPU check) must not reject it
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core this process may use, at most 4: a worker's test may itself
    start a 2-rank torchrun job and inductor's compile workers, so more workers than cores only
    queue for them (and every worker holds its own ~2 GB of imports and fixtures)."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def _longest_first(items) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_MODULES)}
    # Stable: within a module, and among the unlisted ones, the collection order stands. Every xdist
    # worker sorts the same collection the same way, as xdist requires.
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(LONGEST_MODULES)))


def pytest_collection_modifyitems(config, items):
    """Longest modules first (see LONGEST_MODULES). Tests marked ``gpu`` cover CUDA-only branches:
    they skip, with the reason, where CUDA is absent (benchmarks/gpu_check.py runs them on a GPU
    machine)."""
    import torch

    _longest_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); "
                                   "run benchmarks/gpu_check.py on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.gcs", "tests.fixtures.torchrun", "tests.fixtures.slurm",
                  "tests.fixtures.shapes"]
