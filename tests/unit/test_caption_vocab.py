"""ldm_scale.data.caption_vocab and data_tools/build_vocab.py: words counted through the loader's tar
reader from any storage URL, the word-vocabulary / CLIP-BPE rule, and a vocabulary the WordPiece
tokenizer and the own-data experiment accept."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from ldm_scale import config as C
from ldm_scale.data import caption_vocab as V
from ldm_scale.data.shard_writer import write_shard, write_sizes
from ldm_scale.models.tokenizers import WordPieceTokenizer

REPO = Path(__file__).resolve().parents[2]


def _cli():
    spec = importlib.util.spec_from_file_location("build_vocab", REPO / "data_tools" / "build_vocab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _caption_shards(url: str, captions: list[str], per_shard: int = 8) -> str:
    """Shards of (tiny image, caption) samples, one without a caption; returns a glob for them."""
    sizes = {}
    for shard in range(-(-len(captions) // per_shard)):
        chunk = captions[shard * per_shard:(shard + 1) * per_shard]
        samples = [{"__key__": f"{shard:05d}{i:04d}", "jpg": b"not decoded here", "txt": c} for i, c in enumerate(chunk)]
        if shard == 0:
            samples.append({"__key__": f"{shard:05d}9999", "jpg": b"no caption"})
        write_shard(url, shard, samples)
        sizes[f"{shard:05d}.tar"] = len(samples)
    write_sizes(url, sizes)
    return url.rstrip("/") + "/*.tar"


def test_closed_captions_get_a_word_vocabulary_the_tokenizer_covers(tmp_path):
    captions = [f"A handwritten digit {d}." for d in range(10)] * 3
    words = V.count_caption_words(_caption_shards(str(tmp_path / "s"), captions))
    assert words.captions == 30 and words.samples_without_caption == 1 and words.shards_read == 4
    assert words.counts["digit"] == 30 and words.counts["."] == 30  # the tokenizer's own splitting
    assert words.unseen_word_probability == 0.0
    advice = V.recommend(words)
    assert advice.tokenizer == "wordpiece"

    path = tmp_path / "vocab.txt"
    assert V.write_vocab(words, str(path)) == 4 + 14
    tokenizer = WordPieceTokenizer(str(path), max_length=16)
    ids = tokenizer(["a handwritten digit 7", "A HANDWRITTEN DIGIT 0."])
    assert not (ids == tokenizer.unk_id).any()


def test_open_ended_or_oversized_captions_get_the_bpe(tmp_path):
    open_ended = [f"photo number {i} of a thing called w{i}" for i in range(40)]  # new words keep coming
    words = V.count_caption_words(_caption_shards(str(tmp_path / "open"), open_ended))
    p = words.unseen_word_probability
    assert p == pytest.approx(40 * 2 / (40 * 8))  # n1 / N: "{i}" and "w{i}" are seen once per caption
    advice = V.recommend(words)
    assert advice.tokenizer == "bpe" and "Good-Turing" in advice.reason

    many = [f"w{i} w{i}" for i in range(60)]  # every word twice: closed, but larger than the table
    capped = V.count_caption_words(_caption_shards(str(tmp_path / "many"), many), stop_above_tokens=20)
    assert not capped.complete and capped.tokens == 21  # stopped at the first word past the table
    assert V.recommend(capped, max_tokens=20).tokenizer == "bpe"
    assert V.recommend(V.CaptionWords()).tokenizer == "bpe"  # no captions at all


def test_cli_reads_s3_and_prints_the_overrides_the_experiment_takes(tmp_path, s3_server, capsys):
    url = s3_server.url("captions")
    pattern = _caption_shards(url, [f"a handwritten digit {d}" for d in range(10)] * 2)
    out = tmp_path / "vocab.txt"
    assert _cli().main([f"data={pattern}", f"out={out}"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["tokenizer"] == "wordpiece" and record["tokens"] == 4 + 13 and record["vocab"] == str(out)
    assert out.read_text().split()[:4] == list(V.SPECIAL_TOKENS)

    # The printed overrides complete experiment=txt2img_own_data, whose table is MAX_TOKENS rows.
    cfg = C.to_object(C.compose(["experiment=txt2img_own_data", "data.urls=['s3://b/lat/*.tar']",
                                 "model.first_stage_ckpt=s3://b/ae.pt", "eval.prompts=[a handwritten digit 1]",
                                 *record["overrides"]]))
    text = C.validate(cfg, world_size=2, check_files=False).spec.cond_stage.text
    assert text.vocab_size == V.MAX_TOKENS and text.tokenizer.kind == "wordpiece"
    assert text.tokenizer.vocab_path == str(out)

    # Open-ended captions: no file, the BPE overrides, which also complete the experiment.
    open_pattern = _caption_shards(s3_server.url("open"), [f"caption {i} says w{i}" for i in range(30)])
    assert _cli().main([f"data={open_pattern}", f"out={tmp_path / 'none.txt'}"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["tokenizer"] == "bpe" and record["vocab"] is None and not (tmp_path / "none.txt").exists()
    cfg = C.to_object(C.compose(["experiment=txt2img_own_data", "data.urls=['s3://b/lat/*.tar']",
                                 "model.first_stage_ckpt=s3://b/ae.pt", "eval.prompts=[x]", *record["overrides"]]))
    text = C.validate(cfg, world_size=2, check_files=False).spec.cond_stage.text
    assert text.tokenizer.kind == "bpe" and text.vocab_size == V.CLIP_BPE_VOCAB


def test_cli_refuses_a_remote_vocabulary_path(tmp_path):
    with pytest.raises(SystemExit) as exc:
        _cli().main([f"data={tmp_path / '*.tar'}", "out=s3://bucket/vocab.txt"])
    assert exc.value.code == 2


def test_quickstart_uses_the_library_copy():
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "launch" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.write_caption_vocab is V.write_caption_vocab


def test_unseen_probability_is_singletons_over_occurrences():
    words = V.CaptionWords(counts=Counter({"a": 3, "b": 1, "c": 1}), captions=2)
    assert words.unseen_word_probability == pytest.approx(2 / 5) and words.tokens == 4 + 3
