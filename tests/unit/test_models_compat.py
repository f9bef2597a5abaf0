"""CompVis checkpoint layout <-> ours."""

import pytest
import torch

from ldm_scale.models import build_ldm
from ldm_scale.models.compat import (
    CompVisKeyMismatch,
    compvis_to_ldm_state_dict,
    describe_compvis_checkpoint,
    ldm_to_compvis_state_dict,
    load_compvis_autoencoder,
    load_compvis_checkpoint,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_ldm("tiny")


def test_round_trip_is_identity(tiny):
    sd = tiny.state_dict()
    compvis = ldm_to_compvis_state_dict(sd)
    back = compvis_to_ldm_state_dict(compvis, use_ema=False)
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)
    # Prefix-only for UNet / first stage; x-transformers names for the text transformer.
    assert "model.diffusion_model.input_blocks.0.0.weight" in compvis
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in compvis
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in compvis
    assert "first_stage_model.post_quant_conv.weight" in compvis
    for key in ["cond_stage_model.transformer.token_emb.weight", "cond_stage_model.transformer.pos_emb.emb.weight",
                "cond_stage_model.transformer.norm.weight",
                "cond_stage_model.transformer.attn_layers.layers.0.0.weight",
                "cond_stage_model.transformer.attn_layers.layers.0.1.to_q.weight",
                "cond_stage_model.transformer.attn_layers.layers.0.1.to_out.bias",
                "cond_stage_model.transformer.attn_layers.layers.1.0.bias",
                "cond_stage_model.transformer.attn_layers.layers.1.1.net.0.0.weight",
                "cond_stage_model.transformer.attn_layers.layers.3.1.net.2.weight"]:
        assert key in compvis, key
    assert not any(k.startswith("cond_stage.") or k.startswith("unet.") for k in compvis)
    assert compvis["scale_factor"] is sd["scale_factor"]


def test_ema_weights_are_exported_and_selected(tiny):
    sd = tiny.state_dict()
    ema = {k[len("unet."):]: v + 1.0 for k, v in sd.items() if k.startswith("unet.")}
    compvis = ldm_to_compvis_state_dict(sd, ema_sd=ema)
    assert "model_ema.diffusion_modelinput_blocks00weight" in compvis
    with_ema = compvis_to_ldm_state_dict(compvis, use_ema=True)
    without = compvis_to_ldm_state_dict(compvis, use_ema=False)
    torch.testing.assert_close(with_ema["unet.out.2.bias"], sd["unet.out.2.bias"] + 1.0)
    torch.testing.assert_close(without["unet.out.2.bias"], sd["unet.out.2.bias"])
    torch.testing.assert_close(with_ema["cond_stage.token_emb.weight"], sd["cond_stage.token_emb.weight"])
    partial = dict(compvis)
    del partial["model_ema.diffusion_modelout2bias"]
    with pytest.raises(CompVisKeyMismatch, match="use_ema=False"):
        compvis_to_ldm_state_dict(partial, use_ema=True)


