"""The caption vocabulary of a shard set for a text encoder trained from scratch, or the advice to
use CLIP's BPE tokenizer instead.

    python data_tools/build_vocab.py 'data/mine/*.tar' --out data/mine_vocab.txt
    python data_tools/build_vocab.py 's3://bucket/laion/{00000..41407}.tar' --out vocab.txt

Reads every caption (``.txt``) of the shards (any storage URL, brace pattern or glob) with the
loader's tar reader, tokenised as the WordPiece tokenizer will see it. Rule
(``ldm_scale.data.caption_vocab``): a word vocabulary when the special tokens plus the distinct words
fit ``--max-tokens`` embedding rows and a word of a new caption is unknown with Good-Turing
probability (words seen once / word occurrences) at most ``--max-unseen``; then ``--out`` (a local
file: the tokenizer opens it) is written. Otherwise nothing is written and CLIP's BPE is
recommended. Reading stops early once the words outgrow ``--max-tokens``.

Prints the Hydra overrides for ``experiment=txt2img_own_data`` (whose table has 1024 rows) and, as
the last line, a JSON record: ``tokenizer``, ``reason``, ``vocab``, ``tokens``, ``overrides``, ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_scale import storage  # noqa: E402
from ldm_scale.data import caption_vocab  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("urls", nargs="+", help="shard patterns (brace / glob / list)")
    p.add_argument("--out", required=True, help="vocab.txt to write (a local path)")
    p.add_argument("--max-tokens", type=int, default=caption_vocab.MAX_TOKENS,
                   help="largest vocabulary (special tokens included) to build; also the embedding rows it needs")
    p.add_argument("--max-unseen", type=float, default=caption_vocab.MAX_UNSEEN,
                   help="largest acceptable Good-Turing probability that a new caption's word is unknown")
    p.add_argument("--max-samples", type=int, default=None, help="read at most this many captions")
    p.add_argument("--cased", action="store_true", help="keep case (then set tokenizer.lowercase=false too)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    args = p.parse_args(argv)
    if not storage.is_local(args.out):
        p.error(f"--out {args.out}: the tokenizer reads a local file; give a local path")

    cfg = storage.StorageConfig(endpoint_url=args.endpoint_url)
    words = caption_vocab.count_caption_words(args.urls, cfg, lowercase=not args.cased, max_samples=args.max_samples,
                                              stop_above_tokens=args.max_tokens)
    advice = caption_vocab.recommend(words, max_tokens=args.max_tokens, max_unseen=args.max_unseen)
    record = {"tokenizer": advice.tokenizer, "reason": advice.reason, "captions": words.captions,
              "samples_without_caption": words.samples_without_caption, "shards_read": words.shards_read,
              "complete": words.complete, "distinct_words": len(words.counts),
              "unseen_word_probability": round(words.unseen_word_probability, 6), "skips": words.skips,
              "vocab": None, "tokens": None}
    if advice.tokenizer == "wordpiece":
        record["vocab"] = str(Path(storage.local_path(args.out)).resolve())
        record["tokens"] = caption_vocab.write_vocab(words, record["vocab"])
        # txt2img_own_data's table already has MAX_TOKENS rows; a larger --max-tokens needs its own.
        rows = record["tokens"] if record["tokens"] > caption_vocab.MAX_TOKENS else None
        record["overrides"] = caption_vocab.tokenizer_overrides("wordpiece", record["vocab"], rows)
        if args.cased:
            record["overrides"].append(f"{caption_vocab.TEXT_KEY}.tokenizer.lowercase=false")
        print(f"word vocabulary: {record['tokens']} tokens in {args.out} ({advice.reason})")
    else:
        record["overrides"] = caption_vocab.tokenizer_overrides("bpe")
        print(f"use the CLIP BPE tokenizer, no vocabulary written: {advice.reason}")
    print("train with: " + " ".join(record["overrides"]))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
