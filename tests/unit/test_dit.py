"""DiT / PixArt-α / MMDiT backbone (ldm_scale/models/dit.py).

Independent references: the DiT paper's Table 4 (parameters and Gflops), DiT's 2-D sin-cos rule
written out in numpy from its definition, and diffusers' ``DiTTransformer2DModel`` /
``PixArtTransformer2DModel`` with the same weights (mapped by the key rules of diffusers'
conversion scripts). The original facebookresearch/DiT code is compared in
``benchmarks/check_dit_reference.py`` (results in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_scale.logging import count_flops
from ldm_scale.models.dit import DIT_SIZES, DiT, DiTConfig, dit_config, load_dit_release, sincos_2d

# DiT paper Table 4: Gflops (multiply-accumulates, as fvcore counts them) of one 256x256 image
# (32x32x4 latent) forward, and parameters (Sec. 4: S 33M, B 130M, L 458M, XL 675M).
PAPER_GFLOPS = {("S", 8): 0.36, ("S", 4): 1.41, ("S", 2): 6.06, ("B", 8): 1.42, ("B", 4): 5.56, ("B", 2): 23.01,
                ("L", 4): 19.70, ("L", 2): 80.71, ("XL", 8): 7.39, ("XL", 4): 29.05, ("XL", 2): 118.64}
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}


def _release_like(size: str, patch: int) -> DiT:
    with torch.device("meta"):
        return DiT(dit_config(size, patch, num_classes=1001, learn_sigma=True, input_size=32))


def _forward_macs(model: DiT, latent: int = 32) -> float:
    x = torch.empty(1, 4, latent, latent, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta")
    with torch.no_grad():
        return count_flops(lambda: model(x, t, y=y)) / 2


def _analytic_macs(size: str, patch: int, latent: int = 32) -> float:
    """MACs of one forward from the layer shapes: per block 12 D^2 per token (qkv 3, proj 1, MLP 8)
    + 2 N^2 D for the attention products + 6 D^2 adaLN, plus patch embed, t-MLP, final layer."""
    depth, d, _ = DIT_SIZES[size]
    n = (latent // patch) ** 2
    block = 12 * d * d * n + 2 * n * n * d + 6 * d * d
    embed = n * d * 4 * patch * patch + 256 * d + d * d
    final = 2 * d * d + n * d * patch * patch * 8
    return depth * block + embed + final


@pytest.mark.parametrize("size", list(DIT_SIZES))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_flavour_parameters_and_flops_match_the_paper(size, patch):
    model = _release_like(size, patch)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e6 - PAPER_PARAMS_M[size]) / PAPER_PARAMS_M[size] < 0.01
    macs = _forward_macs(model)
    assert macs == pytest.approx(_analytic_macs(size, patch), rel=1e-9)
    if (size, patch) in PAPER_GFLOPS:
        # The paper rounds to 2 decimals and its counter sees a little more than the matmuls (its
        # XL/2 is 0.016% above ours): within 0.006 G or 0.03%, whichever is larger.
        assert macs / 1e9 == pytest.approx(PAPER_GFLOPS[(size, patch)], rel=3e-4, abs=0.006)
    else:
        # Table 4 lists DiT-L/8 at 5.73 Gflops, which no layer count gives: 16 tokens x 24 blocks x
        # 12 x 1024^2 = 4.83 G for the blocks' linears alone, 5.01 G in all, the same formula that
        # reproduces every other entry (S/B/XL at /8 included) to the paper's last digit.
        assert (size, patch) == ("L", 8) and macs / 1e9 == pytest.approx(5.011, abs=0.001)


def test_xl2_is_the_papers_675m_119_gflops_model():
    macs = _forward_macs(_release_like("XL", 2))
    params = sum(p.numel() for p in _release_like("XL", 2).parameters())
    assert 674e6 < params < 676e6 and 118.5e9 < macs < 118.7e9


def _numpy_dit_pos_embed(dim: int, grid: int) -> np.ndarray:
    """DiT's get_2d_sincos_pos_embed, from its definition (meshgrid(w, h): column first)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


def test_sincos_positions_equal_dits_table_and_extend_to_other_grids():
    got = sincos_2d(64, 6, 6).numpy()
    np.testing.assert_allclose(got, _numpy_dit_pos_embed(64, 6), atol=1e-6)
    wide = sincos_2d(64, 3, 8)
    # Row r, column c of a 3x8 grid has the embedding of (r, c) on any grid containing it.
    big = sincos_2d(64, 8, 8).reshape(8, 8, 64)
    torch.testing.assert_close(wide.reshape(3, 8, 64), big[:3], rtol=0, atol=0)


def _tiny(**kw) -> DiTConfig:
    base = dict(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4)
    base.update(kw)
    return DiTConfig(**base)


