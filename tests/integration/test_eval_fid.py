"""eval/fid.py and data_tools/reference_stats.py end to end on the tiny text LDM and synthetic shapes
data, offline (random-weight Inception, named as such in the result): single process, re-run
resumes, and 2 torchrun ranks (gloo) reproduce the single-rank samples, reference and metrics."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from ldm_scale.data.synthetic import write_synthetic_dataset
from ldm_scale.evaluation.generate import load_samples
from ldm_scale.evaluation.reference import load_reference
from ldm_scale.models.registry import build_ldm, get_spec
from tests.fixtures.torchrun import run_python

pytestmark = [pytest.mark.slow]

EXTRACTOR = ["extractor.name=random-inception", "extractor.input_size=75", "extractor.batch_size=8"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")  # laid out like launch/quickstart.py's --workdir
    write_synthetic_dataset(str(root / "data" / "synthetic"), num_samples=32, samples_per_shard=8, labels="text")
    export = root / "runs" / "checkpoints" / "quickstart-ldm" / "export.pt"
    export.parent.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_ldm("tiny")
    torch.save({"format": "ldm_scale/ldm-v1", "model_config": dataclasses.asdict(get_spec("tiny")),
                "state_dict": model.state_dict(), "ema_state_dict": model.unet.state_dict(), "scale_factor": 1.0,
                "step": 5, "config": {"diffusion": {"schedule": "scaled_linear"}, "name": "test"}},
               export)
    return root


def fid_args(root, out, ref):
    """The quickstart preset (model and data paths) scaled down, plus every optional metric."""
    return ["preset=quickstart", f"quickstart_dir={root}", f"ref={ref}", f"out={root / out}", "n_samples=12",
            "batch_size=4", "sampler.steps=2", "sampler.guidance_scale=2.0", "metrics.kid=true", "metrics.kid_subset_size=8",
            "metrics.sfid=true", "metrics.pr_batch_size=5", "metrics.density_coverage=true", "metrics.dc_k=3", *EXTRACTOR]


@pytest.fixture(scope="module")
def single_run(setup):
    root = setup
    shards = root / "data" / "synthetic" / "{00000..00003}.tar"
    made = run_python(["data_tools/reference_stats.py", f"data={shards}", "n_samples=32", "keep_images=32",
                       "resolution=32", "conditioning=text", "batch_size=8", "num_workers=1",
                       f"out={root / 'ref1.npz'}", *EXTRACTOR]).check()
    assert json.loads(made.stdout.strip().splitlines()[-1])["n"] == 32
    run_python(["eval/fid.py", *fid_args(root, "run1", root / "ref1.npz")]).check()
    return json.loads((root / "run1" / "results.json").read_text())


def test_single_process_record(single_run, setup):
    record = single_run
    m = record["metrics"]
    assert {"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall", "kid", "density",
            "coverage"} <= set(m)
    assert m["density"] >= 0 and 0 <= m["coverage"] <= 1
    assert m["fid"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["inception_score"] >= 1
    assert record["extractor"]["name"] == "random-inception-seed0-75px (NOT comparable to published FID)"
    assert record["comparable_to_published"] is False
    assert record["n_samples"] == 12 and record["n_reference"] == 32
    assert record["checkpoint"]["url"].endswith("runs/checkpoints/quickstart-ldm/export.pt")
    assert record["checkpoint"]["step"] == 5 and record["checkpoint"]["weights"] == "ema"
    assert len(record["checkpoint"]["config_hash"]) == 12
    assert record["sampler"] == {"name": "ddim", "steps": 2, "eta": 0.0, "spacing": "uniform", "guidance_scale": 2.0,
                                 "shift": 1.0, "seed": 0, "chunk_size": 4, "use_ema": True, "condition_kind": "text"}
    assert record["generation"]["per_rank"][0]["images_made"] == 12
    assert record["generation"]["per_rank"][0]["images_per_second"] > 0
    samples = load_samples(str(setup / "run1" / "samples"), 12, 4)
    ref = load_reference(str(setup / "ref1.npz"))
    assert samples["captions"] == [ref.captions[i] for i in range(12)]  # conditions taken from the reference
    assert list((setup / "run1" / "wandb").glob("offline-run-*")), "W&B offline run directory missing"


def test_rerun_resumes_without_resampling(single_run, setup):
    # In-process this time (same code path as the CLI minus the interpreter start-up).
    from ldm_scale.evaluation.config import compose_fid_config
    from ldm_scale.evaluation.evaluate import run_fid_eval

    again = run_fid_eval(compose_fid_config([*fid_args(setup, "run1", setup / "ref1.npz"), "logger.backend=none"]))
    assert again["generation"]["per_rank"][0]["chunks_skipped"] == 3
    assert again["generation"]["per_rank"][0]["chunks_made"] == 0
    assert again["metrics"] == single_run["metrics"]


def test_two_ranks_reproduce_single_rank(single_run, setup, torchrun):
    root = setup
    shards = root / "data" / "synthetic" / "*.tar"
    # Reference computed from shards by both ranks this time; samples split over the ranks.
    torchrun(["eval/fid.py", *fid_args(root, "run2", shards), "ref_n_samples=32", "ref_keep_images=32",
              f"ref_out={root / 'ref2.npz'}", "logger.backend=none"], nproc=2).check()
    record = json.loads((root / "run2" / "results.json").read_text())
    assert record["generation"]["world_size"] == 2
    assert [r["images_made"] for r in record["generation"]["per_rank"]] == [8, 4]  # chunks 0, 2 | chunk 1

    np.testing.assert_array_equal(load_samples(str(root / "run2" / "samples"), 12, 4)["images"],
                                  load_samples(str(root / "run1" / "samples"), 12, 4)["images"])
    ref1, ref2 = load_reference(str(root / "ref1.npz")), load_reference(str(root / "ref2.npz"))
    assert ref2.pool.n == ref1.pool.n == 32 and ref2.meta["world_size"] == 2
    np.testing.assert_allclose(ref2.pool.mu, ref1.pool.mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ref2.pool.sigma, ref1.pool.sigma, rtol=1e-7, atol=1e-12)
    m1, m2 = single_run["metrics"], record["metrics"]
    assert m2["precision"] == m1["precision"] and m2["recall"] == m1["recall"]
    for key in ("fid", "sfid", "inception_score"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-6), key


def test_guidance_sweep_writes_the_fid_vs_clip_score_curve(single_run, setup):
    """guidance_scales=[...]: one evaluation per scale on the same conditions and noise, then
    sweep.json / sweep.md / sweep.png. Scale 2.0 is the single run's setting: same FID."""
    root = setup
    out = root / "sweep"
    args = [a for a in fid_args(root, "sweep", root / "ref1.npz") if not a.startswith(("metrics.", "sampler.guidance"))]
    run_python(["eval/fid.py", *args, "guidance_scales=[1.0,2.0]", "metrics.precision_recall=false",
                "metrics.clip_score=true", "metrics.clip_model=clip:ViT-B-32"], timeout=900).check()
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["guidance_scale"] for r in sweep["scales"]] == [1.0, 2.0]
    for r in sweep["scales"]:
        assert {"fid", "clip_score", "inception_score"} <= set(r)
        record = json.loads((out / f"scale_{r['guidance_scale']:g}" / "results.json").read_text())
        assert record["sampler"]["guidance_scale"] == r["guidance_scale"] and record["metrics"]["fid"] == r["fid"]
    # (The fixture's untrained UNet has a zero-initialised output layer: eps = 0 for every condition, so
    # the scale cannot change its samples here; guidance itself is tested in test_diffusion_samplers.py.)
    assert sweep["scales"][1]["fid"] == pytest.approx(single_run["metrics"]["fid"], rel=1e-9)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| guidance scale | fid | clip_score") and len(table) == 4


