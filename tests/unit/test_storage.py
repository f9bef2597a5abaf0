"""ldm_scale.storage against the local filesystem and a real S3 API server on 127.0.0.1."""
from __future__ import annotations

import os

import pytest

from ldm_scale import storage
from ldm_scale.storage import StorageConfig, StorageError

FAST = StorageConfig(retries=2, backoff_s=0.01, timeout_s=5.0)


def test_expand_braces_ranges_and_alternatives():
    assert storage.expand_braces("s3://b/x/{00008..00011}.tar") == [
        "s3://b/x/00008.tar", "s3://b/x/00009.tar", "s3://b/x/00010.tar", "s3://b/x/00011.tar"]
    assert storage.expand_braces("d/{a,b}/{0..1}.tar") == ["d/a/0.tar", "d/a/1.tar", "d/b/0.tar", "d/b/1.tar"]
    assert storage.expand_urls("a/{0..1}.tar::b/{2..3}.tar") == ["a/0.tar", "a/1.tar", "b/2.tar", "b/3.tar"]
    with pytest.raises(ValueError, match="descending"):
        storage.expand_braces("{5..1}")
    # nested alternatives (the hand-written expansion split "{a,{b,c}}" at every comma)
    assert storage.expand_braces("d/{a,{b,c}}/{0..4..2}.tar") == [
        "d/a/0.tar", "d/a/2.tar", "d/a/4.tar", "d/b/0.tar", "d/b/2.tar", "d/b/4.tar", "d/c/0.tar", "d/c/2.tar",
        "d/c/4.tar"]
    assert storage.expand_braces("https://h/x/{0..1}.tar?X-Amz-Signature=abc") == [
        "https://h/x/0.tar?X-Amz-Signature=abc", "https://h/x/1.tar?X-Amz-Signature=abc"]


def test_redact_removes_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecretvalue")
    text = ("https://user:pw@host/p?X-Amz-Signature=abc123&X-Amz-Credential=AKIA/x&ok=1 "
            "err supersecretvalue")
    out = storage.redact(text)
    assert "pw@" not in out and "abc123" not in out and "AKIA" not in out and "supersecretvalue" not in out
    assert "ok=1" in out and "host/p" in out


def test_local_roundtrip(tmp_path):
    base = str(tmp_path / "root")
    storage.write_text(storage.join(base, "a/b.txt"), "hello")
    assert storage.read_text(base + "/a/b.txt") == "hello"
    assert storage.exists(base + "/a/b.txt") and not storage.exists(base + "/nope")
    with storage.open_url(base + "/c.bin", "wb") as f:
        f.write(b"\x00" * 10)
    assert storage.size(base + "/c.bin") == 10
    assert storage.listdir(base) == [base + "/a", base + "/c.bin"]
    assert storage.glob(base + "/**/*.txt") == [base + "/a/b.txt"]
    assert storage.expand_urls([base + "/*.bin"]) == [base + "/c.bin"]
    with pytest.raises(FileNotFoundError, match="no objects match"):
        storage.expand_urls(base + "/*.tar")
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_bytes(base + "/nope")
    # file:// URLs are the same files
    assert storage.read_text("file://" + base + "/a/b.txt") == "hello"
    storage.rm(base, recursive=True)
    assert not os.path.exists(base)


def test_s3_roundtrip(s3_server, tmp_path):
    url = s3_server.url("dir/obj.bin")
    storage.write_bytes(url, b"abc" * 1000, FAST)
    assert storage.read_bytes(url, FAST) == b"abc" * 1000
    assert storage.exists(url, FAST)
    with storage.open_url(url, "rb", FAST) as f:
        f.seek(3)
        assert f.read(6) == b"abcabc"
    local = tmp_path / "src"
    (local / "sub").mkdir(parents=True)
    (local / "x.txt").write_text("x")
    (local / "sub" / "y.txt").write_text("y")
    written = storage.put_dir(str(local), s3_server.url("up"), FAST)
    assert sorted(written) == [s3_server.url("up/sub/y.txt"), s3_server.url("up/x.txt")]
    assert storage.glob(s3_server.url("up/**/*.txt"), FAST) == sorted(written)
    got = storage.get_dir(s3_server.url("up"), str(tmp_path / "down"), FAST)
    assert [open(p).read() for p in got] == ["y", "x"]
    storage.rm(s3_server.url("up"), recursive=True, cfg=FAST)
    assert not storage.exists(s3_server.url("up/x.txt"), FAST)
    with pytest.raises(FileNotFoundError, match=s3_server.bucket):
        storage.read_bytes(s3_server.url("missing"), FAST)


def test_unreachable_endpoint_names_url_and_retries(monkeypatch):
    from tests.fixtures.s3 import free_port

    port = free_port()  # nothing listens here
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3tvalue")
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01, timeout_s=2.0)
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://nobucket/shard-000.tar", cfg)
    msg = str(info.value)
    assert "s3://nobucket/shard-000.tar" in msg and "2 attempt(s)" in msg and "s3cr3tvalue" not in msg


def test_http_shards_through_the_loader(tmp_path):
    """Shards served over http(s) read like any other URL (range requests, no listing needed)."""
    import functools
    import http.server
    import threading

    from ldm_scale.data import DataConfig, build_loader
    from ldm_scale.data.synthetic import write_synthetic_dataset
    from ldm_scale.dist import DistInfo

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    write_synthetic_dataset(str(tmp_path), num_samples=16, samples_per_shard=8, seed=0, min_size=32, max_size=36)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert storage.read_text(base + "/sizes.json").startswith("{")
        cfg = DataConfig(urls=[base + "/{00000..00001}.tar"], resolution=32, num_workers=0, shuffle_buffer=0)
        keys = [k for batch in build_loader(cfg, DistInfo(), batch_size=4, seed=0) for k in batch["key"]]
        assert sorted(keys) == [f"{s:05d}{i:04d}" for s in range(2) for i in range(8)]
        with pytest.raises(FileNotFoundError, match="nope.tar"):
            storage.read_bytes(base + "/nope.tar", FAST)
    finally:
        server.shutdown()
        server.server_close()
