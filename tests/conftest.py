"""Shared fixtures. Each tier adds its own in tests/fixtures/ and lists it here."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.gcs", "tests.fixtures.torchrun", "tests.fixtures.slurm"]
