"""The ``cluster`` section: where labels run, for any batch scheduler Parsl supports.

``kind: local`` runs labels in worker processes on this machine. Every other kind names a Parsl
provider (``slurm``, ``pbspro``, ``lsf``, ``sge``, ``torque``, ``condor``): blocks of label workers
are batch jobs, requested while labels queue up and released when idle. The section keeps Parsl's
own split:

- ``provider``: what one block asks the scheduler for. The keys every scheduler shares are typed
  here (walltime, blocks, nodes, extra directives, worker_init); any other key is a keyword
  argument of Parsl's provider class for that kind (``partition`` for SLURM, ``queue`` and
  ``select_options`` for PBS Pro, ``project`` for LSF, ...), checked against the class's own
  signature when the config is read, so a typo is an error naming the key, not a surprise at the
  first block.
- ``launcher``: how the worker pool starts inside a block.
- ``executor``: Parsl's HighThroughputExecutor: workers per node and how blocks scale.

Machine-specific values usually come from a site profile (``aimspax_like.site``), so a campaign
file moves between machines unchanged.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from aimspax_like.config_base import _Strict, lines
from aimspax_like.errors import ConfigError

BATCH_KINDS = ("slurm", "pbspro", "lsf", "sge", "torque", "condor")
"""Schedulers whose Parsl provider the ``cluster.kind`` can name."""

DIRECTIVE_PREFIX = {"slurm": "#SBATCH", "pbspro": "#PBS", "torque": "#PBS", "lsf": "#BSUB", "sge": "#$"}
"""How each scheduler's batch script marks an option line; HTCondor takes plain submit lines."""

_WALLTIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")


