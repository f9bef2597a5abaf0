"""The pipeline against a real S3 API server on 127.0.0.1: same batches as from disk, clear errors and
configured retries when the server goes away, and a stream that survives a short outage."""
from __future__ import annotations

import logging
import socket
import threading

import pytest
import torch

from ldm_scale import storage
from ldm_scale.data import DataConfig, build_loader
from ldm_scale.data.synthetic import write_synthetic_dataset
from ldm_scale.dist import DistInfo
from ldm_scale.storage import StorageConfig, StorageError


def _cfg(urls: str, **kw) -> DataConfig:
    base = dict(urls=[urls], resolution=32, num_workers=2, shuffle_buffer=4, crop="random", flip=True,
                storage=StorageConfig(retries=2, backoff_s=0.05, timeout_s=5.0))
    base.update(kw)
    return DataConfig(**base)


def test_s3_batches_equal_local_batches(s3_server, tmp_path):
    local = str(tmp_path / "shards")
    remote = s3_server.url("shapes")
    for root in (local, remote):
        write_synthetic_dataset(root, num_samples=32, samples_per_shard=8, seed=4, min_size=32, max_size=48)
    from_disk = list(build_loader(_cfg(local + "/{00000..00003}.tar"), DistInfo(), batch_size=4, seed=2))
    from_s3 = list(build_loader(_cfg(remote + "/{00000..00003}.tar"), DistInfo(), batch_size=4, seed=2))
    assert len(from_s3) == 8
    assert all(a["key"] == b["key"] and torch.equal(a["image"], b["image"]) for a, b in zip(from_disk, from_s3))


def test_missing_bucket_error_names_url(s3_server):
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-xyz/set/00000.tar"):
        build_loader(_cfg("s3://no-such-bucket-xyz/set/{00000..00003}.tar"), DistInfo(), batch_size=2, seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_server_killed_mid_epoch_gives_clear_error_after_retries(s3_process, caplog, workers):
    root = s3_process.url("shapes")
    write_synthetic_dataset(root, num_samples=32, samples_per_shard=4, seed=1, min_size=32, max_size=40)
    cfg = _cfg(root + "/{00000..00007}.tar", num_workers=workers, shuffle_buffer=0, shards_per_block=1)
    loader = build_loader(cfg, DistInfo(), batch_size=4, seed=0)
    stream = iter(loader)
    next(stream)  # shard 1 of 8 read
    s3_process.proc.kill()
    s3_process.proc.wait(timeout=10)
    caplog.set_level(logging.WARNING, logger="ldm_scale.storage")
    with pytest.raises(StorageError) as info:
        for _ in stream:
            pass
    message = str(info.value)
    assert f"s3://{s3_process.bucket}/shapes/000" in message
    assert "after 3 attempt(s) (storage.retries=2)" in message
    if workers == 0:  # with workers the retries are logged in the worker processes
        assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2
    assert "ldmtestsecret" not in message


class _CuttableProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 server whose connections the test can cut."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.refusing = threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def outage(self, seconds: float) -> None:
        """Cut every open connection and refuse new ones for ``seconds``."""
        self.refusing.set()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns.clear()
        threading.Timer(seconds, self.refusing.clear).start()

    def close(self) -> None:
        self.stopped = True
        self.listener.close()


def test_stream_survives_short_outage(s3_server):
    """A shard stream broken mid-way reopens at the same byte and completes (retries, not errors)."""
    payload = bytes(range(256)) * 4096 * 6  # 6 MiB: several 1 MiB buffered reads
    url = s3_server.url("blob.bin")
    storage.write_bytes(url, payload)
    proxy = _CuttableProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    try:
        cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{proxy.port}", retries=6, backoff_s=0.1, timeout_s=5.0)
        got = bytearray()
        with storage.open_url(url, "rb", cfg, block_size=64 << 10) as f:
            got += f.read(100_000)
            proxy.outage(1.5)  # long enough that no pooled-connection retry can hide it
            while chunk := f.read(500_000):
                got += chunk
            assert f.raw.reopens >= 1
        assert bytes(got) == payload
    finally:
        proxy.close()
