"""One storage block: ``data.storage.*`` inherits ``storage.*`` field by field, and every storage
error names the key (or environment variable) that chose the endpoint."""
from __future__ import annotations

import dataclasses

import pytest

from ldm_scale import config as config_lib
from ldm_scale import storage
from ldm_scale.storage import StorageConfig, StorageError, StorageOverrides

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "STORAGE_EMULATOR_HOST")


@pytest.fixture(autouse=True)
def _no_endpoint_env(monkeypatch):
    for name in ENDPOINT_ENV:
        monkeypatch.delenv(name, raising=False)
    before = storage.get_config()
    yield
    storage.configure(before)


def test_overrides_mirror_every_storage_field():
    assert [f.name for f in dataclasses.fields(StorageOverrides)] == [f.name for f in dataclasses.fields(StorageConfig)]
    assert all(getattr(StorageOverrides(), f.name) is None for f in dataclasses.fields(StorageOverrides))


def test_data_storage_inherits_storage_field_by_field():
    base = StorageConfig(endpoint_url="http://top:9000", retries=7, region="eu-1")
    got = storage.resolve(StorageOverrides(retries=1), base)
    assert (got.endpoint_url, got.region, got.retries, got.timeout_s) == ("http://top:9000", "eu-1", 1, base.timeout_s)
    assert got.key("endpoint_url") == "storage.endpoint_url" and got.key("retries") == "data.storage.retries"
    # Nothing set in data.storage: exactly storage.*, which the launcher installs process-wide.
    storage.configure(base)
    assert dataclasses.asdict(storage.resolve(StorageOverrides()))["endpoint_url"] == "http://top:9000"
    # A complete block given in code (the eval tools pass their own `storage`) is used whole.
    whole = StorageConfig(retries=0)
    assert storage.resolve(whole, base) is whole


def test_endpoint_origin_is_the_key_then_the_environment(monkeypatch):
    url = "s3://bucket/set/00000.tar"
    assert storage.endpoint_of(url, StorageConfig(endpoint_url="http://a:1")) == ("http://a:1", "storage.endpoint_url")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:2")
    assert storage.endpoint_of(url, StorageConfig()) == ("http://env:2", "AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://env-s3:3")
    assert storage.endpoint_of(url, StorageConfig()) == ("http://env-s3:3", "AWS_ENDPOINT_URL_S3")
    resolved = storage.resolve(StorageOverrides(endpoint_url="http://data:4"), StorageConfig(endpoint_url="http://a:1"))
    assert storage.endpoint_of(url, resolved) == ("http://data:4", "data.storage.endpoint_url")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    endpoint, origin = storage.endpoint_of(url, StorageConfig())
    assert endpoint is None and "storage.endpoint_url" in origin and "AWS_ENDPOINT_URL" in origin
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    assert storage.endpoint_of("gs://b/x", StorageConfig()) == ("http://127.0.0.1:4443", "STORAGE_EMULATOR_HOST")
    assert storage.endpoint_of("/local/x", StorageConfig()) == (None, "")


def test_final_error_names_the_key_that_set_the_endpoint():
    cfg = storage.resolve(StorageOverrides(endpoint_url="http://127.0.0.1:9", retries=0),
                          StorageConfig(endpoint_url="http://elsewhere:1"))

    def refuse():
        raise ConnectionRefusedError("Could not connect to the endpoint URL")

    with pytest.raises(StorageError) as info:
        storage.with_retries(refuse, "exists", "s3://bucket/set/00000.tar", cfg)
    message = str(info.value)
    assert "s3://bucket/set/00000.tar" in message
    assert "data.storage.endpoint_url=http://127.0.0.1:9" in message
    assert "(data.storage.retries=0)" in message


def test_overrides_passed_as_is_resolve_over_the_process_block():
    """Code that hands ``cfg.data.storage`` straight to a storage call still gets storage.*."""
    storage.configure(StorageConfig(endpoint_url="http://top:9000", retries=0))

    def refuse():
        raise ConnectionRefusedError("refused")

    with pytest.raises(StorageError, match=r"storage\.endpoint_url=http://top:9000"):
        storage.with_retries(refuse, "read", "s3://b/k", StorageOverrides())


def test_composed_config_has_one_storage_block_and_checks_it():
    cfg = config_lib.to_object(config_lib.compose(["storage.endpoint_url=http://minio:9000",
                                                   "data.storage.retries=-1"]))
    assert cfg.storage.endpoint_url == "http://minio:9000"
    assert cfg.data.storage.endpoint_url is None  # inherits
    with pytest.raises(config_lib.ConfigError, match=r"data\.storage\.retries=-1: must be >= 0"):
        config_lib.validate(cfg, world_size=1, check_files=False)
