"""Tokenizers and condition encoders (CPU, offline; checkpoints are written by the tests)."""

import json
import logging

import pytest
import torch

from ldm_scale.models.conditioners import (
    ClassEmbedder,
    ClassEmbedderConfig,
    ClassLabelConditioner,
    ConcatConditioner,
    ConditionerConfig,
    FrozenOpenCLIPEmbedder,
    NullConditioner,
    OpenCLIPConfig,
    TextEmbedderConfig,
    TransformerEmbedder,
    build_conditioner,
)
from ldm_scale.models.tokenizers import (
    BPETokenizer,
    TokenizerConfig,
    WordPieceTokenizer,
    build_tokenizer,
)
from tests.fixtures.tiny_clip import TINY_CLIP

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "square", "##s", "un", "##aff", "##able",
         ",", "!", "cafe", "the", "blue", "circle", "on", "\u4e2d"]


@pytest.fixture()
def vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return str(path)


def test_wordpiece_tokenizer_on_a_test_vocab(vocab_file):
    tok = WordPieceTokenizer(vocab_file, max_length=16)
    ids = {t: i for i, t in enumerate(VOCAB)}
    assert tok.basic_tokenize("Unaffable  red\tSquares, Café!\u4e2d") == \
        ["unaffable", "red", "squares", ",", "cafe", "!", "\u4e2d"]
    out = tok(["Unaffable red squares, Café!", "xyz blue"])
    expected0 = [ids[t] for t in ["[CLS]", "un", "##aff", "##able", "red", "square", "##s", ",", "cafe", "!", "[SEP]"]]
    assert out.shape == (2, 16) and out.dtype == torch.long
    assert out[0].tolist() == expected0 + [0] * (16 - len(expected0))
    # An out-of-vocabulary word becomes a single [UNK].
    assert out[1, :4].tolist() == [ids["[CLS]"], ids["[UNK]"], ids["blue"], ids["[SEP]"]]
    # Truncation keeps [CLS] ... [SEP] within max_length.
    short = WordPieceTokenizer(vocab_file, max_length=5)(["a red square on the blue circle"])
    assert short[0].tolist() == [ids["[CLS]"], ids["a"], ids["red"], ids["square"], ids["[SEP]"]]
    assert build_tokenizer(TokenizerConfig(kind="wordpiece", vocab_path=vocab_file)).vocab_size == len(VOCAB)


