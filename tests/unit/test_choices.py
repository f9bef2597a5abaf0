"""Choice fields (ldm_scale/choices.py): checked when composed, plain strings at run time."""
import dataclasses
import io
import json
import typing

import pytest
import torch
from hydra.errors import ConfigCompositionException

from ldm_scale import config as C
from ldm_scale.config.compose import _nodes
from ldm_scale.choices import Choice
from ldm_scale.train.precision import DTYPES, Precision

BASE = ["experiment=quickstart", "data.urls=['/x/{0..3}.tar']", "checkpoint.root=/tmp/x"]


def test_a_member_behaves_as_its_string():
    bf16 = Precision.bf16
    assert bf16 == "bf16" and f"{bf16}" == "bf16" and str(bf16) == "bf16" and repr(bf16) == "'bf16'"
    assert f"{bf16:>6}" == "  bf16" and DTYPES["bf16"] is DTYPES[bf16] is torch.bfloat16
    assert json.dumps({"p": bf16}) == '{"p": "bf16"}' and Precision.values() == ["fp32", "bf16", "fp16"]


def _choice_fields(cfg):
    """Paths of the fields annotated with a Choice, and their values."""
    for path, node in _nodes(cfg):
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            hints = typing.get_type_hints(type(node))
            for f in dataclasses.fields(node):
                kind = hints[f.name]
                if isinstance(kind, type) and issubclass(kind, Choice):
                    yield (f"{path}.{f.name}" if path else f.name), getattr(node, f.name)


def test_every_choice_of_the_training_config_is_typed_and_a_plain_string_at_run_time():
    cfg = C.to_object(C.compose([*BASE, "deepspeed.precision=bf16", "data.conditioning=class"]))
    fields = dict(_choice_fields(cfg))
    assert {"task", "model.scale_factor_mode", "data.mode", "data.input", "data.conditioning", "data.crop",
            "data.decoder", "diffusion.schedule", "diffusion.parameterization", "diffusion.weighting",
            "deepspeed.precision", "deepspeed.frozen_precision", "optim.implementation", "optim.schedule",
            "train.compile", "logger.backend", "logger.mode", "eval.sampler.name", "eval.sampler.spacing",
            "autoencoder_loss.nll_reduction", "autoencoder_loss.disc_loss", "autoencoder_loss.perceptual.net",
            "autoencoder_loss.discriminator.norm"} <= set(fields)
    assert all(type(v) is str for v in fields.values()), fields
    assert (cfg.deepspeed.precision, cfg.data.conditioning) == ("bf16", "class")
    # What reaches torch.save files (the loader's state, export configs) loads with weights_only.
    buffer = io.BytesIO()
    torch.save({"mode": cfg.data.mode, "config": C.resolved_dict(cfg)}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["config"]["deepspeed"]["precision"] == "bf16"


def test_defaults_built_in_code_are_plain_strings_too():
    from ldm_scale.data.config import DataConfig
    from ldm_scale.diffusion import DiffusionConfig, SamplerConfig

    for cfg in (C.Config(), DataConfig(), DiffusionConfig(), SamplerConfig()):
        assert all(type(v) is str for _, v in _choice_fields(cfg))


def test_a_bad_choice_names_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as err:
        C.compose([*BASE, "data.conditioning=caption"])
    assert C.describe_composition_error(err.value) == \
        "Invalid value 'caption', expected one of [text, class, none] (key data.conditioning)"
