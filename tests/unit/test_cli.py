"""The command line every entry point but training shares (ldm_scale/cli.py: Hydra composition of
conf/commands/), through the real entry points eval/fid.py, eval/recon.py,
data_tools/*.py and launch/sample.py."""
import importlib
import importlib.util

import pytest

from ldm_scale.cli import compose_command, quote_free_text
from ldm_scale.diffusion import SamplerConfig
from ldm_scale.evaluation.config import FIDEvalConfig, ReferenceStatsConfig, compose_fid_config
from ldm_scale.evaluation.recon import compose_recon_config
from ldm_scale.sampling import SampleConfig
from tests.fixtures.torchrun import REPO_ROOT, run_python


def load_script(rel: str):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_").removesuffix(".py"), REPO_ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_types_nesting_groups_and_one_line_errors():
    cfg = compose_fid_config(["ckpt=m.pt", "n_samples=12", "extractor=random_inception", "metrics.kid=true",
                              "metrics.kid_subset_size=8",  # at most n_samples (checked at compose time)
                              "sampler.guidance_scale=1.5", "precision=bf16"])
    assert (cfg.ckpt, cfg.n_samples, cfg.extractor.name, cfg.metrics.kid, cfg.sampler.guidance_scale) == \
        ("m.pt", 12, "random-inception", True, 1.5)
    assert isinstance(cfg, FIDEvalConfig) and cfg.precision == "bf16" and cfg.logger.tags == ["eval"]
    assert cfg.sampler == SamplerConfig(name="ddim", steps=200, eta=0.0, guidance_scale=1.5)
    cases = [
        (["nsamples=3"], "unknown config key nsamples: did you mean n_samples?"),
        (["extractor.nme=x"], "unknown config key extractor.nme: did you mean extractor.name?"),
        (["+bogus=1"], "unknown config key bogus: valid keys: ckpt, use_ema, precision,"),
        (["n_samples=abc"], "could not be converted to Integer (key n_samples)"),
        (["extractor.batch_size=1.5"], "(key extractor.batch_size)"),
        (["precision=fp8"], "Invalid value 'fp8', expected one of [fp32, bf16, fp16] (key precision)"),
        (["sampler.name=dpmpp"], "expected one of [ddim, plms, ddpm, euler, heun] (key sampler.name)"),
        (["sampler=nosuch"], "Could not find 'sampler/nosuch': valid keys: ddim, ddpm, euler, heun, plms"),
        (["extractor.resize=bicubic"], "expected one of [pil_bicubic, pil_bicubic_rgb, tf_bilinear, torch_bilinear]"),
        (["preset=nope"], "Could not find 'preset/nope': valid keys: quickstart"),
        (["sampler=plms", "sampler.eta=0.5"], "PLMS is deterministic: eta must be 0"),
        (["n_samples", "ckpt=m.pt"], "arguments must be key=value overrides, got ['n_samples']"),
        (["metrics.kid=true", "n_samples=12"], "metrics.kid_subset_size=1000 > n_samples=12: KID subsets are drawn"),
    ]
    for argv, message in cases:
        with pytest.raises(ValueError) as info:
            compose_fid_config(argv)
        assert message in str(info.value), (argv, str(info.value))
        assert "\n" not in str(info.value)


def test_group_options_override_the_command_defaults_and_the_command_line_wins():
    assert compose_fid_config(["sampler=ddpm"]).sampler.steps == 0  # ddpm: every training timestep
    assert compose_fid_config(["sampler=ddpm", "sampler.steps=100"]).sampler.steps == 100
    full = compose_fid_config(["metrics=full"]).metrics
    assert full.kid and full.sfid and not full.clip_score
    sample = compose_command("sample", SampleConfig, ["ckpt=m.pt", "sampler=plms"])
    assert sample.sampler == SamplerConfig(name="plms", steps=50, eta=0.0, guidance_scale=5.0)


def test_free_text_and_urls_reach_the_config_verbatim():
    prompt = "it's a cat, a dog {x} \\ done"
    cfg = compose_command("sample", SampleConfig, ["ckpt=s3://b/m.pt", f"prompt={prompt}"])
    assert (cfg.ckpt, cfg.prompt) == ("s3://b/m.pt", prompt)
    stats = compose_command("reference_stats", ReferenceStatsConfig,
                            ["data=s3://b/laion/{00000..00099}.tar", "conditioning=class"])
    assert stats.data == "s3://b/laion/{00000..00099}.tar" and stats.conditioning == "class"
    assert quote_free_text("n_samples=4", SampleConfig) == "n_samples=4"  # not a string field
    assert quote_free_text("prompt='quoted'", SampleConfig) == "prompt='quoted'"  # already Hydra-quoted
    assert quote_free_text("prompt=null", SampleConfig) == "prompt=null"
    assert compose_command("sample", SampleConfig, ["ckpt=m.pt", "prompt=3"]).prompt == "3"  # a class index


def test_check_runs_after_composition():
    with pytest.raises(ValueError, match="ckpt is not set"):
        compose_recon_config(["data=x.tar"])
    with pytest.raises(ValueError, match="data= is required"):
        compose_command("reference_stats", ReferenceStatsConfig, ["n_samples=10"])
    with pytest.raises(ValueError, match="mask= needs init_image="):
        compose_command("sample", SampleConfig, ["ckpt=m.pt", "mask=m.png"])
    assert compose_recon_config(["ckpt=a.pt", "data=x.tar", "batch_size=3"]).batch_size == 3


