"""launch/quickstart.py's caption vocabulary: every caption of the synthetic shards tokenises
without [UNK] through the WordPiece tokenizer and text encoder the quickstart LDM is built with."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ldm_scale.data.synthetic import COLOUR_NAMES, SHAPES, write_synthetic_dataset
from ldm_scale.models.conditioners import ConditionerConfig, TextEmbedderConfig, build_conditioner
from ldm_scale.models.tokenizers import TokenizerConfig, WordPieceTokenizer

REPO = Path(__file__).resolve().parents[2]


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "launch" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_caption_vocab_covers_every_caption_and_feeds_the_text_encoder(tmp_path):
    urls = write_synthetic_dataset(str(tmp_path / "data"), num_samples=48, samples_per_shard=16, seed=3,
                                   min_size=32, max_size=36)
    vocab = tmp_path / "vocab.txt"
    size = _quickstart().write_caption_vocab(urls, vocab)

    tokens = vocab.read_text().split("\n")[:-1]
    assert size == len(tokens) and tokens[:4] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    assert set(COLOUR_NAMES) | set(SHAPES) <= set(tokens)
    assert size <= 64  # the quickstart's embedding table (vocab_size=64)

    tokenizer = WordPieceTokenizer(str(vocab), max_length=16)
    captions = [f"a {c} {s} on a {b} background" for c in COLOUR_NAMES for s in SHAPES for b in ("red", "white")]
    ids = tokenizer(captions)
    assert not (ids == tokenizer.unk_id).any()
    assert len({tuple(row.tolist()) for row in ids}) == len(captions)  # distinct prompts, distinct tokens

    encoder = build_conditioner(ConditionerConfig(kind="text", text=TextEmbedderConfig(
        vocab_size=64, width=32, depth=1, heads=2, dim_head=16, max_length=16,
        tokenizer=TokenizerConfig(kind="wordpiece", vocab_path=str(vocab), max_length=16))))
    context = encoder(captions[:3])["context"]
    assert context.shape == (3, 16, 32) and torch.isfinite(context).all()
