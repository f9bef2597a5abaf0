"""The precision policy (train/precision.py): its table, and a bf16 run's parts on CPU: a frozen text
encoder stored in bf16 and the UNet under bf16 autocast agree with fp32 within bf16 rounding."""
from __future__ import annotations

import pytest
import torch

from ldm_scale.models.conditioners import build_conditioner
from ldm_scale.models.registry import get_spec
from ldm_scale.models.unet import UNetModel
from ldm_scale.train import engine as E
from ldm_scale.train import precision as P


def test_policy_table():
    assert P.autocast_dtype("fp32") is None
    assert P.autocast_dtype("bf16") is torch.bfloat16 and P.autocast_dtype("fp16") is torch.float16
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert P.frozen_dtype("bf16", "auto", cuda) is torch.bfloat16 and P.frozen_dtype("bf16", "auto", cpu) is torch.float32
    assert P.frozen_dtype("fp16", "auto", cuda) is torch.float16 and P.frozen_dtype("fp32", "auto", cuda) is torch.float32
    assert P.frozen_dtype("bf16", "bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="frozen_precision='int8'"):
        P.frozen_dtype("bf16", "int8", cpu)
    with pytest.raises(ValueError, match="precision='fp8'"):
        P.autocast_dtype("fp8")


def test_engine_autocast_follows_the_deepspeed_config():
    plan = E.BatchPlan(2, 1, 1)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        cfg = E.build_ds_config(E.DeepSpeedConfig(precision=precision), plan)
        with E.autocast(cfg, torch.device("cpu")):
            y = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
        assert y.dtype == (dtype or torch.float32)


def test_bf16_frozen_text_encoder_and_unet_under_autocast_match_fp32_on_cpu():
    spec = get_spec("tiny")
    torch.manual_seed(0)
    text = build_conditioner(spec.cond_stage).eval()
    unet = UNetModel(spec.unet).eval()
    with torch.no_grad():  # zero-initialised output layers would make the comparison vacuous
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.05)
    tokens = torch.randint(0, 100, (2, spec.cond_stage.text.max_length))
    x, t = torch.randn(2, spec.unet.in_channels, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        reference = unet(x, t, context=text.encode_tokens(tokens))
        text_bf16 = build_conditioner(spec.cond_stage).eval()
        text_bf16.load_state_dict(text.state_dict())
        text_bf16.to(P.frozen_dtype("bf16", "bf16", torch.device("cpu")))
        assert all(p.dtype == torch.bfloat16 for p in text_bf16.parameters())
        with P.autocast("bf16", torch.device("cpu")):
            out = unet(x, t, context=text_bf16.encode_tokens(tokens))
    assert out.dtype == torch.bfloat16
    err = (out.float() - reference).abs().max() / reference.abs().max()
    assert err < 0.05, float(err)  # bf16 keeps 8 bits of mantissa: a few parts in a hundred end to end


def test_half_frozen_parts_in_an_fp32_run_fail_validation():
    from ldm_scale import config as C

    cfg = C.to_object(C.compose(["experiment=quickstart", "model.allow_random_first_stage=true",
                                 "data.urls=['/x/{0..3}.tar']", "checkpoint.root=/tmp/x", "deepspeed.precision=fp32",
                                 "deepspeed.frozen_precision=bf16"]))
    with pytest.raises(C.ConfigError, match="needs a half-precision run"):
        C.validate(cfg, 2, check_files=False)
