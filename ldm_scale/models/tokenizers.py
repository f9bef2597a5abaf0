"""Text tokenizers for the LDM text encoders, usable offline.

- ``bpe``: the CLIP byte-level BPE (``SimpleTokenizer``) whose merges file ships inside open_clip
  (imported lazily); vocab 49408, ``<start_of_text>`` ... ``<end_of_text>``, zero padding.
- ``wordpiece``: BERT WordPiece from a ``vocab.txt`` given by path (the LDM paper's 1.45B model used
  ``bert-base-uncased``, vocab 30522); ``[CLS]`` ... ``[SEP]`` padded with ``[PAD]``. Implemented
  here (basic tokenisation + greedy longest-match-first) so no ``transformers`` dependency is needed.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # "bpe" (CLIP, via open_clip) | "wordpiece" (BERT vocab.txt)
    # wordpiece: path of a BERT vocab.txt (required). bpe: optional merges .txt.gz (default: open_clip's).
    vocab_path: Optional[str] = None
    max_length: int = 77
    lowercase: bool = True  # wordpiece only (bert-base-uncased lowercases and strips accents)


class BPETokenizer:
    """CLIP BPE tokenizer from open_clip; ``__call__(texts) -> LongTensor[B, max_length]``."""

    def __init__(self, max_length: int = 77, merges_path: Optional[str] = None):
        # Lazy import: ldm_scale.models imports with torch alone.
        from open_clip.tokenizer import SimpleTokenizer

        kwargs = {"bpe_path": merges_path} if merges_path else {}
        self._tokenizer = SimpleTokenizer(context_length=max_length, **kwargs)
        self.max_length = max_length
        self.vocab_size = self._tokenizer.vocab_size
        self.pad_id = 0

    def __call__(self, texts: List[str]) -> torch.Tensor:
        return self._tokenizer(list(texts), context_length=self.max_length)


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # BERT treats all non-alphanumeric ASCII as punctuation (e.g. "$", "^", "`").
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """BERT tokenizer: basic tokenisation (clean, CJK split, lowercase, strip accents, punctuation
    split) then WordPiece (Wu et al. 2016) greedy longest-match-first with ``##`` continuations."""

    def __init__(self, vocab_path: str, max_length: int = 77, lowercase: bool = True,
                 max_chars_per_word: int = 100):
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(
                f"WordPiece vocab file not found: {vocab_path!r}. Point tokenizer.vocab_path to a BERT "
                "vocab.txt (one token per line, e.g. bert-base-uncased's)")
        with open(vocab_path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        self.vocab: Dict[str, int] = {tok: i for i, tok in enumerate(tokens) if tok}
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in self.vocab:
                raise ValueError(f"vocab {vocab_path!r} lacks the special token {special}; is it a BERT vocab.txt?")
        self.vocab_size = len(tokens)
        self.max_length = max_length
        self.lowercase = lowercase
        self.max_chars_per_word = max_chars_per_word
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]

    def basic_tokenize(self, text: str) -> List[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_cjk(cp):
                chars.extend((" ", ch, " "))
            else:
                chars.append(" " if _is_whitespace(ch) else ch)
        words = []
        for word in "".join(chars).split():
            if self.lowercase:
                word = "".join(c for c in unicodedata.normalize("NFD", word.lower())
                               if unicodedata.category(c) != "Mn")
            current = ""
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def wordpiece(self, word: str) -> List[int]:
        if len(word) > self.max_chars_per_word:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            match = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    match = self.vocab[piece]
                    break
                end -= 1
            if match is None:
                return [self.unk_id]  # BERT maps the whole word to [UNK] if any piece is missing
            ids.append(match)
            start = end
        return ids

    def encode(self, text: str) -> List[int]:
        ids = [i for word in self.basic_tokenize(text) for i in self.wordpiece(word)]
        return [self.cls_id, *ids[: self.max_length - 2], self.sep_id]

    def __call__(self, texts: List[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def build_tokenizer(cfg: TokenizerConfig):
    if cfg.kind == "bpe":
        return BPETokenizer(cfg.max_length, cfg.vocab_path)
    if cfg.kind == "wordpiece":
        if cfg.vocab_path is None:
            raise ValueError("tokenizer.kind='wordpiece' needs tokenizer.vocab_path (a BERT vocab.txt, e.g. "
                             "bert-base-uncased's 30522-token vocab used by the LDM paper's text model)")
        return WordPieceTokenizer(cfg.vocab_path, cfg.max_length, cfg.lowercase)
    raise ValueError(f"unknown tokenizer kind {cfg.kind!r}; expected 'bpe' or 'wordpiece'")
