"""launch/sample.py end to end on tiny exported checkpoints (random weights made by the test).

The text-to-image run (and one error) go through a real subprocess; the other variants, including a
checkpoint on the S3 test server, call the same ``main(argv)`` in-process to stay within the time
budget.
"""
import dataclasses
import importlib.util
import json

import pytest
import torch
from PIL import Image

from ldm_scale import storage
from ldm_scale.models.registry import build_ldm, get_spec
from ldm_scale.sampling import grid_size
from tests.fixtures.torchrun import REPO_ROOT, run_python

SCRIPT = str(REPO_ROOT / "launch" / "sample.py")


def export(spec, path, *, with_ema=True, fmt="ldm_scale/ldm-v1", seed=0):
    """Write an exported checkpoint in the docs/architecture.md layout."""
    torch.manual_seed(seed)
    model = build_ldm(spec)
    with torch.no_grad():  # non-zero output convs, so samples depend on the weights
        for p in model.unet.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
        model.scale_factor.fill_(0.8)  # the buffer and the "scale_factor" field agree in real exports
    ema = {k: v + 0.01 for k, v in model.unet.state_dict().items()} if with_ema else None
    torch.save({"format": fmt, "model_config": dataclasses.asdict(spec), "state_dict": model.state_dict(),
                "ema_state_dict": ema, "scale_factor": 0.8, "step": 11,
                "config": {"diffusion": {"schedule": "scaled_linear"}}}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    inpaint = get_spec("tiny_uncond")
    inpaint.name = "tiny_inpaint"
    inpaint.cond_stage.kind, inpaint.cond_stage.concat_channels = "concat", 5
    inpaint.unet.in_channels = 9
    return {
        "text": export(get_spec("tiny"), str(root / "tiny.pt")),
        "cin": export(get_spec("tiny_cin"), str(root / "tiny_cin.pt")),
        "cin_no_ema": export(get_spec("tiny_cin"), str(root / "tiny_cin_no_ema.pt"), with_ema=False),
        "inpaint": export(inpaint, str(root / "tiny_inpaint.pt")),
        "uncond": export(get_spec("tiny_uncond"), str(root / "tiny_uncond.pt")),
    }


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("sample_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def pngs(outdir):
    return sorted((outdir / "samples").glob("*.png"))


@pytest.mark.slow
def test_text_to_image_subprocess(ckpts, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    # W=48 is beyond the training size 32: convolutional sampling at a new aspect ratio.
    run_python([SCRIPT, f"ckpt={ckpts['text']}", f"from_file={prompts}", "n_samples=2", "n_iter=2",
                      "sampler.guidance_scale=3.0", "sampler.steps=2", "H=32", "W=48", "seed=5", f"outdir={out}"], timeout=300).check()
    summary = json.loads((out / "samples.json").read_text())  # what was run, as recorded
    assert (summary["height"], summary["width"], summary["seed"]) == (32, 48, 5)
    assert summary["sampler"]["steps"] == 2 and summary["sampler"]["guidance_scale"] == 3.0
    files = pngs(out)
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in summary["samples"]) == [f.name for f in files]
    assert len(files) == 6  # 2 iterations x (2 + 1 prompts)
    assert all(Image.open(f).size == (48, 32) for f in files)
    # all samples in rows of n_samples: 2 iterations x (a batch of 2 + a batch of 1) = 3 rows
    assert Image.open(out / "grid-0000.png").size[::-1] == grid_size(3, 2, 32, 48)
    summary = json.loads((out / "samples.json").read_text())
    assert summary["use_ema"] and summary["step"] == 11
    assert [s["prompt"] for s in summary["samples"]][:3] == ["a red circle", "a blue square", "a green triangle"]


def test_checkpoint_from_s3(ckpts, cli, s3_server, tmp_path):
    url = s3_server.url("exports/tiny_cin.pt")
    storage.put_file(ckpts["cin"], url)
    out = tmp_path / "out"
    assert cli([f"ckpt={url}", "prompt=3", "n_samples=3", "n_iter=1", "sampler=plms", "sampler.steps=2",
                "precision=bf16", f"outdir={out}", "progress=false"]) == 0
    assert len(pngs(out)) == 3
    assert Image.open(out / "grid-0000.png").size[::-1] == grid_size(1, 3, 32, 32)


def test_seeded_runs_repeat_and_ema_matters(ckpts, cli, tmp_path):
    common = [f"ckpt={ckpts['cin']}", "prompt=1", "n_samples=2", "sampler.steps=2", "progress=false"]
    for outdir, extra in (("a", []), ("a", []), ("raw", ["use_ema=false"])):
        assert cli(common + [f"outdir={tmp_path / outdir}"] + extra) == 0
    # the second run into the same directory continues the numbering (and the grid count)
    first, again = pngs(tmp_path / "a")[0], pngs(tmp_path / "a")[2]
    assert len(pngs(tmp_path / "a")) == 4 and (tmp_path / "a" / "grid-0001.png").exists()
    raw = pngs(tmp_path / "raw")[0]
    assert Image.open(first).tobytes() == Image.open(again).tobytes() != Image.open(raw).tobytes()


def _write_images(tmp_path, size=32):
    g = torch.Generator().manual_seed(0)
    init = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8)
    Image.fromarray(init.numpy()).save(tmp_path / "init.png")
    mask = torch.zeros(size, size, dtype=torch.uint8)
    mask[:, : size // 2] = 255  # repaint the left half
    Image.fromarray(mask.numpy()).save(tmp_path / "mask.png")
    return init


@pytest.mark.parametrize("which", ["cin", "inpaint"])
def test_inpainting_keeps_unmasked_pixels(ckpts, cli, tmp_path, which):
    init = _write_images(tmp_path)
    out = tmp_path / "out"
    args = [f"ckpt={ckpts[which]}", f"init_image={tmp_path / 'init.png'}", f"mask={tmp_path / 'mask.png'}",
            "n_samples=2", "sampler.steps=3", f"outdir={out}", "progress=false"]
    assert cli(args + (["prompt=2"] if which == "cin" else [])) == 0
    for f in pngs(out):
        result = torch.from_numpy(__import__("numpy").array(Image.open(f)))
        assert torch.equal(result[:, 16:], init[:, 16:])
        assert not torch.equal(result[:, :16], init[:, :16])


def test_img2img_strength(ckpts, cli, tmp_path):
    init = _write_images(tmp_path)
    diffs = {}
    for strength in (0.2, 0.9):
        out = tmp_path / f"s{strength}"
        assert cli([f"ckpt={ckpts['cin']}", "prompt=0", f"init_image={tmp_path / 'init.png'}",
                    f"strength={strength}", "n_samples=1", "sampler.steps=10", f"outdir={out}", "progress=false"]) == 0
        result = torch.from_numpy(__import__("numpy").array(Image.open(pngs(out)[0]))).float()
        diffs[strength] = (result - init.float()).abs().mean().item()
    assert diffs[0.2] < diffs[0.9]


def test_clear_errors(ckpts, cli, tmp_path, capsys):
    ae = export(get_spec("tiny_cin"), str(tmp_path / "ae.pt"), fmt="ldm_scale/autoencoder-v1")
    cases = [
        ([f"ckpt={tmp_path / 'missing.pt'}", "prompt=1"], "checkpoint not found"),
        ([f"ckpt={ckpts['cin_no_ema']}", "prompt=1"], "no EMA weights: pass use_ema=false"),
        ([f"ckpt={ckpts['cin']}", "prompt=1", "H=40"], "multiples of 16"),
        ([f"ckpt={ckpts['cin']}", "prompt=cat"], "class indices"),
        ([f"ckpt={ckpts['text']}"], 'give prompt="'),
        ([f"ckpt={ckpts['inpaint']}"], "pass init_image= and mask="),
        ([f"ckpt={ae}", "prompt=1"], "autoencoder export"),
        ([f"ckpt={ckpts['cin']}", "steps=3"], "valid keys"),
        ([f"ckpt={ckpts['cin']}", "sampler=plms", "sampler.eta=0.5"], "eta must be 0"),
        (["prompt=1"], "ckpt= is required"),
    ]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases.append(([f"ckpt={tmp_path / 'junk.pt'}"], "not a readable torch checkpoint"))
    for argv, message in cases:
        assert cli(argv + ["sampler.steps=1", "progress=false", f"outdir={tmp_path / 'o'}"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert "Traceback" not in err
    assert cli(["--help"]) == 0 and "sampler.steps=50" in capsys.readouterr().out
    res = run_python([SCRIPT, f"ckpt={tmp_path / 'missing.pt'}"], timeout=120)
    assert res.returncode == 2 and "checkpoint not found" in res.stderr


def test_compvis_layout_checkpoint_needs_flavour(ckpts, cli, tmp_path, capsys):
    from ldm_scale.models import compat

    exported = torch.load(ckpts["cin"], map_location="cpu", weights_only=True)
    compvis = {"state_dict": compat.ldm_to_compvis_state_dict(exported["state_dict"], exported["ema_state_dict"]),
               "global_step": 11}
    path = tmp_path / "compvis.ckpt"
    torch.save(compvis, path)
    common = ["prompt=4", "n_samples=1", "sampler.steps=2", "progress=false"]
    assert cli([f"ckpt={path}", f"outdir={tmp_path / 'x'}"] + common) == 2
    assert "pass flavour=" in capsys.readouterr().err
    # Same weights (EMA) through either layout give the same image.
    assert cli([f"ckpt={path}", "flavour=tiny_cin", f"outdir={tmp_path / 'compvis'}"] + common) == 0
    assert cli([f"ckpt={ckpts['cin']}", f"outdir={tmp_path / 'ours'}"] + common) == 0
    ours, theirs = (Image.open(pngs(tmp_path / d)[0]).tobytes() for d in ("ours", "compvis"))
    assert ours == theirs


def test_generate_with_given_noise_ignores_batching(ckpts):
    from ldm_scale.diffusion import SamplerConfig
    from ldm_scale.sampling import generate, load_checkpoint

    loaded = load_checkpoint(ckpts["cin"])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = SamplerConfig(steps=2, guidance_scale=2.0)
    both = generate(loaded, torch.tensor([1, 2]), 2, cfg, height=32, width=32,
                    generator=torch.Generator().manual_seed(5), x_T=x_T)
    second = generate(loaded, torch.tensor([2]), 1, cfg, height=32, width=32,
                      generator=torch.Generator().manual_seed(9), x_T=x_T[1:])
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="x_T has shape"):
        generate(loaded, torch.tensor([1]), 1, cfg, height=32, width=32, generator=torch.Generator(), x_T=x_T)


def test_unconditional_model_needs_no_prompt(ckpts, cli, tmp_path):
    out = tmp_path / "out"
    assert cli([f"ckpt={ckpts['uncond']}", "n_samples=2", "n_iter=2", "sampler.steps=2", "H=16", "W=32",
                f"outdir={out}", "progress=false"]) == 0
    assert [Image.open(f).size for f in pngs(out)] == [(32, 16)] * 4
    assert Image.open(out / "grid-0000.png").size[::-1] == grid_size(2, 2, 16, 32)