def test_load_compvis_checkpoint_file(tiny, tmp_path):
    compvis = ldm_to_compvis_state_dict(tiny.state_dict())
    # Keys a real CompVis checkpoint carries that we drop: schedule buffers, EMA counters, LM head.
    compvis["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    compvis["model_ema.num_updates"] = torch.tensor(5)
    compvis["cond_stage_model.transformer.to_logits.bias"] = torch.zeros(49408)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": compvis, "global_step": 10}, path)
    torch.manual_seed(1)
    fresh = build_ldm("tiny")
    assert not torch.equal(fresh.unet.input_blocks[0][0].weight, tiny.unet.input_blocks[0][0].weight)
    result = load_compvis_checkpoint(fresh, path, use_ema=True)
    assert result == {"missing": [], "unexpected": [], "mismatched": []}
    loaded = fresh.state_dict()
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_wrong_keys_raise_a_clear_error(tiny):
    torch.manual_seed(0)
    cin = build_ldm("tiny_cin")
    compvis = ldm_to_compvis_state_dict(cin.state_dict())
    compvis["model.diffusion_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(CompVisKeyMismatch) as err:
        load_compvis_checkpoint(tiny, compvis)
    msg = str(err.value)
    assert "missing key(s)" in msg and "unexpected key(s)" in msg
    assert "30 missing key(s): cond_stage.blocks.0." in msg and "model.diffusion_model.extra.weight" in msg
    assert "closest registry flavour: 'tiny_cin'" in msg
    info = describe_compvis_checkpoint(compvis)
    assert info["cond_stage"] == "class" and info["model_channels"] == 32 and info["context_dim"] == 64
    # Non-strict loading reports instead of raising and loads what matches.
    result = load_compvis_checkpoint(tiny, compvis, strict=False)
    assert "model.diffusion_model.extra.weight" in result["unexpected"]


def test_class_embedding_without_null_row_keeps_ours():
    torch.manual_seed(0)
    cin = build_ldm("tiny_cin")
    n = cin.cond_stage.embedding.weight.shape[0] - 1  # our table: n classes + the null row
    dim = cin.cond_stage.embedding.weight.shape[1]
    compvis = ldm_to_compvis_state_dict(cin.state_dict())
    compvis["cond_stage_model.embedding.weight"] = torch.ones(n, dim)  # CompVis cin: n_classes rows
    null_row = cin.cond_stage.embedding.weight[n].detach().clone()
    load_compvis_checkpoint(cin, compvis)
    assert torch.equal(cin.cond_stage.embedding.weight[:n], torch.ones(n, dim))
    assert torch.equal(cin.cond_stage.embedding.weight[n], null_row)


def test_load_compvis_autoencoder_drops_loss_weights(tiny):
    sd = {k: v + 0.5 for k, v in tiny.first_stage.state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(3)
    load_compvis_autoencoder(tiny.first_stage, sd)
    assert torch.equal(tiny.first_stage.quant_conv.weight, sd["quant_conv.weight"])
    del sd["quant_conv.weight"]
    with pytest.raises(CompVisKeyMismatch, match="missing"):
        load_compvis_autoencoder(tiny.first_stage, sd)


class _XTransformersReplica(torch.nn.Module):
    """The CompVis-vendored x-transformers ``TransformerWrapper(Encoder(...))`` structure
    (ldm/modules/x_transformer.py: pre-norm layers [norm, block, residual] alternating attention and
    feed-forward, final norm, LM head), written out to check that our key mapping puts every
    CompVis weight in the slot that computes the same function."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, dim_head: int, max_len: int = 77):
        super().__init__()
        nn = torch.nn
        self.heads, self.scale = heads, dim_head ** -0.5
        self.token_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Module()
        self.pos_emb.emb = nn.Embedding(max_len, dim)
        self.attn_layers = nn.Module()
        self.attn_layers.layers = nn.ModuleList()
        inner = heads * dim_head
        for _ in range(depth):
            attn = nn.Module()
            attn.to_q, attn.to_k, attn.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
            attn.to_out = nn.Linear(inner, dim)
            ff = nn.Module()
            ff.net = nn.Sequential(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU()), nn.Dropout(0.0),
                                   nn.Linear(4 * dim, dim))
            self.attn_layers.layers.append(nn.ModuleList([nn.LayerNorm(dim), attn]))
            self.attn_layers.layers.append(nn.ModuleList([nn.LayerNorm(dim), ff]))
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.token_emb(tokens) + self.pos_emb.emb(torch.arange(tokens.shape[1]))[None]
        for i, (norm, block) in enumerate(self.attn_layers.layers):
            h = norm(x)
            if i % 2 == 0:
                b, n, _ = h.shape
                projections = (block.to_q, block.to_k, block.to_v)
                q, k, v = (f(h).reshape(b, n, self.heads, -1).transpose(1, 2) for f in projections)
                attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
                h = block.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))
            else:
                h = block.net(h)
            x = x + h
        return self.norm(x)


def test_xtransformers_weights_compute_the_same_function():
    from ldm_scale.models.conditioners import TextEmbedderConfig, TransformerEmbedder

    torch.manual_seed(0)
    theirs = _XTransformersReplica(vocab=100, dim=32, depth=3, heads=2, dim_head=8)
    with torch.no_grad():
        for p in theirs.parameters():  # LayerNorm weights/biases away from 1/0 too
            p.add_(torch.randn_like(p) * 0.1)
    compvis = {"cond_stage_model.transformer." + k: v for k, v in theirs.state_dict().items()}
    ours_sd = compvis_to_ldm_state_dict(compvis, use_ema=False)
    ours = TransformerEmbedder(TextEmbedderConfig(vocab_size=100, width=32, depth=3, heads=2, dim_head=8))
    ours.load_state_dict({k[len("cond_stage."):]: v for k, v in ours_sd.items()}, strict=True)
    tokens = torch.randint(0, 100, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_tokens(tokens), theirs(tokens), atol=1e-5, rtol=1e-5)
