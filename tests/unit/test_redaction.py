"""Credentials never reach a persisted copy of the config: ``storage.redact_config`` (the one function
behind config.yaml, plan.json, checkpoints' client state, exports and W&B), the offline export's
refusal to connect with a masked URL, and the SLURM script that leaves credentials in sbatch's
environment. The end-to-end run is tests/integration/test_secrets.py."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ldm_scale import config as C
from ldm_scale import storage

REPO_ROOT = Path(__file__).resolve().parents[2]

PRESIGNED_S3 = ("https://b.s3.amazonaws.com/shards/00000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                "&X-Amz-Credential=AKIAEXAMPLECRED%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
                "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLE"
                "&X-Amz-SignedHeaders=host&X-Amz-Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7")
PRESIGNED_GCS = ("https://storage.googleapis.com/b/x.tar?X-Goog-Algorithm=GOOG4-RSA-SHA256"
                 "&X-Goog-Credential=sa%40proj.iam.gserviceaccount.com%2F20260101%2Fauto%2Fstorage%2Fgoog4_request"
                 "&X-Goog-Date=20260101T000000Z&X-Goog-Expires=600&X-Goog-SignedHeaders=host"
                 "&X-Goog-Signature=0a1b2c3d4e5f")
AZURE_SAS = "https://acct.blob.core.windows.net/c/x.tar?sv=2022-11-02&se=2026-01-02&sp=r&sig=Zm9vYmFyc2ln%3D"


@pytest.fixture(autouse=True)
def _no_secret_environment(monkeypatch):
    """Only the secrets a test sets itself (the machine's own environment may hold some)."""
    for name in list(os.environ):
        if storage.is_secret_name(name) or name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
            monkeypatch.delenv(name)


def test_urls_lose_userinfo_passwords_and_signed_query_values_but_keep_the_rest():
    assert storage.redact("http://user:hunter2@minio:9000/bucket") == "http://***@minio:9000/bucket"
    s3 = storage.redact(PRESIGNED_S3)
    for secret in ("AKIAEXAMPLECRED", "FwoGZXIvYXdzEXAMPLE", "5d672d79c15b"):
        assert secret not in s3
    assert s3.startswith("https://b.s3.amazonaws.com/shards/00000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&")
    assert "X-Amz-Expires=3600" in s3 and "X-Amz-Signature=***" in s3 and "X-Amz-Credential=***" in s3
    gcs = storage.redact(PRESIGNED_GCS)
    assert "0a1b2c3d4e5f" not in gcs and "iam.gserviceaccount" not in gcs and "X-Goog-Expires=600" in gcs
    azure = storage.redact(AZURE_SAS)
    assert "Zm9vYmFyc2ln" not in azure and "sp=r" in azure and "se=2026-01-02" in azure
    assert storage.redact("https://h/x?access_token=ya29.abc&token=t0k&alt=media") == \
        "https://h/x?access_token=***&token=***&alt=media"
    # Names that merely end like a secret parameter are not one; URLs without credentials are unchanged.
    for text in ("data.caption_key=txt", "monkey=1", "s3://bucket/laion/{00000..41407}.tar", "http://h:80/a?b=c"):
        assert storage.redact(text) == text


@pytest.mark.parametrize("name, secret", [
    ("password", True), ("db_passwd", True), ("api_key", True), ("apiKey", True), ("WANDB_API_KEY", True),
    ("aws_secret_access_key", True), ("AWS_SESSION_TOKEN", True), ("accessToken", True), ("HF_TOKEN", True),
    ("client_secret", True), ("private_key", True),
    ("tokenizer", False), ("max_tokens", False), ("image_key", False), ("caption_key", False), ("key", False),
    ("TOKENIZERS_PARALLELISM", False), ("signals", False), ("endpoint_url", False), ("keep_last", False),
])
def test_secret_names(name, secret):
    assert storage.is_secret_name(name) is secret


def test_redact_config_walks_containers_masks_secret_keys_and_environment_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "svc-token-value-1")  # any secret-named variable, 8+ characters
    monkeypatch.setenv("HF_TOKEN", "short")  # too short to replace wherever it occurs
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a secret at all
    config = {
        "storage": {"endpoint_url": "http://admin:minio-pw@127.0.0.1:9000", "retries": 3, "anon": False,
                    "region": None},
        "data": {"urls": [PRESIGNED_S3, "s3://bucket/{0..9}.tar"], "caption_key": "txt"},
        "extra": ({"password": "hunter2", "api_key": "", "token": None, "tokenizer": "clip"},
                  "uses wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY and svc-token-value-1"),
        "logger": {"tags": ["0123456789abcdef0123456789abcdef01234567", "short", "false"]},
    }
    before = json.dumps(config, default=list)
    out = storage.redact_config(config)
    assert json.dumps(config, default=list) == before  # the live config is not touched
    assert out["storage"] == {"endpoint_url": "http://***@127.0.0.1:9000", "retries": 3, "anon": False,
                              "region": None}
    assert out["data"]["urls"][1] == "s3://bucket/{0..9}.tar" and "5d672d79" not in out["data"]["urls"][0]
    assert out["data"]["caption_key"] == "txt"
    assert isinstance(out["extra"], tuple)
    assert out["extra"][0] == {"password": "***", "api_key": "", "token": None, "tokenizer": "clip"}
    assert out["extra"][1] == "uses *** and ***"
    assert out["logger"]["tags"] == ["***", "short", "false"]
    assert storage.redact_config(out) == out  # idempotent
    assert storage.is_redacted(out["storage"]["endpoint_url"]) and not storage.is_redacted(3)


