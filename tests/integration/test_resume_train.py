"""End to end through the real entry point: `torchrun launch/train.py` (tiny text-to-image LDM, 2 ranks,
ZeRO-2, CPU) checkpointing to a real S3 API server; kill -9 of a rank -> torchrun restarts the group
-> auto-resume from `latest` -> every logged loss equals an uninterrupted run's; then the offline
export CLI consolidates the S3 checkpoint into files that the sampler loads.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ldm_scale.data.synthetic import write_synthetic_dataset
from tests.fixtures.s3 import SECRET_KEY
from tests.fixtures.torchrun import (
    kill_group,
    run_python,
    run_torchrun,
    start_group,
    torchrun_cmd,
)
from tests.integration.tiny_training import TRAIN_SCRIPT, tiny_overrides, write_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]
STEPS = 8


def overrides(data_url: str, out: Path, run_id: str, ckpt_root: str) -> list[str]:
    args = tiny_overrides(data_url, out, STEPS)
    args = [a for a in args if not a.startswith(("train.log_every", "checkpoint.", "logger="))]
    return args + [f"run_id={run_id}", "train.log_every=1", "logger=none", f"checkpoint.root={ckpt_root}",
                   "checkpoint.every_steps=4", "checkpoint.keep_last=2", f"checkpoint.local_dir={out}/staging_{run_id}",
                   "checkpoint.export_final=true", "eval.val_every=4", f"eval.val_data=['{out.parent}/val/{{00000..00001}}.tar']",
                   "eval.val_samples=12", "eval.val_batch_size=4"]


def logged_val(out: Path, run_id: str) -> list[tuple[int, dict]]:
    rows = [json.loads(line) for line in (out / run_id / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], {k: v for k, v in r.items() if k.startswith("val/")}) for r in rows if "val/loss" in r]


def logged_losses(out: Path, run_id: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / run_id / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def worker_pids(agent_pid: int) -> dict[int, int]:
    """{RANK: pid} of the torchrun agent's worker processes."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            out[int(env[b"RANK"])] = int(pid)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return out


def test_kill9_restart_resume_is_exact_and_export_cli_round_trips(s3_server, tmp_path):
    data_url = write_shards(tmp_path / "data")
    write_synthetic_dataset(str(tmp_path / "val"), num_samples=16, samples_per_shard=8, seed=1, min_size=32, max_size=40)
    out = tmp_path / "runs"
    root = s3_server.url("ckpt")
    run_torchrun([TRAIN_SCRIPT, *overrides(data_url, out, "ref", root)], timeout=900).check()
    reference = dict(logged_losses(out, "ref"))
    assert sorted(reference) == list(range(1, STEPS + 1))

    # The same run, with rank 1 SIGKILLed once checkpoint step_4 is published on S3.
    client = s3_server.client()
    cmd = torchrun_cmd([TRAIN_SCRIPT, *overrides(data_url, out, "killed", root)], max_restarts=1)
    killed_at = None
    with open(tmp_path / "killed.log", "w") as log:
        agent = start_group(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while killed_at is None and agent.poll() is None and time.monotonic() < deadline:
                try:
                    tag = client.get_object(Bucket=s3_server.bucket, Key="ckpt/killed/latest")["Body"].read()
                except client.exceptions.NoSuchKey:
                    tag = b""
                if tag == b"step_4":
                    os.kill(worker_pids(agent.pid)[1], signal.SIGKILL)
                    killed_at = time.monotonic()
                time.sleep(0.1)
            assert killed_at is not None, "the run ended before step_4 was published"
            assert agent.wait(timeout=900) == 0, (tmp_path / "killed.log").read_text()[-5000:]
        finally:
            kill_group(agent)
    text = (tmp_path / "killed.log").read_text()
    rows = logged_losses(out, "killed")
    # One row per step: the restarted group dropped the rows after step_4 and logged them again.
    assert [step for step, _ in rows] == list(range(1, STEPS + 1)), rows
    assert json.loads((out / "killed" / "result.json").read_text())["resumed_from"] == 4  # not from scratch
    for step, loss in rows:
        assert loss == reference[step], (step, loss, reference[step])
    # The fixed-timestep validation loss, every 4 steps: the same bits after the restart, and one
    # row per validation (the pre-kill row at step 4 kept, none logged twice).
    assert [s for s, _ in logged_val(out, "ref")] == [4, 8]
    assert logged_val(out, "killed") == logged_val(out, "ref")
    assert SECRET_KEY not in text

    # Offline export of the S3 checkpoint (run directory -> its `latest`) equals the loop's own export.
    live_path = _download(client, s3_server.bucket, "ckpt/killed/export.pt", tmp_path / "live.pt")
    live = torch.load(live_path, map_location="cpu", weights_only=False)
    offline_path = tmp_path / "offline.pt"
    res = run_python(["-m", "ldm_scale.train.export", f"{root}/killed", str(offline_path)], timeout=600).check()
    assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == STEPS
    offline = torch.load(offline_path, map_location="cpu", weights_only=False)
    assert offline["format"] == "ldm_scale/ldm-v1" and offline["step"] == live["step"] == STEPS
    assert offline["state_dict"].keys() == live["state_dict"].keys()
    for key, value in live["state_dict"].items():
        torch.testing.assert_close(offline["state_dict"][key], value, rtol=0, atol=0, msg=key)
    for key, value in live["ema_state_dict"].items():
        torch.testing.assert_close(offline["ema_state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert offline["scale_factor"] == pytest.approx(live["scale_factor"])

    # bf16 + CompVis layout; and the sampler loads the ldm_scale export with its EMA weights.
    compvis_path = tmp_path / "compvis.pt"
    run_python(["-m", "ldm_scale.train.export", f"{root}/killed/step_{STEPS}", str(compvis_path), "--dtype", "bf16",
                "--compvis"], timeout=600).check()
    compvis = torch.load(compvis_path, map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("model.diffusion_model.") for k in compvis)
    assert any(k.startswith("model_ema.") for k in compvis)
    assert all(v.dtype == torch.bfloat16 for k, v in compvis.items() if v.is_floating_point() and k != "scale_factor")
    from ldm_scale.sampling import load_checkpoint

    loaded = load_checkpoint(str(offline_path), use_ema=True)
    assert loaded.step == STEPS and loaded.used_ema


def _download(client, bucket: str, key: str, path: Path) -> Path:
    path.write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    return path