@pytest.mark.parametrize("text", ["none", "cross", "joint"])
def test_fresh_adaln_zero_model_is_identity_on_its_residual_stream(text):
    torch.manual_seed(0)
    cfg = _tiny(text=text, context_dim=None if text == "none" else 24, num_classes=None if text != "none" else 11)
    model = DiT(cfg)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    kwargs = {"context": torch.randn(2, 5, 24)} if text != "none" else {"y": torch.tensor([1, 10])}
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out[0] if isinstance(out, tuple) else out)))
    out = model(x, t, **kwargs)
    assert torch.count_nonzero(out) == 0  # zero final layer
    assert len(seen) == cfg.depth
    for before, after in seen:
        assert torch.equal(before, after)  # zero gates (and zero cross-attention projection)


def test_adaln_single_starts_at_zero_output_and_every_parameter_learns():
    torch.manual_seed(0)
    model = DiT(_tiny(text="cross", context_dim=24, adaln="single"))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 24)
    assert torch.count_nonzero(model(x, t, context=ctx)) == 0
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model(x, t, context=ctx).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("text,adaln", [("none", "zero"), ("cross", "zero"), ("cross", "single"), ("joint", "zero")])
def test_shapes_any_grid_and_conditioning_reaches_the_output(text, adaln):
    torch.manual_seed(0)
    cfg = _tiny(text=text, adaln=adaln, context_dim=None if text == "none" else 24,
                num_classes=11 if text == "none" else None)
    model = DiT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 6, 10), torch.tensor([3, 700])
    a = {"context": torch.randn(2, 5, 24)} if text != "none" else {"y": torch.tensor([1, 2])}
    b = {"context": torch.randn(2, 5, 24)} if text != "none" else {"y": torch.tensor([3, 10])}
    out = model(x, t, **a)
    assert out.shape == (2, 4, 6, 10)
    assert not torch.allclose(out, model(x, t, **b))
    assert not torch.allclose(out, model(x, torch.tensor([4, 100]), **a))
    if text == "joint":  # the last block's text stream has no update to compute
        assert not hasattr(model.blocks[-1], "context_mlp") and hasattr(model.blocks[0], "context_mlp")


def test_learned_positions_refuse_another_grid_and_bad_configs_are_named():
    model = DiT(_tiny(pos_embed="learned", num_classes=3))
    with pytest.raises(ValueError, match="learned positions for a 4x4 patch grid"):
        model(torch.randn(1, 4, 8, 12), torch.tensor([1]), y=torch.tensor([0]))
    with pytest.raises(ValueError, match="not divisible by dit.patch_size"):
        DiT(_tiny(input_size=9))
    with pytest.raises(ValueError, match="needs context_dim"):
        DiT(_tiny(text="cross"))
    with pytest.raises(ValueError, match="pass y"):
        DiT(_tiny(num_classes=3))(torch.randn(1, 4, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        DiT(_tiny())(torch.randn(1, 4, 8, 7), torch.tensor([1]))


def test_release_checkpoint_loads_by_name_and_mismatches_list_every_key():
    torch.manual_seed(0)
    cfg = _tiny(num_classes=11, learn_sigma=True)
    src = DiT(cfg)
    for p in src.parameters():
        torch.nn.init.normal_(p, std=0.05)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["pos_embed"] = src.pos_embed.clone()  # the release stores its fixed table; it is checked, not loaded
    dst = DiT(cfg)
    load_dit_release(dst, {"model": state, "ema": state})  # a training checkpoint: the EMA is taken
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 500]), torch.tensor([0, 10])
    torch.testing.assert_close(dst(x, t, y=y), src(x, t, y=y), rtol=0, atol=0)
    assert dst(x, t, y=y).shape[1] == 4  # learn_sigma: the variance half is dropped
    with pytest.raises(ValueError, match=r"learn_sigma=False.*shape mismatches: final_layer\.linear\.bias"):
        load_dit_release(DiT(_tiny(num_classes=11)), state)
    broken = dict(state)
    broken.pop("blocks.0.attn.qkv.weight")
    broken["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: blocks\.0\.attn\.qkv\.weight; unexpected keys: blocks\.0\.attn\.extra"):
        load_dit_release(DiT(cfg), broken)
    other_table = dict(state, pos_embed=state["pos_embed"] + 0.1)
    with pytest.raises(ValueError, match="not DiT's 2-D sin-cos table"):
        load_dit_release(DiT(cfg), other_table)
    assert "pos_embed" not in DiT(cfg).state_dict()  # fixed: not state (EMA, checkpoints)
    assert "pos_embed" in DiT(_tiny(num_classes=11, pos_embed="learned")).state_dict()


# ----------------------------------------------------------------------------------------------
# diffusers, with the same weights

diffusers = pytest.importorskip("diffusers")


