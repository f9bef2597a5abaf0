"""A word-level vocabulary of a shard set's captions, and when to use CLIP's BPE instead.

A text encoder trained from scratch (the tiny flavours, ``cond_stage.text``) needs one embedding row
per token. When the captions are drawn from a small closed vocabulary (labels, templates: "a
handwritten digit 7"), a ``vocab.txt`` of their words, read by the WordPiece tokenizer
(``ldm_scale.models.tokenizers``), gives every word its own token with a table of tens of rows
instead of the 49408 of CLIP's BPE, whose table would otherwise dominate a small model's parameters,
optimizer step and gradient exchange. Free-form captions keep meeting new words, which a word
vocabulary maps to ``[UNK]``; the BPE spells any word from sub-word pieces.

The rule (:func:`recommend`): a word vocabulary when it fits the text encoder's table
(``max_tokens``, :data:`MAX_TOKENS` by default, special tokens included) *and* a word of a new
caption from the same source is unlikely to be missing from it. That probability is estimated with
the Good-Turing missing-mass estimate (Good 1953, "The population frequencies of species and the
estimation of population parameters", eq. 2 with r = 0): the share of all word occurrences taken by
words seen exactly once, ``n1 / N``; it must be at most ``max_unseen`` (:data:`MAX_UNSEEN`).
Otherwise: the CLIP BPE, and no vocabulary file.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ldm_scale import storage
from ldm_scale.data.filters import clean_caption
from ldm_scale.data.tar_stream import iter_tar_samples

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")  # what WordPieceTokenizer requires, ids 0-3
MAX_TOKENS = 1024  # = the embedding rows of conf/experiment/txt2img_own_data.yaml (a test checks)
MAX_UNSEEN = 0.01  # Good-Turing probability that a new caption's word is [UNK]
CLIP_BPE_VOCAB = 49408  # open_clip's SimpleTokenizer: rows the text encoder needs for kind=bpe

TEXT_KEY = "model.ldm.cond_stage.text"
"""Where a text-conditional flavour's tokenizer and embedding table are set (``vocab_size``,
``tokenizer.kind``, ``tokenizer.vocab_path``)."""


@dataclass
class CaptionWords:
    """Word counts of the captions read (the tokenizer's own basic tokenisation, after the loader's
    caption cleanup). ``complete`` is False when reading stopped early (``max_samples``, or the
    distinct words outgrew any table :func:`recommend` accepts)."""

    counts: Counter = field(default_factory=Counter)
    captions: int = 0
    samples_without_caption: int = 0
    shards_read: int = 0
    complete: bool = True
    skips: Dict[str, int] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Size of the vocabulary file: special tokens plus every distinct word."""
        return len(SPECIAL_TOKENS) + len(self.counts)

    @property
    def unseen_word_probability(self) -> float:
        """Good-Turing estimate of the chance that a word of a new caption is not among ``counts``:
        (words seen exactly once) / (word occurrences); 1.0 when no word was read."""
        total = sum(self.counts.values())
        if total == 0:
            return 1.0
        return sum(1 for c in self.counts.values() if c == 1) / total


