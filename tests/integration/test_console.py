"""The console of a real 2-rank run (launch/train.py under torchrun, gloo on CPU): no library
warnings, compiler lines or DeepSpeed start-up chatter by default; warnings shown with
``logger.show_library_warnings=true``, while compiler output still goes to the build log.

Both runs read their shards from a real S3 server configured through ``storage.endpoint_url``
alone (the AWS endpoint variables are removed), so the pair also covers "one storage block" for a
whole run, data-loader workers included.
"""
from __future__ import annotations

import re

import pytest

from ldm_scale.train import ds_ops
from tests.integration.tiny_training import TRAIN_SCRIPT, tiny_overrides, write_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]

NOISE = re.compile(r"FutureWarning|DeprecationWarning|^gcc |Setting accelerator to CPU|No CUDA runtime is found",
                   re.MULTILINE)


def _build_log() -> str:
    path = ds_ops.extensions_dir() / ds_ops.BUILD_LOG  # same environment as the children
    return path.read_text(errors="replace") if path.exists() else ""


def test_console_is_quiet_by_default_and_shows_library_warnings_on_request(s3_server, monkeypatch, tmp_path,
                                                                           torchrun):
    data_url = write_shards(s3_server.url("shapes"))
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name)
    args = [TRAIN_SCRIPT, *tiny_overrides(data_url, tmp_path / "runs", max_steps=2),
            f"storage.endpoint_url={s3_server.endpoint_url}"]

    quiet = torchrun([*args, "run_id=quiet"], env={ds_ops.SHM_COMM_ENV: "0"}).check()
    console = quiet.stdout + quiet.stderr
    assert not NOISE.search(console), console[-4000:]
    assert "finished at step 2" in console
    assert "no checkpoint to resume" in console and console.count("no checkpoint to resume") == 1  # rank 0 only

    # The switch, with DeepSpeed's CPU comm op built as DeepSpeed would (its probe runs the compiler).
    log_before = len(_build_log())
    shown = torchrun([*args, "run_id=shown", "logger.show_library_warnings=true"],
                     env={ds_ops.SHM_COMM_ENV: "1"}).check()
    console = shown.stdout + shown.stderr
    assert "FutureWarning" in console and "Setting accelerator to CPU" in console, console[-4000:]
    assert not re.search(r"^gcc ", console, re.MULTILINE), console[-4000:]
    assert re.search(r"^gcc ", _build_log()[log_before:], re.MULTILINE)
