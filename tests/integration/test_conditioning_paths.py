"""Every conditioner kind trains through build_task: a jointly trained one inside the engine (and in
its state), a frozen one outside it (driver: _conditioning_paths_driver.py)."""
from __future__ import annotations

import json
import math

import pytest

from ldm_scale.data.synthetic import write_synthetic_dataset
from tests.fixtures.torchrun import REPO_ROOT, run_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond_paths")
    write_synthetic_dataset(str(root), num_samples=16, samples_per_shard=8, seed=0, labels="both")
    run = run_python([str(REPO_ROOT / "tests" / "integration" / "_conditioning_paths_driver.py"),
                      f"{root}/{{00000..00001}}.tar"], timeout=600).check()
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return {r["flavour"]: r for r in json.loads(line[len("RESULT "):])}


@pytest.mark.parametrize("flavour,inside", [("tiny", True), ("tiny_cin", True), ("tiny_uncond", False)])
def test_each_conditioner_kind_trains(results, flavour, inside):
    r = results[flavour]
    assert r["healthy"] == [True, True] and all(math.isfinite(x) for x in r["losses"]), r
    assert r["conditions_inside"] is inside
    assert ("cond_stage" in r["engine_submodules"]) is inside, r  # a frozen conditioner is not in the engine
    assert "unet" in r["engine_submodules"]
