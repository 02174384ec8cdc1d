"""Labels in Parsl worker processes: one HighThroughputExecutor over whichever provider the
cluster section builds (this machine, or blocks of any batch scheduler).

The executor is the same for every scheduler; only the provider differs (composition through
``providers.build_provider``). With a batch scheduler, blocks scale with the label queue
(Parsl's ``htex_auto_scale``), every block change becomes an event (``blocks.BlockMonitor``) and
every label reports the batch job it ran in (a ``label_placed`` event).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeoutError
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aimspax_like.errors import ConfigError
from aimspax_like.execution.base import EventHook, LabelExecutor
from aimspax_like.execution.blocks import BlockMonitor
from aimspax_like.execution.worker_tasks import label_with_placement, worker_report

if TYPE_CHECKING:
    from ase import Atoms
    from parsl import DataFlowKernel
    from parsl.dataflow.taskrecord import TaskRecord
    from parsl.executors import HighThroughputExecutor

    from aimspax_like.cluster_config import BatchCluster, LocalCluster
    from aimspax_like.reference.md_segment import SegmentRequest
    from aimspax_like.reference.results import LabelOutcome

logger = logging.getLogger(__name__)


def _retry_lost_workers_only(exception: Exception, task_record: TaskRecord) -> float:
    """Parsl retry cost: only a lost worker or manager is worth a retry.

    ``label`` returns calculation failures, so any other exception is a bug that would recur.
    """
    from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost

    return 1.0 if isinstance(exception, WorkerLost | ManagerLost) else math.inf


class ParslLabelExecutor(LabelExecutor):
    """Labels in Parsl workers, on this machine (``kind: local``) or in batch-job blocks.

    Each instance owns its ``DataFlowKernel`` instead of using the global ``parsl.load``, so two
    campaigns (or a test session) can hold executors side by side. Parsl's run folder and all
    its logs, worker logs included, go to ``run_dir/'parsl'/NNN/``, never into ``./runinfo``.
    For a batch scheduler the interchange runs here, on the driver, and listens on an address
    the compute nodes can reach.
    """

    LABEL = "labels"
    # The strategy polls its executors' blocks this often; the monitor reads the result.
    MONITOR_PERIOD_S = 1.0

    def __init__(
        self,
        cluster: LocalCluster | BatchCluster,
        run_dir: str | os.PathLike[str],
        on_event: EventHook | None = None,
        retries: int = 1,
        heartbeat_period: int | None = None,
        heartbeat_threshold: int | None = None,
    ) -> None:
        """``retries`` re-runs only labels whose worker died (``_retry_lost_workers_only``).

        One retry absorbs a single lost worker (an OOM kill of an innocent process, a node
        hiccup); a structure that kills its worker on every try comes back as
        ``LabelFailure(CRASHED)``. Heartbeats are tighter than Parsl's defaults (30 s / 120 s):
        5 s / 30 s on this machine, so a dead local pool is noticed within half a minute, and
        10 s / 60 s for batch blocks, whose workers sit across a network.
        """
        self.cluster = cluster
        self.batch = cluster.kind != "local"
        super().__init__(cluster.max_workers, on_event)
        self.parsl_dir = Path(run_dir) / "parsl"
        self.retries = retries
        period, threshold = (10, 60) if self.batch else (5, 30)
        self.heartbeat = (heartbeat_period or period, heartbeat_threshold or threshold)
        self._dfk: DataFlowKernel | None = None
        self._htex: HighThroughputExecutor | None = None
        self._apps: dict[str, Callable[..., Future]] = {}
        self._pending: set[Future] = set()
        self._lock = threading.Lock()
        self._emit_lock = threading.Lock()
        self._monitor: BlockMonitor | None = None
        self._started_at = 0.0

    def _scaling(self) -> dict[str, Any]:
        """Parsl ``Config`` scaling options: autoscaling blocks, or one fixed local block."""
        if not self.batch:
            return {}
        executor = self.cluster.executor  # type: ignore[union-attr]
        return {
            "strategy": "htex_auto_scale",
            "max_idletime": executor.max_idletime_s,
            "strategy_period": executor.strategy_period_s,
        }

    def _task_functions(self) -> dict[str, Callable[..., Any]]:
        """What the 'label' and 'md_segment' apps run on a worker; values go through ``_unpack``.

        Batch workers also report where they ran (the placement wrappers).
        """
        from aimspax_like.reference.label import label
        from aimspax_like.reference.md_segment import run_segment, segment_with_placement

        if self.batch:
            return {"label": label_with_placement, "md_segment": segment_with_placement}
        return {"label": label, "md_segment": run_segment}

    def _unpack(self, value: Any, workdir: str) -> LabelOutcome:
        """The outcome in what a task function returned (and its placement, for batch workers)."""
        if not self.batch:
            return value
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
        """Where workers connect: loopback for local; ``executor.address`` / ``interface`` or the
        hostname for batch blocks."""
        if not self.batch:
            return "127.0.0.1"
        from parsl.addresses import address_by_hostname, address_by_interface

        executor = self.cluster.executor  # type: ignore[union-attr]
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
        """HTEX over the cluster's provider; interchange and workers run ``python -m``.

        Parsl's default commands look ``interchange.py`` and ``process_worker_pool.py`` up on
        ``PATH``, which fails without an activated venv; ``python -m`` works either way.
        """
        from parsl.executors import HighThroughputExecutor

        from aimspax_like.execution.providers import INTERCHANGE_COMMAND, build_provider, worker_pool_command

        if self.batch:
            executor = self.cluster.executor  # type: ignore[union-attr]
            python, workers, cores = executor.worker_python or sys.executable, executor.workers_per_node, \
                executor.cores_per_worker
        else:
            python, workers, cores = sys.executable, self.cluster.max_workers, self.cluster.cores_per_worker
        return HighThroughputExecutor(
            label=self.LABEL,
            address=self.address(),
            loopback_address="127.0.0.1",
            launch_cmd=worker_pool_command(python),
            interchange_launch_cmd=INTERCHANGE_COMMAND,
            max_workers_per_node=workers,
            cores_per_worker=cores,
            heartbeat_period=self.heartbeat[0],
            heartbeat_threshold=self.heartbeat[1],
            provider=build_provider(self.cluster),
        )

    def start(self) -> None:
        """Start the DataFlowKernel and request the worker block(s); workers connect meanwhile."""
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
        # The app functions are module-level functions: workers unpickle them by reference and
        # so import aimspax_like.reference (and the light worker_tasks) only, never torch or MACE.
        for name, fn in (*self._task_functions().items(), ("worker_report", worker_report)):
            self._apps[name] = parsl.python_app(fn, executors=[self.LABEL], data_flow_kernel=self._dfk)
        self._started_at = time.perf_counter()
        info = {"n_workers": self.n_workers, "run_dir": self._dfk.run_dir}
        self._emit("executor_started", kind="parsl", start_s=round(self._started_at - t0, 3), **info)
        if self.batch:
            provider = self.cluster.provider  # type: ignore[union-attr]
            self._emit(
                "batch_executor", scheduler=self.cluster.kind, address=self._htex.address,
                max_blocks=provider.max_blocks, min_blocks=provider.min_blocks,
                max_idletime_s=self.cluster.executor.max_idletime_s,  # type: ignore[union-attr]
            )
            self._monitor = BlockMonitor(self._htex, self._emit, self.MONITOR_PERIOD_S, self.cluster.kind)
            self._monitor.start()

    def block_states(self) -> dict[str, str]:
        """Each block the monitor has seen: 'requested', 'running' or 'released'."""
        monitor = self._monitor
        return monitor.states() if monitor is not None else {}

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
        """Stop the block monitor, then Parsl (scaling, blocks cancelled, interchange, workers),
        then log the blocks' release."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.stop()
            with contextlib.suppress(Exception):  # last look while the interchange still answers
                monitor.poll()
        # Parsl detaches its parsl.log handler at cleanup but never closes it (a ResourceWarning
        # and a leaked descriptor per executor), so we close it ourselves.
        log_file = str(Path(dfk.run_dir, "parsl.log").resolve())
        parsl_handlers = logging.getLogger("parsl").handlers
        handlers = [h for h in parsl_handlers if getattr(h, "baseFilename", "") == log_file]
        dfk.cleanup()
        for handler in handlers:
            handler.close()
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.poll(ask_interchange=False, reason="shutdown")
