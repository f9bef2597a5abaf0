"""Exported checkpoints (ldm_scale/train/export.py) record which weights are EMA, and the sampler's
``LoadedModel`` carries the training config and that record.

CompVis' ``LitEma`` averages only ``model`` (the DiffusionWrapper around the UNet); a jointly trained
text/class encoder is sampled with its raw weights. The export follows that and says so.
"""
import dataclasses
import logging

import pytest
import torch

from ldm_scale.diffusion import SamplerConfig
from ldm_scale.models.registry import build_autoencoder, build_ldm, get_spec
from ldm_scale.sampling import load_checkpoint
from ldm_scale.train.ema import CpuEma, EmaConfig
from ldm_scale.train.export import ema_coverage, export_autoencoder, export_ldm

CONFIG = {"name": "txt2img_tiny", "run_id": "run-42", "diffusion": {"schedule": "scaled_linear"},
          "eval": {"sampler": {"sampler": "plms", "steps": 7, "eta": 0.0, "spacing": "uniform",
                               "guidance_scale": 3.0}}}


def trained_with_ema(module: torch.nn.Module) -> CpuEma:
    """An EMA of ``module``'s trainable weights that differs from the weights (one half-way update)."""
    ema = CpuEma(module, EmaConfig(decay=0.5, use_num_updates=False, async_update=False))
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert ema.update(1)
    return ema


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    torch.manual_seed(0)
    spec = get_spec("tiny")  # trains its text transformer jointly, like txt2img_kl8
    ldm = build_ldm(spec)
    ema = trained_with_ema(ldm)
    path = str(tmp_path_factory.mktemp("export") / "tiny.pt")
    export_ldm(path, ldm, ema, spec, config=CONFIG, step=3)
    ema.close()
    return path, ldm


def test_text_encoder_is_exported_raw_and_recorded(text_export, caplog):
    path, ldm = text_export
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["ema_coverage"] == {"ema": ["unet"], "raw": ["cond_stage"], "frozen": ["first_stage"]}
    assert set(ckpt["ema_state_dict"]) == {f"unet.{n}" for n, _ in ldm.unet.named_parameters()}
    # The raw weights of the jointly trained encoder are the ones exported (no EMA of it in the file).
    for name, p in ldm.cond_stage.named_parameters():
        torch.testing.assert_close(ckpt["state_dict"][f"cond_stage.{name}"], p.detach(), rtol=0, atol=0)

    with caplog.at_level(logging.INFO, logger="ldm_scale.formats"):  # write_export logs the coverage
        export_ldm(path + ".again", ldm, None, get_spec("tiny"), config=CONFIG, step=3)
    assert "weights: EMA: -; raw (trained, no EMA): cond_stage, unet; frozen: first_stage" in caplog.text
    assert torch.load(path + ".again", map_location="cpu", weights_only=True)["ema_coverage"]["ema"] == []


def test_loaded_model_carries_config_coverage_and_ema_unet(text_export):
    path, ldm = text_export
    loaded = load_checkpoint(path, use_ema=True)
    assert loaded.config == CONFIG and loaded.experiment == "txt2img_tiny" and loaded.run_id == "run-42"
    assert loaded.training_sampler() == SamplerConfig(name="plms", steps=7, eta=0.0, guidance_scale=3.0)
    assert loaded.ema_coverage["raw"] == ["cond_stage"] and loaded.step == 3
    assert loaded.scale_factor == pytest.approx(float(ldm.scale_factor))
    # UNet from the EMA (half-way between the initial and the trained weights), encoder raw.
    unet_name, trained = next(iter(ldm.unet.named_parameters()))
    torch.testing.assert_close(dict(loaded.model.unet.named_parameters())[unet_name], trained.detach() - 0.5)
    for name, p in ldm.cond_stage.named_parameters():
        torch.testing.assert_close(dict(loaded.model.cond_stage.named_parameters())[name], p.detach(), rtol=0, atol=0)
    raw = load_checkpoint(path, use_ema=False)
    torch.testing.assert_close(dict(raw.model.unet.named_parameters())[unet_name], trained.detach(), rtol=0, atol=0)


def test_compvis_layout_records_coverage_and_config(tmp_path):
    torch.manual_seed(1)
    spec = get_spec("tiny_cin")  # a jointly trained class embedder: raw as well
    ldm = build_ldm(spec)
    ema = trained_with_ema(ldm)
    path = str(tmp_path / "cin.ckpt")
    export_ldm(path, ldm, ema, spec, config=CONFIG, step=4, compvis=True)
    ema.close()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["ldm_scale_ema_coverage"] == {"ema": ["unet"], "raw": ["cond_stage"], "frozen": ["first_stage"]}
    loaded = load_checkpoint(path, flavour="tiny_cin")
    assert loaded.config == CONFIG and loaded.ema_coverage == ckpt["ldm_scale_ema_coverage"] and loaded.step == 4


def test_file_without_config_or_coverage(tmp_path):
    """Checkpoints from before the field (or CompVis' own) load with config / coverage None."""
    spec = get_spec("tiny_uncond")
    model = build_ldm(spec)
    path = tmp_path / "old.pt"
    torch.save({"format": "ldm_scale/ldm-v1", "model_config": dataclasses.asdict(spec), "state_dict": model.state_dict(),
                "ema_state_dict": None, "scale_factor": 0.5, "step": 1}, path)
    loaded = load_checkpoint(str(path), use_ema=False)
    assert loaded.config is None and loaded.ema_coverage is None
    assert loaded.experiment is None and loaded.run_id is None and loaded.training_sampler() is None


def test_autoencoder_export_is_all_ema(tmp_path):
    spec = get_spec("tiny")
    ae = build_autoencoder(spec.first_stage)
    ema = trained_with_ema(ae)
    export_autoencoder(str(tmp_path / "ae.pt"), ae, ema, spec.first_stage, config={}, step=2)
    ema.close()
    coverage = torch.load(tmp_path / "ae.pt", map_location="cpu", weights_only=True)["ema_coverage"]
    parts = sorted({k.split(".")[0] for k in ae.state_dict()})
    assert coverage == {"ema": parts, "raw": [], "frozen": []} and "encoder" in parts


def test_ema_coverage_parts():
    state = ["unet.a.weight", "cond_stage.emb.weight", "first_stage.enc.weight", "scale_factor"]
    assert ema_coverage(state, ["unet.a.weight"], ["unet", "cond_stage"]) == \
        {"ema": ["unet"], "raw": ["cond_stage"], "frozen": ["first_stage"]}
    assert ema_coverage(state, [], ["unet"]) == {"ema": [], "raw": ["unet"], "frozen": ["cond_stage", "first_stage"]}
