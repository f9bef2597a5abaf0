"""setup_console: warnings raised inside dependencies and their start-up chatter are dropped unless
asked for (config switch or environment variable); our own warnings always show; ranks > 0 log
warnings and errors only."""
from __future__ import annotations

import logging
import warnings

import pytest

from ldm_scale.logging import LIBRARY_NOISE, SHOW_LIBRARY_WARNINGS_ENV, setup_console


def _emit() -> None:
    warnings.warn_explicit("all_gather_into_tensor is deprecated", FutureWarning, "c10d_logger.py", 83,
                           module="torch.distributed.c10d_logger")
    warnings.warn_explicit("an old deepspeed api", DeprecationWarning, "engine.py", 1, module="deepspeed.runtime")
    warnings.warn_explicit("our own deprecation", FutureWarning, "loader.py", 1, module="ldm_scale.data.loader")
    warnings.warn_explicit("torchvision-like but not torch", UserWarning, "x.py", 1, module="torchish")


def _shown(show_cfg: bool) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:  # restores the filters afterwards
        warnings.simplefilter("always")
        setup_console(show_cfg)
        _emit()
    return sorted(str(w.message) for w in seen)


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    monkeypatch.delenv(SHOW_LIBRARY_WARNINGS_ENV, raising=False)
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)
    setup_console(True)  # leave no noise filters on library loggers for later tests


def test_library_warnings_are_dropped_by_default_and_shown_with_the_switch(monkeypatch):
    assert _shown(False) == ["our own deprecation", "torchvision-like but not torch"]
    assert len(_shown(True)) == 4
    monkeypatch.setenv(SHOW_LIBRARY_WARNINGS_ENV, "1")  # the variable wins over the config
    assert len(_shown(False)) == 4
    monkeypatch.setenv(SHOW_LIBRARY_WARNINGS_ENV, "0")
    assert len(_shown(True)) == 2


def test_known_library_chatter_is_dropped_unless_shown():
    record = logging.LogRecord("DeepSpeed", logging.WARNING, "real_accelerator.py", 213,
                               LIBRARY_NOISE["DeepSpeed"][0] + ". If you have GPU ...", None, None)
    other = logging.LogRecord("DeepSpeed", logging.WARNING, "engine.py", 1, "gradient overflow", None, None)
    logger = logging.getLogger("DeepSpeed")
    setup_console(False)
    assert not logger.filter(record) and logger.filter(other)
    setup_console(True)
    assert logger.filter(record)


def test_ranks_other_than_zero_log_warnings_only():
    logging.getLogger().setLevel(logging.INFO)
    setup_console(False, rank=0)
    assert logging.getLogger().level == logging.INFO
    setup_console(False, rank=1)
    assert logging.getLogger().level == logging.WARNING
