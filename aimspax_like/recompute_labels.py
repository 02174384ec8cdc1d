"""The labelling half of ``aimspax-like recompute``: one driver run over the new run directory.

``aimspax_like.recompute`` reads and checks the inputs (``Plan``) and takes NEW_RUN's lock; this
module lays NEW_RUN out, decides which frames still need a label (stored ones are skipped, ones
that failed for good are skipped unless ``--retry-failed``, ones lost in flight are sent again),
keeps the workers busy, stores every label as it returns and writes the summary.

Labels run through a ``Labeller`` (retries per ``al.failures``, the stop rule, ``label_*`` events
of phase ``recompute``) but not through its batch call: ``label_all`` waits for the labels in
order, so one slow DFT label would leave the other workers idle. Here ``2 x n_workers`` labels
are in flight and each is stored the moment it returns, in any order.

Durability: the store fsyncs every frame, ``state/recompute.json`` is written atomically after
each frame that failed for good (before its ``recompute_dropped`` event), so a kill at any point
never pays for a stored label again and never forgets a dropped one.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any

from aimspax_like.errors import CampaignInterrupted, LabelsKeepFailing, SetupError
from aimspax_like.recompute import PHASE, STATE_FILE, Plan, RecomputeOptions, compare_levels, read_state


@dataclass
class _Counts:
    relabelled: int = 0
    dropped: int = 0
    lost: int = 0  # in flight when the run stopped: sent again next time


@dataclass
class Relabel:
    """One driver run over NEW_RUN: lay it out, label the frames still missing, summarise."""

    p: Plan
    options: RecomputeOptions
    should_stop: Callable[[], int]
    counts: _Counts = field(default_factory=_Counts)
    skipped: int = 0  # stored by an earlier run
    resubmitted: int = 0  # lost in flight by an earlier run, sent again now
    tags: dict[str, int] = field(default_factory=dict)  # source tag -> source index
    streak: list[int] = field(default_factory=list)  # dropped since the last stored label

    def run(self, executor: Any) -> dict[str, Any]:
        from aimspax_like.context import RunPaths
        from aimspax_like.events import EventLog

        self.paths = RunPaths(self.p.out)
        self.state = self._prepare()
        self.events = EventLog(self.paths.events)
        self.started = time.perf_counter()
        complete = False
        try:
            todo, again = self._todo()
            self.resubmitted = len(again)
            self.events.emit("recompute_start", run=str(self.p.run), out=str(self.p.out),
                             kind=self.p.config.reference.kind, reference=self.p.fingerprint,
                             frames=len(self.p.frames), done=self.skipped, failed_before=len(self.state["failed"]),
                             todo=len(todo), resubmitted=self.resubmitted, splits=list(self.p.splits))
            self._say(f"recompute: {len(self.p.frames)} frames, {self.skipped} already relabelled, "
                      f"{len(self.state['failed'])} failed before, {len(todo)} to label")
            if todo:
                self._label(todo, executor)
            complete = True
            return self._summary(complete)
        finally:
            try:
                self._export()
                if not complete:
                    with contextlib.suppress(SetupError, OSError):  # the summary must not hide why it stopped
                        self._summary(complete)
            finally:
                self.events.emit("recompute_end", relabelled=self.counts.relabelled, dropped=self.counts.dropped,
                                 skipped=self.skipped, resubmitted=self.resubmitted, lost=self.counts.lost,
                                 complete=complete, wall_s=round(time.perf_counter() - self.started, 3))
                self.events.close()

    # ------------------------------------------------------------ the run directory

    def _prepare(self) -> dict[str, Any]:
        """Lay out NEW_RUN (first run) and record whose recompute it is, before any label."""
        from aimspax_like.campaign import CONFIG_RECORD
        from aimspax_like.data import DatasetStore
        from aimspax_like.state import write_atomic

        state = read_state(self.p.out)
        if state is None:
            state = {"format": 1, "source_run": str(self.p.run.resolve()), "source_dataset": str(self.p.dataset),
                     "kind": self.p.config.reference.kind, "reference": self.p.fingerprint,
                     "store_created": False, "failed": {}}
            self._save(state)
        for folder in (*self.paths.folders, self.paths.report):
            folder.mkdir(parents=True, exist_ok=True)
        if not state["store_created"]:
            self.paths.dataset.unlink(missing_ok=True)  # made by a run killed before it was recorded
            DatasetStore.create(self.paths.dataset)
            state["store_created"] = True
            self._save(state)
        self.store = DatasetStore.open(self.paths.dataset)
        text = self.p.config.resolved_yaml().encode()
        write_atomic(self.paths.state / CONFIG_RECORD, text)
        write_atomic(self.paths.config, text)
        return state

    def _save(self, state: dict[str, Any]) -> None:
        from aimspax_like.analysis.strict_json import dumps_strict
        from aimspax_like.state import write_atomic

        state["updated"] = time.time()
        write_atomic(self.p.out / "state" / STATE_FILE, dumps_strict(state).encode())

    def _todo(self) -> tuple[list[int], set[int]]:
        """(source indices to label, those of them lost in flight by an earlier run).

        Lost labels are read from the event log: sent (``label_submitted``) but neither stored
        nor dropped, whether the earlier run stopped on a signal or was killed outright.
        """
        from aimspax_like.data.frames import source_tag
        from aimspax_like.events import read_events

        self.tags = {source_tag(self.p.dataset, k): k for k in self.p.frames}
        self.done = {self.tags[f.source] for f in self.store.frames() if f.source in self.tags}
        failed = {int(k) for k in self.state["failed"]}
        todo = [k for k in self.p.frames
                if k not in self.done and (self.options.retry_failed or k not in failed)]
        sent = {int(e["source"]) for e in read_events(self.paths.events)
                if e["event"] == "label_submitted" and e.get("phase") == PHASE and "source" in e}
        self.skipped = len(self.done)
        return todo, (sent & set(todo)) - failed

    # ------------------------------------------------------------ labelling

    def _label(self, todo: list[int], executor: Any) -> None:
        from contextlib import nullcontext

        from aimspax_like.execution import make_label_executor
        from aimspax_like.labelling import Labeller

        owned = executor is None
        if owned:
            executor = make_label_executor(self.p.config.cluster, self.p.out,
                                           on_event=lambda name, fields: self.events.emit(name, **fields))
        with executor if owned else nullcontext():
            config = self.p.config
            self.labeller = Labeller.for_policy(
                executor, config.reference.model_dump(mode="json"), self.paths.labels, self.events,
                self.p.original.al.failures, seed=config.seed, should_stop=self.should_stop,
                faults=None if config.faults is None else config.faults.model_dump(mode="json"))
            self._loop(todo)

    def _loop(self, todo: list[int]) -> None:
        """Keep 2 x n_workers labels in flight; store each as it returns, in any order."""
        queue = deque(todo)
        pending: dict[Future, tuple[int, int]] = {}
        window = 2 * self.labeller.n_workers
        self.last_line, self.said, self.total = time.perf_counter(), 0, len(todo)
        try:
            while queue or pending:
                signum = self.should_stop()
                if signum:
                    self._salvage(pending)
                    self._say(f"recompute stopping: {self.counts.relabelled} labels stored this run, "
                              f"{self.counts.lost} in flight lost (sent again on resume)")
                    raise CampaignInterrupted(int(signum))
                while queue and len(pending) < window:
                    k = queue.popleft()
                    # --retry-failed: tries go on counting, so a retry is a fresh seed (fault draw).
                    attempt = int(self.state["failed"].get(str(k), {}).get("tries", 0))
                    self.events.emit("label_submitted", phase=PHASE, source=k)
                    pending[self._submit(k, attempt)] = (k, attempt)
                # Wakes at least twice a second to notice a stop (a DFT label may take hours).
                finished, _ = futures_wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    k, attempt = pending.pop(future)
                    again = self._settle(k, attempt, future)
                    if again is not None:
                        pending[again] = (k, attempt + 1)
                self._progress(len(pending))
        except LabelsKeepFailing:
            # The failures in a row that tripped the stop rule are the reference's fault, not the
            # frames': they are taken back from the record, so a resume tries them again.
            streak, self.streak = self.streak, []
            for k in streak:
                del self.state["failed"][str(k)]
            self._save(self.state)
            self.counts.dropped -= len(streak)
            self.counts.lost += len(streak)
            self._salvage(pending)
            raise

    def _submit(self, k: int, attempt: int) -> Future:
        from ase import Atoms

        frame = self.p.frames[k]
        atoms = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
        return self.labeller.submit(PHASE, k, atoms, attempt, announce=False)

    def _settle(self, k: int, attempt: int, future: Future) -> Future | None:
        """Store a label, or retry / drop a failure; returns the retry's future, if any."""
        from aimspax_like.labelling import outcome_of
        from aimspax_like.reference.results import FailureKind, LabelFailure

        outcome = outcome_of(future)
        if isinstance(outcome, LabelFailure):
            if self.should_stop():  # killed by the signal that stops this run: lost, not the reference's fault
                self.counts.lost += 1
                return None
            retry = self.labeller.may_retry(outcome, attempt)
            try:
                self.labeller.record_failure(PHASE, outcome, retry=retry, source=k)
            finally:
                if not retry:
                    self._drop(k, outcome.kind.value, outcome.message, attempt + 1)
            return self._submit(k, attempt + 1) if retry else None
        try:
            self._store(k, outcome)
        except ValueError as exc:  # a label that cannot be a frame (non-finite, misshapen): never stored
            self.labeller.record_failure(PHASE, LabelFailure(FailureKind.INVALID_RESULT, str(exc), outcome.workdir,
                                                             outcome.wall_s, outcome.cpu_s), source=k)
            self._drop(k, FailureKind.INVALID_RESULT.value, str(exc), attempt + 1)
        return None

    def _store(self, k: int, result: Any) -> None:
        from aimspax_like.data import LabelledFrame
        from aimspax_like.data.frames import source_tag

        old = self.p.frames[k]
        frame = LabelledFrame(
            numbers=old.numbers, positions=old.positions, cell=old.cell, pbc=old.pbc, energy=result.energy,
            forces=result.forces,
            stress=result.stress if self.p.config.reference.compute_stress and not old.is_piece else None,
            split=old.split, origin=old.origin, trajectory=old.trajectory, md_step=old.md_step,
            uncertainty=old.uncertainty, member=old.member, reference=self.p.fingerprint,
            label_wall_s=result.wall_s, source=source_tag(self.p.dataset, k),
            # A substructure stays one: only its core forces are labels at the new level too.
            piece=old.piece, force_mask=old.force_mask, parent_index=old.parent_index)
        index = self.store.append(frame)
        self.labeller.record_success(result)
        self.done.add(k)
        self.streak.clear()
        self.counts.relabelled += 1
        if str(k) in self.state["failed"]:  # --retry-failed: it made it this time
            del self.state["failed"][str(k)]
            self._save(self.state)
        self.events.emit("frame_stored", index=index, split=frame.split, origin=frame.origin,
                         trajectory=frame.trajectory, member=frame.member)
        self.events.emit("label_done", phase=PHASE, **result.cost(), source=k, split=frame.split,
                         energy=result.energy)

    def _drop(self, k: int, kind: str, message: str, tries: int) -> None:
        """A label whose tries are used up: recorded durably first, so a resume never pays for it again."""
        self.state["failed"][str(k)] = {"kind": kind, "message": message, "tries": tries,
                                        "split": self.p.frames[k].split}
        self._save(self.state)
        self.counts.dropped += 1
        self.streak.append(k)
        self.events.emit("recompute_dropped", source=k, kind=kind, message=message, tries=tries)

    def _salvage(self, pending: dict[Future, tuple[int, int]]) -> None:
        """The run stops: store the labels that came back already; the rest is lost (sent again on resume).

        A failure that came back is lost too, neither retried nor dropped: with a signal it may be
        the signal's doing, and after the stop rule nothing is sent any more.
        """
        from aimspax_like.labelling import outcome_of
        from aimspax_like.reference.results import LabelResult

        for future, (k, _) in list(pending.items()):
            outcome = outcome_of(future) if future.done() else None
            stored = False
            if isinstance(outcome, LabelResult):
                with contextlib.suppress(ValueError):  # a label that cannot be a frame: lost as well
                    self._store(k, outcome)
                    stored = True
            self.counts.lost += not stored
        pending.clear()

    def _say(self, message: str) -> None:
        if self.options.on_progress is not None:
            self.options.on_progress(message)

    def _progress(self, in_flight: int) -> None:
        """A line every ``progress_every_s`` seconds or every tenth of the work."""
        settled = self.counts.relabelled + self.counts.dropped
        now = time.perf_counter()
        tenth = settled != self.said and settled % max(1, self.total // 10) == 0 and now - self.last_line > 1.0
        if not tenth and now - self.last_line < self.options.progress_every_s:
            return
        self.last_line, self.said = now, settled
        self._say(f"recompute: {settled}/{self.total} settled ({self.counts.relabelled} stored, "
                  f"{self.counts.dropped} dropped), {in_flight} in flight")

    # ------------------------------------------------------------ results

    def _export(self) -> None:
        from aimspax_like.data import export_extxyz

        try:
            for split in sorted({f.split for f in self.store.frames()}):
                export_extxyz(self.store.frames(split=split), self.paths.data / f"{split}.xyz")
        except (SetupError, OSError) as exc:
            self.events.emit("export_failed", error=str(exc)[:300])

    def _summary(self, complete: bool) -> dict[str, Any]:
        from aimspax_like.analysis.strict_json import dumps_strict
        from aimspax_like.state import write_atomic

        new = self.store.frames()
        after = Counter(f.split for f in new)
        pairs = [(self.p.frames[self.tags[f.source]], f) for f in new if f.source in self.tags]
        failed = self.state["failed"]
        summary = {
            "run": str(self.p.run), "out": str(self.p.out), "complete": complete,
            "reference": {"kind": self.p.config.reference.kind, "fingerprint": self.p.fingerprint,
                          "settings": self.p.config.reference.model_dump(mode="json")},
            "previous_reference": sorted({f.reference for f in self.p.frames.values()}),
            "splits": {s: {"before": self.p.source_counts[s], "after": after.get(s, 0)} for s in self.p.splits},
            "frames": len(self.p.frames), "relabelled": self.counts.relabelled, "relabelled_total": len(pairs),
            "skipped": self.skipped, "resubmitted": self.resubmitted, "lost_in_flight": self.counts.lost,
            "dropped": {"this_run": self.counts.dropped, "total": len(failed),
                        "by_kind": dict(Counter(entry["kind"] for entry in failed.values())),
                        "frames": [{"source": int(k), **entry} for k, entry in sorted(failed.items(),
                                                                                      key=lambda i: int(i[0]))]},
            "comparison": compare_levels(pairs),
            "wall_s": round(time.perf_counter() - self.started, 3),
        }
        write_atomic(self.paths.report / "recompute.json", dumps_strict(summary).encode())
        return summary