def test_presigned_http_urls_are_not_globs():
    url = "http://127.0.0.1:1/shards/00000.tar?X-Amz-Signature=abc&X-Amz-Expires=60"
    assert storage.expand_urls([url, "http://h/{0..1}.tar"]) == [url, "http://h/0.tar", "http://h/1.tar"]


def _composed_with_secrets():
    return C.to_object(C.compose([
        "experiment=quickstart", "model.allow_random_first_stage=true",
        f"data.urls=['{PRESIGNED_S3}','http://reader:pw-in-url@h/{{0..3}}.tar']",
        "storage.endpoint_url=http://admin:minio-pw@127.0.0.1:9000", "checkpoint.root=/tmp/ckpt"]))


def test_run_directory_config_and_plan_are_redacted_while_the_live_config_is_not(tmp_path):
    cfg = _composed_with_secrets()
    C.write_resolved(cfg, C.validate(cfg, world_size=2), tmp_path)
    written = (tmp_path / "config.yaml").read_text() + (tmp_path / "plan.json").read_text()
    for secret in ("minio-pw", "pw-in-url", "5d672d79c15b", "AKIAEXAMPLECRED", "FwoGZXIvYXdzEXAMPLE"):
        assert secret not in written
        assert secret not in json.dumps(C.resolved_dict(cfg))  # W&B, checkpoints and exports get this
    assert cfg.storage.endpoint_url == "http://admin:minio-pw@127.0.0.1:9000"  # what the run connects with
    assert cfg.data.urls[0] == PRESIGNED_S3
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["storage"]["endpoint_url"] == "http://***@127.0.0.1:9000" and saved["name"] == "quickstart"
    assert saved == C.resolved_dict(cfg)
    # A saved config still types as the schema (export_checkpoint reads it back this way).
    from omegaconf import OmegaConf

    assert C.to_object(OmegaConf.merge(OmegaConf.structured(C.Config), saved)).data.urls[1] == "http://***@h/{0..3}.tar"


def test_export_payloads_are_redacted():
    import torch

    from ldm_scale.train.export import autoencoder_payload, ldm_payload

    config = {"data": {"urls": [PRESIGNED_S3]}, "storage": {"endpoint_url": "http://u:minio-pw@h:1"}}
    sd = {"unet.w": torch.zeros(2)}
    for payload in (ldm_payload(sd, None, {}, scale_factor=1.0, step=1, config=config),
                    autoencoder_payload({"encoder.w": torch.zeros(1)}, None, {}, step=1, config=config)):
        text = json.dumps(payload["config"])
        assert "minio-pw" not in text and "5d672d79" not in text and "http://***@h:1" in text
    assert "minio-pw" in config["storage"]["endpoint_url"]


