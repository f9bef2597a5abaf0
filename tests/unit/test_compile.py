"""``train.compile`` (ldm_scale/train/compile.py) on CPU.

- Graph breaks: the tiny UNet, the text transformer and the tiny autoencoders (KL and VQ), with
  activation checkpointing, compile without a graph break in both modes at fixed shapes
  (``fullgraph=True`` raises at a break; dynamo's counters stay empty); ``torch._dynamo.explain``
  agrees on the whole networks. These trace with dynamo only (backend ``eager``): seconds.
- Numerics (``slow``: inductor compiles C++ kernels, minutes on a cold cache): a compiled forward
  and backward gives eager's loss and gradients within float32 reassociation error.
- The config: ``build_task`` in a world-1 process compiles what the mode names, the engines'
  state-dict keys do not change (no ``_orig_mod.``), ZeRO-3 makes the compiled blocks leaves; a
  ZeRO-3 step with compiled blocks matches eager without graph breaks (``slow``); bad values fail.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Callable, Dict, Tuple

import pytest
import torch
from torch import nn

from ldm_scale.models.conditioners import build_conditioner
from ldm_scale.models.registry import AUTOENCODERS, build_autoencoder, build_denoiser, get_spec
from ldm_scale.models.unet import UNetModel
from ldm_scale.train import compile as C
from tests.fixtures.torchrun import REPO_ROOT, run_python

SPEC = get_spec("tiny")
TOKENS = 16  # the quickstart's text length: a fixed shape like any run's


class Denoiser(nn.Module):
    """The LDM task's trainable pair (UNet or DiT + jointly trained text transformer), keyed like
    ``DiffusionTrainModule``; ``loss`` is a fixed-noise eps-style objective (no RNG inside)."""

    def __init__(self, flavour: str = "tiny"):
        super().__init__()
        torch.manual_seed(0)
        spec = get_spec(flavour)
        self.unet = build_denoiser(spec)
        self.cond_stage = build_conditioner(spec.cond_stage)
        with torch.no_grad():  # zero-initialised output layers would make the gradients vacuous
            for p in self.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0, 0.05)
        self.unet.set_activation_checkpointing(True)
        self.cond_stage.set_activation_checkpointing(True)

    @staticmethod
    def inputs() -> Tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(1)  # every tiny flavour: 4-channel 8x8 latents
        return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]),
                torch.randint(0, 1000, (2, TOKENS), generator=g), torch.randn(2, 4, 8, 8, generator=g))

    def loss(self, x, t, tokens, target) -> torch.Tensor:
        return (self.unet(x, t, context=self.cond_stage.encode_tokens(tokens)) - target).pow(2).mean()


class Autoencoder(nn.Module):
    """The autoencoder task's generator network with a deterministic reconstruction loss (the
    posterior mode for KL; VQ quantises as in training)."""

    def __init__(self, name: str):
        super().__init__()
        torch.manual_seed(0)
        self.autoencoder = build_autoencoder(AUTOENCODERS[name])
        self.kind = AUTOENCODERS[name].kind

    @staticmethod
    def inputs() -> Tuple[torch.Tensor, ...]:
        return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)

    def loss(self, x) -> torch.Tensor:
        if self.kind == "kl":
            recon, posterior = self.autoencoder(x, sample_posterior=False)
            return (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        recon, codebook_loss, _ = self.autoencoder(x)
        return (recon - x).abs().mean() + codebook_loss


NETWORKS: Dict[str, Callable[[], nn.Module]] = {
    "unet+text": Denoiser, "kl_tiny": lambda: Autoencoder("kl_tiny"), "vq_tiny": lambda: Autoencoder("vq_tiny"),
    # The transformers: PixArt-style cross-attention with adaLN-single, and MMDiT joint attention.
    "dit+text": lambda: Denoiser("dit_tiny"), "mmdit+text": lambda: Denoiser("dit_tiny_mmdit"),
}
EXPECTED_REGIONS = {
    ("unet+text", "unet"): ["unet", "cond_stage.encode_tokens"],
    ("dit+text", "unet"): ["unet", "cond_stage.encode_tokens"],
    ("kl_tiny", "unet"): ["autoencoder.encoder", "autoencoder.decoder"],
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def loss_and_grads(model: nn.Module, inputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model.loss(*inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------ regions

def test_regions_per_mode_and_unchanged_keys():
    model = Denoiser()
    keys = list(model.state_dict())
    assert C.apply_compile(model, C.CompileMode.off) == []
    assert C.apply_compile(model, "unet", backend="eager") == EXPECTED_REGIONS[("unet+text", "unet")]
    assert list(model.state_dict()) == keys and C.is_compiled(model.unet) and C.is_compiled(model.cond_stage)
    assert C.apply_compile(model, "unet", backend="eager") == EXPECTED_REGIONS[("unet+text", "unet")]  # idempotent

    model = Denoiser()
    regions = C.apply_compile(model, C.CompileMode.blocks, backend="eager")
    assert list(model.state_dict()) == keys
    unet_blocks = [f"unet.{n}" for n, m in model.unet.named_modules() if m in model.unet.blocks()]
    lone_convs = {"unet.input_blocks.0", "unet.input_blocks.2", "unet.input_blocks.4"}  # stem, Downsamples
    assert [r for r in regions if r.startswith("unet.")] == [n for n in unet_blocks if n not in lone_convs]
    assert [r for r in regions if r.startswith("cond_stage.")] == ["cond_stage.blocks.0", "cond_stage.blocks.1"]
    assert not C.is_compiled(model.unet) and not C.is_compiled(model.cond_stage)
    assert C.zero3_leaf_modules(model) == [m for n, m in model.named_modules() if n in regions]
    # Every region may need its own graphs in one shared code-object cache: the limit follows.
    assert torch._dynamo.config.recompile_limit >= C.GRAPHS_PER_REGION * len(regions)

    dit = Denoiser("dit_tiny")
    assert C.apply_compile(dit, "unet", backend="eager") == EXPECTED_REGIONS[("dit+text", "unet")]
    dit = Denoiser("dit_tiny")
    regions = C.apply_compile(dit, "blocks", backend="eager")
    assert [r for r in regions if r.startswith("unet.")] == [f"unet.blocks.{i}" for i in range(len(dit.unet.blocks))]

    ae = Autoencoder("kl_tiny")
    assert C.apply_compile(ae, "unet", backend="eager") == EXPECTED_REGIONS[("kl_tiny", "unet")]
    with pytest.raises(ValueError, match="use train.compile=blocks"):
        C.apply_compile(Denoiser(), "unet", zero_stage=3)


def test_frozen_first_stage_encoder_is_compiled_when_compile_is_on():
    first_stage = build_autoencoder(AUTOENCODERS["kl_tiny"])
    assert C.apply_frozen_compile(first_stage, "off") == [] and not C.is_compiled(first_stage.encoder)
    assert C.apply_frozen_compile(first_stage, "blocks", backend="eager") == ["encoder"]
    assert C.is_compiled(first_stage.encoder) and not C.is_compiled(first_stage.decoder)


def test_zero3_blocks_compile_their_forward_so_hooks_stay_outside_the_graph():
    model = Denoiser()
    keys = list(model.state_dict())
    regions = C.apply_compile(model, "blocks", zero_stage=3, backend="eager")
    block = model.get_submodule(regions[0])
    assert "forward" in block.__dict__ and getattr(block, "_compiled_call_impl", None) is None
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(block)  # the compiled forward is rebound to the copy, not the original
    assert twin.forward.__self__ is twin


# ------------------------------------------------------------------------------------------ graph breaks

@pytest.mark.parametrize("mode", ["unet", "blocks"])
@pytest.mark.parametrize("network", list(NETWORKS))
def test_no_graph_breaks_at_fixed_shapes(network, mode):
    model = NETWORKS[network]()
    regions = C.apply_compile(model, mode, backend="eager", fullgraph=True)  # a graph break raises
    assert regions
    inputs = model.inputs()
    counters = torch._dynamo.utils.counters
    loss_and_grads(model, inputs)
    graphs = counters["stats"]["unique_graphs"]
    loss_and_grads(model, inputs)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs  # the second step recompiles nothing


@pytest.mark.parametrize("network", ["unet", "text", "kl_encoder", "kl_decoder", "vq_encoder"])
def test_explain_counts_no_graph_break(network):
    torch.manual_seed(0)
    if network == "unet":
        fn, args = UNetModel(SPEC.unet), (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, TOKENS, 64))
        fn.set_activation_checkpointing(True)
    elif network == "text":
        text = build_conditioner(SPEC.cond_stage)
        text.set_activation_checkpointing(True)
        fn, args = text.encode_tokens, (torch.randint(0, 1000, (2, TOKENS)),)
    else:
        ae = build_autoencoder(AUTOENCODERS[network.split("_")[0] + "_tiny"])
        if network.endswith("encoder"):
            fn, args = ae.encoder, (torch.randn(2, 3, 32, 32),)
        else:
            fn, args = ae.decoder, (torch.randn(2, 4, 8, 8),)
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ------------------------------------------------------------------------------------------ numerics

@pytest.mark.slow
@pytest.mark.parametrize("network,mode", [("unet+text", "unet"), ("unet+text", "blocks"), ("dit+text", "blocks"),
                                          ("kl_tiny", "unet"),
                                          ("kl_tiny", "blocks")])
def test_inductor_matches_eager_forward_and_backward(network, mode):
    eager, compiled = NETWORKS[network](), NETWORKS[network]()
    compiled.load_state_dict(eager.state_dict())
    C.apply_compile(compiled, mode, backend="inductor")
    inputs = eager.inputs()
    loss, grads = loss_and_grads(eager, inputs)
    for _ in range(2):  # the second call runs the cached kernels
        closs, cgrads = loss_and_grads(compiled, inputs)
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-6)
    assert cgrads.keys() == grads.keys()
    # Absolute error relative to the largest gradient: some gradients are exactly zero in exact
    # arithmetic (a conv bias right before a GroupNorm) and only rounding noise in either run.
    largest = max(float(g.abs().max()) for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(cgrads[name], grad, rtol=1e-3, atol=1e-5 * largest, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------ config

def test_config_rejects_bad_values():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    from ldm_scale import config as config_lib

    with pytest.raises((ValidationError, ConfigCompositionException)):
        config_lib.compose(["train.compile=fast"])
    base = ["experiment=quickstart", "model.allow_random_first_stage=true", "data.urls=['/x/{0..3}.tar']",
            "checkpoint.root=/tmp/x"]
    cfg = config_lib.to_object(config_lib.compose(base + ["train.compile=blocks"]))
    assert cfg.train.compile == C.CompileMode.blocks and type(cfg.train.compile) is str  # choices.py: plain at run time
    assert config_lib.resolved_dict(cfg)["train"]["compile"] == "blocks"  # persisted as plain data
    config_lib.validate(cfg, 2, check_files=False)
    cfg.train.compile = "fast"  # set in code: only validate() sees it
    with pytest.raises(config_lib.ConfigError, match="train.compile='fast'"):
        config_lib.validate(cfg, 2, check_files=False)
    cfg = config_lib.to_object(config_lib.compose(base + ["train.compile=unet", "deepspeed=zero3"]))
    with pytest.raises(config_lib.ConfigError, match="use train.compile=blocks"):
        config_lib.validate(cfg, 2, check_files=False)


def _drive(runs) -> list:
    result = run_python([str(REPO_ROOT / "tests" / "unit" / "_compile_task_driver.py"), json.dumps(runs)],
                        timeout=1500).check()
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(line[-1][len("RESULT "):])


def test_build_task_compiles_where_the_config_says():
    runs = [{"experiment": e, "stage": s, "compile": c} for e, s, c in [
        ("quickstart", 2, "off"), ("quickstart", 2, "unet"), ("quickstart", 2, "blocks"), ("quickstart", 3, "blocks"),
        ("autoencoder_tiny", 2, "off"), ("autoencoder_tiny", 2, "unet"), ("autoencoder_tiny", 2, "blocks")]]
    ldm_off, ldm_unet, ldm_blocks, ldm_z3, ae_off, ae_unet, ae_blocks = _drive(runs)

    assert ldm_off["compiled"] == {"model": [], "first_stage": []}
    assert ldm_unet["compiled"] == {"model": ["unet", "cond_stage"], "first_stage": ["encoder"]}
    blocks = ldm_blocks["compiled"]["model"]
    assert "unet" not in blocks and "unet.middle_block" in blocks and "cond_stage.blocks.1" in blocks
    assert ldm_blocks["compiled"]["first_stage"] == ["encoder"]
    for run in (ldm_unet, ldm_blocks, ldm_z3):
        assert run["keys"] == ldm_off["keys"]  # checkpoints, the EMA and exports see eager's names
    assert ldm_off["leaves"] == [] and ldm_blocks["leaves"] == []
    assert ldm_z3["compiled"]["model"] == blocks
    assert ldm_z3["leaves"] == [f"model:{n}" for n in blocks]

    assert ae_off["compiled"] == {"generator": [], "discriminator": []}
    assert ae_unet["compiled"] == {"generator": ["autoencoder.encoder", "autoencoder.decoder"], "discriminator": []}
    generator_blocks = ae_blocks["compiled"]["generator"]  # ResnetBlocks and AttnBlocks of both stacks
    assert generator_blocks and all(re.search(r"\.(block\.\d+|block_\d|attn\.\d+|attn_1)$", n) for n in generator_blocks)
    assert any(n.startswith("autoencoder.decoder.") for n in generator_blocks)
    assert ae_blocks["compiled"]["discriminator"] == []
    for run in (ae_unet, ae_blocks):
        assert run["keys"] == ae_off["keys"]
        assert not any("_orig_mod" in k for keys in run["keys"].values() for k in keys)


@pytest.mark.slow
def test_zero3_step_with_compiled_blocks_matches_eager_without_graph_breaks():
    eager, compiled = _drive([{"experiment": "quickstart", "stage": 3, "compile": c, "steps": 2}
                              for c in ("off", "blocks")])
    assert compiled["graph_breaks"] == 0 and compiled["graphs"] > 0
    assert eager["graphs"] == 0
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
