"""The sbatch script rendered by launch/slurm.py: shape of an 8-node job, rendezvous, stop signal,
requeue, quoting of training overrides, and the command line's errors. Submission itself is tested
against a real SLURM cluster in tests/integration/test_slurm.py.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_cli():
    spec = importlib.util.spec_from_file_location("launch_slurm", REPO_ROOT / "launch" / "slurm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["launch_slurm"] = module
    spec.loader.exec_module(module)
    return module


slurm = _load_cli()

EIGHT_NODES = ["nodes=8", "gpus_per_node=8", "partition=gpu", "time=48:00:00", "account=proj-ldm",
               "run_id=txt2img-r1", "check_config=false"]
OVERRIDES = ["experiment=txt2img_kl8", 'data.urls=["s3://laion/{00000..41407}.tar"]',
             "model.first_stage_ckpt=s3://ckpt/kl_f8.pt", "logger.tags=[a b, c]", "+note=it's"]


def render(argv: list[str], workdir: Path) -> tuple[str, slurm.SlurmJob]:
    launcher, overrides, dry_run = slurm.split_args(argv)
    assert dry_run
    job = slurm.prepare(slurm.parse_config(launcher), overrides, workdir=workdir)
    return slurm.render(job), job


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            options[key] = value
    return options


def torchrun_command(script: str) -> list[str]:
    """The srun command line of the script, split the way bash will split it."""
    block = script[script.index("\nsrun "):script.index(" &\nsrun_pid=$!")]
    return shlex.split(block.replace("\\\n", " "))


def test_eight_node_job_shape_rendezvous_signal_and_requeue(tmp_path):
    script, job = render([*EIGHT_NODES, *OVERRIDES, "--dry-run"], tmp_path)
    options = sbatch_options(script)
    assert options["--nodes"] == "8" and options["--ntasks-per-node"] == "1"
    assert options["--gpus-per-node"] == "8" and "--exclusive" in options
    assert options["--partition"] == "gpu" and options["--account"] == "proj-ldm"
    assert options["--time"] == "48:00:00"
    assert options["--signal"] == "B:USR1@300"  # to the batch shell, which forwards it
    assert "--requeue" in options and options["--open-mode"] == "append"
    assert options["--output"] == f"{tmp_path}/runs/txt2img-r1/slurm/%j.batch.log"
    assert options["--job-name"] == "txt2img_kl8"

    # Rendezvous on the first node of the allocation, one agent per node.
    assert 'HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in script
    assert "RDZV_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in script
    cmd = torchrun_command(script)
    assert cmd[:4] == ["srun", "--nodes=8", "--ntasks=8", "--ntasks-per-node=1"]
    assert "--kill-on-bad-exit=1" in cmd and "--gpus-per-node=8" in cmd
    agent = cmd.index("-m")
    assert cmd[agent - 5:agent - 1] == ["bash", "-c", 'trap "" USR1; exec "$@"', "torchrun-agent"]  # agent ignores USR1
    assert cmd[agent + 1] == "torch.distributed.run"
    assert {"--nnodes=8", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=$HEAD_NODE:$RDZV_PORT",
            "--rdzv-id=$RUN_ID", "--max-restarts=3"} <= set(cmd[agent + 2:])

    # Training arguments survive bash word splitting exactly; run id and output dir are pinned.
    train_args = cmd[cmd.index(str(REPO_ROOT / "launch" / "train.py")) + 1:]
    assert train_args == [*OVERRIDES, "run_id=txt2img-r1", f"output_dir={tmp_path}/runs"]
    assert job.train_args == train_args

    # Stop signal: trapped, forwarded to srun; requeue after the step when the marker exists.
    assert "trap forward_stop_signal USR1" in script
    assert 'kill -USR1 "$srun_pid"' in script
    assert "RUN_ID=txt2img-r1" in script and 'export LDM_SCALE_RUN_ID="$RUN_ID"' in script
    assert 'export LDM_SCALE_PREEMPT_MARKER="$LOG_DIR/preempted.$SLURM_JOB_ID.$RESTART.json"' in script
    assert re.search(r'if \[ -s "\$LDM_SCALE_PREEMPT_MARKER" \]; then.*requeue=1', script, re.DOTALL)
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert '--output="$LOG_DIR/%j.$RESTART.node%n.log"' in script  # one log per node and instance

    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_cpu_shape_fixed_port_no_requeue_and_environment(tmp_path):
    script, _ = render(["nodes=2", "gpus_per_node=0", "nproc_per_node=4", "cpus_per_task=16", "mem=64G",
                        "rdzv_port=29400", "requeue=false", "signal_seconds=900", "check_config=false",
                        "env.NCCL_SOCKET_IFNAME=ib0", "setup=[module load cuda/12.4]",
                        "sbatch_args=[--reservation=r1]", "output_dir=rel/out", "--dry-run"], tmp_path)
    options = sbatch_options(script)
    assert options["--cpus-per-task"] == "16" and "--exclusive" not in options
    assert "--gpus-per-node" not in options and options["--mem"] == "64G"
    assert options["--signal"] == "B:USR1@900" and "--no-requeue" in options
    assert options["--reservation"] == "r1"
    assert "RDZV_PORT=29400" in script and "scontrol requeue" not in script
    assert "export NCCL_SOCKET_IFNAME=ib0" in script and "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
    assert "\nmodule load cuda/12.4\n" in script
    cmd = torchrun_command(script)
    assert "--cpus-per-task=16" in cmd and "--nproc-per-node=4" in cmd and "--nnodes=2" in cmd
    assert cmd[-1] == f"output_dir={tmp_path}/rel/out"  # relative to the submission directory
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_arguments_split_between_launcher_and_training():
    launcher, training, dry_run = slurm.split_args(
        ["nodes=2", "env.X=1", "experiment=quickstart", "+foo.bar=1", "time=1:00:00"])
    assert launcher == ["nodes=2", "env.X=1", "time=1:00:00"] and not dry_run
    assert training == ["experiment=quickstart", "+foo.bar=1"]
    assert slurm.parse_config(["time=48:00:00"]).time == "48:00:00"  # not YAML's base-60 integer


@pytest.mark.parametrize("time, seconds", [("30", 1800), ("30:15", 1815), ("2:00:00", 7200),
                                           ("1-12", 129600), ("1-0:30", 88200), ("2-00:00:05", 172805)])
def test_time_limit_formats(time, seconds):
    assert slurm.time_limit_seconds(time) == seconds


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2"], "unknown option '--nodes'"),
    (["nodes"], "expected key=value"),
    (["nodes=two"], "nodes"),
    (["time=tomorrow"], "time='tomorrow'"),
    (["signal_seconds=0"], "signal_seconds=0"),
    (["time=5", "signal_seconds=300"], "signal_seconds=300 is not shorter than time=5"),
    (["run_id=a/b"], "run_id='a/b'"),
    (["sbatch_args=[reservation=r1]"], "one long option per entry"),
])
def test_bad_launcher_arguments_name_the_fix(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        launcher, _, _ = slurm.split_args(argv)
        slurm.parse_config(launcher)


def test_training_config_is_validated_for_the_job_world_size(tmp_path):
    """A batch that cannot split over 8x8 processes fails at submission, not after queueing."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "slurm.py"), "nodes=8", "gpus_per_node=8",
         "experiment=txt2img_kl8", "train.global_batch_size=100", "train.micro_batch_size=3",
         'data.urls=["s3://laion/{00000..41407}.tar"]', "model.first_stage_ckpt=s3://ckpt/kl_f8.pt",
         "checkpoint.root=s3://ckpt/runs", f"output_dir={tmp_path}", "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert result.returncode != 0
    assert "invalid for 8x8 processes" in result.stderr and "train.global_batch_size=100" in result.stderr
    assert not (tmp_path / "txt2img_kl8").exists()


