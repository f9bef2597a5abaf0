"""Shared fixtures. Each tier adds its own in tests/fixtures/ and lists it here."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` cover CUDA-only branches: they skip, with the reason, where CUDA is absent
    (benchmarks/gpu_check.py runs them on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); "
                                   "run benchmarks/gpu_check.py on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.gcs", "tests.fixtures.torchrun", "tests.fixtures.slurm",
                  "tests.fixtures.shapes"]