def test_fd_dinov2_end_to_end_from_the_hub_cache_with_a_pinned_digest(setup, tmp_path):
    """extractor=dinov2 metrics=fd_dinov2: the weights file is found in the torch hub cache under Meta's
    name, checked against extractor.sha256 before any sample is made, and recorded with the result."""
    from tests.fixtures.dinov2_weights import write_published_format

    root = setup
    torch_home = tmp_path / "torch_home"
    digest = write_published_format(torch_home / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth")
    shards = root / "data" / "synthetic" / "{00000..00003}.tar"
    base = [a for a in fid_args(root, "fd_dinov2", shards) if not a.startswith(("metrics.", "extractor."))]
    dino_args = [*base, f"ref_out={tmp_path / 'ref_dinov2.npz'}", "ref_keep_images=32", "extractor=dinov2",
                 "extractor.name=dinov2:vits14", "extractor.batch_size=8", "metrics=fd_dinov2", "metrics.pr_batch_size=5",
                 "metrics.dc_k=3"]
    env = {"TORCH_HOME": str(torch_home)}

    wrong = run_python(["eval/fid.py", *dino_args, "extractor.sha256=" + "0" * 64], env=env)
    assert wrong.returncode != 0 and f"has SHA-256 {digest}, but extractor.sha256 expects" in wrong.stderr
    assert not (root / "fd_dinov2").exists()  # refused before a checkpoint was read or a sample made

    run_python(["eval/fid.py", *dino_args, f"extractor.sha256={digest}"], env=env, timeout=900).check()
    record = json.loads((root / "fd_dinov2" / "results.json").read_text())
    ext = record["extractor"]
    assert ext["name"] == "dinov2:vits14" and ext["frechet_label"] == "FD-DINOv2" and ext["weights_sha256"] == digest
    assert ext["resize"] == "pil_bicubic_rgb" and ext["feature_dims"] == {"pool": 384}
    m = record["metrics"]
    assert {"fid", "precision", "recall", "density", "coverage"} == set(m) and m["fid"] > 0
    ref = load_reference(str(tmp_path / "ref_dinov2.npz"))
    assert ref.extractor_name == "dinov2:vits14" and ref.weights_sha256 == digest and ref.pool.mu.shape == (384,)
