"""How entry points leave a process that ran a process group (``dist.run_entry_point``): every
Python exit step runs (non-daemon threads joined, atexit handlers, the group destroyed, buffered
output flushed) and the exit status is the entry point's, without interpreter finalisation."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ldm_scale import dist
from tests.fixtures.torchrun import REPO_ROOT, child_env

SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    import torch
    import torch.distributed as td
    from ldm_scale import dist

    out = sys.argv[1]
    # Registered before the group exists, so it runs after dist.shutdown (atexit is LIFO).
    atexit.register(lambda: open(out + ".atexit", "w").write(f"group up at exit: {td.is_initialized()}"))
    dist.init_distributed()
    t = torch.ones(3)
    td.all_reduce(t)  # gloo has run work on its threads

    def worker():
        time.sleep(0.3)
        open(out + ".thread", "w").write("finished")

    threading.Thread(target=worker).start()  # non-daemon: the exit must wait for it
    sys.stdout.write("buffered, no newline")  # a pipe is block-buffered: lost without a flush
    dist.run_entry_point(lambda: {code})
""")


@pytest.mark.parametrize("code, status", [("None", 0), ("3", 3), ("sys.exit(2)", 2)])
def test_a_process_with_a_group_exits_with_its_status_after_every_exit_step(tmp_path, code, status):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT.replace("{code}", code))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=REPO_ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "out.thread").read_text() == "finished"
    assert (tmp_path / "out.atexit").read_text() == "group up at exit: False"


def test_exit_code_of_maps_returns_exits_and_exceptions(capsys):
    assert dist.exit_code_of(lambda: None) == 0
    assert dist.exit_code_of(lambda: 4) == 4

    def refuse():
        raise SystemExit("launch/x.py: no such checkpoint")

    assert dist.exit_code_of(refuse) == 1
    assert "no such checkpoint" in capsys.readouterr().err

    def crash():
        raise RuntimeError("a bug")

    assert dist.exit_code_of(crash) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err

    def interrupted():
        raise KeyboardInterrupt

    assert dist.exit_code_of(interrupted) == 130


def test_a_process_without_a_group_exits_through_sys_exit(monkeypatch):
    monkeypatch.setattr(dist, "_GROUP_WAS_UP", False)
    with pytest.raises(SystemExit) as info:
        dist.exit_process(5)
    assert info.value.code == 5
