"""Sampling with the EMA swapped into real DeepSpeed ZeRO-2 and ZeRO-3 engines (2 ranks, gloo, CPU).
The driver (``_ema_swap_driver.py``) runs both stages in one launch: a torchrun start costs tens of
seconds here."""
from __future__ import annotations

import re

import pytest

from tests.fixtures.torchrun import REPO_ROOT, run_torchrun

DRIVER = str(REPO_ROOT / "tests" / "integration" / "_ema_swap_driver.py")
pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_ema_swapped_in_under_zero2_and_zero3_then_training_continues_unchanged():
    res = run_torchrun([DRIVER, "--stages", "2,3"], timeout=600)
    res.check()
    checks = {(int(s), name): value for s, name, value in re.findall(r"CHECK (\d) (\S+) (\S+)", res.stdout)}
    for stage in (2, 3):
        assert float(checks[stage, "ema_vs_weights"]) > 1e-4, checks  # the swap has something to show
        assert float(checks[stage, "output_vs_reference"]) == 0.0, checks  # computes with the EMA
        assert float(checks[stage, "params_vs_ema"]) == 0.0, checks
        assert checks[stage, "tensors_not_restored"] == "0", checks  # trained weights back, bitwise
        assert checks[stage, "same_losses_after"] == "True", checks  # training unaffected
        assert checks[stage, "flat_gather_equals_shards"] == "True", checks  # no pickling, same values
