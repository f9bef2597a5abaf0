"""Submit a multi-node training run to SLURM.

    python launch/slurm.py experiment=txt2img_kl8 nodes=8 gpus_per_node=8 partition=gpu \
        time=48:00:00 [account=...] [training overrides...] [--dry-run]

Arguments whose key is a field of :class:`SlurmConfig` configure the job; every other ``key=value``
is a Hydra override for ``launch/train.py``. The training config is composed and validated here,
with the job's world size, so a typo fails now rather than after hours in the queue.

The rendered sbatch script (``launch/templates/sbatch.sh.j2``) is kept in the run directory
``<output_dir>/<run_id>/slurm/job.sbatch``. It starts one torchrun agent per node with ``srun``,
rendezvous (c10d) on the first node of the allocation, forwards the stop signal and requeues the job
after a preemption checkpoint; the run id is fixed at submission, so every node and every requeue
resumes the same run. ``--dry-run`` prints the script and submits nothing. See docs/launch.md.

The script never holds a credential: one in a training override (URL userinfo, a presigned URL's
signature, a secret environment value) is replaced by ``${oc.env:LDM_SCALE_SECRET_<n>}``, and an
``env.`` entry with a secret name or value is left out; both travel in sbatch's own environment,
which SLURM hands to the job (:func:`hide_secrets`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
import secrets
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # like launch/train.py: runnable from a checkout without installing

from ldm_scale import storage  # noqa: E402
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE = "sbatch.sh.j2"
SECRET_ENV_PREFIX = "LDM_SCALE_SECRET_"


@dataclass
class SlurmConfig:
    """The job's shape and scheduling; everything else on the command line goes to training.

    gpus_per_node: GPUs requested per node (``--gpus-per-node``); 0 on CPU partitions.
    nproc_per_node: training processes per node; 0 means one per GPU (or 1 without GPUs).
    cpus_per_task: CPUs for each node's task (agent + workers + data loaders); 0 takes whole nodes
        (``--exclusive``, all of the node's CPUs).
    signal_seconds: lead time of the stop signal before the time limit. It must cover up to
        ``preemption.check_every`` steps plus writing one checkpoint (SLURM may send it up to 60 s early).
    max_restarts: torchrun restarts of the whole worker group after a worker failure; the workers
        resume from the latest checkpoint.
    rdzv_port: c10d rendezvous port on the first node; 0 derives it from the job id.
    run_id: fixed run id (resubmit with an existing one to resume that run); default generated.
    setup: shell lines run before the job step (``module load ...``, ``source venv/bin/activate``).
    env: extra environment for the training processes (e.g. ``env.NCCL_SOCKET_IFNAME=ib0``).
    sbatch_args: extra ``#SBATCH`` options, verbatim (e.g. ``sbatch_args='[--reservation=r1]'``).
    check_config: compose and validate the training config before submitting (launch/train.py only).
    """

    nodes: int = 1
    gpus_per_node: int = 8
    nproc_per_node: int = 0
    cpus_per_task: int = 0
    mem: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time: str = "24:00:00"
    job_name: Optional[str] = None
    signal_seconds: int = 300
    requeue: bool = True
    max_restarts: int = 3
    rdzv_port: int = 0
    run_id: Optional[str] = None
    python: str = sys.executable
    train_script: str = str(REPO_ROOT / "launch" / "train.py")
    setup: List[str] = field(default_factory=list)
    # NCCL defaults (each overridable with env.<NAME>=..., or removed with env.<NAME>=''): fail fast
    # on a communicator error instead of hanging, and on a collective timeout dump the flight
    # recorder (the last 2000 collectives of every rank) so the hung one can be named.
    env: Dict[str, str] = field(default_factory=lambda: {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                                                         "NCCL_DEBUG": "WARN",
                                                         "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
                                                         "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"})
    sbatch_args: List[str] = field(default_factory=list)
    check_config: bool = True

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or max(self.gpus_per_node, 1)


LAUNCHER_KEYS = frozenset(f.name for f in dataclasses.fields(SlurmConfig))
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class SlurmJob:
    """Everything the template needs: the launcher config plus the run's identity and arguments."""

    cfg: SlurmConfig
    run_id: str
    run_dir: Path
    workdir: Path
    train_args: List[str]
    # Credentials for the job, passed in sbatch's environment and never rendered (hide_secrets).
    secret_env: Dict[str, str] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "slurm"

    @property
    def script_path(self) -> Path:
        return self.log_dir / "job.sbatch"


def split_args(argv: Sequence[str]) -> tuple[List[str], List[str], bool]:
    """Separate launcher ``key=value`` items, training overrides and ``--dry-run``."""
    launcher, training, dry_run = [], [], False
    for arg in argv:
        if arg in ("--dry-run", "--dry_run", "dry_run=true"):
            dry_run = True
            continue
        if arg.startswith("-"):
            raise SystemExit(f"launch/slurm.py: unknown option {arg!r}; the only option is --dry-run "
                             "(everything else is key=value)")
        if "=" not in arg:
            raise SystemExit(f"launch/slurm.py: expected key=value, got {arg!r}")
        key = _key(arg).split(".", 1)[0]
        (launcher if key in LAUNCHER_KEYS else training).append(arg)
    return launcher, training, dry_run


def parse_config(dotlist: Sequence[str]) -> SlurmConfig:
    """Typed launcher config from ``key=value`` items; wrong keys or types name the fix."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # String fields are taken verbatim: YAML would read time=48:00:00 as the base-60 integer 172800.
    str_fields = {f.name for f in dataclasses.fields(SlurmConfig) if f.type in ("str", "Optional[str]")}
    verbatim = {}
    structured = []
    for item in dotlist:
        key, _, value = item.partition("=")
        if key in str_fields:
            verbatim[key] = None if value.lower() in ("null", "none") else value
        else:
            structured.append(item)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SlurmConfig), OmegaConf.from_dotlist(structured),
                                 OmegaConf.create(verbatim))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise SystemExit(f"launch/slurm.py: bad launcher argument: {exc}") from None
    assert isinstance(cfg, SlurmConfig)
    check(cfg)
    return cfg


def time_limit_seconds(time: str) -> int:
    """SLURM's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, rest = time.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def check(cfg: SlurmConfig) -> None:
    problems = []
    if cfg.nodes < 1:
        problems.append(f"nodes={cfg.nodes}: must be >= 1")
    if cfg.gpus_per_node < 0 or cfg.nproc_per_node < 0 or cfg.cpus_per_task < 0:
        problems.append("gpus_per_node, nproc_per_node and cpus_per_task must be >= 0")
    if not _TIME.match(cfg.time):
        problems.append(f"time={cfg.time!r}: use SLURM's format, e.g. 48:00:00 or 2-00:00:00")
    elif cfg.signal_seconds >= time_limit_seconds(cfg.time):
        problems.append(f"signal_seconds={cfg.signal_seconds} is not shorter than time={cfg.time}: the stop "
                        "signal would come before training starts; lower signal_seconds or raise time")
    if not 0 < cfg.signal_seconds <= 65535:
        problems.append(f"signal_seconds={cfg.signal_seconds}: must be in 1..65535 (SLURM's limit)")
    if cfg.max_restarts < 0:
        problems.append("max_restarts must be >= 0")
    if not 0 <= cfg.rdzv_port < 65536:
        problems.append(f"rdzv_port={cfg.rdzv_port}: must be a TCP port, or 0 to derive it from the job id")
    if cfg.run_id is not None and not _RUN_ID.match(cfg.run_id):
        problems.append(f"run_id={cfg.run_id!r}: use letters, digits, '.', '_' and '-' (it names directories)")
    for key in cfg.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            problems.append(f"env.{key}: not a valid environment variable name")
    for line in cfg.sbatch_args:
        if not line.startswith("--") or "\n" in line:
            problems.append(f"sbatch_args entry {storage.redact(line)!r}: give one long option per entry, "
                            "e.g. --reservation=r1")
    for what, lines in (("setup", cfg.setup), ("sbatch_args", cfg.sbatch_args)):
        for line in lines:
            if storage.redact(line) != line:
                problems.append(f"{what} entry {storage.redact(line)!r} holds a credential, which the script "
                                "would keep: export it in the shell you submit from (sbatch passes the "
                                "environment on to the job) or give it as env.<NAME>=...")
    if problems:
        raise SystemExit("launch/slurm.py: invalid launcher arguments:\n  - " + "\n  - ".join(problems))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    """The last value given for ``key`` (Hydra applies overrides in order)."""
    values = [o.split("=", 1)[1] for o in overrides if _key(o) == key and "=" in o]
    return values[-1] if values else None


def prepare(cfg: SlurmConfig, overrides: Sequence[str], workdir: Path | None = None) -> SlurmJob:
    """Fix the run id and run directory and, for launch/train.py, validate the training config.

    The run id and an absolute ``output_dir`` are passed to training as overrides, so every node and
    every requeue of the job agrees on them whatever the working directory or environment.
    """
    workdir = (workdir or Path.cwd()).resolve()
    name = cfg.job_name or _override_value(overrides, "experiment") or "ldm_scale"
    output_dir = _override_value(overrides, "output_dir")
    run_id = cfg.run_id
    if cfg.check_config:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from ldm_scale import config as config_lib

        try:
            train_cfg = config_lib.to_object(config_lib.compose(overrides))
        except (HydraException, OmegaConfBaseException, config_lib.ConfigError) as exc:
            raise SystemExit(f"launch/slurm.py: the training overrides do not compose: {exc}") from None
        try:
            config_lib.validate(train_cfg, world_size=cfg.nodes * cfg.procs_per_node)
        except config_lib.ConfigError as exc:
            raise SystemExit(f"launch/slurm.py: the training config is invalid for "
                             f"{cfg.nodes}x{cfg.procs_per_node} processes:\n{exc}") from None
        output_dir = output_dir or train_cfg.output_dir
        run_id = run_id or train_cfg.run_id
        name = cfg.job_name or train_cfg.name
    if not run_id:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_id = f"{name}-{stamp}-{secrets.token_hex(3)}"
    out = Path(output_dir or "runs")
    out = out if out.is_absolute() else workdir / out
    train_args = [o for o in overrides if _key(o) != "output_dir"] + [f"run_id={run_id}", f"output_dir={out}"]
    train_args, public_env, secret_env = hide_secrets(train_args, cfg.env)
    if secret_env and cfg.check_config:
        _check_same_config(overrides, train_args, secret_env)
    cfg = dataclasses.replace(cfg, job_name=cfg.job_name or name, env=public_env)
    return SlurmJob(cfg=cfg, run_id=run_id, run_dir=out / run_id, workdir=workdir, train_args=train_args,
                    secret_env=secret_env)


def hide_secrets(train_args: Sequence[str], env: Mapping[str, str]) -> tuple[List[str], Dict[str, str], Dict[str, str]]:
    """Split credentials out of what the script would hold: returns (training overrides, ``env.``
    entries, secret environment).

    Each credential in an override (see ``storage.replace_secrets``; or the whole value of a key
    that names one, e.g. ``+x.api_key=...``) becomes ``${oc.env:LDM_SCALE_SECRET_<n>}``, which the
    training process resolves from its environment; an ``env.`` entry whose name or value is
    secret moves as it is. The secret environment is given to sbatch, not written anywhere.
    """
    hidden: Dict[str, str] = {}

    def reference(secret: str) -> str:
        name = next((n for n, v in hidden.items() if v == secret), None)
        if name is None:
            name = f"{SECRET_ENV_PREFIX}{len(hidden)}"
            hidden[name] = secret
        return "${oc.env:" + name + "}"

    args = []
    for arg in train_args:
        key, sep, value = arg.partition("=")
        if sep and value and storage.is_secret_name(_key(arg).rsplit(".", 1)[-1]):
            args.append(key + "=" + reference(value))
        else:
            args.append(storage.replace_secrets(arg, reference))
    public_env = {}
    for key, value in env.items():
        if storage.is_secret_name(key) or storage.redact(value) != value:
            hidden[key] = value
        else:
            public_env[key] = value
    return args, public_env, hidden


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_same_config(original: Sequence[str], rewritten: Sequence[str], secret_env: Mapping[str, str]) -> None:
    """The overrides with references must compose, in the job's environment, to the config the
    original ones give (a quoting slip would otherwise surface after the queue)."""
    from ldm_scale import config as config_lib

    def keep(args: Sequence[str]) -> List[str]:
        return [a for a in args if _key(a) not in ("run_id", "output_dir")]

    want = config_lib.to_object(config_lib.compose(keep(original)))
    with _environment(secret_env):
        try:
            got = config_lib.to_object(config_lib.compose(keep(rewritten)))
        except Exception as exc:  # noqa: BLE001 - Hydra and OmegaConf raise several types
            raise SystemExit(f"launch/slurm.py: the overrides with their credentials moved to the environment do "
                             f"not compose ({storage.redact(exc)}); quote the URL values, e.g. "
                             "data.urls=\"['https://...']\"") from None
    if got != want:
        raise SystemExit("launch/slurm.py: the overrides with their credentials moved to the environment give "
                         "another config; quote the URL values, e.g. data.urls=\"['https://...']\"")


def render(job: SlurmJob) -> str:
    """The sbatch script for ``job`` (every value that reaches the shell is quoted)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             autoescape=False)
    env.filters["q"] = lambda value: shlex.quote(str(value))
    cfg = job.cfg
    values = dataclasses.asdict(cfg)
    values.update(nproc_per_node=cfg.procs_per_node, run_id=job.run_id, run_dir=str(job.run_dir),
                  log_dir=str(job.log_dir), workdir=str(job.workdir), train_args=job.train_args,
                  inherited_env=sorted(job.secret_env))
    for key in ("job_name", "partition", "account", "qos", "constraint", "mem"):
        value = values[key]
        if value is not None and not re.match(r"^[A-Za-z0-9_.,:@+\-]+$", str(value)):
            raise SystemExit(f"launch/slurm.py: {key}={value!r} contains characters sbatch options cannot take")
    return env.get_template(TEMPLATE).render(**values)


def submit(script: Path, env: Optional[Dict[str, str]] = None) -> int:
    """``sbatch`` the script; returns the job id. ``env`` (default: this process's) is the job's
    environment too: sbatch exports all of it unless told otherwise."""
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"launch/slurm.py: sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
    return int(proc.stdout.strip().split(";")[0])


def main(argv: Sequence[str]) -> int:
    launcher_args, overrides, dry_run = split_args(argv)
    job = prepare(parse_config(launcher_args), overrides)
    script = render(job)
    if dry_run:
        print(script, end="")
        return 0
    export = os.environ.get("SBATCH_EXPORT") or next(
        (a.split("=", 1)[-1] for a in job.cfg.sbatch_args if a.startswith("--export")), "ALL")
    if job.secret_env and not export.startswith("ALL"):
        raise SystemExit(f"launch/slurm.py: --export={export} would keep {', '.join(sorted(job.secret_env))} from "
                         "the job, and the script does not hold them: use --export=ALL[,...]")
    job.log_dir.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(script)
    job_id = submit(job.script_path, env={**os.environ, **job.secret_env})
    with open(job.log_dir / "jobs.txt", "a") as jobs:
        jobs.write(f"{job_id}\t{datetime.datetime.now(datetime.timezone.utc).isoformat()}\n")
    print(f"submitted job {job_id}: run {job.run_id}\n  script {job.script_path}\n  logs   {job.log_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
