"""Config errors that used to slip through (issue 11, "run safety"): keys the schema does not know
however they are added, non-finite numbers, and a first-stage checkpoint that cannot serve the LDM.
Each fails in composition or ``validate()``, before any work, with one line naming the key."""
from __future__ import annotations

import shutil
import zipfile

import pytest
from hydra.errors import ConfigCompositionException

from ldm_scale import config as C
from ldm_scale import storage
from ldm_scale.train.export import TensorStub, read_metadata
from tests.fixtures.exports import write_autoencoder_export, write_bad_first_stages

# No first-stage file: these tests are about the tree itself.
BASE = ["experiment=quickstart", "data.urls=['s3://bucket/set/{00000..00099}.tar']", "checkpoint.root=/tmp/ckpt",
        "model.allow_random_first_stage=true"]


def composed(*overrides: str) -> C.Config:
    return C.to_object(C.compose([*BASE, *overrides]))


def one_line(message: str) -> str:
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("override, message", [
    ("+train.max_step=10", "unknown config key train.max_step: did you mean train.max_steps?"),
    ("++train.max_step=10", "unknown config key train.max_step: did you mean train.max_steps?"),
    ("+optim.warmup_step=5", "unknown config key optim.warmup_step: did you mean optim.warmup_steps?"),
    ("+model.first_stage=x.pt", "unknown config key model.first_stage: did you mean model.first_stage_ckpt?"),
    ("+zzz=1", "unknown config key zzz: valid keys: task, name, run_id,"),
])
def test_added_keys_the_schema_lacks_fail_at_composition(override, message):
    with pytest.raises(C.ConfigError) as info:
        composed(override)
    assert one_line(str(info.value)).startswith(message), str(info.value)


def test_a_typo_in_an_experiment_file_names_the_file_key_and_closest_key(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(C.CONF_DIR, conf)
    (conf / "experiment" / "typo.yaml").write_text("# @package _global_\ntrain:\n  max_step: 10\n")
    with pytest.raises(ConfigCompositionException) as info:
        C.compose(["experiment=typo"], config_dir=conf)
    assert one_line(C.describe_composition_error(info.value)) == \
        "In 'experiment/typo': unknown config key train.max_step: did you mean train.max_steps?"
    with pytest.raises(ConfigCompositionException) as info:
        C.compose(["train.micro_batch_sz=4"])
    assert C.describe_composition_error(info.value) == \
        "unknown config key train.micro_batch_sz: did you mean train.micro_batch_size?"


def test_an_attribute_set_in_python_is_a_problem_of_validate():
    cfg = composed()
    cfg.train.max_step = 10  # dataclasses accept any attribute
    with pytest.raises(C.ConfigError, match=r"unknown config key train\.max_step: did you mean train\.max_steps\?"):
        C.validate(cfg, world_size=2)


def test_a_key_added_to_the_model_spec_with_plus_is_refused_with_the_closest():
    cfg = composed("model.ldm.cond_stage.text.tokenizer.max_length=12", "model.ldm.unet.model_channels=32")
    spec = C.validate(cfg, world_size=2).spec
    assert (spec.cond_stage.text.tokenizer.max_length, spec.unet.model_channels) == (12, 32)
    with pytest.raises(C.ConfigError) as info:  # `+` lifts struct mode at compose time; to_object catches it
        composed("+model.ldm.unet.model_chanels=32")
    assert "unknown config key model.ldm.unet.model_chanels: did you mean model.ldm.unet.model_channels?" \
           in one_line(str(info.value))


@pytest.mark.parametrize("override, key", [
    ("model.scale_factor=nan", "model.scale_factor=nan"),
    ("optim.lr=inf", "optim.lr=inf"),
    ("diffusion.linear_end=-inf", "diffusion.linear_end=-inf"),
    ("model.ldm.unet.dropout=nan", "model.ldm.unet.dropout=nan"),
])
def test_non_finite_numbers_are_rejected_naming_the_key(override, key):
    with pytest.raises(C.ConfigError) as info:
        C.validate(composed("model.scale_factor_mode=spec", override), world_size=2)
    assert f"{key}: must be a finite number" in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------- first stage

@pytest.fixture(scope="module")
def first_stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_stages")
    return {"autoencoder": write_autoencoder_export(root / "kl_tiny.pt"), "directory": root,
            **write_bad_first_stages(root / "bad")}


def with_first_stage(url) -> C.Config:
    return composed("model.allow_random_first_stage=false", f"model.first_stage_ckpt={url}")


@pytest.mark.parametrize("case, problem", [
    ("missing", "does not exist: give the export.pt an experiment=autoencoder_* run writes"),
    ("directory", "is a directory (a training checkpoint?), not an export file"),
    ("not_an_export", "is not an exported autoencoder (not a torch.save archive)"),
    ("ldm_export", "is an LDM export (format 'ldm_scale/ldm-v1', expected 'ldm_scale/autoencoder-v1')"),
    ("other_latent_width", ("holds another first stage than model tiny's: ddconfig.z_channels=8 (needs 4), "
                            "embed_dim=8 (needs 4): give the export of an autoencoder trained with "
                            "autoencoder=kl_tiny")),
    ("vq_autoencoder", "holds another first stage than model tiny's: kind='vq' (needs 'kl')"),
])
def test_first_stage_ckpt_is_checked_in_validate(first_stages, case, problem):
    url = first_stages[case]
    with pytest.raises(C.ConfigError) as info:
        C.validate(with_first_stage(url), world_size=2)
    message = one_line(str(info.value))
    assert message.startswith(f"invalid configuration: model.first_stage_ckpt={url} {problem}"), message


def test_a_matching_export_passes_reading_only_its_pickle(first_stages, monkeypatch):
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(str(name)) or
                        real_open(self, name, *a, **k))
    meta = read_metadata(str(first_stages["autoencoder"]))
    assert meta["format"] == "ldm_scale/autoencoder-v1" and meta["model_config"]["kl"]["embed_dim"] == 4
    assert meta["state_dict"]["encoder.conv_in.weight"] == TensorStub((32, 3, 3, 3), "FloatStorage")
    assert [n.rsplit("/", 1)[-1] for n in opened] == ["data.pkl"], opened  # no tensor record
    opened.clear()
    assert C.validate(with_first_stage(first_stages["autoencoder"]), world_size=2).spec.name == "tiny"
    assert len(opened) == 1
    # check_files=False checks the configuration alone (placeholder URLs).
    assert C.validate(with_first_stage(first_stages["missing"]), world_size=2, check_files=False)


def test_first_stage_ckpt_on_object_storage(first_stages, s3_server):
    good, ldm = s3_server.url("ae/export.pt"), s3_server.url("ldm/export.pt")
    storage.put_file(str(first_stages["autoencoder"]), good)
    storage.put_file(str(first_stages["ldm_export"]), ldm)
    assert C.validate(with_first_stage(good), world_size=2).spec.first_stage.latent_channels == 4
    with pytest.raises(C.ConfigError, match=r"^invalid configuration: model.first_stage_ckpt=s3://\S+/ldm/export.pt "
                                            r"is an LDM export"):
        C.validate(with_first_stage(ldm), world_size=2)
    with pytest.raises(C.ConfigError, match=r"model.first_stage_ckpt=s3://\S+/nope.pt does not exist"):
        C.validate(with_first_stage(s3_server.url("nope.pt")), world_size=2)
