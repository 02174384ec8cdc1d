"""Block bookkeeping as events: requested, running, released, and workers connected.

Parsl has no callback for block changes: its scaling strategy submits and cancels batch jobs on
its own ``JobStatusPoller`` thread and records them in the executor. ``BlockMonitor`` reads the
executor's public view of that (``status_facade``: each block's ``JobStatus``;
``blocks_to_job_id``; ``connected_managers()``: which workers connected) every ``period``
seconds and emits one event per change. It only reads: it never submits or cancels a job and
never touches a label, so it cannot change scaling or hold up the scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parsl.executors import HighThroughputExecutor

logger = logging.getLogger(__name__)


class BlockMonitor:
    """Turns Parsl's block bookkeeping into events: requested, running, released, workers.

    Parsl has no callback for block changes: its scaling strategy submits and cancels batch
    jobs on its own ``JobStatusPoller`` thread and only records them in the executor
    (``blocks_to_job_id``, ``status_facade``; the interchange knows which workers connected).
    So this thread reads those every ``period`` seconds and emits one event per change.

    It only reads: it never submits or cancels a job and never touches a label, so it cannot
    change scaling or hold up the scheduler (which never waits on it). It asks the interchange
    through Parsl's own locked command channel, as the strategy does, and is stopped before
    that channel closes. ``SlurmProvider`` refreshes job states from squeue only every 60 s, so
    a block counts as running as soon as one of its workers connects.
    """

    def __init__(self, htex: HighThroughputExecutor, emit: Callable[..., None], period: float,
                 scheduler: str = "slurm") -> None:
        self._htex = htex
        self._scheduler = scheduler
        self._emit = emit
        self._period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._blocks: dict[str, str] = {}  # block id -> 'requested' | 'running' | 'released'
        self._jobs: dict[str, str | None] = {}  # block id -> batch job id
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
                if job_status.state == JobState.COMPLETED and not reason and self._scheduler == "slurm":
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
