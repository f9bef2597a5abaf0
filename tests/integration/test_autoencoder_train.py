"""Autoencoder training through the real entry points on 2 CPU ranks (gloo), W&B offline:

- run A: `launch/train.py experiment=autoencoder_tiny` (KL, ZeRO-2) for 120 steps on synthetic
  shards; the GAN switches on at step 100; checkpoints at 55 and 110 and the final 120;
- run B: a new run resumed from A's step_110 checkpoint reaches step 120 with A's weights (both
  engines' optimizer states, data position and RNG restored);
- run C: the VQ flavour under ZeRO-1 in bf16 with an EMA for a few steps across disc_start;
- `eval/recon.py` on A's export, split over 2 ranks, against the same metrics computed here.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from ldm_scale.data.synthetic import write_synthetic_dataset
from ldm_scale.evaluation.recon import ReconMetrics, load_autoencoder_export, reconstruct
from ldm_scale.models.registry import AUTOENCODERS, build_autoencoder
from tests.fixtures.torchrun import run_torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS, DISC_START, EVERY = 120, 100, 55


def _train_args(root, run_id, *extra):
    return ["launch/train.py", "experiment=autoencoder_tiny", f"data.urls=['{root}/data/{{00000..00007}}.tar']",
            f"output_dir={root}/runs", f"run_id={run_id}", f"checkpoint.local_dir={root}/staging/{run_id}",
            "train.micro_batch_size=8", "train.log_every=5", "train.progress_bar=false", "logger.mode=offline",
            "checkpoint.keep_last=5", "autoencoder_loss.perceptual.net=alex",
            # In-process data reading: a DataLoader created after the RNG restore draws its base seed
            # from the global RNG, which shifts the posterior noise of a resumed run (data issue).
            "data.num_workers=0", *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae_train")
    write_synthetic_dataset(str(root / "data"), num_samples=512, samples_per_shard=64, seed=0)
    write_synthetic_dataset(str(root / "val"), num_samples=64, samples_per_shard=32, seed=99)
    return root


@pytest.fixture(scope="module")
def run_a(root):
    run_torchrun(_train_args(root, "ae-a", f"train.max_steps={STEPS}", f"autoencoder_loss.disc_start={DISC_START}",
                             f"checkpoint.every_steps={EVERY}"), timeout=900).check()
    return root / "runs" / "checkpoints" / "ae-a"


def _metrics(root, run_id):
    lines = (root / "runs" / run_id / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _client_state(step_dir):
    state = json.loads((step_dir / "client_state.json").read_text())
    return state.get("client_state", state)


def test_discriminator_switches_on_exactly_at_disc_start(root, run_a):
    rows = [r for r in _metrics(root, "ae-a") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(5, STEPS + 1, 5))
    for r in rows:
        on = r["step"] > DISC_START  # the logged interval holds micro-batches of steps step-4 .. step
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/logvar"])
        assert ("train/logits_real" in r) == on and ("discriminator/lr" in r) == on
        assert (r["train/d_weight"] > 0) == on
    # DeepSpeed's own step counter of the discriminator engine: never stepped before disc_start.
    assert _client_state(run_a / f"step_{EVERY}")["discriminator_steps"] == 0
    assert _client_state(run_a / f"step_{2 * EVERY}")["discriminator_steps"] == 2 * EVERY - DISC_START
    assert _client_state(run_a / f"step_{STEPS}")["discriminator_steps"] == STEPS - DISC_START
    # the learned log-variance moved
    assert rows[-1]["train/logvar"] < rows[0]["train/logvar"] - 0.01
    assert list((root / "runs" / "ae-a" / "samples").glob("reconstructions_step*.png"))


def _images(url, n=64):
    from ldm_scale.data import build_loader
    from ldm_scale.data.config import DataConfig

    cfg = DataConfig(urls=[url], mode="epoch", conditioning="none", resolution=32, shuffle_buffer=0, num_workers=1)
    return torch.cat([b["image"] for b in build_loader(cfg, None, batch_size=16, seed=0)])[:n]


def _psnr_of(model, kind, images):
    m = ReconMetrics()
    recon, z = reconstruct(model, kind, images, sample_posterior=False, generator=None)
    m.update(images, recon, z)
    return m.compute()


def test_training_improves_psnr_measurably(root, run_a):
    images = _images(f"{root}/val/{{00000..00001}}.tar")
    torch.manual_seed(0)  # the task seeds with cfg.seed before building: these are the step-0 weights
    initial = _psnr_of(build_autoencoder(AUTOENCODERS["kl_tiny"]).eval(), "kl", images)
    trained, info = load_autoencoder_export(str(run_a / "export.pt"))
    final = _psnr_of(trained, "kl", images)
    assert info["step"] == STEPS and info["kind"] == "kl"
    assert final["psnr"] > initial["psnr"] + 2.0, (initial, final)
    assert final["ssim"] > initial["ssim"] + 0.15, (initial, final)


def test_resume_from_a_checkpoint_reproduces_both_engines(root, run_a):
    run_torchrun(_train_args(root, "ae-b", f"train.max_steps={STEPS}", f"autoencoder_loss.disc_start={DISC_START}",
                             "checkpoint.every_steps=0", f"checkpoint.resume={run_a}/step_{2 * EVERY}"),
                 timeout=900).check()
    b = root / "runs" / "checkpoints" / "ae-b"
    assert _client_state(b / f"step_{STEPS}")["discriminator_steps"] == STEPS - DISC_START
    for engine in ("generator", "discriminator"):
        sa = torch.load(run_a / f"step_{STEPS}" / engine / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
        sb = torch.load(b / f"step_{STEPS}" / engine / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5, rtol=1e-4), (engine, k)
    last_a = [r for r in _metrics(root, "ae-a") if r.get("step") == STEPS and "train/loss" in r][0]
    last_b = [r for r in _metrics(root, "ae-b") if r.get("step") == STEPS and "train/loss" in r][0]
    assert last_b["train/disc_loss"] == pytest.approx(last_a["train/disc_loss"], rel=1e-4)


def test_vq_under_zero1_bf16_trains_both_engines(root):
    run_torchrun(_train_args(root, "ae-vq", "autoencoder=vq_tiny", "deepspeed=zero1", "deepspeed.precision=bf16",
                             "train.max_steps=6",
                             "train.log_every=3", "autoencoder_loss.disc_start=3", "autoencoder_loss.nll_reduction=mean",
                             "autoencoder_loss.learn_logvar=false", "checkpoint.every_steps=0", "ema.enabled=true",
                             "ema.decay=0.9"), timeout=900).check()
    rows = {r["step"]: r for r in _metrics(root, "ae-vq") if "train/loss" in r}
    assert 1 <= rows[6]["train/perplexity"] <= 256 and 0 < rows[6]["train/codebook_usage"] <= 1
    assert rows[6]["train/codebook_loss"] > 0 and rows[6]["discriminator/lr"] > 0
    assert "train/logits_fake" not in rows[3] and "train/logits_fake" in rows[6]
    assert _client_state(root / "runs" / "checkpoints" / "ae-vq" / "step_6")["discriminator_steps"] == 3
    # the optional EMA of the autoencoder's weights is exported next to the raw weights
    export = torch.load(root / "runs" / "checkpoints" / "ae-vq" / "export.pt", map_location="cpu", weights_only=False)
    assert export["format"] == "ldm_scale/autoencoder-v1" and export["model_config"]["kind"] == "vq"
    assert export["ema_state_dict"].keys() <= export["state_dict"].keys()
    assert "quantize.embedding.weight" in export["ema_state_dict"]
    ema_model, info = load_autoencoder_export(str(root / "runs" / "checkpoints" / "ae-vq" / "export.pt"))
    assert info["weights"] == "ema" and info["kind"] == "vq"


def test_recon_cli_over_two_ranks_matches_in_process_metrics(root, run_a):
    out = root / "recon.json"
    run_torchrun(["eval/recon.py", f"ckpt={run_a}/export.pt", f"data={root}/val/{{00000..00001}}.tar",
                  "batch_size=16", "lpips.net=alex", "lpips.backbone_weights=random", "extractor.name=random-inception",
                  "extractor.input_size=75", f"out={out}"], timeout=600).check()
    record = json.loads(out.read_text())
    m = record["metrics"]
    assert m["num_images"] == 64 and record["world_size"] == 2
    model, _ = load_autoencoder_export(str(run_a / "export.pt"))
    expected = _psnr_of(model, "kl", _images(f"{root}/val/{{00000..00001}}.tar"))
    assert m["psnr"] == pytest.approx(expected["psnr"], rel=1e-4)
    assert m["ssim"] == pytest.approx(expected["ssim"], rel=1e-4)
    assert 0 < m["lpips"] and math.isfinite(m["rfid"]) and m["rfid"] >= 0
    assert m["latent_std"] > 0 and m["scale_factor"] == pytest.approx(1 / m["latent_std"])
    assert record["checkpoint"]["step"] == STEPS and "NOT comparable" in record["extractor"]["name"]
