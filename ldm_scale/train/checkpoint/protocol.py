"""What a checkpointed component promises the manager (as torchtitan's ``Stateful``).

The manager (``manager.py``) is handed ``states: Mapping[str, <one of the kinds below>]`` and
knows no component types: it saves and loads each state by its kind, in the mapping's order, and
merges what the states ``describe()`` into ``client_state.json``. The adapters for ldm_scale's own
components (engines, EMA, loader, RNG) are in ``states.py``; the training task is a
:class:`ClientStateful` as it is.

Three kinds, told apart by their methods (exactly one kind per state):

- :class:`Stateful`: ``state_dict()`` / ``load_state_dict(state)``, one file per rank,
  ``<name>_rank<R>.pt`` (``torch.save``). With the same world size rank R loads its own file.
  On another world size the state must be :class:`Reshardable` (it reads whichever saved ranks'
  files it needs); otherwise resuming is refused up front.
- :class:`DirectoryStateful`: writes its own files into the step directory (DeepSpeed engines:
  ``<engine name>/...``), named so ``layout.file_owner`` tells each file's rank; on another world
  size one process per node converts the saved files first (DeepSpeed's universal checkpoint).
- :class:`ClientStateful`: a few JSON numbers (rank 0's) merged into ``client_state.json``;
  every rank loads them from that file.

Optional hooks on any kind: :class:`Described` (entries for ``client_state.json`` that resuming
checks against, rank 0 only, before anything is loaded) and, for per-rank states,
:class:`AbsentAware` (what to do when the checkpoint does not hold the state).

Collectives: ``state_dict()``, ``save_files`` and ``load_*`` run on every rank in the mapping's
order, so a state may issue collectives there (the loader's ``state_dict`` gathers every rank's
finished shards). ``describe``, ``check`` and ``convert_files`` run on some ranks only and must not.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    """Per-rank state saved as ``<name>_rank<R>.pt``."""

    def state_dict(self) -> Any:
        """This rank's state (picklable by ``torch.save``; every rank, may be collective)."""

    def load_state_dict(self, state: Any) -> None:
        """Load what this rank saved (same world size)."""


@runtime_checkable
class Reshardable(Protocol):
    """A :class:`Stateful` that can resume on a different world size."""

    def load_resharded(self, read: Callable[[int], Any], *, saved_world: int, rank: int) -> None:
        """Load this rank's part from the saved ranks' states: ``read(r)`` loads rank ``r``'s
        (0 <= r < saved_world), only the ones asked for are read."""


@runtime_checkable
class DirectoryStateful(Protocol):
    """A state that writes its own files into the step directory (DeepSpeed engines)."""

    def save_files(self, step_dir: str, step: int) -> None:
        """Write this state's files under ``step_dir`` (every rank, may be collective)."""

    def load_files(self, files_dir: str, *, converted: bool) -> None:
        """Load from ``files_dir``: the step directory (``converted=False``, same world size) or the
        folder ``convert_files`` wrote (``converted=True``). Every rank."""

    def convert_files(self, step_dir: str, out_dir: str) -> None:
        """Make the files saved on another world size loadable on this one, into ``out_dir`` (one
        process per node, no collectives)."""


@runtime_checkable
class ClientStateful(Protocol):
    """A few JSON-able numbers kept in ``client_state.json`` (rank 0's values)."""

    def client_state(self) -> Mapping[str, Any]:
        """Top-level entries for ``client_state.json`` (rank 0 only, no collectives)."""

    def load_client_state(self, state: Mapping[str, Any]) -> None:
        """Load from the whole saved client state (every rank)."""


@runtime_checkable
class Described(Protocol):
    """A state that records what resuming must match, and checks it."""

    def describe(self) -> Mapping[str, Any]:
        """Top-level entries for ``client_state.json`` (rank 0 only, no collectives)."""

    def check(self, saved: Mapping[str, Any]) -> Optional[str]:
        """Why the saved client state cannot be loaded into this state, or None. The text follows
        ``checkpoint <url> ``: "was written for a different model (...)". Rank 0, before anything is
        loaded (the manager raises the same ``CheckpointError`` on every rank)."""


@runtime_checkable
class AbsentAware(Protocol):
    """A per-rank state that reacts when the checkpoint does not hold it (default: left as it is)."""

    def load_absent(self, step: int, source: str) -> None:
        """The checkpoint ``source`` (a redacted URL) of ``step`` has no files of this state."""


KINDS = (("directory", DirectoryStateful), ("client", ClientStateful), ("rank", Stateful))


def state_kind(name: str, state: Any) -> str:
    """``"directory"``, ``"client"`` or ``"rank"``; a state matching none or several is refused."""
    kinds = [kind for kind, proto in KINDS if isinstance(state, proto)]
    if len(kinds) != 1:
        what = "none" if not kinds else " and ".join(kinds)
        raise TypeError(f"checkpoint state {name!r} ({type(state).__name__}) must be exactly one of Stateful "
                        "(state_dict/load_state_dict), DirectoryStateful (save_files/load_files/convert_files) "
                        f"or ClientStateful (client_state/load_client_state); it matches {what}. Wrap it in an "
                        "adapter (ldm_scale/train/checkpoint/states.py)")
    return kinds[0]
