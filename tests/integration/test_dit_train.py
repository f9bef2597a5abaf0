"""Diffusion transformers through the real entry point (`torchrun launch/train.py`, 2 CPU ranks, gloo):
the tiny PixArt-style DiT with rectified flow under ZeRO-3 resumes exactly and exports a model that
samples with Euler / Heun steps at any size through the API, launch/sample.py and eval/fid.py; the
tiny MMDiT (eps, ZeRO-2) and the class-conditional DiT (ZeRO-3) learn."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.fixtures.torchrun import run_python, run_torchrun
from tests.integration.tiny_training import TRAIN_SCRIPT, tiny_overrides, write_shards

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_url(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("dit_data"))


@pytest.fixture(scope="module")
def class_data_url(tmp_path_factory):
    """The same synthetic images with .cls labels (5 colours x 3 shapes) instead of captions."""
    from ldm_scale.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("dit_class_data")
    write_synthetic_dataset(str(root), num_samples=64, samples_per_shard=16, seed=0, min_size=32, max_size=40,
                            labels="class")
    return f"{root}/{{00000..00003}}.tar"


def launch(data_url: str, out: Path, run_id: str, steps: int, *extra: str) -> None:
    args = [a for a in tiny_overrides(data_url, out, steps) if not a.startswith(("experiment=", "train.log_every",
                                                                                  "checkpoint."))]
    run_torchrun([TRAIN_SCRIPT, *args, f"run_id={run_id}", "train.log_every=1", f"checkpoint.root={out}/ckpt",
                  f"checkpoint.local_dir={out}/staging_{run_id}", "optim.schedule=constant", *extra],
                 timeout=900).check()


def losses(out: Path, run_id: str) -> dict:
    rows = [json.loads(line) for line in (out / run_id / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_flow_dit_under_zero3_resumes_exactly_and_its_export_samples_with_euler(data_url, tmp_path):
    out = tmp_path / "runs"
    common = ["experiment=quickstart_dit", "deepspeed=zero3", "checkpoint.every_steps=6"]
    launch(data_url, out, "ref", 12, *common, "checkpoint.export_final=true")
    reference = losses(out, "ref")
    assert sorted(reference) == list(range(1, 13))
    # A fresh DiT predicts v = 0 (zero final layer, initialised on the gathered ZeRO-3 shards): the
    # first loss is E|eps - x0|^2 = 1 + Var(x0) ~ 2 for unit-variance latents, not a random net's.
    assert 1.5 < reference[1] < 2.5, reference

    launch(data_url, out, "part", 6, *common, "checkpoint.export_final=false")
    launch(data_url, out, "part", 12, *common, "checkpoint.export_final=false")  # the same command, resumed
    resumed = losses(out, "part")
    assert json.loads((out / "part" / "result.json").read_text())["resumed_from"] == 6
    for step in range(1, 13):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])

    from ldm_scale.diffusion import SamplerConfig
    from ldm_scale.diffusion.noise import PerSampleGenerators
    from ldm_scale.models.dit import DiT
    from ldm_scale.sampling import generate, load_checkpoint

    loaded = load_checkpoint(str(out / "ckpt" / "ref" / "export.pt"), use_ema=True)
    assert isinstance(loaded.model.unet, DiT) and loaded.spec.parameterization == "flow"
    assert loaded.training_sampler().name == "euler" and loaded.size_multiple == 8
    euler = SamplerConfig(name="euler", steps=4, guidance_scale=3.0)
    for height, width in ((32, 32), (32, 48)):  # the training size and a wider bucket (sin-cos positions)
        images = generate(loaded, ["a red circle on a blue background"] * 2, 2, euler, height=height, width=width,
                          generator=PerSampleGenerators(0, [0, 1]))
        assert images.shape == (2, 3, height, width) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="use sampler.name=euler or heun"):
        generate(loaded, ["x"], 1, SamplerConfig(name="ddim", steps=2), height=32, width=32,
                 generator=PerSampleGenerators(0, [0]))

    # The offline commands on the same export: launch/sample.py (Heun, a non-square size) and
    # eval/fid.py (Euler, random-weight Inception: the plumbing, not a comparable FID).
    export = out / "ckpt" / "ref" / "export.pt"
    run_python(["launch/sample.py", f"ckpt={export}", "prompt=a red circle on a blue background", "n_samples=2",
                "sampler=heun", "sampler.steps=3", "H=32", "W=48", f"outdir={tmp_path / 'samples'}"],
               timeout=300).check()
    assert json.loads((tmp_path / "samples" / "samples.json").read_text())["sampler"]["name"] == "heun"
    refused = run_python(["launch/sample.py", f"ckpt={export}", "prompt=x", "sampler=ddim",
                          f"outdir={tmp_path / 'refused'}"], timeout=300)
    assert refused.returncode != 0 and "use sampler.name=euler or heun" in refused.stdout + refused.stderr
    shards = data_url.replace("{00000..00003}", "{00000..00001}")
    extractor = ["extractor.name=random-inception", "extractor.input_size=75", "extractor.batch_size=8"]
    run_python(["data_tools/reference_stats.py", f"data={shards}", "n_samples=16", "resolution=32",
                "conditioning=text", "batch_size=8", "num_workers=1", f"out={tmp_path / 'ref.npz'}", *extractor],
               timeout=300).check()
    run_python(["eval/fid.py", f"ckpt={export}", f"ref={tmp_path / 'ref.npz'}", f"out={tmp_path / 'fid'}",
                "n_samples=10", "batch_size=5", "sampler=euler", "sampler.steps=2", "metrics.precision_recall=false",
                *extractor], timeout=300).check()
    record = json.loads((tmp_path / "fid" / "results.json").read_text())
    assert record["metrics"]["fid"] >= 0 and record["sampler"]["name"] == "euler"


@pytest.mark.parametrize("flavour,conditioning,zero", [("dit_tiny_mmdit", "text", "zero2"),
                                                        ("dit_tiny_cin", "class", "zero3")])
def test_transformers_learn_with_the_diffusion_objective(request, tmp_path, flavour, conditioning, zero):
    out = tmp_path / "runs"
    url = request.getfixturevalue("class_data_url" if conditioning == "class" else "data_url")
    launch(url, out, "learn", 40, "experiment=quickstart", f"model={flavour}", f"data.conditioning={conditioning}",
           f"deepspeed={zero}", "diffusion.weighting=simple", "optim.lr=1e-3", "checkpoint.every_steps=0",
           "checkpoint.export_final=false", "train.micro_batch_size=8")
    got = losses(out, "learn")
    first, last = sum(got[s] for s in range(1, 6)) / 5, sum(got[s] for s in range(31, 41)) / 10
    # eps-prediction from a zero-initialised output starts at E|eps|^2 = 1.
    assert 0.9 < got[1] < 1.1 and last < 0.8 * first, got
