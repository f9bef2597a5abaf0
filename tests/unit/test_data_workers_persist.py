"""Data workers that persist across epochs and tokenise captions (issue 12, input path).

Persistent workers must hand out exactly the batches per-epoch workers do (the logical worker a
physical one plays shifts at every epoch boundary), start once per run, and resume exactly at any
position; tokenised batches must condition the model exactly as the captions would.
"""
from __future__ import annotations

import functools
import pickle

import pytest
import torch

from ldm_scale.data import build_loader
from ldm_scale.diffusion.objective import drop_conditions
from ldm_scale.dist import DistInfo
from ldm_scale.models.conditioners import TextEmbedderConfig, TransformerEmbedder
from tests.fixtures.shapes import shapes_cfg

ONE = DistInfo()


_cfg = shapes_cfg  # the `shapes` fixture (tests/fixtures/shapes.py) and its loader config


def _keys(batches):
    return [tuple(b["key"]) for b in batches]


def _take(loader, n):
    stream = loader.infinite()
    return [next(stream) for _ in range(n)]


def _encoder() -> TransformerEmbedder:
    torch.manual_seed(0)
    return TransformerEmbedder(TextEmbedderConfig(vocab_size=49408, width=32, depth=1, heads=2, dim_head=16))


@pytest.mark.parametrize("workers,mode", [(2, "epoch"), (3, "epoch"), (2, "resampled")])
def test_persistent_workers_hand_out_the_batches_of_per_epoch_workers(shapes, workers, mode):
    # batch 5: 19 batches an epoch, not a multiple of the worker count, so the logical worker each
    # physical one plays must shift at every boundary for batch g to come from worker g % W.
    per_epoch = [build_loader(_cfg(shapes, num_workers=workers, mode=mode, persistent_workers=False), ONE,
                              batch_size=5, seed=4)]
    persistent = [build_loader(_cfg(shapes, num_workers=workers, mode=mode), ONE, batch_size=5, seed=4)]
    assert len(per_epoch[0]) == 19
    a, b = _take(per_epoch[0], 3 * 19 + 2), _take(persistent[0], 3 * 19 + 2)
    assert _keys(a) == _keys(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert per_epoch[0].state_dict() == persistent[0].state_dict()


def test_workers_start_once_per_run(shapes):
    loader = build_loader(_cfg(shapes), ONE, batch_size=8, seed=0)
    stream = loader.infinite()
    seen = set()
    for _ in range(3 * len(loader)):
        next(stream)
        seen.add(tuple(w.pid for w in loader._live._workers))  # DataLoader's worker processes
    assert loader.epoch == 2 and len(seen) == 1, seen
    pids = next(iter(seen))
    loader.close()
    assert loader._live is None
    # per-epoch workers: a new set every epoch
    loader = build_loader(_cfg(shapes, persistent_workers=False), ONE, batch_size=8, seed=0)
    sets = set()
    for _ in range(3):
        it = iter(loader)
        next(it)
        sets.add(tuple(w.pid for w in it.gi_frame.f_locals["source"]._workers))
        for _ in it:
            pass
    assert len(sets) == 3 and pids not in sets


@pytest.mark.parametrize("stop", [7, 18, 19, 20, 45])
def test_resume_anywhere_with_persistent_workers(shapes, stop):
    """Stop after ``stop`` batches (19 an epoch: mid-epoch, the last batch of an epoch, the first
    of the next, the third epoch), save, resume in a fresh loader: the same batches follow."""
    cfg = _cfg(shapes, num_workers=2)
    reference = _take(build_loader(cfg, ONE, batch_size=5, seed=9), stop + 12)
    first = build_loader(cfg, ONE, batch_size=5, seed=9)
    _take(first, stop)
    state = first.state_dict()
    first.close()
    resumed = build_loader(cfg, ONE, batch_size=5, seed=9)
    resumed.load_state_dict(state)
    assert _keys(_take(resumed, 12)) == _keys(reference[stop:])


def test_loading_a_state_restarts_live_workers(shapes):
    """load_state_dict while workers are live (the spike rollback) must not hand out the batches
    the old workers had prefetched."""
    cfg = _cfg(shapes, num_workers=2)
    loader = build_loader(cfg, ONE, batch_size=5, seed=2)
    reference = _take(build_loader(cfg, ONE, batch_size=5, seed=2), 30)
    stream = loader.infinite()
    for _ in range(5):
        next(stream)
    state = loader.state_dict()
    for _ in range(20):  # into the next epoch
        next(stream)
    stream.close()
    loader.load_state_dict(state)
    assert _keys(_take(loader, 25)) == _keys(reference[5:30])


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_tokenise_captions_with_the_encoders_tokenizer(shapes, method):
    encoder = _encoder()
    tokenizer = encoder.caption_tokenizer
    loader = build_loader(_cfg(shapes, multiprocessing_context=method), ONE, batch_size=4, seed=0,
                          tokenize=tokenizer)
    for batch in _take(loader, 5):
        assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (4, 77)
        assert torch.equal(batch["tokens"], tokenizer(batch["caption"]))
    # no captions, no tokens
    labels = build_loader(_cfg(shapes, conditioning="none"), ONE, batch_size=4, seed=0, tokenize=tokenizer)
    assert "tokens" not in next(iter(labels))


def test_dropped_tokens_condition_as_dropped_captions():
    """Caption dropout on tokens draws the same mask and gives the same context as on captions."""
    encoder = _encoder().eval()
    captions = [f"a red circle number {i}" for i in range(16)]
    tokens = encoder.caption_tokenizer(captions)
    torch.manual_seed(3)
    raw_a, dropped_a = drop_conditions(captions, 0.4, encoder.null_raw)
    torch.manual_seed(3)
    raw_b, dropped_b = drop_conditions(tokens, 0.4, functools.partial(encoder.null_raw, tokens=True))
    assert torch.equal(dropped_a, dropped_b) and 0 < int(dropped_a.sum()) < 16
    with torch.no_grad():
        assert torch.equal(encoder(raw_a)["context"], encoder(raw_b)["context"])
    assert torch.equal(raw_b[dropped_b], encoder.caption_tokenizer([""]).expand(int(dropped_b.sum()), -1))


def test_caption_tokenizers_survive_pickling():
    """Workers started by forkserver/spawn receive the tokenizer by pickle (not the module)."""
    tokenizer = _encoder().caption_tokenizer
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(copy(["two blue squares"]), tokenizer(["two blue squares"]))
    assert len(pickle.dumps(tokenizer)) < 8 << 20
    open_clip = pytest.importorskip("open_clip")
    clip = functools.partial(open_clip.get_tokenizer("ViT-H-14"), context_length=77)  # what FrozenOpenCLIPEmbedder gives
    assert torch.equal(pickle.loads(pickle.dumps(clip))(["a cat"]), clip(["a cat"]))
