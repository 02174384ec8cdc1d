"""The one path by which every phase asks the reference for labels.

IDG (foundation sampler), active learning and the test set all label through a ``Labeller``, so
they share one behaviour: the scratch folder ``labels/<phase>_<number>[_retryK]``, one seed per
try (a retry is a fresh fault draw), the reference's ``timeout_s``, the ``faults`` injection, the
retry policy of ``al.failures`` (crashes retried, SCF failures never), the events
(``label_submitted``, ``label_failed`` with ``retry``, ``label_done``) and the stop rule.

The stop rule. A reference that fails on every call (a wrong basis set, a missing pseudopotential,
an MPI launcher that cannot start, ``cluster.kind: slurm`` with no nodes) would otherwise turn a
campaign into a long series of discarded labels that ends in "success". After
``al.failures.max_consecutive`` failed tries in a row, across all phases, the labeller raises
``LabelsKeepFailing``: the campaign saves its state and stops with exit code 3, and the message
quotes the last failure. Any successful label resets the count.

Reference-driven MD and start-structure relaxations run on the workers too, as segments
(``submit_segment``, ``reference_md``): their failures count towards the same rule.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any

from ase import Atoms

from aimspax_like.errors import CampaignInterrupted, LabelsKeepFailing
from aimspax_like.events import EventLog, WallClock
from aimspax_like.reference.results import (
    FailureKind,
    LabelFailure,
    LabelOutcome,
    LabelResult,
)
from aimspax_like.signals import stop_requested

# Seeds of different phases never collide (label numbers restart per phase).
_SEED_OFFSET = {"al": 0, "idg": 500_000, "analysis": 700_000, "test": 900_000, "recompute": 1_100_000}


def outcome_of(future: Future) -> LabelOutcome:
    """A future that raised (a lost worker, a bug in the task) counts as a crashed label."""
    try:
        return future.result()
    except Exception as exc:  # any task error is data here, not a crash of the campaign
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return LabelFailure(FailureKind.CRASHED, f"{type(exc).__name__}: {first_line}", None, 0.0)


class Labeller:
    """Submits labels, decides retries, records outcomes, and stops a campaign whose labels keep failing."""

    def __init__(
        self,
        executor: Any,
        spec: dict[str, Any],
        labels_root: Path,
        events: EventLog,
        *,
        faults: dict[str, Any] | None = None,
        seed: int = 0,
        crashed_retries: int = 1,
        timed_out_retries: int = 0,
        max_consecutive: int | None = 10,
        clock: WallClock | None = None,
        should_stop: Callable[[], int] = stop_requested,
    ) -> None:
        self.executor = executor
        self.spec = spec
        self.labels_root = Path(labels_root)
        self.events = events
        self.faults = faults
        self.seed = seed
        self.retries = {FailureKind.CRASHED: crashed_retries, FailureKind.TIMED_OUT: timed_out_retries}
        self.max_consecutive = max_consecutive
        self.clock = clock or WallClock()
        self.consecutive_failures = 0
        self.should_stop = should_stop

    @classmethod
    def for_policy(
        cls, executor: Any, spec: dict[str, Any], labels_root: Path, events: EventLog, policy: Any, *,
        faults: dict[str, Any] | None = None, seed: int = 0, clock: WallClock | None = None,
        should_stop: Callable[[], int] = stop_requested,
    ) -> Labeller:
        """A labeller whose retries and stop rule are ``policy`` (an ``al.failures`` section)."""
        return cls(
            executor, spec, labels_root, events, faults=faults, seed=seed,
            crashed_retries=policy.crashed_retries, timed_out_retries=policy.timed_out_retries,
            max_consecutive=policy.max_consecutive, clock=clock, should_stop=should_stop,
        )

    @classmethod
    def for_campaign(cls, config: Any, executor: Any, labels_root: Path, events: EventLog,
                     clock: WallClock | None = None, should_stop: Callable[[], int] = stop_requested) -> Labeller:
        return cls.for_policy(
            executor, config.reference.model_dump(mode="json"), labels_root, events, config.al.failures,
            faults=None if config.faults is None else config.faults.model_dump(mode="json"),
            seed=config.seed, clock=clock, should_stop=should_stop,
        )

    @property
    def n_workers(self) -> int:
        return max(1, int(getattr(self.executor, "n_workers", 1)))

    # ------------------------------------------------------------------ one try

    def workdir(self, phase: str, number: int, attempt: int = 0) -> str:
        return str(self.labels_root / (f"{phase}_{number:06d}" + (f"_retry{attempt}" if attempt else "")))

    def seed_of(self, phase: str, number: int, attempt: int = 0) -> int:
        return self.seed * 1_000_003 + _SEED_OFFSET.get(phase, 0) + number + 7919 * attempt

    def submit(self, phase: str, number: int, atoms: Atoms, attempt: int = 0, announce: bool = True,
               **fields: Any) -> Future:
        """Send one try to the workers; ``label_submitted`` carries ``fields`` (first try only).

        ``announce=False``: the caller emits its own, richer ``label_submitted`` (active learning).
        """
        if announce and not attempt:
            self.events.emit("label_submitted", phase=phase, **fields)
        return self.executor.submit(atoms, self.spec, self.workdir(phase, number, attempt), self.faults,
                                    seed=self.seed_of(phase, number, attempt))

    def submit_segment(self, phase: str, number: int, atoms: Atoms, request: Any, attempt: int = 0,
                       **fields: Any) -> Future:
        """Send a stretch of reference MD (``reference_md``) to the workers: a label like any other
        for folders (``labels/<phase>_md_<number>``), seeds, faults and ``label_submitted``."""
        if not attempt:
            self.events.emit("label_submitted", phase=phase, **fields)
        return self.executor.submit_segment(atoms, self.spec, self.workdir(f"{phase}_md", number, attempt),
                                            self.faults, seed=self.seed_of(phase, number, attempt), request=request)

    def may_retry(self, failure: LabelFailure, attempt: int) -> bool:
        return attempt < self.retries.get(failure.kind, 0)

    # ------------------------------------------------------------------ outcomes

    def record_failure(self, phase: str, failure: LabelFailure, retry: bool = False, **fields: Any) -> None:
        """A failed try: a ``label_failed`` event, then the stop rule (``LabelsKeepFailing``)."""
        self.clock.add("labelling", failure.wall_s, cpu_s=failure.cpu_s)
        self.consecutive_failures += 1
        cpu = {} if failure.cpu_s is None else {"cpu_s": round(float(failure.cpu_s), 4)}
        self.events.emit("label_failed", phase=phase, kind=failure.kind.value, message=failure.message,
                         wall_s=failure.wall_s, **cpu, workdir=failure.workdir, retry=retry, **fields)
        if self.should_stop():
            return  # workers killed by the same signal that stops the campaign: not the reference's fault
        if self.max_consecutive is not None and self.consecutive_failures >= self.max_consecutive:
            self.events.emit("labels_keep_failing", phase=phase, consecutive=self.consecutive_failures,
                             last=failure.message)
            raise LabelsKeepFailing(self.consecutive_failures, phase, failure.message)

    def record_success(self, result: LabelResult) -> None:
        """A label came back: the failure run is over (its ``label_done`` event is the caller's).

        Its worker wall and CPU time go to the clock's ``labelling`` bucket of the current phase.
        """
        self.clock.add("labelling", result.wall_s, cpu_s=result.cpu_s)
        self.consecutive_failures = 0

    # ------------------------------------------------------------------ batches

    def _wait(self, future: Future) -> None:
        """Wait for one label, waking twice a second to notice a stop (a DFT label may take hours)."""
        while not future.done():
            futures_wait([future], timeout=0.5)
            signum = self.should_stop()
            if signum:
                raise CampaignInterrupted(int(signum))

    def label_all(
        self, phase: str, frames: list[Atoms], first_number: int,
        fields: list[dict[str, Any]] | None = None,
    ) -> list[LabelResult | None]:
        """Label frames on the workers in parallel, with retries; a label whose tries are used up is None.

        Label ``k`` is number ``first_number + k`` of ``phase``; every try is seeded and foldered
        as in ``submit``. Used by the phases that label in batches (IDG, the test set).
        """
        fields = fields or [{} for _ in frames]
        pending = {k: (self.submit(phase, first_number + k, atoms, **extra), 0)
                   for k, (atoms, extra) in enumerate(zip(frames, fields, strict=True))}
        results: list[LabelResult | None] = [None] * len(frames)
        while pending:
            k = next(iter(pending))
            future, attempt = pending.pop(k)
            with self.clock.measure("waiting"):
                self._wait(future)
            outcome = outcome_of(future)
            if isinstance(outcome, LabelFailure):
                retry = self.may_retry(outcome, attempt)
                self.record_failure(phase, outcome, retry=retry, **fields[k])
                if retry:
                    pending[k] = (self.submit(phase, first_number + k, frames[k], attempt + 1), attempt + 1)
                continue
            self.record_success(outcome)
            self.events.emit("label_done", phase=phase, **outcome.cost(), **fields[k])
            results[k] = outcome
        return results
