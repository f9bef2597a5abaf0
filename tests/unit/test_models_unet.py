"""UNet, attention and activation checkpointing (tiny configs, CPU)."""

import pytest
import torch

from ldm_scale.models.attention import multihead_attention, naive_attention
from ldm_scale.models.unet import UNetConfig, UNetModel, timestep_embedding


def _tiny_unet(**overrides) -> UNetModel:
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                     attention_resolutions=[1, 2], num_heads=-1, num_head_channels=16, context_dim=24)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return UNetModel(cfg)


def _randomise_zero_inits(model: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised output convs make the UNet output identically zero; give every parameter
    noise so that comparisons are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_sdpa_matches_naive_softmax_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 48, generator=g) for n in (10, 7, 7))
    torch.testing.assert_close(multihead_attention(q, k, v, heads=3), naive_attention(q, k, v, heads=3),
                               atol=1e-5, rtol=1e-5)


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(3.0)))


def test_zero_initialised_output_and_residual_branches():
    unet = _tiny_unet()
    assert torch.count_nonzero(unet.out[2].weight) == 0
    assert torch.count_nonzero(unet.input_blocks[1][0].out_layers[3].weight) == 0
    assert torch.count_nonzero(unet.input_blocks[1][1].proj_out.weight) == 0
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), context=torch.randn(2, 5, 24))
    assert out.shape == (2, 4, 8, 8) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("overrides", [
    {},
    {"use_scale_shift_norm": True, "use_linear_in_transformer": True, "transformer_depth": 2},
    {"num_heads": 2, "num_head_channels": -1},
    {"resblock_updown": True, "channel_mult": [1, 2, 2]},
])
def test_cross_attention_uses_context(overrides):
    torch.manual_seed(0)
    unet = _tiny_unet(**overrides)
    _randomise_zero_inits(unet)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    ctx = torch.randn(2, 5, 24)
    out_a = unet(x, t, context=ctx)
    out_b = unet(x, t, context=ctx + torch.randn_like(ctx))
    assert out_a.shape == x.shape
    assert (out_a - out_b).abs().max() > 1e-4
    # Sample 0's output depends only on sample 0's context.
    ctx_c = ctx.clone()
    ctx_c[1] += 1.0
    torch.testing.assert_close(unet(x, t, context=ctx_c)[0], out_a[0], atol=1e-5, rtol=1e-5)


def test_class_labels_and_concat_channels():
    torch.manual_seed(0)
    unet = _tiny_unet(num_classes=5, in_channels=9, use_spatial_transformer=False, context_dim=None)
    _randomise_zero_inits(unet)
    x = torch.randn(2, 9, 8, 8)
    out_a = unet(x, torch.tensor([5, 5]), y=torch.tensor([0, 1]))
    out_b = unet(x, torch.tensor([5, 5]), y=torch.tensor([2, 1]))
    assert out_a.shape == (2, 4, 8, 8)
    assert (out_a[0] - out_b[0]).abs().max() > 1e-4
    torch.testing.assert_close(out_a[1], out_b[1])
    with pytest.raises(ValueError, match="input channels"):
        unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 1]), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        unet(x, torch.tensor([1, 1]))


def test_missing_context_is_a_clear_error():
    with pytest.raises(ValueError, match="context"):
        _tiny_unet()(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="context_dim"):
        UNetConfig(context_dim=None).validate()


def _grads(unet, x, t, ctx):
    unet.zero_grad(set_to_none=True)
    loss = unet(x, t, context=ctx).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}


def test_activation_checkpointing_gives_identical_gradients_fp32():
    torch.manual_seed(0)
    unet = _tiny_unet(dropout=0.0)
    _randomise_zero_inits(unet)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 24)
    loss_ref, grads_ref = _grads(unet, x, t, ctx)
    unet.set_activation_checkpointing(True)
    assert all(block.checkpointing for block in unet.blocks())
    loss_ckpt, grads_ckpt = _grads(unet, x, t, ctx)
    assert torch.equal(loss_ref, loss_ckpt)
    for name in grads_ref:
        torch.testing.assert_close(grads_ckpt[name], grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_activation_checkpointing_under_bf16_autocast():
    torch.manual_seed(0)
    unet = _tiny_unet()
    _randomise_zero_inits(unet)
    unet.set_activation_checkpointing(True)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, context=ctx)
        loss = out.float().pow(2).mean()
    assert out.dtype == torch.bfloat16
    loss.backward()
    grads = [p.grad for p in unet.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert unet.input_blocks[0][0].weight.grad.abs().sum() > 0
