"""Parsl providers and launchers built from the ``cluster`` section, for any scheduler by name.

One table maps ``cluster.kind`` to Parsl's provider class and ``cluster.launcher.kind`` to its
launcher class; the provider's keyword arguments are the section's shared keys plus whatever
else the user wrote, checked against the class's own signature (``check_provider_options``), so a
new Parsl keyword works without a change here and a misspelt one is refused by name.

``block_script`` renders the batch script Parsl would submit for one block, through the
provider's own ``submit`` with the submit command caught instead of run, so what a user reviews
is exactly what the scheduler would get.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import tempfile
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aimspax_like.errors import ConfigError

if TYPE_CHECKING:
    from parsl.launchers.base import Launcher
    from parsl.providers.base import ExecutionProvider

    from aimspax_like.cluster_config import BatchCluster, LocalCluster

PROVIDER_CLASSES = {
    "local": "parsl.providers:LocalProvider",
    "slurm": "parsl.providers:SlurmProvider",
    "pbspro": "parsl.providers:PBSProProvider",
    "lsf": "parsl.providers:LSFProvider",
    "sge": "parsl.providers:GridEngineProvider",
    "torque": "parsl.providers:TorqueProvider",
    "condor": "parsl.providers:CondorProvider",
}
LAUNCHER_CLASSES = {
    "single_node": "parsl.launchers:SingleNodeLauncher",
    "simple": "parsl.launchers:SimpleLauncher",
    "srun": "parsl.launchers:SrunLauncher",
    "mpiexec": "parsl.launchers:MpiExecLauncher",
    "mpirun": "parsl.launchers:MpiRunLauncher",
    "aprun": "parsl.launchers:AprunLauncher",
    "jsrun": "parsl.launchers:JsrunLauncher",
}
SCHEDULER_COMMANDS = {
    "slurm": ("sbatch", "squeue", "scancel"),
    "pbspro": ("qsub", "qstat", "qdel"),
    "torque": ("qsub", "qstat", "qdel"),
    "lsf": ("bsub", "bjobs", "bkill"),
    "sge": ("qsub", "qstat", "qdel"),
    "condor": ("condor_submit", "condor_q", "condor_rm"),
}
"""What Parsl's provider runs to submit, watch and cancel blocks."""

# Keyword arguments set from other parts of the section, never by hand in 'provider'.
_OWNED = {"launcher": "cluster.launcher", "parallelism": "computed from cluster.launcher and nodes_per_block"}
_SHARED = ("walltime", "nodes_per_block", "init_blocks", "min_blocks", "max_blocks", "scheduler_options",
           "worker_init")


