"""The checkpoint protocol itself: a CheckpointManager saving and resuming toy states of every kind
(per-rank ``Stateful``, ``DirectoryStateful``, ``ClientStateful``) on one process with a local root.

The manager, the publish protocol and the files are real; only the components are toys, so what is
tested is what the manager promises any state: its kind decides how it is written, states load in
the mapping's order, ``describe`` lands in client_state.json and ``check`` refuses a checkpoint
before anything is loaded, a world-size change goes through ``convert_files`` / ``load_resharded``
(or is refused), and a state the checkpoint lacks is left alone or told (``load_absent``).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from ldm_scale.dist import DistInfo
from ldm_scale.train.checkpoint import (AbsentAware, CheckpointConfig, CheckpointError, CheckpointManager,
                                        ClientStateful, Described, DirectoryStateful, Reshardable, Stateful,
                                        standard_states)


class Counter:
    """Per-rank state with a description (parameter names) and resharding."""

    def __init__(self, names, value=0.0, log=None):
        self.names, self.value, self.log = list(names), torch.full((3,), float(value)), log
        self.resharded_from = None

    def state_dict(self):
        return {"value": self.value.clone()}

    def load_state_dict(self, state):
        self.value = state["value"].clone()
        self.log.append("counter")

    def load_resharded(self, read, *, saved_world, rank):
        self.value = sum(read(r)["value"] for r in range(saved_world))
        self.resharded_from = saved_world
        self.log.append("counter")

    def describe(self):
        return {"counter_names": self.names}

    def check(self, saved):
        if saved.get("counter_names") != self.names:
            return f"counts {saved.get('counter_names')} but this run counts {self.names}"
        return None


class Plain:
    """Per-rank state with nothing but state_dict / load_state_dict."""

    def __init__(self, value=0, log=None):
        self.value, self.log = value, log

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]
        self.log.append("plain")


class Blob:
    """Writes its own folder (shared file: rank 0); a world change converts it first."""

    def __init__(self, text="", log=None):
        self.text, self.log, self.loaded_converted = text, log, None

    def save_files(self, step_dir, step):
        os.makedirs(os.path.join(step_dir, "blob"), exist_ok=True)
        with open(os.path.join(step_dir, "blob", "data.json"), "w") as f:
            json.dump({"text": self.text, "step": step}, f)

    def convert_files(self, step_dir, out_dir):
        os.makedirs(os.path.join(out_dir, "blob"), exist_ok=True)
        with open(os.path.join(step_dir, "blob", "data.json")) as f:
            data = json.load(f)
        with open(os.path.join(out_dir, "blob", "data.json"), "w") as f:
            json.dump({**data, "text": data["text"] + " (converted)"}, f)

    def load_files(self, files_dir, *, converted):
        with open(os.path.join(files_dir, "blob", "data.json")) as f:
            self.text = json.load(f)["text"]
        self.loaded_converted = converted
        self.log.append("blob")


class Notes:
    """A few JSON numbers in client_state.json."""

    def __init__(self, seen=0, log=None):
        self.seen, self.log = seen, log

    def client_state(self):
        return {"notes_seen": self.seen}

    def load_client_state(self, state):
        self.seen = state["notes_seen"]
        self.log.append("notes")


class Extra(Plain):
    def load_absent(self, step, source):
        self.absent = (step, source)
        self.log.append("extra absent")


def manager(tmp_path, **kw):
    cfg = CheckpointConfig(root=str(tmp_path / "ckpt"), local_dir=str(tmp_path / "local"), every_steps=1,
                           poll_interval_s=0.01, confirm_timeout_s=10, **kw)
    return CheckpointManager(cfg, run_id="run", dist_info=DistInfo())


def toy_states(log, names=("a", "b"), value=0.0, text="", seen=0, plain=0):
    return {"blob": Blob(text, log), "counter": Counter(names, value, log), "notes": Notes(seen, log),
            "plain": Plain(plain, log)}


def save_two_steps(tmp_path):
    m = manager(tmp_path, keep_last=2)
    states = toy_states([], value=1.0, text="first", seen=1, plain=1)
    m.save(1, states, client_state={"step": 1, "epoch": 0})
    states["counter"].value += 1
    states["blob"].text, states["notes"].seen, states["plain"].value = "second", 2, 2
    m.save(2, states, client_state={"step": 2, "epoch": 1})
    m.close()
    return tmp_path / "ckpt" / "run"


def test_the_kinds_are_told_apart_by_their_methods():
    log = []
    assert isinstance(Counter([], log=log), Stateful) and isinstance(Counter([], log=log), Reshardable)
    assert isinstance(Counter([], log=log), Described) and not isinstance(Plain(log=log), Reshardable)
    assert isinstance(Blob(log=log), DirectoryStateful) and isinstance(Notes(log=log), ClientStateful)
    assert isinstance(Extra(log=log), AbsentAware)
    assert list(standard_states(engines={}, loader=Plain(), task=Notes())) == ["engines", "loader", "task", "rng"]


def test_every_kind_is_saved_and_resumed_in_order(tmp_path):
    run = save_two_steps(tmp_path)
    assert (run / "latest").read_text() == "step_2"
    step_dir = run / "step_2"
    files = set(json.loads((step_dir / "COMPLETE").read_text())["files"])
    assert files == {"blob/data.json", "counter_rank0.pt", "plain_rank0.pt", "client_state.json"}
    meta = json.loads((step_dir / "client_state.json").read_text())
    assert meta["epoch"] == 1 and meta["notes_seen"] == 2 and meta["counter_names"] == ["a", "b"]
    assert meta["step"] == 2 and meta["world_size"] == 1 and meta["run_id"] == "run"

    shutil.rmtree(tmp_path / "local")  # resume from the root, as a fresh node would
    log = []
    fresh = toy_states(log)
    resumed = manager(tmp_path).resume(fresh)
    assert resumed["step"] == 2 and resumed["epoch"] == 1
    assert log == ["blob", "counter", "notes", "plain"]  # the mapping's order
    assert fresh["blob"].text == "second" and fresh["blob"].loaded_converted is False
    assert torch.equal(fresh["counter"].value, torch.full((3,), 2.0))
    assert fresh["notes"].seen == 2 and fresh["plain"].value == 2


def test_a_checkpoint_a_state_rejects_is_refused_before_anything_loads(tmp_path):
    run = save_two_steps(tmp_path)
    before = sorted(p.name for p in run.rglob("*"))
    log = []
    refused = r"checkpoint .*step_2 counts \['a', 'b'\] but this run counts \['a', 'c'\]"
    with pytest.raises(CheckpointError, match=refused):
        manager(tmp_path).resume(toy_states(log, names=("a", "c")))
    assert log == []  # not even the directory state, which comes first, was loaded
    assert sorted(p.name for p in run.rglob("*")) == before


def fake_second_rank(run, step=2):
    """Make step_<step> look saved on 2 ranks: a rank-1 copy of every per-rank file."""
    step_dir = run / f"step_{step}"
    for name in ("counter", "plain"):
        shutil.copy(step_dir / f"{name}_rank0.pt", step_dir / f"{name}_rank1.pt")
    meta = json.loads((step_dir / "client_state.json").read_text())
    (step_dir / "client_state.json").write_text(json.dumps({**meta, "world_size": 2}))
    complete = json.loads((step_dir / "COMPLETE").read_text())
    complete["world_size"] = 2
    complete["files"] = {str(p.relative_to(step_dir)): p.stat().st_size for p in step_dir.rglob("*")
                         if p.is_file() and p.name != "COMPLETE" and "DONE" not in p.parts}
    (step_dir / "COMPLETE").write_text(json.dumps(complete))


def test_another_world_size_converts_and_reshards_or_is_refused(tmp_path):
    run = save_two_steps(tmp_path)
    fake_second_rank(run)
    shutil.rmtree(tmp_path / "local")

    log = []
    with pytest.raises(CheckpointError, match=r"saved on 2 ranks and its state 'plain' cannot be loaded on 1"):
        manager(tmp_path).resume(toy_states(log))
    assert log == []

    states = toy_states(log)
    del states["plain"]
    resumed = manager(tmp_path).resume(states)
    assert resumed["world_size"] == 2 and log == ["blob", "counter", "notes"]
    assert states["blob"].text == "second (converted)" and states["blob"].loaded_converted is True
    assert states["counter"].resharded_from == 2
    assert torch.equal(states["counter"].value, torch.full((3,), 4.0))  # read both saved ranks
    assert os.path.isdir(os.path.join(tmp_path / "local", os.listdir(tmp_path / "local")[0], "step_2_universal"))


def test_a_state_the_checkpoint_lacks_is_left_alone_or_told(tmp_path):
    save_two_steps(tmp_path)
    log = []
    states = {**toy_states(log), "extra": Extra(5, log), "other": Plain(7, log)}
    manager(tmp_path).resume(states)
    assert "extra absent" in log and states["extra"].absent[0] == 2
    assert states["extra"].absent[1].endswith("step_2") and states["other"].value == 7


def test_bad_states_are_refused_before_anything_is_written(tmp_path):
    class Both(Plain, Notes):
        pass

    m = manager(tmp_path)
    with pytest.raises(TypeError, match="'thing' .* matches none"):
        m.save(1, {"thing": object()}, client_state={})
    with pytest.raises(TypeError, match="matches client and rank"):
        m.save(1, {"both": Both()}, client_state={})
    with pytest.raises(ValueError, match="without 'rank'"):
        m.save(1, {"my_rank1": Plain()}, client_state={})
    with pytest.raises(TypeError, match="not both"):
        m.save(1, {"plain": Plain()}, client_state={}, engines={})
    m.close()
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "local").exists()
