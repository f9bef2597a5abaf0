"""`python launch/train.py experiment=quickstart` without any launcher: a world of one, as every trainer
allows. DeepSpeed used to stop it with "No module named 'mpi4py'" (it tries MPI discovery when the
launcher variables are missing); dist.init_distributed now makes the process rank 0 of 1 itself."""
from __future__ import annotations

import json

import pytest

from tests.fixtures.torchrun import run_python
from tests.integration.tiny_training import TRAIN_SCRIPT, tiny_overrides, write_shards

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_stray_processes")]

MAX_STEPS = 3


def test_plain_python_trains_the_quickstart_as_a_world_of_one(tmp_path):
    output_dir = tmp_path / "runs"
    args = [TRAIN_SCRIPT, *tiny_overrides(write_shards(tmp_path / "data"), output_dir, MAX_STEPS), "run_id=solo"]
    result = run_python(args, timeout=600).check()  # child_env: no RANK/WORLD_SIZE/MASTER_* at all
    assert "mpi4py" not in result.stderr
    run_dir = output_dir / "solo"
    assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 1
    done = json.loads((run_dir / "result.json").read_text())
    assert done["step"] == MAX_STEPS and done["samples_seen"] == MAX_STEPS * 2  # micro-batch 2, world 1
