"""Runs Parsl's HTEX interchange, and ends it when the campaign driver that started it dies.

Parsl starts the interchange as a child process of the driver but never notices the driver's
death: after a SIGKILL, an OOM kill or a node failure of the driver's job, the interchange lives
on (re-parented to init) and keeps its worker pools alive, holding cores, or on SLURM whole
allocations, until someone kills them by hand. Run as the interchange's launch command
(``python -m aimspax_like.execution.interchange_guard``), this module starts a watcher thread and then runs
the interchange itself in the same process, so Parsl's process handle, its signals and the
config it writes to stdin all reach the interchange unchanged. When the parent is gone, the
watcher ends the process; the worker pools then lose their interchange and exit after their
heartbeat threshold.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import threading
import time

INTERCHANGE = "parsl.executors.high_throughput.interchange"
POLL_S = 1.0
GRACE_S = 5.0


def watch_parent(parent: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> threading.Thread:
    """Daemon thread: once ``parent`` is no longer our parent, SIGTERM ourselves, then exit hard."""

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(3)

    thread = threading.Thread(target=loop, name="parent-watch", daemon=True)
    thread.start()
    return thread


def main() -> None:
    # A session of its own: Ctrl-C in the terminal, or SIGTERM to the driver's process group
    # (what SLURM sends), must reach the driver only. Killed with the driver, the interchange
    # could not answer the driver's shutdown commands, and Parsl waits for that answer forever.
    # The driver's death still ends it (watch_parent).
    with contextlib.suppress(OSError):  # already a session leader
        os.setsid()
    watch_parent(os.getppid())
    runpy.run_module(INTERCHANGE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
