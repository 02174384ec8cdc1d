"""Labels on threads of this process: for scheduler unit tests and debugging, not production."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from aimspax_like.execution.base import EventHook, LabelExecutor

if TYPE_CHECKING:
    from ase import Atoms

    from aimspax_like.reference.md_segment import SegmentRequest


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
