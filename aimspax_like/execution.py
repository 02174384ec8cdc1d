"""Where reference labels run: the engine's only door to Parsl.

The scheduler hands a structure to a ``LabelExecutor`` and gets a plain
``concurrent.futures.Future`` back, so it can ``wait(..., FIRST_COMPLETED)`` on labels without
knowing the backend. With Parsl behind this one module, the SLURM backend
(``SlurmLabelExecutor``: blocks of workers in sbatch jobs, scaled with the label queue) lives
here too, and the rest of the engine never imports parsl.

A failed label is data (``LabelFailure``) in the future's result, including a label whose
worker process died on every try. The future raises only when the infrastructure itself broke
(e.g. the worker pool is gone), and is cancelled when the executor shuts down before it ends.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import os
import platform
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aimspax_like.errors import ConfigError

if TYPE_CHECKING:
    from ase import Atoms
    from parsl import DataFlowKernel
    from parsl.dataflow.taskrecord import TaskRecord
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import SlurmProvider

    from aimspax_like.config import LocalCluster, SlurmCluster
    from aimspax_like.reference.md_segment import SegmentRequest
    from aimspax_like.reference.results import LabelOutcome

EventHook = Callable[[str, dict[str, Any]], None]

logger = logging.getLogger(__name__)


def _placement() -> dict[str, Any]:
    """Where this process runs: host, pid, and the SLURM job and Parsl block it belongs to."""
    return {
        "host": platform.node(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "block": os.environ.get("PARSL_WORKER_BLOCK_ID"),
    }


def worker_report() -> dict[str, Any]:
    """A worker's placement and heavy modules loaded (``ParslLabelExecutor.probe``); this
    module's top-level imports are light, so shipping this function to a worker loads nothing
    heavy."""
    heavy = [name for name in ("torch", "mace", "e3nn") if name in sys.modules]
    return {**_placement(), "heavy_modules": heavy}


def label_with_placement(
    atoms: Atoms, spec: dict, workdir: str, faults: dict | None = None, seed: int | None = None
) -> tuple[LabelOutcome, dict[str, Any]]:
    """``label`` and where it ran, for executors whose workers live elsewhere (SLURM jobs).

    The outcome types stay as they are; the placement travels beside them and becomes a
    ``label_placed`` event, the record that a label ran inside a given SLURM job.
    """
    from aimspax_like.reference.label import label

    return label(atoms, spec, workdir, faults=faults, seed=seed), _placement()


class LabelExecutor(abc.ABC):
    """Runs ``aimspax_like.reference.label.label`` somewhere; ``submit`` returns a future."""

    def __init__(self, n_workers: int, on_event: EventHook | None = None) -> None:
        self._n_workers = n_workers
        self._on_event = on_event

    @property
    def n_workers(self) -> int:
        """Configured worker count: how many labels may usefully be in flight at once."""
        return self._n_workers

    @abc.abstractmethod
    def start(self) -> None:
        """Acquire the backend; returns without waiting for workers (see ``wait_ready``)."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release everything; idempotent. Futures of labels not yet finished are cancelled."""

    @abc.abstractmethod
    def _submit(
        self, atoms: Atoms, spec: dict, workdir: str, faults: dict | None, seed: int | None
    ) -> Future:
        """Backend part of ``submit``; receives private copies of the arguments."""

    def submit(
        self, atoms: Atoms, spec: dict, workdir: str, faults: dict | None = None, seed: int | None = None
    ) -> Future:
        """Queue one label and return at once; the future's result is its ``LabelOutcome``.

        The arguments are copied because the backends serialise or run the label later on
        another thread, while the caller's MD keeps moving the very same ``atoms``.
        """
        return self._submit(atoms.copy(), dict(spec), workdir, dict(faults) if faults else None, seed)

    def submit_segment(
        self, atoms: Atoms, spec: dict, workdir: str, faults: dict | None = None, seed: int | None = None,
        request: SegmentRequest | None = None,
    ) -> Future:
        """Queue a stretch of reference-driven MD (``reference.md_segment``) on a worker.

        The future's result is a ``SegmentResult`` or a ``LabelFailure``, with the same
        guarantees as a label's: the reference never runs in the driver process.
        """
        return self._submit_segment(atoms.copy(), dict(spec), workdir, dict(faults) if faults else None, seed,
                                    request)

    @abc.abstractmethod
    def _submit_segment(
        self, atoms: Atoms, spec: dict, workdir: str, faults: dict | None, seed: int | None,
        request: SegmentRequest | None,
    ) -> Future:
        """Backend part of ``submit_segment``."""

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Block until a worker can take a label; False if ``timeout`` seconds passed first."""
        return True

    def _emit(self, name: str, **payload: Any) -> None:
        if self._on_event is not None:
            self._on_event(name, payload)

    def __enter__(self) -> LabelExecutor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


class ThreadLabelExecutor(LabelExecutor):
    """Labels on threads of this process, for scheduler unit tests and debugging: NOT production.

    Labels share the GIL with training and MD, a crashing DFT code takes the campaign down and a
    hung label cannot be stopped; but it starts at once and spawns nothing, as unit tests want.
    """

    def __init__(self, max_workers: int = 2, on_event: EventHook | None = None) -> None:
        super().__init__(max_workers, on_event)
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.n_workers, thread_name_prefix="label")
            self._emit("executor_started", kind="thread", n_workers=self.n_workers)

    def _submit(
        self, atoms: Atoms, spec: dict, workdir: str, faults: dict | None, seed: int | None
    ) -> Future:
        from aimspax_like.reference.label import label

        if self._pool is None:
            raise RuntimeError("ThreadLabelExecutor.submit before start()")
        return self._pool.submit(label, atoms, spec, workdir, faults=faults, seed=seed)

    def _submit_segment(
        self, atoms: Atoms, spec: dict, workdir: str, faults: dict | None, seed: int | None,
        request: SegmentRequest | None,
    ) -> Future:
        from aimspax_like.reference.md_segment import run_segment

        if self._pool is None:
            raise RuntimeError("ThreadLabelExecutor.submit_segment before start()")
        return self._pool.submit(run_segment, atoms, spec, workdir, faults=faults, seed=seed, request=request)

    def shutdown(self) -> None:
        if self._pool is not None:
            # Queued labels are cancelled; running ones finish on their own (threads can't be killed).
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self._emit("executor_stopped", kind="thread")


def _retry_lost_workers_only(exception: Exception, task_record: TaskRecord) -> float:
    """Parsl retry cost: only a lost worker or manager is worth a retry.

    ``label`` returns calculation failures, so any other exception is a bug that would recur.
    """
    from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost

    return 1.0 if isinstance(exception, WorkerLost | ManagerLost) else math.inf


class ParslLabelExecutor(LabelExecutor):
    """Labels in Parsl worker processes on this machine (HighThroughputExecutor, LocalProvider).

    Each instance owns its ``DataFlowKernel`` instead of using the global ``parsl.load``, so two
    campaigns (or a test session) can hold executors side by side. Parsl's run folder and all
    its logs, worker logs included, go to ``run_dir/'parsl'/NNN/``, never into ``./runinfo``.
    """

    LABEL = "labels"

    def __init__(
        self,
        cluster: LocalCluster,
        run_dir: str | os.PathLike[str],
        on_event: EventHook | None = None,
        retries: int = 1,
        heartbeat_period: int = 5,
        heartbeat_threshold: int = 30,
    ) -> None:
        """``retries`` re-runs only labels whose worker died (``_retry_lost_workers_only``).

        One retry absorbs a single lost worker (an OOM kill of an innocent process, a node
        hiccup); a structure that kills its worker on every try comes back as
        ``LabelFailure(CRASHED)``. Heartbeats are tighter than Parsl's defaults (30 s / 120 s)
        because everything is local: a dead worker pool is noticed within half a minute.
        """
        super().__init__(self._worker_count(cluster), on_event)
        self.cluster = cluster
        self.parsl_dir = Path(run_dir) / "parsl"
        self.retries = retries
        self.heartbeat = (heartbeat_period, heartbeat_threshold)
        self._dfk: DataFlowKernel | None = None
        self._htex: HighThroughputExecutor | None = None
        self._apps: dict[str, Callable[..., Future]] = {}
        self._pending: set[Future] = set()
        self._lock = threading.Lock()
        self._started_at = 0.0

    @staticmethod
    def _worker_count(cluster: Any) -> int:
        """How many labels the configured workers run at once (``n_workers``)."""
        return cluster.max_workers

    def _scaling(self) -> dict[str, Any]:
        """Parsl ``Config`` scaling options; the local pool is one fixed block (Parsl's default)."""
        return {}

    def _task_functions(self) -> dict[str, Callable[..., Any]]:
        """What the 'label' and 'md_segment' apps run on a worker; values go through ``_unpack``."""
        from aimspax_like.reference.label import label
        from aimspax_like.reference.md_segment import run_segment

        return {"label": label, "md_segment": run_segment}

    def _unpack(self, value: Any, workdir: str) -> LabelOutcome:
        """The outcome in what a task function returned (here: the value itself)."""
        return value

    def _build_htex(self) -> HighThroughputExecutor:
        """HTEX on loopback only; interchange and workers run by this very interpreter.

        Parsl's default commands look ``interchange.py`` and ``process_worker_pool.py`` up on
        ``PATH``, which fails without an activated venv; ``python -m`` works either way.
        A 'slurm' kind overrides this with another provider and address.
        """
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider

        return HighThroughputExecutor(
            label=self.LABEL,
            address="127.0.0.1",
            loopback_address="127.0.0.1",
            launch_cmd=_worker_pool_command(sys.executable),
            interchange_launch_cmd=INTERCHANGE_COMMAND,
            max_workers_per_node=self.cluster.max_workers,
            cores_per_worker=self.cluster.cores_per_worker,
            heartbeat_period=self.heartbeat[0],
            heartbeat_threshold=self.heartbeat[1],
            # min_blocks=1: never scale the pool in while training leaves labels idle for minutes.
            # One OpenMP thread per worker core: xTB/PySCF with more threads than cores they
            # own oversubscribe the node and slow each label down by orders of magnitude.
            provider=LocalProvider(
                init_blocks=1, min_blocks=1, max_blocks=1,
                worker_init=f"export OMP_NUM_THREADS={max(1, int(self.cluster.cores_per_worker))}",
            ),
        )

    def start(self) -> None:
        """Start the DataFlowKernel and request the worker block; workers connect meanwhile."""
        if self._dfk is not None:
            return
        import parsl
        from parsl.config import Config

        t0 = time.perf_counter()
        self._htex = self._build_htex()
        config = Config(
            executors=[self._htex],
            run_dir=str(self.parsl_dir),
            retries=self.retries,
            retry_handler=_retry_lost_workers_only,
            usage_tracking=0,
            **self._scaling(),
        )
        # Parsl logs at DEBUG into its own parsl.log; keep that out of the user's terminal when a
        # library (mace calls logging.info on the root logger) has given the root a handler.
        # Before the DataFlowKernel starts: it logs its whole config while starting.
        for name in ("parsl", "concurrent.futures"):
            logging.getLogger(name).propagate = False
        self._dfk = parsl.DataFlowKernel(config)
        # The app functions are module-level functions (``label`` itself, or this module's light
        # wrappers): workers unpickle them by reference and so import aimspax_like.reference
        # (and this module) only, never torch or MACE.
        for name, fn in (*self._task_functions().items(), ("worker_report", worker_report)):
            self._apps[name] = parsl.python_app(fn, executors=[self.LABEL], data_flow_kernel=self._dfk)
        self._started_at = time.perf_counter()
        info = {"n_workers": self.n_workers, "run_dir": self._dfk.run_dir}
        self._emit("executor_started", kind="parsl", start_s=round(self._started_at - t0, 3), **info)

    def _run(self, app: str, *args: Any, **kwargs: Any) -> Future:
        if self._dfk is None:
            raise RuntimeError("ParslLabelExecutor used before start()")
        return self._apps[app](*args, **kwargs)

    def _submit(
        self, atoms: Atoms, spec: dict, workdir: str, faults: dict | None, seed: int | None
    ) -> Future:
        return self._submit_app("label", workdir, atoms, spec, workdir, faults=faults, seed=seed)

    def _submit_segment(
        self, atoms: Atoms, spec: dict, workdir: str, faults: dict | None, seed: int | None,
        request: SegmentRequest | None,
    ) -> Future:
        return self._submit_app("md_segment", workdir, atoms, spec, workdir, faults=faults, seed=seed,
                                request=request)

    def _submit_app(self, app: str, workdir: str, *args: Any, **kwargs: Any) -> Future:
        """Chain Parsl's AppFuture into a plain Future that we own and settle.

        Owning it lets a lost worker become ``LabelFailure(CRASHED)`` like any other crash,
        lets ``cancel()`` work (an AppFuture refuses it), and lets ``shutdown`` wake waiters.
        """
        from parsl.executors.high_throughput.errors import WorkerLost

        from aimspax_like.reference.results import FailureKind, LabelFailure

        outcome: Future = Future()
        submitted = time.perf_counter()
        with self._lock:
            self._pending.add(outcome)
        outcome.add_done_callback(self._forget)

        def settle(app_future: Future) -> None:
            with contextlib.suppress(InvalidStateError):  # cancelled or shut down meanwhile
                exc = app_future.exception()
                if exc is None:
                    outcome.set_result(self._unpack(app_future.result(), workdir))
                elif isinstance(exc, WorkerLost):
                    wall_s = time.perf_counter() - submitted
                    message = f"the label killed its worker process ({exc})"
                    outcome.set_result(LabelFailure(FailureKind.CRASHED, message, workdir, wall_s))
                else:
                    outcome.set_exception(exc)

        self._run(app, *args, **kwargs).add_done_callback(settle)
        return outcome

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def probe(self) -> Future:
        """``worker_report()`` as run by some worker (a diagnostic, not tracked by shutdown)."""
        return self._run("worker_report")

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """True once a worker process has run a probe task: registered is not yet ready."""
        try:
            self.probe().result(timeout=timeout)
        except FutureTimeoutError:
            return False
        return True

    def shutdown(self) -> None:
        """Stop workers and interchange, then cancel unfinished labels' futures (Parsl would
        leave them pending forever, and a scheduler in ``wait()`` would never wake up)."""
        if self._dfk is None:
            return
        dfk, self._dfk = self._dfk, None
        self._cleanup(dfk)
        with self._lock:
            orphans, self._pending = self._pending, set()
        for future in orphans:
            future.cancel()
        self._htex = None
        self._apps.clear()
        uptime_s = round(time.perf_counter() - self._started_at, 3)
        self._emit("executor_stopped", kind="parsl", uptime_s=uptime_s)

    def _cleanup(self, dfk: DataFlowKernel) -> None:
        """Stop Parsl: its scaling, the blocks (cancelled), the interchange and the workers."""
        # Parsl detaches its parsl.log handler at cleanup but never closes it (a ResourceWarning
        # and a leaked descriptor per executor), so we close it ourselves.
        log_file = str(Path(dfk.run_dir, "parsl.log").resolve())
        parsl_handlers = logging.getLogger("parsl").handlers
        handlers = [h for h in parsl_handlers if getattr(h, "baseFilename", "") == log_file]
        dfk.cleanup()
        for handler in handlers:
            handler.close()


# Parsl's interchange, run under a guard that ends it when the driver dies (no orphaned pools).
INTERCHANGE_COMMAND = [sys.executable, "-m", "aimspax_like.interchange_guard"]


def _worker_pool_command(python: str) -> str:
    """Parsl's worker-pool command run by ``python -m`` instead of a script looked up on PATH.

    Parsl's default looks ``process_worker_pool.py`` up on ``PATH``, which fails without an
    activated venv; ``python -m`` works either way.
    """
    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

    pool = "parsl.executors.high_throughput.process_worker_pool"
    pool_args = DEFAULT_LAUNCH_CMD.split(" ", 1)[1]  # everything after 'process_worker_pool.py'
    return f"{shlex.quote(python)} -m {pool} {pool_args}"


def slurm_provider(cluster: SlurmCluster) -> SlurmProvider:
    """Parsl's ``SlurmProvider`` (with its launcher) for a ``cluster.kind: slurm`` section.

    Constructing it runs ``sacct -X`` once (Parsl picks sacct or squeue for job status); on a
    machine without SLURM that fails fast and nothing else happens until a block is requested.
    """
    from parsl.launchers import SimpleLauncher, SingleNodeLauncher, SrunLauncher
    from parsl.providers import SlurmProvider

    provider, launcher, executor = cluster.provider, cluster.launcher, cluster.executor
    if launcher.kind == "srun":
        parsl_launcher = SrunLauncher(overrides=launcher.overrides)
    elif launcher.kind == "simple":
        parsl_launcher = SimpleLauncher()
    else:
        parsl_launcher = SingleNodeLauncher()
    # One OpenMP thread per worker core first (as for the local pool), then the user's lines, so
    # that a site's module loads or an explicit OMP_NUM_THREADS win.
    worker_init = [f"export OMP_NUM_THREADS={max(1, int(executor.cores_per_worker))}", *provider.worker_init]
    return SlurmProvider(
        partition=provider.partition,
        account=provider.account,
        qos=provider.qos,
        constraint=provider.constraint,
        nodes_per_block=provider.nodes_per_block,
        mem_per_node=provider.mem_per_node,
        init_blocks=provider.init_blocks,
        min_blocks=provider.min_blocks,
        max_blocks=provider.max_blocks,
        parallelism=_parallelism(cluster),
        walltime=provider.walltime,
        scheduler_options="\n".join(provider.scheduler_options),
        worker_init="\n".join(worker_init),
        exclusive=provider.exclusive,
        launcher=parsl_launcher,
    )


def _parallelism(cluster: SlurmCluster) -> float:
    """Parsl's ``parallelism`` that makes its block arithmetic match the launcher.

    Parsl counts ``workers_per_node * nodes_per_block`` slots per block, which is true for
    ``srun`` (one pool per node). ``single_node`` and ``simple`` start one pool per block (whose
    labels use all its nodes, e.g. ``srun -n 256 aims.x`` over two nodes), so a block has only
    ``workers_per_node`` slots; scaling the demand by ``nodes_per_block`` gives Parsl exactly
    one block per ``workers_per_node`` queued labels, both when scaling out and in.
    """
    return 1.0 if cluster.launcher.kind == "srun" else float(cluster.provider.nodes_per_block)


class _BlockMonitor:
    """Turns Parsl's block bookkeeping into events: requested, running, released, workers.

    Parsl has no callback for block changes: its scaling strategy submits and cancels sbatch
    jobs on its own ``JobStatusPoller`` thread and only records them in the executor
    (``blocks_to_job_id``, ``status_facade``; the interchange knows which workers connected).
    So this thread reads those every ``period`` seconds and emits one event per change.

    It only reads: it never submits or cancels a job and never touches a label, so it cannot
    change scaling or hold up the scheduler (which never waits on it). It asks the interchange
    through Parsl's own locked command channel, as the strategy does, and is stopped before
    that channel closes. ``SlurmProvider`` refreshes job states from squeue only every 60 s, so
    a block counts as running as soon as one of its workers connects.
    """

    def __init__(self, htex: HighThroughputExecutor, emit: Callable[..., None], period: float) -> None:
        self._htex = htex
        self._emit = emit
        self._period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._blocks: dict[str, str] = {}  # block id -> 'requested' | 'running' | 'released'
        self._jobs: dict[str, str | None] = {}  # block id -> SLURM job id
        self._workers: dict[str, int] = {}  # block id -> connected workers

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="aimspax-block-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling; a poll stuck on a dead interchange is abandoned (daemon thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self.poll()
            except Exception:  # never let a bookkeeping hiccup end the monitoring
                logger.debug("block monitor poll failed", exc_info=True)

    @property
    def active_blocks(self) -> int:
        return sum(state != "released" for state in self._blocks.values())

    def states(self) -> dict[str, str]:
        return dict(self._blocks)

    def poll(self, ask_interchange: bool = True, reason: str | None = None) -> None:
        """Emit the changes since the last poll; ``ask_interchange=False`` after shutdown."""
        from parsl.jobs.states import TERMINAL_STATES, JobState

        jobs = _snapshot(self._htex.blocks_to_job_id)
        status = _snapshot(self._htex.status_facade)
        managers = self._htex.connected_managers() if ask_interchange else []
        workers: dict[str, int] = {}
        for manager in managers:
            if manager.get("active"):
                block = str(manager.get("block_id"))
                workers[block] = workers.get(block, 0) + int(manager.get("worker_count", 0))

        for block in sorted({*jobs, *status}, key=_block_order):
            job_id = jobs.get(block, self._jobs.get(block))
            self._jobs[block] = job_id
            if block not in self._blocks:
                self._blocks[block] = "requested"
                self._emit("block_requested", block=block, job_id=job_id, active_blocks=self.active_blocks)
            job_status = status.get(block)
            state = job_status.state if job_status is not None else None
            if self._blocks[block] == "requested" and (workers.get(block) or state == JobState.RUNNING):
                self._blocks[block] = "running"
                self._emit("block_running", block=block, job_id=job_id, active_blocks=self.active_blocks)
        if workers != self._workers:
            self._workers = workers
            self._emit("workers", connected=sum(workers.values()), blocks=dict(workers))
        for block, job_status in sorted(status.items(), key=lambda item: _block_order(item[0])):
            if self._blocks.get(block) != "released" and job_status.state in TERMINAL_STATES:
                self._blocks[block] = "released"
                state_name = job_status.state.name
                if job_status.state == JobState.COMPLETED and not reason:
                    # Without SLURM accounting Parsl reads squeue, where a finished job is simply
                    # gone, and calls it COMPLETED, a cancelled one (scancel) included: ask
                    # scontrol, which remembers a job for MinJobAge (300 s by default).
                    state_name = slurm_job_state(self._jobs.get(block)) or state_name
                fields = {"state": state_name,
                          "reason": reason or ("cancelled" if state_name == "CANCELLED"
                                               else _release_reason(job_status.state))}
                if job_status.message:
                    fields["message"] = job_status.message
                self._emit("block_released", block=block, job_id=self._jobs.get(block),
                           active_blocks=self.active_blocks, **fields)


def slurm_job_state(job_id: str | None) -> str | None:
    """SLURM's own final state of a job (CANCELLED, COMPLETED, TIMEOUT, ...), None if unknown."""
    import shutil
    import subprocess

    if not job_id or shutil.which("scontrol") is None:
        return None
    try:
        done = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    for field in done.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1] or None
    return None