def _randomised(cfg: DiTConfig) -> DiT:
    torch.manual_seed(1)
    model = DiT(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def _split_qkv(prefix_to: str, w: torch.Tensor, b: torch.Tensor, out: dict) -> None:
    for name, wi, bi in zip(("to_q", "to_k", "to_v"), w.chunk(3), b.chunk(3)):
        out[f"{prefix_to}.{name}.weight"], out[f"{prefix_to}.{name}.bias"] = wi, bi


def test_class_conditional_dit_equals_diffusers_dit_transformer():
    cfg = _tiny(num_classes=11, learn_sigma=True)
    ours = _randomised(cfg)
    s = ours.state_dict()
    ref = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                          num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                          norm_eps=1e-6).eval()
    # The rules of diffusers' scripts/convert_dit_to_diffusers.py: the timestep/label embedder is
    # copied into every block's adaLN-Zero (diffusers recomputes it per block).
    m = {"pos_embed.proj.weight": s["x_embedder.proj.weight"], "pos_embed.proj.bias": s["x_embedder.proj.bias"],
         "proj_out_1.weight": s["final_layer.adaLN_modulation.1.weight"],
         "proj_out_1.bias": s["final_layer.adaLN_modulation.1.bias"],
         "proj_out_2.weight": s["final_layer.linear.weight"], "proj_out_2.bias": s["final_layer.linear.bias"]}
    for i in range(cfg.depth):
        p, q = f"transformer_blocks.{i}", f"blocks.{i}"
        for a, b in (("linear_1", "0"), ("linear_2", "2")):
            m[f"{p}.norm1.emb.timestep_embedder.{a}.weight"] = s[f"t_embedder.mlp.{b}.weight"]
            m[f"{p}.norm1.emb.timestep_embedder.{a}.bias"] = s[f"t_embedder.mlp.{b}.bias"]
        m[f"{p}.norm1.emb.class_embedder.embedding_table.weight"] = s["y_embedder.embedding_table.weight"]
        m[f"{p}.norm1.linear.weight"] = s[f"{q}.adaLN_modulation.1.weight"]
        m[f"{p}.norm1.linear.bias"] = s[f"{q}.adaLN_modulation.1.bias"]
        _split_qkv(f"{p}.attn1", s[f"{q}.attn.qkv.weight"], s[f"{q}.attn.qkv.bias"], m)
        m[f"{p}.attn1.to_out.0.weight"], m[f"{p}.attn1.to_out.0.bias"] = s[f"{q}.attn.proj.weight"], s[f"{q}.attn.proj.bias"]
        m[f"{p}.ff.net.0.proj.weight"], m[f"{p}.ff.net.0.proj.bias"] = s[f"{q}.mlp.fc1.weight"], s[f"{q}.mlp.fc1.bias"]
        m[f"{p}.ff.net.2.weight"], m[f"{p}.ff.net.2.bias"] = s[f"{q}.mlp.fc2.weight"], s[f"{q}.mlp.fc2.bias"]
        # diffusers' DiT port divides the frequency exponent by half - 1 (downscale_freq_shift=1); the
        # DiT release (and this module) by half. Set it to DiT's rule; everything else is theirs.
        ref.transformer_blocks[i].norm1.emb.time_proj.downscale_freq_shift = 0
    missing, unexpected = ref.load_state_dict(m, strict=False)
    assert not unexpected and all(k.endswith("pos_embed.pos_embed") for k in missing)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 250, 999]), torch.tensor([0, 5, 10])
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample[:, :4]
        got = ours(x, t, y=y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cross_attention_adaln_single_equals_diffusers_pixart():
    cfg = _tiny(text="cross", context_dim=24, adaln="single")
    ours = _randomised(cfg)
    s = ours.state_dict()
    ref = diffusers.PixArtTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4,
                                             out_channels=4, num_layers=3, cross_attention_dim=64, sample_size=8,
                                             patch_size=2, caption_channels=24, use_additional_conditions=False,
                                             norm_eps=1e-6, interpolation_scale=1).eval()
    m = {"pos_embed.proj.weight": s["x_embedder.proj.weight"], "pos_embed.proj.bias": s["x_embedder.proj.bias"],
         "adaln_single.linear.weight": s["t_block.1.weight"], "adaln_single.linear.bias": s["t_block.1.bias"],
         "caption_projection.linear_1.weight": s["caption_projection.fc1.weight"],
         "caption_projection.linear_1.bias": s["caption_projection.fc1.bias"],
         "caption_projection.linear_2.weight": s["caption_projection.fc2.weight"],
         "caption_projection.linear_2.bias": s["caption_projection.fc2.bias"],
         "scale_shift_table": s["final_layer.scale_shift_table"],
         "proj_out.weight": s["final_layer.linear.weight"], "proj_out.bias": s["final_layer.linear.bias"]}
    for a, b in (("linear_1", "0"), ("linear_2", "2")):
        m[f"adaln_single.emb.timestep_embedder.{a}.weight"] = s[f"t_embedder.mlp.{b}.weight"]
        m[f"adaln_single.emb.timestep_embedder.{a}.bias"] = s[f"t_embedder.mlp.{b}.bias"]
    for i in range(cfg.depth):
        p, q = f"transformer_blocks.{i}", f"blocks.{i}"
        m[f"{p}.scale_shift_table"] = s[f"{q}.scale_shift_table"]
        _split_qkv(f"{p}.attn1", s[f"{q}.attn.qkv.weight"], s[f"{q}.attn.qkv.bias"], m)
        m[f"{p}.attn1.to_out.0.weight"], m[f"{p}.attn1.to_out.0.bias"] = s[f"{q}.attn.proj.weight"], s[f"{q}.attn.proj.bias"]
        m[f"{p}.attn2.to_q.weight"], m[f"{p}.attn2.to_q.bias"] = s[f"{q}.cross_attn.q_linear.weight"], s[f"{q}.cross_attn.q_linear.bias"]
        kw, vw = s[f"{q}.cross_attn.kv_linear.weight"].chunk(2)
        kb, vb = s[f"{q}.cross_attn.kv_linear.bias"].chunk(2)
        m[f"{p}.attn2.to_k.weight"], m[f"{p}.attn2.to_k.bias"], m[f"{p}.attn2.to_v.weight"], m[f"{p}.attn2.to_v.bias"] = kw, kb, vw, vb
        m[f"{p}.attn2.to_out.0.weight"], m[f"{p}.attn2.to_out.0.bias"] = s[f"{q}.cross_attn.proj.weight"], s[f"{q}.cross_attn.proj.bias"]
        m[f"{p}.ff.net.0.proj.weight"], m[f"{p}.ff.net.0.proj.bias"] = s[f"{q}.mlp.fc1.weight"], s[f"{q}.mlp.fc1.bias"]
        m[f"{p}.ff.net.2.weight"], m[f"{p}.ff.net.2.bias"] = s[f"{q}.mlp.fc2.weight"], s[f"{q}.mlp.fc2.bias"]
    missing, unexpected = ref.load_state_dict(m, strict=False)
    assert not unexpected and all(k.endswith("pos_embed.pos_embed") for k in missing), (missing, unexpected)
    x, t, ctx = torch.randn(3, 4, 8, 8), torch.tensor([0, 250, 999]), torch.randn(3, 7, 24)
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        got = ours(x, t, context=ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DiT(_tiny(text="joint", context_dim=24))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 24)

    def grads():
        model.zero_grad(set_to_none=True)
        model(x, t, context=ctx).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_activation_checkpointing(True)
    checkpointed = grads()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=0, atol=0, msg=name)


