"""Checkpoints + CPU EMA with real DeepSpeed ZeRO engines under torchrun (2 ranks, gloo, CPU).

The toy driver (``_ckpt_driver.py``) is independent of the training spine; each launch combines
several checks because a torchrun + DeepSpeed start costs tens of seconds here. ZeRO-2 kill -> resume
exactness is covered end to end through launch/train.py in test_resume_train.py.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.fixtures.s3 import SECRET_KEY
from tests.fixtures.torchrun import REPO_ROOT, run_torchrun

DRIVER = str(REPO_ROOT / "tests" / "integration" / "_ckpt_driver.py")
pytestmark = [pytest.mark.dist, pytest.mark.slow]


def losses(out: Path, rank: int = 0) -> dict:
    """{(attempt, step): loss} from the driver's log."""
    rows = [json.loads(line) for line in (out / f"losses_rank{rank}.jsonl").read_text().splitlines()]
    return {(r["attempt"], r["step"]): r["loss"] for r in rows}


def test_zero3_on_s3_kill9_restart_resumes_exactly(s3_server, tmp_path):
    """kill -9 of rank 1 -> torchrun restarts the group -> resume from `latest` on S3 -> the replayed
    steps reproduce the first attempt's losses bit for bit; retention pruned; no secret anywhere."""
    out = tmp_path / "out"
    root = s3_server.url("ckpt")
    res = run_torchrun([DRIVER, "--stage", "3", "--root", root, "--run-id", "run-a", "--steps", "8",
                        "--every", "3", "--accum", "2", "--keep-last", "1", "--kill-at", "5", "--out", str(out)],
                       max_restarts=1, timeout=600)
    res.check()
    assert res.stdout.count("RESUMED step=3 world=2 from_world=2 ema_updates=3") == 2, res.stdout
    got = losses(out)
    assert {s for a, s in got if a == 0} == {1, 2, 3, 4, 5}
    for step in (4, 5):  # replayed after the restart: identical optimizer, EMA, data and RNG state
        assert got[(1, step)] == got[(0, step)]
    assert (1, 8) in got

    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket)["Contents"]]
    assert client.get_object(Bucket=s3_server.bucket, Key="ckpt/run-a/latest")["Body"].read() == b"step_6"
    assert not any(k.startswith("ckpt/run-a/step_3/") for k in keys)  # keep_last=1 pruned it
    manifest = json.loads(client.get_object(Bucket=s3_server.bucket, Key="ckpt/run-a/step_6/COMPLETE")["Body"].read())
    for rel in manifest["files"]:
        assert f"ckpt/run-a/step_6/{rel}" in keys
    assert {"model/zero_pp_rank_1_mp_rank_00_optim_states.pt", "ema_rank1.pt", "loader_rank1.pt",
            "rng_rank0.pt", "client_state.json"} <= set(manifest["files"])

    # Credentials never reach logs, checkpoint objects or the local staging files.
    assert SECRET_KEY not in res.stdout + res.stderr
    for key in keys:
        assert SECRET_KEY.encode() not in client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read(), key
    for path in (out / "local").rglob("*"):
        if path.is_file():
            assert SECRET_KEY.encode() not in path.read_bytes(), path


def test_zero3_ema_matches_full_param_ema_then_resume_on_one_rank(tmp_path):
    """Launch 1 (2 ranks, ZeRO-3): the sharded CPU EMA of fp32 partitions equals an EMA of the
    gathered full parameters. Launch 2 (1 rank): wrong model / incomplete / corrupt checkpoints are
    refused with clear errors, then the 2-rank checkpoint resumes on 1 rank (universal checkpoint,
    EMA re-split) with identical weights and continues."""
    root = tmp_path / "ckpt"
    out1 = tmp_path / "out1"
    res = run_torchrun([DRIVER, "--stage", "3", "--root", str(root), "--run-id", "run-c", "--steps", "4",
                        "--every", "2", "--accum", "2", "--keep-last", "3", "--ema-check", "--out", str(out1)],
                       timeout=600)
    res.check()
    diff = float(re.search(r"EMA_MAX_DIFF (\S+) updates=4", res.stdout).group(1))
    assert diff <= 1e-6
    saved = re.search(r"SAVED step=4 params=(\S+)", res.stdout).group(1)
    run = root / "run-c"
    assert (run / "latest").read_text() == "step_4"

    # Broken checkpoints next to the good ones: nothing about them may be loaded or deleted.
    shutil.copytree(run / "step_2", run / "step_90")
    (run / "step_90" / "COMPLETE").unlink()
    shutil.copytree(run / "step_2", run / "step_91")
    ema0 = run / "step_91" / "ema_rank0.pt"
    ema0.write_bytes(ema0.read_bytes()[:100])
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    out2 = tmp_path / "out2"
    bad = f"{run / 'step_90'},{run / 'step_91'},{run / 'step_77'}"
    res = run_torchrun([DRIVER, "--stage", "3", "--root", str(root), "--run-id", "run-c", "--steps", "6",
                        "--every", "0", "--accum", "2", "--error-checks", "--out", str(out2)],
                       nproc=1, env={"BAD_RESUME_URLS": bad}, timeout=600)
    res.check()
    checks = dict(re.findall(r"ERROR_CHECK (\S+): (.*)", res.stdout))
    assert "different model" in checks["other_model"] and "0.bias is [32] in the checkpoint, [24] here" in checks["other_model"]
    assert "incomplete" in checks["step_90"] and "COMPLETE" in checks["step_90"]
    assert "corrupt" in checks["step_91"]
    assert "does not exist" in checks["step_77"]
    assert f"RESUMED step=4 world=1 from_world=2 ema_updates=4 params={saved}" in res.stdout
    assert "DONE step=6" in res.stdout
    after = {str(p.relative_to(root)) for p in root.rglob("*")}
    assert set(before) <= after  # the failed resumes deleted nothing

    # The EMA continued from the re-split shards: 2 more updates on top of launch 1's.
    ema1 = torch.load(out1 / "ema_final_attempt0.pt")
    ema2 = torch.load(out2 / "ema_final_attempt0.pt")
    assert ema1.keys() == ema2.keys()
    assert any(not torch.equal(ema1[k], ema2[k]) for k in ema1)
