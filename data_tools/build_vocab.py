"""The caption vocabulary of a shard set for a text encoder trained from scratch, or the advice to
use CLIP's BPE tokenizer instead.

    python data_tools/build_vocab.py data='data/mine/*.tar' out=data/mine_vocab.txt
    python data_tools/build_vocab.py data='s3://bucket/laion/{00000..41407}.tar' out=vocab.txt

Arguments are Hydra overrides of ``conf/commands/build_vocab.yaml`` (typed by
``ldm_scale.data.commands.BuildVocabConfig``; ``--help`` lists the keys). Reads every caption
(``.txt``) of the shards (any storage URL, brace pattern or glob) with the loader's tar reader,
tokenised as the WordPiece tokenizer will see it. Rule (``ldm_scale.data.caption_vocab``): a word
vocabulary when the special tokens plus the distinct words fit ``max_tokens`` embedding rows and a
word of a new caption is unknown with Good-Turing probability (words seen once / word occurrences)
at most ``max_unseen``; then ``out`` (a local file: the tokenizer opens it) is written. Otherwise
nothing is written and CLIP's BPE is recommended. Reading stops early once the words outgrow
``max_tokens``.

Prints the Hydra overrides for ``experiment=txt2img_own_data`` (whose table has 1024 rows) and, as
the last line, a JSON record: ``tokenizer``, ``reason``, ``vocab``, ``tokens``, ``overrides``, ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import storage  # noqa: E402
from ldm_scale.cli import report_input_errors, start_command  # noqa: E402
from ldm_scale.data import caption_vocab  # noqa: E402
from ldm_scale.data.commands import BuildVocabConfig  # noqa: E402

PROGRAM = "data_tools/build_vocab.py"


def main(argv=None) -> int:
    cfg = start_command(argv, "build_vocab", BuildVocabConfig, program=PROGRAM, doc=__doc__)
    words = report_input_errors(PROGRAM, lambda: caption_vocab.count_caption_words(
        cfg.shard_patterns(), cfg.storage, lowercase=not cfg.cased, max_samples=cfg.max_samples,
        stop_above_tokens=cfg.max_tokens))
    advice = caption_vocab.recommend(words, max_tokens=cfg.max_tokens, max_unseen=cfg.max_unseen)
    record = {"tokenizer": advice.tokenizer, "reason": advice.reason, "captions": words.captions,
              "samples_without_caption": words.samples_without_caption, "shards_read": words.shards_read,
              "complete": words.complete, "distinct_words": len(words.counts),
              "unseen_word_probability": round(words.unseen_word_probability, 6), "skips": words.skips,
              "vocab": None, "tokens": None}
    if advice.tokenizer == "wordpiece":
        record["vocab"] = str(Path(storage.local_path(cfg.out)).resolve())
        record["tokens"] = caption_vocab.write_vocab(words, record["vocab"])
        # txt2img_own_data's table already has MAX_TOKENS rows; a larger max_tokens needs its own.
        rows = record["tokens"] if record["tokens"] > caption_vocab.MAX_TOKENS else None
        record["overrides"] = caption_vocab.tokenizer_overrides("wordpiece", record["vocab"], rows)
        if cfg.cased:
            record["overrides"].append(f"{caption_vocab.TEXT_KEY}.tokenizer.lowercase=false")
        print(f"word vocabulary: {record['tokens']} tokens in {cfg.out} ({advice.reason})")
    else:
        record["overrides"] = caption_vocab.tokenizer_overrides("bpe")
        print(f"use the CLIP BPE tokenizer, no vocabulary written: {advice.reason}")
    print("train with: " + " ".join(record["overrides"]))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
