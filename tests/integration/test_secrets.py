"""No credential of a run is written anywhere: `torchrun launch/train.py` (tiny text-to-image LDM, 2 CPU
ranks) with distinctive secrets in its environment, in URL userinfo and in presigned-style query
strings of its shard URLs, checkpointing to a real S3 API server (moto), W&B offline, resumed once,
exported by the loop and by the offline CLI. Then every byte the runs wrote (run directory, W&B
offline files, local staging, every object in the bucket, both exports) is searched for every secret.

The shards are served over HTTP by a server that, like a presigned-URL store, answers only requests
carrying the real credentials: so the runs demonstrably read with the live (unredacted) config while
persisting the redacted one, and the resume reads its config from nowhere but the command line.
"""
from __future__ import annotations

import base64
import functools
import http.server
import json
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch

from tests.fixtures.torchrun import run_python, run_torchrun
from tests.integration.tiny_training import TRAIN_SCRIPT

pytestmark = [pytest.mark.dist, pytest.mark.slow]

RUN_ID = "secrets"
USERINFO_SECRET = "UserinfoPw-7f3a9c1e"  # http://reader:<this>@... (shards 0 and 1, and sizes.json)
GCS_USERINFO_SECRET = "GcsEndpointPw-52be8d0a"  # storage.gcs_endpoint_url: only stored by this run
SIGNATURE_SECRETS = ("a1b2c3d4e5f60718293a4b5c6d7e8f90deadbeef", "0f1e2d3c4b5a69788796a5b4c3d2e1f0cafebabe")
CREDENTIAL_SECRET = "AKIAPRESIGNEDCRED42"  # X-Amz-Credential=<this>/20260101/us-west-2/s3/aws4_request
ENV_SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "AwsSecretAccessKey-9d8c7b6a5f4e3d2c1b0a",  # signs every S3 request
    "AWS_SESSION_TOKEN": "AwsSessionToken-0123456789abcdefFEDCBA",  # also in a presigned URL below
    "WANDB_API_KEY": "wandbapikey0123456789abcdef0123456789abcd",
}
SECRETS = (USERINFO_SECRET, GCS_USERINFO_SECRET, *SIGNATURE_SECRETS, CREDENTIAL_SECRET, *ENV_SECRETS.values())


def _presigned_query(signature: str) -> str:
    return ("X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential={CREDENTIAL_SECRET}%2F20260101%2Fus-west-2%2Fs3%2Faws4_request"
            f"&X-Amz-Date=20260101T000000Z&X-Amz-Expires=604800"
            f"&X-Amz-Security-Token={ENV_SECRETS['AWS_SESSION_TOKEN']}&X-Amz-SignedHeaders=host"
            f"&X-Amz-Signature={signature}")


class CredentialCheckingShards(http.server.SimpleHTTPRequestHandler):
    """Serves the shard directory only to requests with the right credentials (404 otherwise):
    HTTP basic auth for the userinfo shards, the exact presigned query for the others."""

    presigned: dict[str, str] = {}
    basic_auth = ""
    served: list[str] = []

    def _allowed(self) -> bool:
        path, _, query = self.path.partition("?")
        name = path.lstrip("/")
        if name in self.presigned:  # compared decoded, as S3 does (clients may re-encode "/")
            return urllib.parse.parse_qs(query) == urllib.parse.parse_qs(self.presigned[name])
        return self.headers.get("Authorization") == self.basic_auth

    def do_HEAD(self):
        if not self._allowed():
            return self.send_error(404)
        return super().do_HEAD()

    def do_GET(self):
        if not self._allowed():
            return self.send_error(404)
        self.served.append(self.path.partition("?")[0])
        return super().do_GET()

    def send_head(self):  # HEAD and GET of a file that exists and was allowed
        response = super().send_head()
        if response is not None and self.command == "HEAD":
            self.served.append(self.path.partition("?")[0])
        return response

    def log_message(self, *args):
        pass


