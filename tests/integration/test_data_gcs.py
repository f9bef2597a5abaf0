"""The pipeline against a real GCS JSON-API server on 127.0.0.1 (gcp-storage-emulator, through gcsfs):
shards written to gs:// by data_tools/make_synthetic.py load as the same batches as from disk, and an
unreachable endpoint or a server lost mid-epoch gives a clear error naming the URL after the
configured retries (gcsfs's own retry loop would otherwise take ~30 s per call)."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from ldm_scale import storage
from ldm_scale.data import DataConfig, build_loader
from ldm_scale.data.synthetic import write_synthetic_dataset
from ldm_scale.dist import DistInfo
from ldm_scale.storage import StorageConfig, StorageError
from tests.fixtures.s3 import free_port

SYNTH = ["num_samples=32", "samples_per_shard=8", "seed=4", "min_size=32", "max_size=48"]


def _cfg(urls: str, storage_cfg: StorageConfig, **kw) -> DataConfig:
    base = dict(urls=[urls], resolution=32, num_workers=2, shuffle_buffer=4, crop="random", flip=True,
                storage=storage_cfg)
    base.update(kw)
    return DataConfig(**base)


def _make_synthetic():
    path = Path(__file__).resolve().parents[2] / "data_tools" / "make_synthetic.py"
    spec = importlib.util.spec_from_file_location("make_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gs_batches_equal_local_batches(gcs_server, tmp_path, capsys):
    make_synthetic = _make_synthetic()
    local = str(tmp_path / "shards")
    remote = gcs_server.url("shapes")
    for root, extra in ((local, []), (remote, ["storage.anon=true"])):
        assert make_synthetic.main([f"out={root}", *SYNTH, *extra]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["urls"] == remote + "/{00000..00003}.tar" and printed["shards"] == 4
    assert storage.listdir(remote, gcs_server.storage_config())[:2] == [remote + "/00000.parquet",
                                                                         remote + "/00000.tar"]

    scfg = gcs_server.storage_config(retries=1, backoff_s=0.05, timeout_s=5.0)
    from_disk = list(build_loader(_cfg(local + "/{00000..00003}.tar", scfg), DistInfo(), batch_size=4, seed=2))
    from_gs = list(build_loader(_cfg(printed["urls"], scfg), DistInfo(), batch_size=4, seed=2))
    assert len(from_gs) == 8
    assert all(a["key"] == b["key"] and a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
               for a, b in zip(from_disk, from_gs))


def test_unreachable_gs_endpoint_names_the_url(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens
    scfg = StorageConfig(anon=True, retries=1, backoff_s=0.05, timeout_s=5.0)
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        build_loader(_cfg("gs://some-bucket/set/{00000..00003}.tar", scfg), DistInfo(), batch_size=2, seed=0)
    assert time.monotonic() - start < 10  # our 2 attempts, not gcsfs's 6 with sleeps of up to 32 s
    message = str(info.value)
    assert "gs://some-bucket/set/" in message and "after 2 attempt(s) (storage.retries=1)" in message
    assert "Check that the endpoint is reachable" in message


def test_gs_server_lost_mid_epoch(gcs_server):
    scfg = gcs_server.storage_config(retries=1, backoff_s=0.05, timeout_s=5.0)
    root = gcs_server.url("shapes")
    write_synthetic_dataset(root, num_samples=32, samples_per_shard=4, seed=1, min_size=32, max_size=40, cfg=scfg)
    cfg = _cfg(root + "/{00000..00007}.tar", scfg, num_workers=0, shuffle_buffer=0, shards_per_block=1)
    stream = iter(build_loader(cfg, DistInfo(), batch_size=4, seed=0))
    next(stream)  # one shard read
    gcs_server.proc.kill()
    gcs_server.proc.wait(timeout=10)
    with pytest.raises(StorageError, match=rf"gs://{gcs_server.bucket}/shapes/000\d\d\.tar.*storage.retries=1"):
        for _ in stream:
            pass


def test_gcs_secrets_are_redacted(monkeypatch):
    monkeypatch.setenv("GOOGLE_OAUTH_ACCESS_TOKEN", "ya29.secret-token-value")
    text = ("401 for gs://b/x.tar: Authorization: Bearer ya29.a0AfB_other-token; "
            "https://storage.googleapis.com/b/x?X-Goog-Signature=abc123&access_token=ya29.secret-token-value")
    out = storage.redact(text)
    assert "ya29" not in out and "abc123" not in out and "gs://b/x.tar" in out and "Bearer ***" in out