def _snapshot(mapping: dict) -> dict:
    """A copy of a dict that Parsl's threads may be resizing meanwhile."""
    for _ in range(10):
        try:
            return dict(mapping)
        except RuntimeError:  # "dictionary changed size during iteration"
            time.sleep(0.01)
    return {}


def _block_order(block: str) -> tuple[int, str]:
    return (int(block), block) if block.isdigit() else (1 << 30, block)


def _release_reason(state: Any) -> str:
    from parsl.jobs.states import JobState

    if state == JobState.SCALED_IN:
        return "scaled_in"  # cancelled by Parsl's strategy: idle longer than max_idletime
    if state in (JobState.COMPLETED, JobState.TIMEOUT):
        return "ended"  # left SLURM on its own, e.g. at the end of its walltime
    return "failed"


class SlurmLabelExecutor(ParslLabelExecutor):
    """Labels in Parsl workers inside SLURM jobs: blocks scale with the label queue.

    Parsl's ``htex_auto_scale`` strategy requests blocks (sbatch jobs) while labels wait for a
    worker, never more than ``max_blocks``, and cancels blocks idle for ``max_idletime_s`` down to
    ``min_blocks``. Every block change and worker count becomes an event (``_BlockMonitor``);
    every label's SLURM job id becomes a ``label_placed`` event. The interchange runs here, on
    the driver, and listens on an address the compute nodes can reach.
    """

    # The strategy polls its executors' blocks this often; the monitor reads the result.
    MONITOR_PERIOD_S = 1.0

    def __init__(
        self,
        cluster: SlurmCluster,
        run_dir: str | os.PathLike[str],
        on_event: EventHook | None = None,
        retries: int = 1,
        heartbeat_period: int = 10,
        heartbeat_threshold: int = 60,
    ) -> None:
        """Heartbeats are looser than the local pool's: workers sit across a network now."""
        super().__init__(cluster, run_dir, on_event, retries, heartbeat_period, heartbeat_threshold)
        self._monitor: _BlockMonitor | None = None
        self._emit_lock = threading.Lock()

    @staticmethod
    def _worker_count(cluster: Any) -> int:
        executor, provider = cluster.executor, cluster.provider
        pools_per_block = provider.nodes_per_block if cluster.launcher.kind == "srun" else 1
        return provider.max_blocks * pools_per_block * executor.workers_per_node

    def _scaling(self) -> dict[str, Any]:
        executor = self.cluster.executor
        return {
            "strategy": "htex_auto_scale",
            "max_idletime": executor.max_idletime_s,
            "strategy_period": executor.strategy_period_s,
        }

    def _task_functions(self) -> dict[str, Callable[..., Any]]:
        from aimspax_like.reference.md_segment import segment_with_placement

        return {"label": label_with_placement, "md_segment": segment_with_placement}

    def _unpack(self, value: Any, workdir: str) -> LabelOutcome:
        outcome, placement = value
        try:
            self._emit("label_placed", workdir=workdir, ok=outcome.ok, **placement)
        except Exception:  # a broken event hook must not leave the label's future unsettled
            logger.warning("label_placed event failed", exc_info=True)
        return outcome

    def _emit(self, name: str, **payload: Any) -> None:
        # The monitor thread and Parsl's result thread both emit: one event at a time.
        with self._emit_lock:
            super()._emit(name, **payload)

    def address(self) -> str:
        """The address workers connect to: ``executor.address`` / ``interface`` or the hostname."""
        from parsl.addresses import address_by_hostname, address_by_interface

        executor = self.cluster.executor
        try:
            if executor.interface:
                return address_by_interface(executor.interface)
            if executor.address:
                return socket.gethostbyname(executor.address)
            return address_by_hostname()
        except OSError as exc:
            key = "interface" if executor.interface else "address"
            raise ConfigError(f"cluster.executor.{key}", f"cannot resolve an address: {exc}") from None

    def _build_htex(self) -> HighThroughputExecutor:
        """HTEX whose blocks are SLURM jobs; the worker pool runs ``worker_python -m ...``."""
        from parsl.executors import HighThroughputExecutor

        executor = self.cluster.executor
        return HighThroughputExecutor(
            label=self.LABEL,
            address=self.address(),
            loopback_address="127.0.0.1",
            launch_cmd=_worker_pool_command(executor.worker_python or sys.executable),
            interchange_launch_cmd=INTERCHANGE_COMMAND,
            max_workers_per_node=executor.workers_per_node,
            cores_per_worker=executor.cores_per_worker,
            heartbeat_period=self.heartbeat[0],
            heartbeat_threshold=self.heartbeat[1],
            provider=slurm_provider(self.cluster),
        )

    def start(self) -> None:
        if self._dfk is not None:
            return
        super().start()
        assert self._htex is not None
        self._emit(
            "slurm_executor", address=self._htex.address, max_blocks=self.cluster.provider.max_blocks,
            min_blocks=self.cluster.provider.min_blocks, max_idletime_s=self.cluster.executor.max_idletime_s,
        )
        self._monitor = _BlockMonitor(self._htex, self._emit, self.MONITOR_PERIOD_S)
        self._monitor.start()

    def block_states(self) -> dict[str, str]:
        """Each block the monitor has seen: 'requested', 'running' or 'released'."""
        monitor = self._monitor
        return monitor.states() if monitor is not None else {}

    def _cleanup(self, dfk: DataFlowKernel) -> None:
        """Stop the monitor, let Parsl cancel the blocks, then log their release."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop()
            with contextlib.suppress(Exception):  # last look while the interchange still answers
                monitor.poll()
        htex = self._htex
        super()._cleanup(dfk)
        if monitor is not None and htex is not None:
            with contextlib.suppress(Exception):
                monitor.poll(ask_interchange=False, reason="shutdown")


_EXECUTOR_KINDS: dict[str, type[ParslLabelExecutor]] = {"local": ParslLabelExecutor, "slurm": SlurmLabelExecutor}


def make_label_executor(
    cluster_config: LocalCluster | SlurmCluster,
    run_dir: str | os.PathLike[str],
    on_event: EventHook | None = None,
) -> LabelExecutor:
    """The (not yet started) executor for the campaign's ``cluster`` section."""
    kind = getattr(cluster_config, "kind", None)
    cls = _EXECUTOR_KINDS.get(str(kind))
    if cls is None:
        raise ConfigError("cluster.kind", f"unknown cluster kind {kind!r}")
    return cls(cluster_config, run_dir, on_event=on_event)
