"""Where reference labels run: the engine's only door to Parsl.

The scheduler hands a structure to a ``LabelExecutor`` and gets a plain
``concurrent.futures.Future`` back, so it can ``wait(..., FIRST_COMPLETED)`` on labels without
knowing the backend. With Parsl behind this one module, a second backend (a SLURM provider)
only touches this file, and the rest of the engine never imports parsl.

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
import shlex
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

    from aimspax_like.config import LocalCluster

EventHook = Callable[[str, dict[str, Any]], None]


def worker_report() -> dict[str, Any]:
    """A worker's pid and heavy modules loaded (``ParslLabelExecutor.probe``); this module's
    top-level imports are light, so shipping this function to a worker loads nothing heavy."""
    heavy = [name for name in ("torch", "mace", "e3nn") if name in sys.modules]
    return {"pid": os.getpid(), "heavy_modules": heavy}


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
        super().__init__(cluster.max_workers, on_event)
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

    def _build_htex(self) -> HighThroughputExecutor:
        """HTEX on loopback only; interchange and workers run by this very interpreter.

        Parsl's default commands look ``interchange.py`` and ``process_worker_pool.py`` up on
        ``PATH``, which fails without an activated venv; ``python -m`` works either way.
        A 'slurm' kind overrides this with another provider and address.
        """
        from parsl.executors import HighThroughputExecutor
        from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD
        from parsl.providers import LocalProvider

        pool = "parsl.executors.high_throughput.process_worker_pool"
        pool_args = DEFAULT_LAUNCH_CMD.split(" ", 1)[1]  # everything after 'process_worker_pool.py'
        return HighThroughputExecutor(
            label=self.LABEL,
            address="127.0.0.1",
            loopback_address="127.0.0.1",
            launch_cmd=f"{shlex.quote(sys.executable)} -m {pool} {pool_args}",
            interchange_launch_cmd=[sys.executable, "-m", "parsl.executors.high_throughput.interchange"],
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

        from aimspax_like.reference.label import label

        t0 = time.perf_counter()
        self._htex = self._build_htex()
        config = Config(
            executors=[self._htex],
            run_dir=str(self.parsl_dir),
            retries=self.retries,
            retry_handler=_retry_lost_workers_only,
            usage_tracking=0,
        )
        self._dfk = parsl.DataFlowKernel(config)
        # The app function is ``label`` itself: workers unpickle it by reference and so import
        # aimspax_like.reference only, never torch or MACE.
        for fn in (label, worker_report):
            self._apps[fn.__name__] = parsl.python_app(fn, executors=[self.LABEL], data_flow_kernel=self._dfk)
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
                    outcome.set_result(app_future.result())
                elif isinstance(exc, WorkerLost):
                    wall_s = time.perf_counter() - submitted
                    message = f"the label killed its worker process ({exc})"
                    outcome.set_result(LabelFailure(FailureKind.CRASHED, message, workdir, wall_s))
                else:
                    outcome.set_exception(exc)

        self._run("label", atoms, spec, workdir, faults=faults, seed=seed).add_done_callback(settle)
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
        # Parsl detaches its parsl.log handler at cleanup but never closes it (a ResourceWarning
        # and a leaked descriptor per executor), so we close it ourselves.
        log_file = str(Path(dfk.run_dir, "parsl.log").resolve())
        parsl_handlers = logging.getLogger("parsl").handlers
        handlers = [h for h in parsl_handlers if getattr(h, "baseFilename", "") == log_file]
        dfk.cleanup()
        for handler in handlers:
            handler.close()
        with self._lock:
            orphans, self._pending = self._pending, set()
        for future in orphans:
            future.cancel()
        self._htex = None
        self._apps.clear()
        uptime_s = round(time.perf_counter() - self._started_at, 3)
        self._emit("executor_stopped", kind="parsl", uptime_s=uptime_s)


# Extension point: a 'slurm' kind maps to a ParslLabelExecutor subclass whose ``_build_htex``
# uses a SlurmProvider; register it here and add its model to ``CampaignConfig.cluster``.
_EXECUTOR_KINDS: dict[str, type[ParslLabelExecutor]] = {"local": ParslLabelExecutor}


def make_label_executor(
    cluster_config: LocalCluster, run_dir: str | os.PathLike[str], on_event: EventHook | None = None
) -> LabelExecutor:
    """The (not yet started) executor for the campaign's ``cluster`` section."""
    kind = getattr(cluster_config, "kind", None)
    cls = _EXECUTOR_KINDS.get(str(kind))
    if cls is None:
        raise ConfigError("cluster.kind", f"unknown cluster kind {kind!r}")
    return cls(cluster_config, run_dir, on_event=on_event)
