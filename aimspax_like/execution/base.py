"""The interface the scheduler labels through: submit a structure, get a plain future back.

The scheduler ``wait(..., FIRST_COMPLETED)``s on label futures without knowing the backend. A
failed label is data (``LabelFailure``) in the future's result, including a label whose worker
process died on every try. The future raises only when the infrastructure itself broke (e.g.
the worker pool is gone), and is cancelled when the executor shuts down before it ends.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ase import Atoms

    from aimspax_like.reference.md_segment import SegmentRequest

EventHook = Callable[[str, dict[str, Any]], None]


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
