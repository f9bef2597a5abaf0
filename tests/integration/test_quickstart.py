"""README's first command, ``python launch/quickstart.py``, end to end and shortened only by its own
flags: synthetic shards -> tiny autoencoder (2 ranks) -> latent shards -> tiny text-to-image LDM
(2 ranks) -> sample grid, validation loss on held-out images and prompt-adherence score. At this
fixed seed the LDM must *learn the prompts*, not just lower its loss: the score must beat chance by
a margin.

Settings and margin, measured on the 2-core CI machine (``--num-samples 2048``; the 200-prompt
score's standard error is ~0.035):

  --ae-steps 150 --ldm-steps 400 (1024 images): 0.245, chance level: too short to learn prompts
  --ae-steps 150 --ldm-steps 800 (1024 images): 0.292
  --ae-steps 300 --ldm-steps 800:               0.443, 3.9 min
  --ae-steps 200 --ldm-steps 800:               0.500, 3.4 min (the GAN term starts at step 200, so
                                                these steps train the L1 + perceptual + KL part only)
  the README default (300 / 1300, 4096 images): 0.568

The bound, chance + 0.10 = 0.344, is ~4.5 standard errors below what these settings score: a real regression
(a sampler, guidance, conditioning or scale-factor bug) drops the score to chance (~0.24), which
it catches; the run-to-run spread of a correct model on another machine's float rounding does not.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from ldm_scale.data.synthetic import CHANCE_ADHERENCE
from tests.fixtures.torchrun import run_python

pytestmark = [pytest.mark.dist, pytest.mark.slow]

NUM_SAMPLES, AE_STEPS, LDM_STEPS = 2048, 200, 800
MARGIN = 0.10


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    result = run_python(["launch/quickstart.py", f"--workdir={work}", f"--num-samples={NUM_SAMPLES}",
                         f"--ae-steps={AE_STEPS}", f"--ldm-steps={LDM_STEPS}"], timeout=1200).check()
    return work, result


def test_the_ldm_learns_the_prompts(quickstart):
    work, _ = quickstart
    run = work / "runs" / "quickstart-ldm"
    result = json.loads((run / "result.json").read_text())
    assert result["step"] == LDM_STEPS and result["stop_reason"] == "completed"
    assert result["sample_weights"] == "ema"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert result["eval/prompt_adherence_chance"] == pytest.approx(CHANCE_ADHERENCE)
    score = result["eval/prompt_adherence"]
    assert score >= CHANCE_ADHERENCE + MARGIN, (score, CHANCE_ADHERENCE)

    # The loss falls: the first logged window (eps-prediction starts near E[eps^2] = 1) against the
    # mean of the last three windows.
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    # The fixed-timestep validation loss on the 256 held-out images: every 325 steps and at the
    # end, falling, and the last value in result.json.
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    assert [s for s, _ in val] == [325, 650, LDM_STEPS], val
    assert val[-1][1] < val[0][1], val
    assert result["val/loss"] == val[-1][1]


def test_every_stage_left_what_the_readme_promises(quickstart):
    work, _ = quickstart
    runs = work / "runs"
    ae = json.loads((runs / "quickstart-ae" / "result.json").read_text())
    assert ae["step"] == AE_STEPS and ae["stop_reason"] == "completed"
    assert (runs / "checkpoints" / "quickstart-ae" / "export.pt").stat().st_size > 0
    latents = json.loads((work / "data" / "latents" / "dataset.json").read_text())
    assert latents["num_samples"] == NUM_SAMPLES, latents
    assert (runs / "checkpoints" / "quickstart-ldm" / "export.pt").stat().st_size > 0
    grids = sorted((runs / "quickstart-ldm" / "samples").glob("*.png"))
    assert [g.name for g in grids] == [f"samples_step{LDM_STEPS:07d}.png"]
    assert list((runs / "quickstart-ldm" / "wandb").glob("offline-run-*"))


def test_the_run_report_of_the_quickstart_shows_the_validation_loss(quickstart):
    """README points to it: runs/quickstart-ldm/report/index.html, checked in headless Chromium."""
    from tests.fixtures.browser import loaded_images

    work, _ = quickstart
    seen = loaded_images(work / "runs" / "quickstart-ldm" / "report" / "index.html")
    panels = {img["panel"] for img in seen["images"] if img["complete"] and img["width"] > 0}
    assert {"loss", "loss_by_t", "val_loss", "eval", "grid"} <= panels, panels


BUCKET_LDM_STEPS = 150


def test_the_bucketed_quickstart_trains_on_bucketed_latents(quickstart):
    """README's ``python launch/quickstart.py --buckets`` in the same workdir (the autoencoder, the
    vocabulary and the held-out set are reused): wide and tall images, latents encoded in buckets,
    a micro-conditioned LDM that learns, and a grid of one sample per bucket. Adherence is measured
    at the full length in benchmarks/RESULTS.md (0.558); 150 steps only check the path."""
    work, _ = quickstart
    run_python(["launch/quickstart.py", f"--workdir={work}", f"--num-samples={NUM_SAMPLES}", f"--ae-steps={AE_STEPS}",
                f"--ldm-steps={BUCKET_LDM_STEPS}", "--buckets"], timeout=1200).check()
    card = json.loads((work / "data" / "latents_buckets" / "dataset.json").read_text())
    assert card["buckets"]["sizes"] == [[16, 48], [32, 32], [48, 16]]
    run = work / "runs" / "quickstart-ldm-buckets"
    result = json.loads((run / "result.json").read_text())
    assert result["step"] == BUCKET_LDM_STEPS and result["stop_reason"] == "completed"
    losses = [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert sum(losses[-2:]) / 2 < 0.7 * losses[0], losses
    assert (run / "samples" / f"buckets_step{BUCKET_LDM_STEPS:07d}.png").exists()
    export = torch.load(work / "runs" / "checkpoints" / "quickstart-ldm-buckets" / "export.pt", weights_only=False)
    assert any(k.startswith("unet.micro_embed.") for k in export["state_dict"])