def test_transformer_experiments_are_the_papers_models():
    from ldm_scale import config as C
    from ldm_scale.models.registry import build_ldm, parameter_counts

    urls = ["data.urls=['s3://b/{00000..00009}.tar']", "model.first_stage_ckpt=s3://b/ae.pt",
            "checkpoint.root=s3://b/ckpt"]
    dit = C.validate(C.to_object(C.compose(["experiment=dit_xl2_kl8_cin", *urls])), world_size=8, check_files=False)
    assert dit.spec.is_dit and dit.batch.global_batch_size == 256
    assert 674e6 < parameter_counts(build_ldm(dit.spec, device="meta"))["trainable"] < 676e6
    t2i = C.to_object(C.compose(["experiment=pixart_xl2_openclip_kl8", *urls]))
    plan = C.validate(t2i, world_size=8, check_files=False)
    assert t2i.diffusion.parameterization == "flow" and t2i.eval.sampler.name == "euler"
    assert 0.55e9 < parameter_counts(build_ldm(plan.spec, device="meta"))["trainable"] < 0.65e9  # "about 0.6B"
    # A diffusion sampler for a flow model is refused when the config is validated, not at sampling.
    with pytest.raises(C.ConfigError, match="eval.sampler.*use sampler.name=euler or heun"):
        C.validate(C.to_object(C.compose(["experiment=pixart_xl2_openclip_kl8", *urls, "eval.sampler.name=ddim"])),
                   world_size=8, check_files=False)


def test_the_compvis_layout_refuses_a_transformer():
    import dataclasses

    from ldm_scale.formats import ldm_payload
    from ldm_scale.models.registry import get_spec

    config = dataclasses.asdict(get_spec("dit_tiny_cin"))
    with pytest.raises(ValueError, match="backbone=dit: export it in the ldm_scale layout"):
        ldm_payload({}, None, config, scale_factor=1.0, step=1, config={}, compvis=True)
    assert ldm_payload({}, None, config, scale_factor=1.0, step=1, config={})["model_config"]["backbone"] == "dit"