def _load(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.cache
def provider_keywords(kind: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments of Parsl's provider class for ``kind``."""
    cls = _load(PROVIDER_CLASSES[kind])
    parameters = dict(inspect.signature(cls.__init__).parameters)
    parameters.pop("self", None)
    return parameters


def _type_hints(kind: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(_load(PROVIDER_CLASSES[kind]).__init__)
    except Exception:  # a hint that does not resolve: fall back to the defaults' types
        return {}


def check_provider_options(kind: str, options: dict[str, Any], launcher: str = "single_node") -> None:
    """Raise ``ConfigError('cluster.provider.<key>', ...)`` for a key Parsl's class would refuse.

    A key must be a keyword argument of the class; its value must fit the argument's annotation,
    or, where Parsl gives none, the type of its default (an int default takes ints, a bool one
    bools, a string one strings; a None default takes any scalar).
    """
    from pydantic import TypeAdapter, ValidationError

    parameters = provider_keywords(kind)
    cls_name = PROVIDER_CLASSES[kind].rsplit(":", 1)[1]
    missing = [key for key in _SHARED if kind != "local" and key not in parameters]
    if missing:  # every batch provider takes these today; a Parsl release that drops one must show
        raise ConfigError(f"cluster.provider.{missing[0]}", f"Parsl's {cls_name} no longer takes '{missing[0]}'")
    hints = _type_hints(kind)
    for key, value in options.items():
        where = f"cluster.provider.{key}"
        if key in _OWNED:
            raise ConfigError(where, f"set by aimspax-like ({_OWNED[key]}), not in cluster.provider")
        parameter = parameters.get(key)
        if parameter is None or parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            known = ", ".join(sorted(set(parameters) - set(_OWNED) - {"cmd_timeout"}))
            raise ConfigError(where, f"unknown key: not an argument of Parsl's {cls_name} (it takes: {known})")
        hint = hints.get(key)
        if hint is not None:
            try:
                TypeAdapter(hint).validate_python(value, strict=True)
            except ValidationError:
                raise ConfigError(where, f"{value!r} does not fit Parsl's {cls_name}.{key} "
                                  f"({getattr(hint, '__name__', hint)})") from None
            continue
        _check_like_default(where, value, parameter.default, cls_name, key)


def _check_like_default(where: str, value: Any, default: Any, cls_name: str, key: str) -> None:
    if default is None or default is inspect.Parameter.empty:
        if not isinstance(value, str | int | float | bool | list | dict):
            raise ConfigError(where, f"{value!r} is no value Parsl's {cls_name}.{key} can take")
        return
    expected: tuple[type, ...]
    if isinstance(default, bool):
        expected = (bool,)
    elif isinstance(default, int):
        expected = (int,)
    elif isinstance(default, float):
        expected = (int, float)
    else:
        expected = (type(default),)
    wrong_bool = isinstance(value, bool) and bool not in expected
    if wrong_bool or not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in expected)
        raise ConfigError(where, f"{value!r} is not a {names}, as Parsl's {cls_name}.{key} expects")


def build_launcher(cluster: BatchCluster) -> Launcher:
    """Parsl's launcher for ``cluster.launcher``; ``overrides`` go to launchers that take them."""
    launcher = cluster.launcher
    cls = _load(LAUNCHER_CLASSES[launcher.kind])
    if launcher.overrides:
        return cls(overrides=launcher.overrides)
    return cls()


def parallelism(cluster: BatchCluster) -> float:
    """Parsl's ``parallelism`` that makes its block arithmetic match the launcher.

    Parsl counts ``workers_per_node * nodes_per_block`` slots per block, which is true for
    per-node launchers (one pool per node). ``single_node`` and ``simple`` start one pool per
    block (whose labels use all its nodes, e.g. ``srun -n 256 aims.x`` over two nodes), so a
    block has only ``workers_per_node`` slots; scaling the demand by ``nodes_per_block`` gives
    Parsl exactly one block per ``workers_per_node`` queued labels, scaling out and in.
    """
    return float(cluster.provider.nodes_per_block) / cluster.pools_per_block


def omp_line(cores_per_worker: float) -> str:
    """One OpenMP thread per worker core: xTB/PySCF with more threads than cores they own
    oversubscribe the node and slow each label down by orders of magnitude."""
    return f"export OMP_NUM_THREADS={max(1, int(cores_per_worker))}"


def build_provider(cluster: BatchCluster | LocalCluster) -> ExecutionProvider:
    """Parsl's provider for the section: the local pool, or blocks of the batch scheduler ``kind``.

    Constructing a ``SlurmProvider`` runs ``sacct -X`` once (Parsl picks sacct or squeue for job
    status); on a machine without SLURM that fails fast and nothing else happens until a block
    is requested. The same holds for the other schedulers' status commands.
    """
    if cluster.kind == "local":
        # min_blocks=1: never scale the pool in while training leaves labels idle for minutes.
        return _load(PROVIDER_CLASSES["local"])(
            init_blocks=1, min_blocks=1, max_blocks=1, worker_init=omp_line(cluster.cores_per_worker))
    provider = cluster.provider
    # Our OMP line first, then the user's lines, so that a site's module loads or an explicit
    # OMP_NUM_THREADS win.
    worker_init = [omp_line(cluster.executor.cores_per_worker), *provider.worker_init]
    keywords: dict[str, Any] = {
        "nodes_per_block": provider.nodes_per_block,
        "init_blocks": provider.init_blocks,
        "min_blocks": provider.min_blocks,
        "max_blocks": provider.max_blocks,
        "parallelism": parallelism(cluster),
        "walltime": provider.walltime,
        "scheduler_options": "\n".join(provider.scheduler_options),
        "worker_init": "\n".join(worker_init),
        "launcher": build_launcher(cluster),
        **provider.options(),
    }
    return _load(PROVIDER_CLASSES[cluster.kind])(**keywords)


_FAKE_SUBMIT_REPLY = {"lsf": "Job <4242> is submitted to queue <q>.", "condor": "1 job(s) submitted to cluster 4242."}


def block_script(cluster: BatchCluster, command: str = "WORKER_POOL_COMMAND") -> str:
    """The batch script Parsl would submit for one block of ``cluster``, without submitting it.

    Runs the provider's own ``submit`` with stand-ins for the scheduler's submit commands first
    on ``PATH`` (``sbatch``, ``qsub``, ``bsub``, ``condor_submit``): they record how they were
    called and answer with a made-up job id, so nothing reaches a real scheduler even on a
    cluster. The script file Parsl wrote is read back; ``command`` stands for the worker-pool
    command Parsl fills in.
    """
    provider = build_provider(cluster)
    reply = _FAKE_SUBMIT_REPLY.get(cluster.kind, "Submitted batch job 4242")
    with tempfile.TemporaryDirectory(prefix="aimspax-block-") as folder:
        stubs, scripts_dir, log = Path(folder, "bin"), Path(folder, "scripts"), Path(folder, "submitted")
        stubs.mkdir()
        scripts_dir.mkdir()
        for name in {"sbatch", "qsub", "bsub", "condor_submit"}:
            stub = stubs / name
            stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\necho "{reply}"\n')
            stub.chmod(0o755)
        provider.script_dir = str(scripts_dir)  # type: ignore[attr-defined]
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{stubs}{os.pathsep}{path}"
        try:
            provider.submit(command, 1, "parsl.labels.block-0")
        finally:
            os.environ["PATH"] = path
        caught = log.read_text().splitlines() if log.is_file() else []
        scripts = sorted(p for p in scripts_dir.iterdir() if p.is_file())
        if not scripts or not caught:
            raise RuntimeError(f"Parsl's {type(provider).__name__} submitted no script (ran: {caught})")
        # Parsl writes the script and the block's logs to its run folder; name that, not ours.
        text = scripts[0].read_text().replace(str(scripts_dir), "RUN_DIR/parsl/NNN/submit_scripts")
        submit = " ".join(caught[-1].split()).replace(str(scripts[0]), "SCRIPT")
    # Some options travel on the submit command, not in the script (PBS: -q, -A): show it.
    first, _, rest = text.partition("\n")
    return f"{first}\n# submitted by Parsl as: {submit}\n{rest}"


def worker_pool_command(python: str) -> str:
    """Parsl's worker-pool command run by ``python -m`` instead of a script looked up on PATH.

    Parsl's default looks ``process_worker_pool.py`` up on ``PATH``, which fails without an
    activated venv; ``python -m`` works either way.
    """
    import shlex

    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

    pool = "parsl.executors.high_throughput.process_worker_pool"
    pool_args = DEFAULT_LAUNCH_CMD.split(" ", 1)[1]  # everything after 'process_worker_pool.py'
    return f"{shlex.quote(python)} -m {pool} {pool_args}"


# Parsl's interchange, run under a guard that ends it when the driver dies (no orphaned pools).
INTERCHANGE_COMMAND = [sys.executable, "-m", "aimspax_like.execution.interchange_guard"]



def check_scheduler_commands(cluster: BatchCluster | LocalCluster) -> None:
    """The scheduler's submit, status and cancel commands must be on this machine's PATH."""
    import shutil

    if cluster.kind == "local":
        return
    missing = [cmd for cmd in SCHEDULER_COMMANDS[cluster.kind] if shutil.which(cmd) is None]
    if missing:
        raise ConfigError("cluster.kind", f"{cluster.kind}, but {', '.join(missing)} not found on PATH (run the "
                          "driver where the scheduler's commands are, or use cluster.kind: local)")
