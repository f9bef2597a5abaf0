"""Kernel choices of the engine adapter: AdamW implementation, TF32, channels_last. The CPU branches
run here; the CUDA branches are `gpu` tests (benchmarks/gpu_check.py)."""
from __future__ import annotations

import pytest
import torch

from ldm_scale.models.registry import get_spec
from ldm_scale.models.unet import UNetModel
from ldm_scale.train import engine as E


def test_adamw_kernel_choice():
    assert E.adamw_kernel("auto") == {"fused": True}  # CUDA and CPU (measured 4x the for-loop on CPU)
    assert E.adamw_kernel("foreach") == {"foreach": True}
    assert E.adamw_kernel("for_loop") == {"foreach": False}
    with pytest.raises(ValueError, match="optim.implementation='apex'"):
        E.adamw_kernel("apex")


def test_optimizer_section_passes_the_kernel_to_torch_adamw_but_not_to_cpu_adam():
    plan = E.BatchPlan(2, 1, 1)
    section = E._optimizer_section(E.OptimConfig(implementation="foreach"), plan, offload=False)
    assert section["params"]["torch_adam"] and section["params"]["foreach"] is True
    offloaded = E._optimizer_section(E.OptimConfig(implementation="fused"), plan, offload=True)
    assert "fused" not in offloaded["params"] and "torch_adam" not in offloaded["params"]


@pytest.mark.parametrize("implementation", ["fused", "foreach", "for_loop"])
def test_every_adamw_kernel_gives_the_same_update_on_cpu(implementation):
    """torch's fused / foreach / for-loop AdamW agree (fused has had a CPU kernel since torch 2.4)."""
    def run(kwargs):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(64, 32))
        opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.1, **kwargs)
        for _ in range(3):
            w.grad = torch.randn_like(w)
            opt.step()
        return w.detach()

    torch.testing.assert_close(run(E.adamw_kernel(implementation)), run({}), rtol=1e-6, atol=1e-7)


def test_channels_last_unet_matches_the_contiguous_one():
    spec = get_spec("tiny")
    torch.manual_seed(0)
    unet = UNetModel(spec.unet).eval()
    x = torch.randn(2, spec.unet.in_channels, 8, 8)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 7, spec.unet.context_dim)
    with torch.no_grad():
        expected = unet(x, t, context=context)
        ds = E.DeepSpeedConfig(channels_last=True)
        E.apply_memory_format(unet, ds)
        convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        x_cl = E.to_memory_format(x, ds)
        assert x_cl.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
            memory_format=torch.channels_last)
        got = unet(x_cl, t, context=context)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert E.to_memory_format(x, E.DeepSpeedConfig()) is x


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU branch")
def test_device_math_is_left_alone_on_cpu():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    E.configure_device_math(E.DeepSpeedConfig(tf32=not before[0]))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == before


def test_channels_last_with_zero3_and_unknown_kernels_fail_validation():
    from hydra.errors import ConfigCompositionException

    from ldm_scale import config as C

    base = ["experiment=quickstart", "model.allow_random_first_stage=true", "data.urls=['/x/{0..3}.tar']",
            "checkpoint.root=/tmp/x"]
    cfg = C.to_object(C.compose([*base, "deepspeed.zero.stage=3", "deepspeed.channels_last=true"]))
    with pytest.raises(C.ConfigError) as info:
        C.validate(cfg, 2, check_files=False)
    assert "deepspeed.channels_last needs ZeRO stage <= 2" in str(info.value)
    # An unknown kernel is an invalid choice: refused when the config is composed.
    with pytest.raises(ConfigCompositionException) as composing:
        C.compose([*base, "optim.implementation=apex"])
    assert "Invalid value 'apex', expected one of [auto, fused, foreach, for_loop] (key optim.implementation)" \
        == C.describe_composition_error(composing.value)


@pytest.mark.gpu
def test_tf32_and_cudnn_benchmark_on_cuda():
    E.configure_device_math(E.DeepSpeedConfig(tf32=True))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    E.configure_device_math(E.DeepSpeedConfig(tf32=False))
    assert not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.gpu
def test_fused_adamw_runs_on_cuda():
    w = torch.nn.Parameter(torch.randn(256, 256, device="cuda"))
    opt = torch.optim.AdamW([w], lr=1e-3, **E.adamw_kernel("auto"))
    assert opt.defaults["fused"] is True
    w.grad = torch.randn_like(w)
    opt.step()
    assert torch.isfinite(w).all()
