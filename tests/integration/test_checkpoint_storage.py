"""CheckpointManager against real storage (local disk, a moto S3 server we can stop): retention,
confirmation before `latest`, outages, and the pure helpers.

One process (world size 1). The engine here is a minimal stand-in implementing the two DeepSpeed
engine methods the manager calls (``save_checkpoint`` / ``load_checkpoint``); the manager, the
storage layer and the S3 server are real. DeepSpeed engines are exercised under torchrun in
test_checkpoint_resume.py.
"""
from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ldm_scale import storage
from ldm_scale.dist import DistInfo
from ldm_scale.train.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    describe_shape_mismatch,
    file_owner,
    parse_step,
    steps_to_delete,
)
from ldm_scale.train.ema import CpuEma, EmaConfig
from tests.fixtures.s3 import SECRET_KEY, S3Server, _wait_listening, free_port


class FileEngine:
    """The DeepSpeed-engine surface the manager uses, writing one model-states file per tag."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.global_steps = 0
        self._config = SimpleNamespace(load_universal_checkpoint=False)

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, save_dir, tag, client_state):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"module": self.module.state_dict(), "global_steps": self.global_steps, **client_state},
                   os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, load_dir, tag, **kwargs):
        path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
        state = torch.load(path)
        self.module.load_state_dict(state["module"])
        self.global_steps = state["global_steps"]
        return path, state


def make(width: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    engine = FileEngine(nn.Sequential(nn.Linear(4, width), nn.Linear(width, 2)))
    return engine, CpuEma(engine.module, EmaConfig(decay=0.5, async_update=False))


def train_steps(engine, ema, n):
    for _ in range(n):
        with torch.no_grad():
            for p in engine.module.parameters():
                p.add_(0.1)
        engine.global_steps += 1
        ema.update(engine.global_steps)


def manager(root, tmp_path, **kw):
    cfg = CheckpointConfig(root=root, local_dir=str(tmp_path / "local"), every_steps=1, poll_interval_s=0.05,
                           confirm_timeout_s=30, **kw)
    return CheckpointManager(cfg, run_id="run", dist_info=DistInfo())


# --- pure helpers --------------------------------------------------------------------------------
def test_retention_policy():
    assert steps_to_delete([1, 2, 3, 4, 5], [], 5, keep_last=2, keep_every=None) == [1, 2, 3]
    assert steps_to_delete([10, 20, 30, 40, 50], [], 50, keep_last=1, keep_every=20) == [10, 30]
    # `latest` is never deleted even if retention alone would drop it.
    assert steps_to_delete([1, 2, 3], [], 1, keep_last=1, keep_every=None) == [2]
    # Incomplete: older than latest = abandoned upload (deleted); newer = maybe still uploading.
    assert steps_to_delete([4], [2, 6], 4, keep_last=3, keep_every=None) == [2]
    assert steps_to_delete([], [3], None, keep_last=1, keep_every=None) == []
    with pytest.raises(ValueError, match="keep_last"):
        steps_to_delete([1], [], 1, keep_last=0, keep_every=None)


def test_file_ownership_and_names():
    assert file_owner("model/zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert file_owner("model/bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert file_owner("model/mp_rank_00_model_states.pt") == 0  # shared, rank 0 uploads
    assert file_owner("ema_rank5.pt") == 5 and file_owner("loader_rank1.pt") == 1
    assert file_owner("client_state.json") == 0
    assert parse_step("s3://b/ckpt/run/step_120/") == 120 and parse_step("latest") is None
    assert describe_shape_mismatch({"a": [2, 3]}, {"a": [2, 3]}) is None
    msg = describe_shape_mismatch({"a": [2, 3], "b": [1]}, {"a": [2, 4], "c": [1]})
    assert "a is [2, 3] in the checkpoint, [2, 4] here" in msg and "first: b" in msg and "first: c" in msg


# --- local storage ---------------------------------------------------------------------------------
def test_save_resume_prune_on_local_disk(tmp_path):
    root = str(tmp_path / "ckpt")
    engine, ema = make()
    m = manager(root, tmp_path, keep_last=2, keep_every=4)
    gen = torch.Generator().manual_seed(7)
    for step in range(1, 7):
        train_steps(engine, ema, 1)
        m.save(step, engines={"model": engine}, ema=ema, client_state={"step": step, "samples_seen": 8 * step},
               generators={"noise": gen})
    m.close()
    run = tmp_path / "ckpt" / "run"
    assert (run / "latest").read_text() == "step_6"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step_")) == ["step_4", "step_5", "step_6"]
    assert sorted(os.listdir(m.local_run_dir)) == ["step_6"]  # keep_local=1
    assert os.path.dirname(m.local_run_dir) == str(tmp_path / "local")
    # Same run id under another root: its own staging folder, never the other run's staged weights.
    assert manager(str(tmp_path / "other_root"), tmp_path).local_run_dir != m.local_run_dir
    complete = json.loads((run / "step_6" / "COMPLETE").read_text())
    assert complete["world_size"] == 1 and "model/mp_rank_00_model_states.pt" in complete["files"]
    expected = {k: v.clone() for k, v in ema.full_state_dict().items()}
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    after_save = torch.rand(3, generator=gen)
    torch.manual_seed(99)
    expected_noise = torch.rand(3)

    # A fresh process-equivalent resumes everything: weights, EMA, step, RNGs (global + named).
    engine2, ema2 = make(seed=1)
    gen2 = torch.Generator().manual_seed(0)
    shutil_local = tmp_path / "local"
    import shutil

    shutil.rmtree(shutil_local)  # force a download from the root
    torch.manual_seed(99)
    m2 = manager(root, tmp_path)
    meta = m2.resume(engines={"model": engine2}, ema=ema2, generators={"noise": gen2})
    assert m2.last_saved_step == 6  # a run restarted at its last step does not save that step again
    assert meta["step"] == 6 and meta["samples_seen"] == 48 and engine2.global_steps == 6
    for k, v in engine2.module.state_dict().items():
        assert torch.equal(v, weights[k])
    for k, v in ema2.full_state_dict().items():
        assert torch.equal(v, expected[k])
    assert ema2.num_updates == 6 and not ema2.update(6)
    assert torch.equal(torch.rand(3, generator=gen2), after_save)
    assert not torch.equal(torch.rand(3), expected_noise)  # global RNG came from the checkpoint


def test_resume_errors_are_clear_and_destroy_nothing(tmp_path):
    root = str(tmp_path / "ckpt")
    engine, ema = make()
    m = manager(root, tmp_path)
    train_steps(engine, ema, 2)
    m.save(2, engines={"model": engine}, ema=ema, client_state={"step": 2})
    m.close()
    before = sorted(p.name for p in (tmp_path / "ckpt" / "run").rglob("*"))

    other, other_ema = make(width=16)
    with pytest.raises(CheckpointError, match=r"different model .*3 shapes differ \(first: 0.bias is \[8\] in the checkpoint, \[16\] here"):
        manager(root, tmp_path).resume(engines={"model": other}, ema=other_ema)
    with pytest.raises(CheckpointError, match="holds engines"):
        manager(root, tmp_path).resume(engines={"generator": engine}, ema=ema)
    (tmp_path / "ckpt" / "run" / "latest").write_text("garbage")
    with pytest.raises(CheckpointError, match="not a step_<N> tag"):
        manager(root, tmp_path).resume(engines={"model": engine}, ema=ema)
    (tmp_path / "ckpt" / "run" / "latest").write_text("step_2")
    assert sorted(p.name for p in (tmp_path / "ckpt" / "run").rglob("*")) == before
    assert manager(root, tmp_path, resume="never").resume(engines={"model": engine}) is None
    assert manager(str(tmp_path / "empty"), tmp_path).resume(engines={"model": engine}) is None
    with pytest.raises(ValueError, match="checkpoint.root is not set"):
        CheckpointManager(CheckpointConfig(), run_id="x")


# --- S3 outages ---------------------------------------------------------------------------------
class StoppableS3:
    """moto's S3 server on a fixed 127.0.0.1 port that can be stopped and started again. The
    objects live in this process's moto backend, so they survive the outage, as on a real store."""

    def __init__(self, monkeypatch):
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.port = free_port()
        self.server = None
        self.start()
        self.s3 = S3Server(endpoint_url=f"http://127.0.0.1:{self.port}", bucket="")
        for key, value in self.s3.env.items():
            monkeypatch.setenv(key, value)
        self.s3.bucket = self.s3.make_bucket()

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        _wait_listening(self.port)

    def stop(self) -> None:
        self.server.stop()


