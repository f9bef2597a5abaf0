"""One storage block against a real S3 API server (moto) on 127.0.0.1: a loader configured only
through ``storage.endpoint_url`` reads its shards, workers included; an unreachable endpoint fails
fast with an error that names the key which set it."""
from __future__ import annotations

import time

import pytest

from ldm_scale import config as config_lib
from ldm_scale import storage
from ldm_scale.data import build_loader
from ldm_scale.data.synthetic import write_synthetic_dataset
from ldm_scale.dist import DistInfo
from ldm_scale.storage import StorageError

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@pytest.fixture(autouse=True)
def _restore_process_storage():
    before = storage.get_config()
    yield
    storage.configure(before)


def _loader(overrides: list[str]):
    """What launch/train.py does before the loader exists: compose, configure storage.*, build."""
    cfg = config_lib.to_object(config_lib.compose(overrides))
    storage.configure(cfg.storage)
    return build_loader(cfg.data, DistInfo(), batch_size=4, seed=0)


def test_loader_reads_s3_configured_only_through_storage_endpoint(s3_server, monkeypatch):
    root = s3_server.url("shapes")
    write_synthetic_dataset(root, num_samples=16, samples_per_shard=8, seed=3, min_size=32, max_size=40)
    for name in ENDPOINT_ENV:  # from here on only the config knows where the server is
        monkeypatch.delenv(name)
    # A spawned worker starts with a fresh process-wide block: it must be handed the resolved one.
    loader = _loader([f"storage.endpoint_url={s3_server.endpoint_url}", f"data.urls=['{root}/{{00000..00001}}.tar']",
                      "data.resolution=32", "data.num_workers=1", "data.multiprocessing_context=spawn",
                      "data.shuffle_buffer=0"])
    assert loader.storage_cfg.endpoint_url == s3_server.endpoint_url
    batches = list(loader)
    assert len(batches) == 4 and batches[0]["image"].shape == (4, 3, 32, 32)


def test_unreachable_endpoint_error_names_the_key_that_set_it_quickly(s3_process, monkeypatch):
    dead = s3_process.endpoint_url
    s3_process.proc.kill()  # a real server that went away: connections to its port are refused
    s3_process.proc.wait(timeout=10)
    for name in ENDPOINT_ENV:
        monkeypatch.delenv(name)
    urls = f"data.urls=['s3://{s3_process.bucket}/shapes/{{00000..00003}}.tar']"

    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        _loader([f"storage.endpoint_url={dead}", urls])  # default retries and timeouts
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert f"storage.endpoint_url={dead}" in message and f"s3://{s3_process.bucket}/shapes/00000.tar" in message
    assert "amazonaws" not in message
    assert elapsed < 20, f"{elapsed:.1f} s to the error"

    with pytest.raises(StorageError) as info:
        _loader(["storage.endpoint_url=http://127.0.0.1:1", f"data.storage.endpoint_url={dead}",
                 "storage.backoff_s=0.05", urls])
    assert f"data.storage.endpoint_url={dead}" in str(info.value)

    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(StorageError, match=f"AWS_ENDPOINT_URL={dead}"):
        _loader(["storage.retries=0", urls])
