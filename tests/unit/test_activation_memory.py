"""The activation-memory measurement behind docs/scaling.md (benchmarks/scaling_estimate.py), on
networks whose saved bytes can be written down by hand, with and without checkpointing, on meta.

Linear + ReLU, per layer: ``addmm`` saves its input and the weight, ``relu`` saves its output, which
is the next layer's input (one storage, counted once); the pre-activation is freed. So a stack of L
layers holds L outputs of B x d after the forward (the first input is the caller's). Non-reentrant
checkpointing of blocks keeps only each block's input: the outputs of every block but the last.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests.fixtures.torchrun import REPO_ROOT

LOSS_BYTES = 4  # the fp32 scalar loss the forward returns


@pytest.fixture(scope="module")
def se():
    spec = importlib.util.spec_from_file_location("scaling_estimate", REPO_ROOT / "benchmarks" / "scaling_estimate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling_estimate"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def stack_forward(layers: nn.Sequential, x: torch.Tensor, per_block: int):
    """``layers`` run in blocks of ``per_block`` modules, each checkpointed (0: none)."""
    def forward() -> torch.Tensor:
        h = x
        step = per_block or len(layers)
        for i in range(0, len(layers), step):
            block = layers[i:i + step]
            h = checkpoint(block, h, use_reentrant=False) if per_block else block(h)
        return h.float().sum()
    return forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_relu_stack_holds_its_outputs_not_its_weights(se, dtype):
    L, B, d = 6, 2, 256  # the weights (256 KiB a layer in fp32) dwarf the activations (2 KiB)
    with torch.device("meta"):
        net = nn.Sequential(*[m for _ in range(L) for m in (nn.Linear(d, d), nn.ReLU())]).to(dtype)
    x = torch.empty(B, d, device="meta", dtype=dtype)
    size = dtype.itemsize
    assert se.measure_activations(stack_forward(net, x, 0), [net]).held == L * B * d * size + LOSS_BYTES
    # checkpointing every layer keeps the inputs of layers 2..L; every 2 layers, of blocks 2..L/2
    assert se.measure_activations(stack_forward(net, x, 2), [net]).held == (L - 1) * B * d * size + LOSS_BYTES
    assert se.measure_activations(stack_forward(net, x, 4), [net]).held == (L // 2 - 1) * B * d * size + LOSS_BYTES


def test_conv_relu_stack_in_closed_form_with_and_without_checkpointing(se):
    L, B, c, hw = 4, 3, 8, 16
    with torch.device("meta"):
        net = nn.Sequential(*[m for _ in range(L) for m in (nn.Conv2d(c, c, 3, padding=1), nn.ReLU())])
    net = net.to(torch.bfloat16)
    x = torch.empty(B, c, hw, hw, device="meta", dtype=torch.bfloat16)
    per_layer = B * c * hw * hw * 2
    assert se.measure_activations(stack_forward(net, x, 0), [net]).held == L * per_layer + LOSS_BYTES
    assert se.measure_activations(stack_forward(net, x, 2), [net]).held == (L - 1) * per_layer + LOSS_BYTES


def test_parameters_and_caller_inputs_are_not_activations(se):
    """A forward that only reads the weight (a view of it is saved by mm) holds nothing of its own."""
    with torch.device("meta"):
        lin = nn.Linear(512, 512, bias=False)
    x = torch.empty(4, 512, device="meta")
    held = se.measure_activations(lambda: (x @ lin.weight.t()).sum(), [lin]).held
    assert held == LOSS_BYTES


def test_peak_includes_the_recomputation_but_not_every_parameter_gradient(se):
    L, B, d = 6, 2, 256
    with torch.device("meta"):
        net = nn.Sequential(*[m for _ in range(L) for m in (nn.Linear(d, d), nn.ReLU())])
    x = torch.empty(B, d, device="meta")
    grads = sum(p.numel() * 4 for p in net.parameters())
    plain = se.measure_activations(stack_forward(net, x, 0), [net], backward=True)
    ckpt = se.measure_activations(stack_forward(net, x, 4), [net], backward=True)
    for m in (plain, ckpt):
        assert m.held < m.peak < m.held + grads / 2  # gradients are dropped as they are produced
    # backward of a checkpointed block first recomputes its two layers' outputs
    assert ckpt.peak >= ckpt.held + 2 * B * d * 4


def test_flash_attention_model_saves_the_output_and_log_sum_exp_not_the_weights(se):
    B, H, N, D = 2, 4, 256, 64
    q, k, v = (torch.empty(B, H, N, D, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v).float().sum()

    with se.cuda_bf16_kernels():
        flash = se.measure_activations(forward, []).held
    out, lse = B * H * N * D * 2, B * H * N * 4
    assert out + lse + LOSS_BYTES <= flash <= out + lse + LOSS_BYTES + 64  # + the kernel's philox seed / offset
    assert se.measure_activations(forward, []).held >= B * H * N * N * 4  # meta's math kernel: fp32 weights


def test_layer_norm_runs_in_fp32_as_under_autocast(se):
    B, N, C = 2, 77, 64
    with torch.device("meta"):
        norm = nn.LayerNorm(C).to(torch.bfloat16)
    x = torch.empty(B, N, C, device="meta", dtype=torch.bfloat16, requires_grad=True)
    with se.cuda_bf16_kernels():
        held = se.measure_activations(lambda: norm(x).float().sum(), [norm]).held
    # fp32 copy of the input, fp32 mean and rstd per row, fp32 copies of weight and bias
    assert held == B * N * C * 4 + 2 * B * N * 4 + 2 * C * 4 + LOSS_BYTES


def test_linear_fit_and_zero_stage_arithmetic(se):
    assert se.linear_fit(110, 210) == (100, 10)
    P, N = 1000, 8
    assert se.model_state_bytes(1, P, N) == 4 * P + 12 * P / N
    assert se.model_state_bytes(2, P, N) == 2 * P + 14 * P / N
    assert se.model_state_bytes(3, P, N) == 16 * P / N


def test_estimate_runs_on_the_tiny_flavour(se):
    est = se.estimate("tiny")
    assert set(est.held) == {"plain", "unet", "all"}
    assert est.held["all"][0] < est.held["unet"][0] < est.held["plain"][0]
    assert est.gflop["train_plain"] < est.gflop["train_unet"] < est.gflop["train_all"]
    assert est.trainable == est.params["unet"] + est.params["cond"]


def test_kl8_experiments_default_to_no_checkpointing_as_docs_scaling_says():
    from ldm_scale import config as C

    urls = ["data.urls=['s3://bucket/set/{00000..00099}.tar']", "checkpoint.root=s3://bucket/ckpt"]
    for experiment in ("txt2img_kl8", "ldm_kl8_cin", "ldm_uncond_kl8"):
        cfg = C.to_object(C.compose([f"experiment={experiment}", *urls]))
        assert cfg.model.activation_checkpointing is False, experiment
    cfg = C.to_object(C.compose(["experiment=txt2img_kl8", *urls]))
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (17, 680)
    doc = (REPO_ROOT / "docs" / "scaling.md").read_text()
    assert "**`model.activation_checkpointing: false`**" in doc and "micro-batch 17" in doc


@pytest.mark.slow
def test_the_fitting_rule_picks_the_txt2img_kl8_default(se):
    """The 1.45B flavour on meta (~40 s): without checkpointing, 17 is the largest divisor of
    680 / 8 that fits a 40 GB card at ZeRO-2 on 8 GPUs, and 85 fits an 80 GB card."""
    est = se.estimate("txt2img_kl8")
    keep = se.divisors(680 // 8)
    assert se.largest_fitting(est, "plain", 2, 8, se.CARDS_GIB["40 GB"], keep) == 17
    assert se.largest_fitting(est, "plain", 2, 8, se.CARDS_GIB["80 GB"], keep) == 85
    assert est.gflop["train_unet"] / est.gflop["train_plain"] == pytest.approx(1.204, abs=0.005)
    per_image_mib = est.peak["plain"][0] / se.MIB
    assert 300 < per_image_mib < 420, per_image_mib
