"""Shared settings for the launcher tests: a tiny text-to-image run of launch/train.py on CPU.

The quickstart experiment shrunk to a few steps on freshly written synthetic shards, with a random
first stage (no downloads) and no logging backend, so a launch costs mostly interpreter start-up.
"""
from __future__ import annotations

from pathlib import Path

from tests.fixtures.torchrun import REPO_ROOT

TRAIN_SCRIPT = str(REPO_ROOT / "launch" / "train.py")


def write_shards(root: Path) -> str:
    """Four small synthetic shards; returns the brace URL for data.urls."""
    from ldm_scale.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(str(root), num_samples=64, samples_per_shard=16, seed=0, min_size=32, max_size=40)
    return f"{root}/{{00000..00003}}.tar"


def tiny_overrides(data_url: str, output_dir: Path, max_steps: int) -> list[str]:
    """Hydra overrides for launch/train.py (without run_id: the launchers set it)."""
    return [
        "experiment=quickstart",
        "model.allow_random_first_stage=true",
        f'data.urls=["{data_url}"]',
        "data.num_workers=0",
        "train.micro_batch_size=2",
        f"train.max_steps={max_steps}",
        "train.log_every=1000",  # no metric logging: these tests are about launching
        "train.progress_bar=false",
        "checkpoint.every_steps=0",
        "checkpoint.export_final=false",
        "eval.sample_at_end=false",
        "eval.prompt_adherence_samples=0",
        "logger=none",
        "logger.report=false",  # rendered and checked in test_run_report.py
        "preemption.check_every=1",
        f"output_dir={output_dir}",
    ]


def events(run_dir: Path) -> list[dict]:
    """The run's event log (``events.jsonl``: one record per resume, written by rank 0)."""
    import json

    from ldm_scale.train.run_records import EVENTS_FILE

    path = Path(run_dir) / EVENTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