def test_offline_export_does_not_connect_with_a_redacted_first_stage_url(tmp_path):
    """The saved config's first stage was a presigned URL: the export asks for it again instead of
    requesting the masked one."""
    from ldm_scale.train.checkpoint import CheckpointError
    from ldm_scale.train.export import export_checkpoint

    saved = C.resolved_dict(C.to_object(C.compose(["experiment=quickstart", f"model.first_stage_ckpt='{PRESIGNED_S3}'",
                                                   "checkpoint.root=/tmp/ckpt"])))
    step = tmp_path / "run" / "step_1"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text(json.dumps({"files": []}))
    (step / "client_state.json").write_text(json.dumps({"config": saved, "world_size": 1, "step": 1,
                                                        "engines": {"model": {}}}))
    with pytest.raises(CheckpointError, match="saved redacted: give the first stage again with --first-stage-ckpt"):
        export_checkpoint(str(step), str(tmp_path / "out.pt"))


def test_wandb_sees_a_redacted_command_line(monkeypatch):
    from ldm_scale import logging as run_logging

    argv = ["launch/train.py", "storage.endpoint_url=http://u:minio-pw@h:1", "experiment=quickstart"]
    monkeypatch.setattr(sys, "argv", list(argv))
    with run_logging._redacted_argv():
        assert sys.argv == ["launch/train.py", "storage.endpoint_url=http://***@h:1", "experiment=quickstart"]
    assert sys.argv == argv


# --- SLURM --------------------------------------------------------------------------------------
def _load_slurm():
    spec = importlib.util.spec_from_file_location("launch_slurm_redaction", REPO_ROOT / "launch" / "slurm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


slurm = _load_slurm()
SLURM_SECRETS = ("pw-in-url", "5d672d79c15b", "AKIAEXAMPLECRED", "FwoGZXIvYXdzEXAMPLE", "wandb-key-from-env-1234",
                 "minio-pw")


def _slurm_argv(tmp_path: Path, check_config: bool) -> list[str]:
    return ["nodes=1", "gpus_per_node=0", "nproc_per_node=2", "time=1:00:00", "run_id=r1",
            f"check_config={str(check_config).lower()}", "env.WANDB_API_KEY=wandb-key-from-env-1234",
            "env.NCCL_DEBUG=INFO", "experiment=quickstart", "model.allow_random_first_stage=true",
            f"data.urls=['{PRESIGNED_S3}','http://reader:pw-in-url@h/{{0..3}}.tar']",
            "storage.endpoint_url=http://admin:minio-pw@127.0.0.1:9000", f"output_dir={tmp_path}/runs"]


def test_sbatch_script_holds_no_credential_and_the_job_composes_the_same_config(tmp_path):
    launcher, overrides, _ = slurm.split_args(_slurm_argv(tmp_path, check_config=True))
    # prepare() composes the rewritten overrides with the secret environment and compares the configs.
    job = slurm.prepare(slurm.parse_config(launcher), overrides, workdir=tmp_path)
    script = slurm.render(job)
    for secret in SLURM_SECRETS:
        assert secret not in script
        assert any(secret in value for value in job.secret_env.values())
    assert job.secret_env["WANDB_API_KEY"] == "wandb-key-from-env-1234"
    assert "export NCCL_DEBUG=INFO" in script and "WANDB_API_KEY=" not in script
    assert "storage.endpoint_url=http://${oc.env:LDM_SCALE_SECRET_" in script
    assert "X-Amz-Expires=3600" in script  # only the credentials move
    assert "come from sbatch's environment" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_sbatch_receives_the_credentials_in_its_environment(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nenv > {tmp_path}/sbatch_env\necho 4242\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SBATCH_EXPORT", raising=False)
    assert slurm.main(_slurm_argv(tmp_path, check_config=False)) == 0
    env = dict(line.split("=", 1) for line in (tmp_path / "sbatch_env").read_text().splitlines() if "=" in line)
    assert env["WANDB_API_KEY"] == "wandb-key-from-env-1234"
    assert "admin:minio-pw" in env.values() and "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7" in env.values()
    script = (tmp_path / "runs" / "r1" / "slurm" / "job.sbatch").read_text()
    for secret in SLURM_SECRETS:
        assert secret not in script

    monkeypatch.setenv("SBATCH_EXPORT", "NONE")
    with pytest.raises(SystemExit, match="--export=NONE would keep"):
        slurm.main(_slurm_argv(tmp_path, check_config=False))


def test_setup_lines_with_credentials_are_refused(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    with pytest.raises(SystemExit, match="holds a credential") as info:
        slurm.parse_config(["setup=[export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY]"])
    assert "wJalrXUtnFEMI" not in str(info.value)