def _splitter(lowercase: bool):
    """The WordPiece tokenizer's basic tokenisation (lower-casing, accent stripping, punctuation
    split), so the vocabulary holds exactly the words the tokenizer will look up."""
    from ldm_scale.models.tokenizers import WordPieceTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # it needs a vocab file; basic tokenisation does not use it
        path = os.path.join(tmp, "vocab.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(SPECIAL_TOKENS) + "\n")
        return WordPieceTokenizer(path, lowercase=lowercase).basic_tokenize


def count_caption_words(urls: Sequence[str] | str, cfg: Optional[storage.StorageConfig] = None, *,
                        lowercase: bool = True, max_samples: Optional[int] = None,
                        stop_above_tokens: Optional[int] = None) -> CaptionWords:
    """Count the words of every ``.txt`` caption in the shards ``urls`` (brace pattern, glob, list;
    any storage URL), read with the loader's tar reader in shard order.

    ``stop_above_tokens``: stop as soon as the vocabulary would exceed this many tokens (the answer
    can no longer be a word vocabulary; LAION-scale sets stop after a few thousand captions).
    """
    split = _splitter(lowercase)
    words = CaptionWords()
    skips: Counter = Counter()
    for index, url in enumerate(storage.expand_urls(urls, cfg)):
        words.shards_read += 1
        for sample in iter_tar_samples(url, index, skips, cfg):
            if "txt" not in sample:
                words.samples_without_caption += 1
                continue
            words.counts.update(split(clean_caption(sample["txt"].decode("utf-8", errors="replace"))))
            words.captions += 1
            if (max_samples is not None and words.captions >= max_samples) or (
                    stop_above_tokens is not None and words.tokens > stop_above_tokens):
                words.complete = False
                break
        if not words.complete:
            break
    words.skips = {k: v for k, v in skips.items() if k.startswith("skip/")}
    return words


@dataclass(frozen=True)
class Recommendation:
    tokenizer: str  # "wordpiece" (a word vocabulary of the captions) | "bpe" (CLIP's)
    reason: str


def recommend(words: CaptionWords, *, max_tokens: int = MAX_TOKENS, max_unseen: float = MAX_UNSEEN) -> Recommendation:
    """The module docstring's rule: a word vocabulary when it fits ``max_tokens`` rows and the
    Good-Turing unseen-word probability is at most ``max_unseen``; else the CLIP BPE."""
    if words.captions == 0:
        return Recommendation("bpe", "no captions (.txt members) were found in the shards")
    if words.tokens > max_tokens:
        seen = f"after {words.captions} captions" if not words.complete else f"in {words.captions} captions"
        return Recommendation("bpe", f"the captions use more than {max_tokens - len(SPECIAL_TOKENS)} distinct "
                                     f"words ({len(words.counts)} {seen}): a word vocabulary would not fit "
                                     f"a {max_tokens}-row embedding table")
    p = words.unseen_word_probability
    if p > max_unseen:
        return Recommendation("bpe", f"a word of a new caption would be unknown with probability {p:.3f} "
                                     f"(Good-Turing: words seen once / word occurrences) > {max_unseen:g}: the "
                                     "captions are open-ended")
    return Recommendation("wordpiece", f"{len(words.counts)} distinct words in {words.captions} captions; a new "
                                       f"caption's word is unknown with probability {p:.3g} <= {max_unseen:g}")


def write_vocab(words: CaptionWords, path: str) -> int:
    """Write ``vocab.txt`` (a local file, as the tokenizer reads it): the special tokens, then the
    words in sorted order (stable ids for the same captions). Returns the number of tokens."""
    tokens = [*SPECIAL_TOKENS, *sorted(words.counts)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    return len(tokens)


def write_caption_vocab(shard_urls: Sequence[str] | str, path, cfg: Optional[storage.StorageConfig] = None,
                        *, lowercase: bool = True) -> int:
    """Write the word vocabulary of every caption in ``shard_urls`` to ``path``, whatever its size;
    returns the number of tokens (launch/quickstart.py; data_tools/build_vocab.py adds the rule)."""
    return write_vocab(count_caption_words(shard_urls, cfg, lowercase=lowercase), str(path))


def tokenizer_overrides(tokenizer: str, vocab_path: Optional[str] = None, vocab_size: Optional[int] = None) -> List[str]:
    """Hydra overrides that select ``tokenizer`` for a text flavour: the vocabulary file and, when
    given, the embedding rows (``vocab_size``) for a word vocabulary; CLIP's BPE and its 49408 rows."""
    if tokenizer == "wordpiece":
        if vocab_path is None:
            raise ValueError("a word vocabulary needs its vocab_path")
        out = [f"{TEXT_KEY}.tokenizer.kind=wordpiece", f"{TEXT_KEY}.tokenizer.vocab_path={vocab_path}"]
        return out + ([f"{TEXT_KEY}.vocab_size={vocab_size}"] if vocab_size is not None else [])
    if tokenizer == "bpe":
        return [f"{TEXT_KEY}.tokenizer.kind=bpe", f"{TEXT_KEY}.tokenizer.vocab_path=null",
                f"{TEXT_KEY}.vocab_size={CLIP_BPE_VOCAB}"]
    raise ValueError(f"tokenizer={tokenizer!r}; expected 'wordpiece' or 'bpe'")