def test_nccl_defaults_are_exported_and_each_can_be_overridden_or_removed(tmp_path):
    script, _ = render(["nodes=2", "check_config=false", "--dry-run"], tmp_path)
    for line in ("export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "export NCCL_DEBUG=WARN",
                 "export TORCH_NCCL_TRACE_BUFFER_SIZE=2000", "export TORCH_NCCL_DUMP_ON_TIMEOUT=1"):
        assert line in script.splitlines(), line
    script, _ = render(["nodes=2", "check_config=false", "env.NCCL_DEBUG=INFO", "env.TORCH_NCCL_DUMP_ON_TIMEOUT=''",
                        "--dry-run"], tmp_path)
    lines = script.splitlines()
    assert "export NCCL_DEBUG=INFO" in lines and "export NCCL_DEBUG=WARN" not in lines
    assert "unset TORCH_NCCL_DUMP_ON_TIMEOUT" in lines and "export TORCH_NCCL_DUMP_ON_TIMEOUT=1" not in lines
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_job_event_lines_are_json(tmp_path):
    """The rendered ``job_event`` function, run by bash with and without extra fields, appends one
    JSON object per call to ``job_events.jsonl`` (what test_slurm.py and tools read, not log lines)."""
    import json

    script, _ = render(["nodes=2", "check_config=false", "--dry-run"], tmp_path)
    start = script.index('JOB_EVENTS="$LOG_DIR/job_events.jsonl"')
    function = script[start:script.index("\n}\n", start) + 3]
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    calls = '\n'.join([
        'job_event start "\\"nodes\\": \\"node[1-2]\\", \\"rendezvous\\": \\"node1:20042\\""',
        'job_event step_end "\\"status\\": 143"',
        'job_event signal \'"signal": "USR1"\'',
        'job_event bare',
    ])
    subprocess.run(["bash", "-c", f'set -uo pipefail\nLOG_DIR={log_dir}\nSLURM_JOB_ID=42\nRESTART=1\n{function}\n{calls}'],
                   check=True)
    events = [json.loads(line) for line in (log_dir / "job_events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["job_id"], e["restart"]) for e in events] == [
        ("start", 42, 1), ("step_end", 42, 1), ("signal", 42, 1), ("bare", 42, 1)]
    assert events[0]["nodes"] == "node[1-2]" and events[0]["rendezvous"] == "node1:20042"
    assert events[1]["status"] == 143 and events[2]["signal"] == "USR1" and set(events[3]) == {
        "event", "time", "job_id", "restart"}
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["time"]) for e in events)
