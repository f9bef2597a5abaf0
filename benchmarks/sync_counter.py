"""Count, by call site, what would block the host or wait for peers on a CUDA/NCCL cluster:
device->host copies (``Tensor.item / tolist / cpu / numpy / __bool__ / __float__ / __int__``),
``torch.distributed`` collectives, and tensors built from host values straight on a device
(``torch.tensor / as_tensor`` given a ``device``: on CUDA a blocking copy from pageable memory).

On CPU nothing waits, but the call sites are exactly those that would, which is what the bounds of
tests/integration/test_sync_count.py and the before/after figure of benchmarks/count_syncs.py are
about. Depends on torch only, so count_syncs.py can run it against an older checkout.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import traceback

import torch
import torch.distributed as torch_dist

HOST_COPIES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
HOST_TO_DEVICE = ("tensor", "as_tensor")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "barrier", "all_gather_object", "broadcast_object_list", "all_to_all_single")


def _relative(path: str) -> str:
    """``path`` relative to the longest ``sys.path`` entry holding it: ``ldm_scale/...`` wherever
    the checkout lives (this one or an older one on PYTHONPATH), ``deepspeed/...`` from site-packages."""
    roots = [r.rstrip(os.sep) + os.sep for r in sys.path if r and path.startswith(r.rstrip(os.sep) + os.sep)]
    if roots:
        return path[len(max(roots, key=len)):]
    return path[path.rfind("/ldm_scale/") + 1:] if "/ldm_scale/" in path else path  # an editable install's finder


def call_site() -> str:
    """``path:line`` of the innermost frame outside torch that asked. ``torch/optim/`` frames count
    as a site of their own: torch's optimizers keep CPU step counters, host memory on any device."""
    for frame in reversed(traceback.extract_stack()[:-2]):  # not this function, not counted()
        if "/torch/" in frame.filename and "/torch/optim/" not in frame.filename:
            continue
        return f"{_relative(frame.filename)}:{frame.lineno}"
    return "?"


@contextlib.contextmanager
def counting(sites: collections.Counter):
    """While inside, ``sites[(kind, call site)] += 1`` for every call above; kind is
    ``sync/<method>``, ``collective/<function>`` or ``h2d/<factory>``."""
    saved = []

    def wrap(owner, name, kind, only_with_device=False):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if not only_with_device or kwargs.get("device") is not None:
                sites[(kind, call_site())] += 1
            return original(*args, **kwargs)

        saved.append((owner, name, original))
        setattr(owner, name, counted)

    for name in HOST_COPIES:
        wrap(torch.Tensor, name, f"sync/{name}")
    for name in HOST_TO_DEVICE:
        wrap(torch, name, f"h2d/{name}", only_with_device=True)
    for name in COLLECTIVES:
        if hasattr(torch_dist, name):
            wrap(torch_dist, name, f"collective/{name}")
    try:
        yield sites
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
