"""The Hydra tree composes, the schema rejects typos, validate() derives the plan and explains errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from ldm_scale import config as C
from ldm_scale.models.registry import build_ldm, parameter_counts
from ldm_scale.train import engine as E
from tests.fixtures.torchrun import run_python

URLS = ["data.urls=['s3://bucket/set/{00000..00099}.tar']", "model.first_stage_ckpt=s3://bucket/ae/export.pt",
        "checkpoint.root=s3://bucket/ckpt"]
EXPERIMENTS = sorted(p.stem for p in (C.CONF_DIR / "experiment").glob("*.yaml"))
# Values an experiment leaves to its user besides the URLs (its own data's vocabulary and prompts).
# txt2img_kl8's BERT tokenizer reads a vocab.txt nobody ships with the code (validate() asks for it).
REQUIRED = {"txt2img_own_data": ["model.ldm.cond_stage.text.tokenizer.vocab_path=/data/vocab.txt",
                                 "eval.prompts=[a caption]"],
            "txt2img_kl8": ["model.ldm.cond_stage.text.tokenizer.vocab_path=/bert/vocab.txt"]}


def composed(*overrides: str) -> C.Config:
    return C.to_object(C.compose(list(overrides)))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = composed(f"experiment={experiment}", *URLS, *REQUIRED.get(experiment, []))
    # World sizes the experiments are written for: the quickstart's 2 CPU ranks, an 8-GPU node.
    # check_files=False: the URLs are placeholders (tests/unit/test_config_errors.py reads real files).
    plan = C.validate(cfg, world_size=2 if experiment == "quickstart" else 8, check_files=False)
    b = plan.batch
    assert b.global_batch_size == b.micro_batch_size * b.gradient_accumulation_steps * b.world_size
    assert plan.latent_size * (plan.image_size // plan.latent_size) == plan.image_size
    if cfg.task == "ldm":
        assert plan.spec is not None and plan.spec.image_size == cfg.data.resolution
    else:
        assert plan.autoencoder is not None


def test_txt2img_kl8_is_the_papers_model_and_batch():
    cfg = composed("experiment=txt2img_kl8", *URLS, *REQUIRED["txt2img_kl8"])
    plan = C.validate(cfg, world_size=8, check_files=False)
    assert plan.batch.global_batch_size == 680 and plan.batch.gradient_accumulation_steps == 5
    assert plan.peak_lr == pytest.approx(1.0e-4)
    assert (plan.image_size, plan.latent_size, plan.latent_channels) == (256, 32, 4)
    counts = parameter_counts(build_ldm(plan.spec, device="meta"))  # meta: no memory
    assert 1.3e9 < counts["trainable"] < 1.6e9, counts
    assert C.validate(cfg, world_size=40, check_files=False).batch.gradient_accumulation_steps == 1
    with pytest.raises(C.ConfigError, match=r"train.global_batch_size=680 is not a multiple"):
        C.validate(cfg, world_size=64)


def test_unknown_experiment_key_and_type_fail_at_compose_time():
    with pytest.raises(MissingConfigException, match="experiment/nope"):
        C.compose(["experiment=nope"])
    with pytest.raises(ConfigCompositionException, match="train.micro_batch_sz"):
        C.compose(["train.micro_batch_sz=4"])
    with pytest.raises(ConfigCompositionException, match="train.micro_batch_size"):
        C.compose(["train.micro_batch_size=four"])
    with pytest.raises(ConfigCompositionException, match="deepspeed.zero.stag"):
        C.compose(["deepspeed.zero.stag=3"])


def test_unset_required_values_are_listed_with_the_fix():
    with pytest.raises(C.ConfigError) as err:
        composed("experiment=txt2img_kl8")
    assert "checkpoint.root" in str(err.value) and "data.urls[0]" in str(err.value)
    cfg = composed("experiment=txt2img_kl8", *URLS[:1], URLS[2])
    with pytest.raises(C.ConfigError, match="model.first_stage_ckpt is not set"):
        C.validate(cfg, world_size=8)


def test_validate_reports_every_problem_with_key_and_fix():
    cfg = composed("experiment=quickstart", *URLS, "train.global_batch_size=30", "train.gradient_accumulation_steps=2",
                   "data.resolution=64", "model.ldm.unet.context_dim=96", "deepspeed.zero.offload_param=true",
                   "deepspeed.frozen_precision=bf16", "deepspeed.precision=fp32")
    with pytest.raises(C.ConfigError) as err:
        C.validate(cfg, world_size=2)
    message = str(err.value)
    for expected in [
        "train.global_batch_size=30 but train.micro_batch_size x train.gradient_accumulation_steps x world size = 16 x 2 x 2 = 64",
        "data.resolution=64 but model tiny is built for 32px images",
        "unet.context_dim=96 but the text encoder emits 64-wide tokens: set model.ldm.unet.context_dim=64",
        "deepspeed.zero.offload_param needs deepspeed.zero.stage=3",
        "deepspeed.frozen_precision=bf16 needs a half-precision run",
    ]:
        assert expected in message, message


def test_bucket_and_micro_conditioning_settings_are_checked_against_the_model():
    cfg = composed("experiment=quickstart", *URLS, "data.buckets.enabled=true", "data.buckets.step=8",
                   "model.ldm.unet.micro_conditioning=true")
    C.validate(composed("experiment=quickstart", *URLS, "data.buckets.enabled=true", "data.buckets.step=16",
                        "model.ldm.unet.micro_conditioning=true"), world_size=2, check_files=False)
    with pytest.raises(C.ConfigError) as err:
        C.validate(cfg, world_size=2, check_files=False)
    assert "data.buckets.step=8 but model tiny's image sides must be multiples of 16 (first stage f=4 x denoiser 4)" \
        in str(err.value)
    cfg = composed("experiment=quickstart", *URLS, "model.ldm.unet.micro_conditioning=true")
    with pytest.raises(C.ConfigError, match="micro-conditioned .* but data.buckets.enabled=false"):
        C.validate(cfg, world_size=2, check_files=False)
    cfg = composed("experiment=autoencoder_tiny", *URLS, "data.buckets.enabled=true", "data.buckets.step=8",
                   "data.resolution=32")
    C.validate(cfg, world_size=2, check_files=False)  # f=4 divides 8


@pytest.mark.parametrize("override, valid", [
    ("deepspeed.precision=fp8", "[fp32, bf16, fp16]"),
    ("optim.schedule=exponential", "[constant, cosine, linear]"),
    ("data.mode=shuffled", "[epoch, resampled]"),
    ("eval.sampler.name=dpmpp", "[ddim, plms, ddpm, euler, heun]"),
    ("diffusion.parameterization=score", "[eps, v, x0, flow]"),
    ("logger.backend=tensorboard", "[wandb, none]"),
    ("task=vae", "[ldm, autoencoder]"),
])
def test_a_bad_choice_fails_at_compose_time_with_the_valid_ones(override, valid):
    with pytest.raises(ConfigCompositionException) as err:
        C.compose(["experiment=quickstart", override])
    assert valid in C.describe_composition_error(err.value)


def test_a_bad_choice_set_in_code_is_reported_by_validate():
    cfg = composed("experiment=quickstart", *URLS)
    cfg.deepspeed.precision = "fp8"
    cfg.data.crop = "left"
    with pytest.raises(C.ConfigError) as err:
        C.validate(cfg, world_size=2, check_files=False)
    assert "deepspeed.precision='fp8': expected one of ['fp32', 'bf16', 'fp16']" in str(err.value)
    assert "data.crop='left': expected one of ['center', 'random']" in str(err.value)


def test_batch_plan_derives_accumulation_from_the_global_batch():
    cfg = composed("experiment=quickstart", *URLS, "train.micro_batch_size=4", "train.global_batch_size=32",
                   "train.gradient_accumulation_steps=null")
    plan = C.validate(cfg, world_size=2, check_files=False)
    assert (plan.batch.micro_batch_size, plan.batch.gradient_accumulation_steps) == (4, 4)


def test_model_specs_are_typed_at_compose_time():
    cases = [
        ("model.ldm.unet.model_chanels=64", "unknown config key model.ldm.unet.model_chanels: did you mean "
                                            "model.ldm.unet.model_channels?"),
        ("model.ldm.unet.model_channels=wide", "could not be converted to Integer (key model.ldm.unet.model_channels)"),
        ("model=txt2img_kl9", "Could not find 'model/txt2img_kl9': did you mean txt2img_kl8?"),
        ("autoencoder=kl_f9", "Could not find 'autoencoder/kl_f9': did you mean kl_f8?"),
    ]
    for override, message in cases:
        with pytest.raises(ConfigCompositionException) as err:
            C.compose(["experiment=quickstart", *URLS, override])
        assert message in C.describe_composition_error(err.value), override
    cfg = composed("experiment=quickstart", *URLS, "model.ldm.unet.model_channels=64")
    assert C.validate(cfg, world_size=2, check_files=False).spec.unet.model_channels == 64


def test_every_registered_model_is_a_group_option():
    from ldm_scale.models.registry import AUTOENCODERS, FLAVOURS

    for name, spec in FLAVOURS.items():
        assert composed(f"model={name}", *URLS).model.ldm == spec, name
    for name, first_stage in AUTOENCODERS.items():
        assert composed("task=autoencoder", f"autoencoder={name}", *URLS).model.autoencoder == first_stage, name
    with pytest.raises(C.ConfigError, match="model.autoencoder is not set: task=autoencoder needs autoencoder=<name>"):
        C.validate(composed("task=autoencoder", "data.conditioning=none", *URLS), world_size=2, check_files=False)


def test_conditioning_must_match_the_model():
    cfg = composed("experiment=quickstart", *URLS, "data.conditioning=class")
    with pytest.raises(C.ConfigError, match="data.conditioning='class' but model tiny is conditioned on 'text'"):
        C.validate(cfg, world_size=2)


def test_deepspeed_config_from_the_groups():
    for group, stage in [("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)]:
        cfg = composed(f"deepspeed={group}", *URLS)
        ds = E.build_ds_config(cfg.deepspeed, E.BatchPlan(4, 2, 8))
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
        assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
        assert ("offload_param" in ds["zero_optimization"]) == (group == "zero3_offload")
    fp16 = E.build_ds_config(E.DeepSpeedConfig(precision="fp16"), E.BatchPlan(1, 1, 1))
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                            "hysteresis": 2, "min_loss_scale": 1.0}


def test_lr_schedule_warmup_then_decay():
    cos = E.OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    values = [E.lr_multiplier(s, cos, total_steps=110) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert E.lr_multiplier(500, E.OptimConfig(warmup_steps=10), total_steps=100) == 1.0


def test_run_id_from_config_env_or_generated(monkeypatch, tmp_path: Path):
    cfg = composed("experiment=quickstart", *URLS)
    monkeypatch.delenv(C.RUN_ID_ENV, raising=False)
    generated = C.resolve_run_id(cfg)
    assert generated.startswith("quickstart-") and generated != C.resolve_run_id(cfg)
    monkeypatch.setenv(C.RUN_ID_ENV, "requeued-run")
    assert C.resolve_run_id(cfg) == "requeued-run"
    cfg.run_id = "fixed"
    assert C.resolve_run_id(cfg) == "fixed"
    path = C.write_resolved(cfg, C.validate(cfg, world_size=2, check_files=False), tmp_path / "run")
    assert "name: quickstart" in path.read_text() and (tmp_path / "run" / "plan.json").exists()


def test_cli_rejects_bad_batch_arithmetic_before_building_anything(tmp_path: Path):
    result = run_python(["launch/train.py", "experiment=quickstart", *URLS, "train.global_batch_size=7",
                         f"output_dir={tmp_path}"], timeout=300)
    assert result.returncode != 0
    assert "train.global_batch_size=7 but train.micro_batch_size" in result.stderr + result.stdout
    assert not any(tmp_path.iterdir()), "nothing may be written for an invalid config"