@pytest.mark.slow
def test_s3_outage_during_upload_is_retried_and_latest_is_never_partial(monkeypatch, tmp_path, caplog):
    store = StoppableS3(monkeypatch)
    s3 = store.s3
    storage.configure(storage.StorageConfig(retries=8, backoff_s=0.3, max_backoff_s=1.5, timeout_s=5.0))
    try:
        root = s3.url("ckpt")
        engine, ema = make(width=256)
        m = manager(root, tmp_path, keep_last=5)
        train_steps(engine, ema, 1)
        m.save(1, engines={"model": engine}, ema=ema, client_state={"step": 1})
        m.wait()

        # Watch `latest` throughout: whenever it exists, its checkpoint is COMPLETE with every file.
        seen, stop = [], threading.Event()
        client = s3.client()

        def watch():
            while not stop.is_set():
                try:
                    tag = client.get_object(Bucket=s3.bucket, Key="ckpt/run/latest")["Body"].read().decode()
                    manifest = json.loads(client.get_object(Bucket=s3.bucket,
                                                            Key=f"ckpt/run/{tag}/COMPLETE")["Body"].read())
                    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket,
                                                                     Prefix=f"ckpt/run/{tag}/")["Contents"]}
                    seen.append((tag, all(f"ckpt/run/{tag}/{rel}" in keys for rel in manifest["files"])))
                except Exception as exc:  # server down: nothing to check right now
                    seen.append(("down", type(exc).__name__))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            store.stop()  # the outage starts before the upload of step 2
            train_steps(engine, ema, 1)
            t0 = time.monotonic()
            m.save(2, engines={"model": engine}, ema=ema, client_state={"step": 2})
            assert time.monotonic() - t0 < 5  # the loop is not blocked by the outage
            time.sleep(1.5)
            store.start()
            m.wait()
        finally:
            stop.set()
            watcher.join()
        assert client.get_object(Bucket=s3.bucket, Key="ckpt/run/latest")["Body"].read() == b"step_2"
        published = [ok for tag, ok in seen if tag != "down"]
        assert published and all(ok is True for ok in published)
        assert any("retry" in r.getMessage() for r in caplog.records)

        # A permanent outage: the upload fails after its retries, `latest` stays, the error is clear.
        store.stop()
        storage.configure(storage.StorageConfig(retries=1, backoff_s=0.1, timeout_s=2.0))
        train_steps(engine, ema, 1)
        m.save(3, engines={"model": engine}, ema=ema, client_state={"step": 3})
        with pytest.raises(RuntimeError, match="step_3 could not be uploaded"):
            m.wait()
        store.start()
        assert client.get_object(Bucket=s3.bucket, Key="ckpt/run/latest")["Body"].read() == b"step_2"
        m.close()
        assert SECRET_KEY not in caplog.text
    finally:
        storage.configure(storage.StorageConfig())
        store.stop()
