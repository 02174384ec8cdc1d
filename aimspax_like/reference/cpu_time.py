"""CPU seconds of one label, measured where it runs (standard library only: workers import it).

A label's CPU is what its process spent on it plus what the programs it started spent (an MPI
launcher and FHI-aims, pw.x, a timeout child). Two readings make that up:

* its own: ``time.process_time`` (every thread of the process, BLAS and OpenMP threads too) when
  the label runs in a process's main thread, as in a Parsl worker, a timeout child or a label
  server; ``time.thread_time`` (this thread only) when it runs in a pool thread, which shares its
  process with other labels and, with the thread label executor, with the driver.
* its children's: the ``RUSAGE_CHILDREN`` delta, which counts a child only once it has been
  waited for. Children started and reaped during the label are counted; a persistent child is
  not (CP2K's shell; a label server reports its own share instead, see ``warm_worker``). In a
  pool thread another label's reaped children can land in this label's delta.
"""

from __future__ import annotations

import resource
import threading
import time


def _children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Started on creation; ``seconds()``: the CPU spent since, by this process (or thread) and its reaped children."""

    def __init__(self) -> None:
        in_main = threading.current_thread() is threading.main_thread()
        self._own = time.process_time if in_main else time.thread_time
        self._own0 = self._own()
        self._children0 = _children()

    def seconds(self, children: bool = True) -> float:
        spent = self._own() - self._own0
        if children:
            spent += _children() - self._children0
        return max(0.0, spent)