def walltime_seconds(walltime: str) -> int:
    """``HH:MM:SS`` in seconds (the format every provider's ``walltime`` takes)."""
    match = _WALLTIME.match(walltime)
    if match is None:
        raise ValueError(f"{walltime!r} is not HH:MM:SS")
    hours, minutes, seconds = (int(part) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def check_walltime(value: str) -> str:
    """A field validator's body for walltimes: ``HH:MM:SS`` and longer than zero."""
    if _WALLTIME.match(value) is None:
        raise ValueError("must be HH:MM:SS")
    if walltime_seconds(value) == 0:
        raise ValueError("must be longer than 00:00:00")
    return value


class LocalCluster(_Strict):
    """Labels in worker processes on this machine."""

    kind: Literal["local"] = "local"
    max_workers: int = Field(2, ge=1, description="Label worker processes.")
    cores_per_worker: float = Field(1.0, gt=0, description="Cores one label uses (OMP_NUM_THREADS).")


class ProviderConfig(_Strict):
    """What each block (one batch job) asks the scheduler for: Parsl's provider for ``cluster.kind``.

    The keys below are shared by every scheduler. Any other key is passed to Parsl's provider
    class unchanged (``partition``, ``account``, ``qos``, ``constraint``, ``mem_per_node``,
    ``exclusive`` for SLURM; ``queue``, ``account``, ``select_options``, ``cpus_per_node`` for PBS
    Pro; ``queue``, ``project``, ``cores_per_node`` for LSF; ...) and must be one of its keyword
    arguments.
    """

    model_config = ConfigDict(extra="allow")

    walltime: str = Field("01:00:00", description="Wall limit of one block, HH:MM:SS.")
    nodes_per_block: int = Field(1, ge=1)
    init_blocks: int = Field(0, ge=0, description="Blocks requested when the campaign starts.")
    min_blocks: int = Field(0, ge=0, description="Blocks kept even when idle.")
    max_blocks: int = Field(1, ge=1, validate_default=True, description="Never more blocks than this.")
    scheduler_options: list[str] = Field(
        default_factory=list,
        description="Extra option lines of the block script; '--x' / '-x' gets the scheduler's prefix "
        "('#SBATCH ', '#PBS ', '#BSUB ', '#$ ').",
    )
    worker_init: list[str] = Field(
        default_factory=list, description="Shell lines run before the workers start (module load, venv)."
    )

    _split_lines = field_validator("scheduler_options", "worker_init", mode="before")(lines)

    _hh_mm_ss = field_validator("walltime")(check_walltime)

    @field_validator("max_blocks")
    @classmethod
    def _covers_min_and_init(cls, value: int, info: ValidationInfo) -> int:
        for key in ("min_blocks", "init_blocks"):
            if key in info.data and info.data[key] > value:
                raise ValueError(f"must be at least {key} ({info.data[key]})")
        return value

    def options(self) -> dict[str, Any]:
        """The keys passed through to Parsl's provider class as they are."""
        return dict(self.model_extra or {})


LAUNCHER_KINDS = ("single_node", "simple", "srun", "mpiexec", "mpirun", "aprun", "jsrun")
PER_NODE_LAUNCHERS = frozenset({"srun", "mpiexec", "mpirun", "aprun", "jsrun"})
"""Launchers that start one worker pool on every node of a block (the others start one per block)."""


class LauncherConfig(_Strict):
    """How the worker pool starts inside a block (Parsl's launchers).

    ``single_node`` (Parsl's default) and ``simple`` start one pool in the batch script, which
    leaves the allocation free for a reference that launches itself (``srun -n 128 aims.x``,
    ``mpiexec -n 128 aims.x``); ``srun``, ``mpiexec``, ``mpirun``, ``aprun`` and ``jsrun`` start one
    pool per node as a parallel job step, for Python references on multi-node blocks (an MPI
    launch inside such a step would wait for cores the step already holds).
    """

    kind: Literal["single_node", "simple", "srun", "mpiexec", "mpirun", "aprun", "jsrun"] = "single_node"
    overrides: str = Field("", description="Extra options of the launcher command (per-node launchers only).")

    @field_validator("overrides")
    @classmethod
    def _overrides_need_a_parallel_launcher(cls, value: str, info: ValidationInfo) -> str:
        kind = info.data.get("kind")
        if value and kind is not None and kind not in PER_NODE_LAUNCHERS:
            raise ValueError(f"only used by {', '.join(sorted(PER_NODE_LAUNCHERS))}, not '{kind}'")
        return value


class ExecutorConfig(_Strict):
    """Parsl's ``HighThroughputExecutor``: the workers of each node and how blocks scale."""

    workers_per_node: int = Field(1, ge=1, description="Labels running at once on one node.")
    cores_per_worker: float = Field(1.0, gt=0, description="Cores one label uses (OMP_NUM_THREADS).")
    max_idletime_s: float = Field(120.0, ge=0, description="Idle seconds before a block is released.")
    strategy_period_s: float = Field(5.0, gt=0, description="Seconds between Parsl's scaling decisions.")
    address: str | None = Field(
        None, description="Host or IP the compute nodes reach this driver at; default: its hostname."
    )
    interface: str | None = Field(None, description="Network interface to take the address from, e.g. ib0.")
    worker_python: str | None = Field(
        None, description="Python on the compute nodes; default: the driver's own (shared filesystem)."
    )

    @field_validator("interface")
    @classmethod
    def _one_address_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and info.data.get("address"):
            raise ValueError("give address or interface, not both")
        return value


class BatchCluster(_Strict):
    """Labels in batch jobs (Parsl blocks) of the scheduler ``kind``, scaled with the label queue."""

    kind: Literal["slurm", "pbspro", "lsf", "sge", "torque", "condor"] = "slurm"
    provider: ProviderConfig = Field(default_factory=ProviderConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @model_validator(mode="after")
    def _provider_fits_the_scheduler(self) -> BatchCluster:
        """Prefix bare option lines and check the passed-through keys against Parsl's class.

        Raises ``ConfigError`` itself (not a pydantic error) so the message names the exact key,
        ``cluster.provider.<key>``, which a model-level check could not.
        """
        from aimspax_like.execution.providers import check_provider_options

        prefix = DIRECTIVE_PREFIX.get(self.kind)
        directives = []
        for line in self.provider.scheduler_options:
            if prefix is not None and line.startswith("-"):
                line = f"{prefix} {line}"
            if prefix is not None and not line.startswith(f"{prefix} "):
                raise ConfigError("cluster.provider.scheduler_options",
                                  f"'{line}' is neither '{prefix} ...' nor an option '--...' of {self.kind}")
            directives.append(line)
        if directives != self.provider.scheduler_options:
            self.provider.scheduler_options = directives
        check_provider_options(self.kind, self.provider.options(), self.launcher.kind)
        return self

    @property
    def pools_per_block(self) -> int:
        """Worker pools one block runs: one per node for per-node launchers, else one."""
        return self.provider.nodes_per_block if self.launcher.kind in PER_NODE_LAUNCHERS else 1

    @property
    def max_workers(self) -> int:
        """Labels the cluster can run at once: every block, every pool, every worker."""
        return self.provider.max_blocks * self.pools_per_block * self.executor.workers_per_node


SlurmCluster = BatchCluster
"""The name this section had when SLURM was the only scheduler."""


def _local_unless_named(value: Any) -> Any:
    # Configs written before the batch kinds existed may leave out 'kind: local'.
    return {**value, "kind": "local"} if isinstance(value, dict) and "kind" not in value else value


ClusterConfig = Annotated[
    LocalCluster | BatchCluster,
    Field(discriminator="kind"),
    BeforeValidator(_local_unless_named),
]
