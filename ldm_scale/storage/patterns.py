"""Shard lists: brace patterns, ``::``-separated lists and globs expanded to URLs."""
from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Union

from braceexpand import braceexpand

from ldm_scale.storage.config import StorageConfig
from ldm_scale.storage.objects import glob
from ldm_scale.storage.redaction import redact
from ldm_scale.storage.urls import protocol




URL_LIST_SEPARATOR = "::"  # between patterns in one string (a brace pattern may hold commas)
_RANGE = re.compile(r"\{(\d+\.\.\d+(?:\.\.\d+)?)\}")
_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> List[str]:
    """Expand ``{a,b}`` alternatives (nested too) and ``{000..041}`` zero-padded ranges, as bash and
    webdataset do (the ``braceexpand`` package: a maintained implementation of exactly that). A
    descending range (``{5..1}``) is refused: bash would count down, but in a shard list it is a
    typo far more often than an intent, and it would silently reverse the shard order."""
    for body in _RANGE.findall(pattern):
        lo, hi = (int(x) for x in body.split("..")[:2])
        if hi < lo:
            raise ValueError(f"brace range {{{body}}} is descending in {redact(pattern)}")
    return list(braceexpand(pattern))


def _has_glob(url: str) -> bool:
    """Glob characters in the path; in http(s) URLs ``?`` starts the query (a presigned URL's signature)."""
    path = url.split("://", 1)[-1]
    if protocol(url) in ("http", "https"):
        path = path.split("?", 1)[0]
    return bool(_GLOB_CHARS.search(path))


def expand_urls(pattern_or_list: Union[str, Sequence[str]], cfg: Optional[StorageConfig] = None) -> List[str]:
    """Shard URLs from a brace pattern, a ``::``-separated string, a list of either, or globs.

    Brace patterns expand without touching storage (41k shard names cost nothing); entries with
    glob characters are listed on their filesystem and must match at least one object.
    Order is preserved (no sorting of brace expansions), duplicates are kept.
    """
    if isinstance(pattern_or_list, str):
        items: Iterable[str] = pattern_or_list.split(URL_LIST_SEPARATOR)
    else:
        items = list(pattern_or_list)
    urls: List[str] = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        for url in expand_braces(item):
            if _has_glob(url):
                matched = glob(url, cfg)
                if not matched:
                    raise FileNotFoundError(f"no objects match {redact(url)}")
                urls.extend(matched)
            else:
                urls.append(url)
    if not urls:
        raise ValueError(f"no shard URLs in {redact(pattern_or_list)!r}")
    return urls