def test_tokenizer_errors_are_clear(tmp_path, vocab_file):
    with pytest.raises(ValueError, match="vocab_path"):
        build_tokenizer(TokenizerConfig(kind="wordpiece"))
    with pytest.raises(FileNotFoundError, match="vocab"):
        WordPieceTokenizer(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        WordPieceTokenizer(str(bad))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer(TokenizerConfig(kind="sentencepiece"))


def test_bpe_tokenizer_matches_open_clip():
    import open_clip

    tok = BPETokenizer(max_length=77)
    texts = ["a red square on the left", ""]
    out = tok(texts)
    assert tok.vocab_size == 49408
    assert torch.equal(out, open_clip.tokenize(texts))
    assert out[1, 0] == 49406 and out[1, 1] == 49407 and out[1, 2:].eq(0).all()


def _tiny_text(tokenizer: TokenizerConfig, vocab_size: int = 49408) -> TransformerEmbedder:
    return TransformerEmbedder(TextEmbedderConfig(vocab_size=vocab_size, width=32, depth=2, heads=2, dim_head=16,
                                                  tokenizer=tokenizer))


def test_transformer_embedder_with_wordpiece(vocab_file):
    torch.manual_seed(0)
    emb = _tiny_text(TokenizerConfig(kind="wordpiece", vocab_path=vocab_file), vocab_size=len(VOCAB))
    out = emb(["a red square", "the blue circle"])
    assert set(out) == {"context"} and out["context"].shape == (2, 77, 32)
    assert emb.output_dim == 32 and emb.trainable
    assert emb.null_raw(3) == ["", "", ""]
    # Different prompts give different contexts; the same prompt gives the same context.
    assert not torch.allclose(out["context"][0], out["context"][1])
    torch.testing.assert_close(emb(["a red square"])["context"][0], out["context"][0])
    # Gradients reach the token embedding (the text transformer is trained jointly).
    out["context"].sum().backward()
    assert emb.token_emb.weight.grad.abs().sum() > 0


def test_transformer_embedder_vocab_too_small_is_an_error():
    emb = _tiny_text(TokenizerConfig(kind="bpe"), vocab_size=1000)
    with pytest.raises(ValueError, match="vocab"):
        emb(["a"])


def test_class_embedder_null_token():
    emb = ClassEmbedder(ClassEmbedderConfig(n_classes=10, embed_dim=16))
    assert emb.embedding.weight.shape == (11, 16)
    null = emb.null_raw(3)
    assert null.tolist() == [10, 10, 10]
    ctx = emb(torch.tensor([0, 10]))["context"]
    assert ctx.shape == (2, 1, 16)
    torch.testing.assert_close(ctx[1, 0], emb.embedding.weight[10])
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        emb(torch.tensor([11]))
    label = ClassLabelConditioner(ClassEmbedderConfig(n_classes=10))
    assert torch.equal(label(torch.tensor([3, 10]))["y"], torch.tensor([3, 10]))
    assert label.null_raw(2).tolist() == [10, 10]


def test_null_and_concat_conditioners():
    null = NullConditioner()
    assert null(None) == {} and null.null_raw(4) is None and null.output_dim == 0
    with pytest.raises(ValueError):
        null(["text"])
    concat = build_conditioner(ConditionerConfig(kind="concat", concat_channels=5))
    assert isinstance(concat, ConcatConditioner)
    t = torch.randn(2, 5, 8, 8)
    assert concat(t)["concat"] is t
    with pytest.raises(ValueError, match=r"\[B, 5, h, w\]"):
        concat(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="guidance"):
        concat.null_raw(2)
    with pytest.raises(ValueError, match="unknown conditioner kind"):
        build_conditioner(ConditionerConfig(kind="t5"))


def test_open_clip_embedder_from_local_checkpoint(tmp_path, caplog):
    import open_clip

    config_path = tmp_path / "ldm-test-tiny-clip.json"
    config_path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config_path))
    torch.manual_seed(0)
    reference = open_clip.create_model("ldm-test-tiny-clip", pretrained=None)
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(reference.state_dict(), ckpt)

    with caplog.at_level(logging.WARNING):
        random_emb = FrozenOpenCLIPEmbedder(OpenCLIPConfig(arch="ldm-test-tiny-clip", pretrained=None,
                                                           model_config_path=str(config_path)))
    assert "RANDOM weights" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        last = FrozenOpenCLIPEmbedder(OpenCLIPConfig(arch="ldm-test-tiny-clip", pretrained=str(ckpt), layer="last"))
        penultimate = FrozenOpenCLIPEmbedder(OpenCLIPConfig(arch="ldm-test-tiny-clip", pretrained=str(ckpt)))
    assert "RANDOM" not in caplog.text
    assert torch.equal(last.model.token_embedding.weight, reference.token_embedding.weight)
    assert not torch.equal(random_emb.model.token_embedding.weight, reference.token_embedding.weight)

    texts = ["a red square", ""]
    tokens = open_clip.tokenize(texts)
    with torch.no_grad():
        x = reference.token_embedding(tokens) + reference.positional_embedding
        expected = reference.ln_final(reference.transformer(x, attn_mask=reference.attn_mask))
    out_last = last(texts)["context"]
    torch.testing.assert_close(out_last, expected, atol=1e-5, rtol=1e-5)
    out_pen = penultimate(texts)["context"]
    assert out_pen.shape == (2, 77, 64) and penultimate.output_dim == 64
    assert not torch.allclose(out_pen, out_last)

    # Frozen: no gradients, and eval mode survives .train().
    assert not any(p.requires_grad for p in penultimate.parameters())
    penultimate.train()
    assert not penultimate.training and not penultimate.model.training
    assert penultimate.null_raw(2) == ["", ""] and not penultimate.trainable

    with pytest.raises(FileNotFoundError, match="not found"):
        FrozenOpenCLIPEmbedder(OpenCLIPConfig(arch="ldm-test-tiny-clip", pretrained=str(tmp_path / "nope.pt")))