@pytest.fixture
def shard_server(tmp_path):
    from ldm_scale.data.synthetic import write_synthetic_dataset

    shards = tmp_path / "shards"
    write_synthetic_dataset(str(shards), num_samples=64, samples_per_shard=16, seed=0, min_size=32, max_size=40)
    handler = type("Handler", (CredentialCheckingShards,), {
        "presigned": {"00002.tar": _presigned_query(SIGNATURE_SECRETS[0]),
                      "00003.tar": _presigned_query(SIGNATURE_SECRETS[1])},
        "basic_auth": "Basic " + base64.b64encode(f"reader:{USERINFO_SECRET}".encode()).decode(),
        "served": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler.served
    finally:
        server.shutdown()
        server.server_close()


def _overrides(host: str, out: Path, ckpt_root: str, max_steps: int, export: bool) -> list[str]:
    urls = [f"http://reader:{USERINFO_SECRET}@{host}/{{00000..00001}}.tar",
            f"http://{host}/00002.tar?{_presigned_query(SIGNATURE_SECRETS[0])}",
            f"http://{host}/00003.tar?{_presigned_query(SIGNATURE_SECRETS[1])}"]
    return [
        "experiment=quickstart", "model.allow_random_first_stage=true", f"run_id={RUN_ID}", f"output_dir={out}",
        "data.urls=[" + ",".join(f"'{u}'" for u in urls) + "]", "data.samples_per_epoch=64", "data.num_workers=0",
        f"storage.gcs_endpoint_url=http://gcs:{GCS_USERINFO_SECRET}@127.0.0.1:9",
        "train.micro_batch_size=2", f"train.max_steps={max_steps}", "train.log_every=1", "train.progress_bar=false",
        f"checkpoint.root={ckpt_root}", f"checkpoint.local_dir={out}/staging", "checkpoint.every_steps=2",
        f"checkpoint.export_final={str(export).lower()}", "eval.sample_at_end=false",
        "eval.prompt_adherence_samples=0", "logger.mode=offline", "preemption.check_every=1",
    ]


def _leaks(name: str, data: bytes) -> list[str]:
    return [f"{name}: {secret}" for secret in SECRETS if secret.encode() in data]


def test_no_secret_is_persisted_and_resume_and_export_still_work(s3_server, shard_server, tmp_path, monkeypatch):
    for key, value in ENV_SECRETS.items():
        monkeypatch.setenv(key, value)  # moto accepts any key; the children sign with these
    host, served = shard_server
    out = tmp_path / "runs"
    ckpt_root = s3_server.url("ckpt")

    first = run_torchrun([TRAIN_SCRIPT, *_overrides(host, out, ckpt_root, 2, export=False)], timeout=900).check()
    # Resumed from step_2 on S3: its client state holds only the redacted config; the run reads
    # its shards with the real credentials from the command line.
    served.clear()
    second = run_torchrun([TRAIN_SCRIPT, *_overrides(host, out, ckpt_root, 4, export=True)], timeout=900).check()
    assert {"/00000.tar", "/00002.tar", "/00003.tar"} <= set(served), served  # each dataset's first shard
    rows = [json.loads(line) for line in (out / RUN_ID / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]  # 3 and 4 after the resume

    offline_export = tmp_path / "offline_export.pt"
    exported = run_python(["-m", "ldm_scale.train.export", f"{ckpt_root}/{RUN_ID}", str(offline_export)],
                          timeout=600).check()
    # Every byte written: run directory (config.yaml, plan.json, metrics, W&B offline files),
    # staging, the offline export; every object in the bucket; and the console of every process.
    leaks, files = [], 0
    for path in [*out.rglob("*"), offline_export]:
        if path.is_file():
            files += 1
            leaks += _leaks(str(path.relative_to(tmp_path)), path.read_bytes() + str(path).encode())
    assert list((out / RUN_ID / "wandb").glob("offline-run-*")), "W&B wrote no offline run"
    client = s3_server.client()
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket)
            for obj in page.get("Contents", [])]
    assert f"ckpt/{RUN_ID}/export.pt" in keys and f"ckpt/{RUN_ID}/step_4/client_state.json" in keys
    for key in keys:
        leaks += _leaks(f"s3://{s3_server.bucket}/{key}",
                        client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() + key.encode())
    for name, res in (("first run", first), ("resumed run", second), ("export CLI", exported)):
        leaks += _leaks(f"console of the {name}", (res.stdout + res.stderr).encode())
    assert not leaks, "\n".join(leaks)
    assert files > 20 and len(keys) > 10

    # The persisted configs describe the run with the secrets masked, and the export loads.
    from ldm_scale.sampling import load_checkpoint

    loaded = load_checkpoint(str(offline_export))
    assert loaded.step == 4 and loaded.config["storage"]["gcs_endpoint_url"] == "http://***@127.0.0.1:9"
    assert all("***" in u for u in loaded.config["data"]["urls"])
    client_state = json.loads(client.get_object(Bucket=s3_server.bucket,
                                                Key=f"ckpt/{RUN_ID}/step_4/client_state.json")["Body"].read())
    assert client_state["config"]["data"]["urls"][0] == f"http://***@{host}/{{00000..00001}}.tar"
    assert "X-Amz-Signature=***" in client_state["config"]["data"]["urls"][1]
    assert "http://***@127.0.0.1:9" in (out / RUN_ID / "config.yaml").read_text()
    live_export = tmp_path / "live_export.pt"
    live_export.write_bytes(client.get_object(Bucket=s3_server.bucket, Key=f"ckpt/{RUN_ID}/export.pt")["Body"].read())
    config = torch.load(live_export, map_location="cpu", weights_only=False)["config"]
    assert config["storage"]["gcs_endpoint_url"] == "http://***@127.0.0.1:9"