def test_fid_preset_is_a_config_group_and_explicit_overrides_win():
    cfg = compose_fid_config(["preset=quickstart", "quickstart_dir=/w", "n_samples=7"])
    assert cfg.ckpt == "/w/runs/checkpoints/quickstart-ldm/export.pt" and cfg.ref == "/w/data/synthetic/*.tar"
    assert cfg.n_samples == 7 and cfg.sampler.steps == 25 and cfg.sampler.guidance_scale == 3.0
    assert cfg.extractor.input_size == 96


def test_entry_points_parse_help_and_errors(capsys):
    fid, recon = load_script("eval/fid.py"), load_script("eval/recon.py")
    stats, sample = load_script("data_tools/reference_stats.py"), load_script("launch/sample.py")
    assert fid.parse_config(["ckpt=m.pt", "ref=r.npz", "sampler.steps=3"]).sampler.steps == 3
    assert recon.parse_config(["ckpt=a.pt", "data=v.tar"]).data == "v.tar"
    assert stats.parse_config(["data=v.tar", "resolution=64"]).resolution == 64
    assert sample.parse(["ckpt=m.pt", "H=64"]) == SampleConfig(ckpt="m.pt", H=64)

    groups = {"eval/fid.py": ["sampler: ddim, ddpm, euler, heun, plms (default: ddim)", "metrics: cmmd, default, fd_dinov2, full, text",
                              "preset: quickstart"],
              "eval/recon.py": ["extractor: auto, dinov2, inception, random_inception (default: auto)"],
              "data_tools/reference_stats.py": ["extractor: auto, dinov2, inception, random_inception"]}
    for parse, program in ((fid.parse_config, "eval/fid.py"), (recon.parse_config, "eval/recon.py"),
                           (stats.parse_config, "data_tools/reference_stats.py")):
        with pytest.raises(SystemExit) as info:
            parse(["--help"])
        shown = capsys.readouterr().out
        assert info.value.code == 0 and "Config groups" in shown and "Keys and defaults" in shown
        assert all(g in shown for g in groups[program]), shown
        with pytest.raises(SystemExit) as info:
            parse(["bogus_key=1"])
        assert info.value.code == 2
        assert capsys.readouterr().err.startswith(f"{program}: error: unknown config key bogus_key")
    with pytest.raises(ValueError, match="unknown config key steps: valid keys: ckpt, use_ema"):
        sample.parse(["steps=3"])


def test_bad_argument_exits_without_traceback():
    res = run_python([str(REPO_ROOT / "eval" / "recon.py"), "data=v.tar", "batch_size=many"], timeout=120)
    assert res.returncode == 2
    assert "eval/recon.py: error: Value 'many' of type 'str' could not be converted to Integer (key batch_size)" \
        in res.stderr
    assert "Traceback" not in res.stderr


DATA_TOOLS = {  # script: (valid arguments, one typed field they set, its value, a required key's message)
    "data_tools/make_synthetic.py": (["out=s3://b/shapes", "labels=class", "num_samples=64"], "labels", "class",
                                     "out= is required"),
    "data_tools/download.py": (["parquet=p.parquet", "out=d", "extra_columns=label,aesthetic", "resize_mode=border"],
                               "resize_mode", "border", "parquet= is required"),
    "data_tools/inspect_shards.py": (["data=d/{00000..00003}.tar", "write_sizes=false"], "write_sizes", False,
                                     "data= is required"),
    "data_tools/build_vocab.py": (["data=d/*.tar", "out=v.txt", "max_samples=10"], "max_samples", 10,
                                  "data= is required"),
    "data_tools/precompute_latents.py": (["data=d/*.tar", "out=l", "ckpt=ae.pt", "resolution=32", "dtype=float32"],
                                         "dtype", "float32", "data= is required"),
}


@pytest.mark.parametrize("script", sorted(DATA_TOOLS))
def test_data_tools_are_hydra_commands_that_check_before_any_work(script, capsys, tmp_path, monkeypatch):
    """Each data tool composes its conf/commands/<tool>.yaml: typed values, --help with the keys, and a
    bad key, a bad choice or a missing input exit 2 with one line before anything is read or written."""
    from ldm_scale import cli

    name = script.rsplit("/", 1)[-1].removesuffix(".py")
    module = load_script(script)
    argv, key, value, required = DATA_TOOLS[script]
    schema = {"make_synthetic": "MakeSyntheticConfig", "download": "DownloadCommandConfig",
              "inspect_shards": "InspectShardsConfig", "build_vocab": "BuildVocabConfig",
              "precompute_latents": "PrecomputeLatentsConfig"}[name]
    cfg = compose_command(name, getattr(importlib.import_module("ldm_scale.data.commands"), schema), argv)
    got = getattr(cfg, key)
    assert got == value and type(got) is type(value)  # a plain str at run time, not the Enum member

    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    shown = capsys.readouterr().out
    assert info.value.code == 0 and "Keys and defaults" in shown and f"{key}:" in shown and "storage:" in shown

    monkeypatch.chdir(tmp_path)  # nothing may be written: the directory stays empty
    bad = [(argv + ["bogus_key=1"], "unknown config key bogus_key"), ([], required)]
    if name == "make_synthetic":
        bad.append((["out=x", "labels=caption"], "expected one of [text, class, both] (key labels)"))
    if name == "precompute_latents":
        bad.append((["data=d/*.tar", "out=l", "resolution=32"], "ckpt= is required"))
        bad.append((argv + ["architecture=kl_f99"], "architecture='kl_f99' is not a registered autoencoder"))
    if name == "download":
        bad.append((["parquet=p", "out=d", "extra_columns=,"], "extra_columns=','"))
    for args, message in bad:
        with pytest.raises(SystemExit) as info:
            module.main(args)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith(f"{script}: error: ") and message in err, (args, err)
        assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    assert cli.COMMANDS_DIR.joinpath(f"{name}.yaml").is_file()
