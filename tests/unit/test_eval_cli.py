"""The shared ``key=value`` command line (ldm_scale/evaluation/cli.py) through the real entry points:
eval/fid.py, eval/recon.py, data_tools/reference_stats.py and launch/sample.py parse with it."""
import importlib.util

import pytest

from ldm_scale.evaluation.cli import compose_config, config_from_argv
from ldm_scale.evaluation.config import FIDEvalConfig, ReferenceStatsConfig, compose_fid_config
from ldm_scale.evaluation.recon import ReconEvalConfig
from ldm_scale.sampling import SampleConfig
from tests.fixtures.torchrun import REPO_ROOT, run_python


def load_script(rel: str):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_").removesuffix(".py"), REPO_ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compose_config_types_nesting_and_errors():
    cfg = compose_config(FIDEvalConfig, ["ckpt=m.pt", "n_samples=12", "extractor.name=random-inception",
                                         "metrics.kid=true", "scale=1.5"])
    assert (cfg.ckpt, cfg.n_samples, cfg.extractor.name, cfg.metrics.kid, cfg.scale) == \
        ("m.pt", 12, "random-inception", True, 1.5)
    assert isinstance(cfg, FIDEvalConfig) and cfg.ddim_steps == FIDEvalConfig().ddim_steps
    cases = [
        (["nsamples=3"], "Key 'nsamples' not in 'FIDEvalConfig' (valid keys: preset, quickstart_dir, ckpt,"),
        (["extractor.nme=x"], "(valid keys of extractor: name, weights,"),
        (["n_samples=abc"], "could not be converted to Integer (key n_samples)"),
        (["extractor.batch_size=1.5"], "(key extractor.batch_size)"),
        (["n_samples", "ckpt=m.pt"], "arguments must be key=value overrides, got ['n_samples']"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError) as info:
            compose_config(FIDEvalConfig, argv)
        assert message in str(info.value), (argv, str(info.value))
        assert "\n" not in str(info.value)


def test_check_runs_after_the_merge():
    with pytest.raises(ValueError, match="ckpt is not set"):
        compose_config(ReconEvalConfig, ["data=x.tar"])
    with pytest.raises(ValueError, match="data= is required"):
        compose_config(ReferenceStatsConfig, ["n_samples=10"])
    assert compose_config(ReconEvalConfig, ["ckpt=a.pt", "data=x.tar", "batch_size=3"]).batch_size == 3


def test_fid_preset_then_explicit_overrides():
    cfg = compose_fid_config(["preset=quickstart", "quickstart_dir=/w", "n_samples=7"])
    assert cfg.ckpt == "/w/runs/checkpoints/quickstart-ldm/export.pt" and cfg.ref == "/w/data/synthetic/*.tar"
    assert cfg.n_samples == 7 and cfg.ddim_steps == 25 and cfg.extractor.input_size == 96
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; known: \['quickstart'\]"):
        compose_fid_config(["preset=nope"])


def test_entry_points_parse_help_and_errors(capsys):
    fid, recon = load_script("eval/fid.py"), load_script("eval/recon.py")
    stats, sample = load_script("data_tools/reference_stats.py"), load_script("launch/sample.py")
    assert fid.parse_config(["ckpt=m.pt", "ref=r.npz", "ddim_steps=3"]).ddim_steps == 3
    assert recon.parse_config(["ckpt=a.pt", "data=v.tar"]).data == "v.tar"
    assert stats.parse_config(["data=v.tar", "resolution=64"]).resolution == 64
    assert sample.parse(["ckpt=m.pt", "H=64"]) == SampleConfig(ckpt="m.pt", H=64)

    for parse, program in ((fid.parse_config, "eval/fid.py"), (recon.parse_config, "eval/recon.py"),
                           (stats.parse_config, "data_tools/reference_stats.py")):
        with pytest.raises(SystemExit) as info:
            parse(["--help"])
        assert info.value.code == 0 and "Defaults:\n" in capsys.readouterr().out
        with pytest.raises(SystemExit) as info:
            parse(["bogus_key=1"])
        assert str(info.value.code).startswith(f"{program}: Key 'bogus_key' not in"), info.value.code
    with pytest.raises(ValueError, match="valid keys: ckpt, prompt"):
        sample.parse(["steps=3"])


def test_config_from_argv_custom_compose():
    seen = []

    def compose(argv):
        seen.append(argv)
        raise ValueError("no such model")

    with pytest.raises(SystemExit, match="^prog: no such model$"):
        config_from_argv(("a=1",), FIDEvalConfig, program="prog", doc="", compose=compose)
    assert seen == [["a=1"]]


def test_bad_argument_exits_without_traceback():
    res = run_python([str(REPO_ROOT / "eval" / "recon.py"), "data=v.tar", "batch_size=many"], timeout=120)
    assert res.returncode == 1
    assert "eval/recon.py: Value 'many' of type 'str' could not be converted to Integer (key batch_size)" in res.stderr
    assert "Traceback" not in res.stderr
