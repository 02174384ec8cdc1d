"""The active-learning state machine over many trajectories.

Each trajectory is ``RUNNING -> WAITING (label in flight) -> TRAINING -> RUNNING``, or ``DONE``.
One loop iteration:

1. take every label that has finished (futures report through a queue; nothing polls),
2. run one training round if any trajectory is TRAINING; a trajectory returns to RUNNING once
   its point has had ``max_epochs_per_point`` epochs,
3. advance all RUNNING trajectories by one MD step with one batched committee call,
4. on check steps, compare each trajectory's Eq. 1 uncertainty with the shared Eq. 2 threshold
   and send the frames above it to the reference.

In ``parallel`` mode a trajectory whose frame is being labelled waits while the others go on;
in ``serial`` mode the whole loop blocks until the label returns (the paper's serial version).

``while_labelling: continue`` goes beyond the paper: a trajectory keeps sampling while its labels
(up to ``labels_per_trajectory``) run, and every returned point adds ``max_epochs_per_point``
epochs to a training debt that is paid ``intermediate_epochs`` per loop iteration, between MD
steps, so neither a label nor training ever stops all sampling. Workers stay busy even when
there are fewer trajectories than workers.
A failed label is retried as ``al.failures`` says (crashes once by default), else discarded, and
its trajectory restarts from its checkpoint geometry: the last frame that was labelled
successfully (the start structure before that).

Large frames (``al.substructures``): a frame the uncertainty sends to the reference may be
labelled as a few substructures carved around its uncertain atoms instead (``PiecePlanner``).
Each piece is a label of its own (same folders, seeds, retries and events, ``piece`` in them),
and the frame counts as labelled once its last piece has come back: the trajectory trains and
moves on if at least one piece was stored, and rewinds if none was, as for a failed label.

Observers (``observers``, called with an event name after every submitted label, every label
that came back and every training round) let the campaign checkpoint without the loop knowing
about files; ``should_stop`` (a signal flag) makes the loop save and stop cleanly. What such a
checkpoint holds is ``state_dict`` (plain data: arrays, dicts), and ``load_state_dict`` puts it
back; writing it to disk is ``aimspax_like.state``'s business.

The scheduler only sees a ``CommitteeLike`` (forces for a batch, add a frame, train a round) and a
``LabelSubmitter`` (submit returns a future of a result or a typed failure).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from ase import Atoms

from aimspax_like.config import ALConfig
from aimspax_like.data import LabelledFrame
from aimspax_like.errors import CampaignInterrupted
from aimspax_like.events import EventLog, WallClock
from aimspax_like.ground_truth import AnalysisPoints, Probe
from aimspax_like.guards import FiniteGuard, Guard, first_failure
from aimspax_like.label_gate import EnergyGate
from aimspax_like.labelling import Labeller, outcome_of
from aimspax_like.piece_planner import PiecePlanner
from aimspax_like.reference.results import LabelFailure, LabelOutcome
from aimspax_like.sampling.dynamics import MDState, maxwell_boltzmann, step_batch
from aimspax_like.scheduler_checkpoint import SchedulerCheckpoint
from aimspax_like.uncertainty import MovingAverageThreshold, max_atomic_uncertainty, stress_uncertainty


class Status(str, Enum):
    RUNNING = "running"
    WAITING = "waiting"
    TRAINING = "training"
    DONE = "done"


class CommitteeLike(Protocol):
    """What the scheduler needs of the committee (``committee_energies`` ``[M, S]`` is optional:
    with it, frames the committee places far above the seen energies are not sent to the reference;
    ``committee_stresses`` (one ``[M, 3, 3]`` per structure) is needed for NPT trajectories only).

    ``state_dict()`` / ``load_state_dict(state)`` are optional too: a committee with them has its
    learned state (the trainer) saved in and restored from the scheduler's checkpoint; one
    without them (a stand-in) has nothing to save.
    """

    def committee_forces(self, structures: list[Atoms]) -> list[np.ndarray]: ...
    def add(self, frame: LabelledFrame) -> None: ...
    def train_round(self, epochs: int) -> list[Any]: ...
    def valid_force_mae(self) -> float: ...


class LabelSubmitter(Protocol):
    def submit(
        self, atoms: Atoms, spec: dict, workdir: str, faults: dict | None = None, seed: int | None = None
    ) -> Future: ...


# Stores a successful label durably and returns the stored frame (split decided by the sink).
LabelSink = Callable[[Atoms, LabelOutcome, dict[str, Any]], LabelledFrame]


@dataclass
class Trajectory:
    index: int
    md: MDState
    checkpoint: Atoms
    status: Status = Status.RUNNING
    epochs_for_point: int = 0
    labels_done: int = 0
    labels_failed: int = 0
    labels_held: int = 0
    labels_in_flight: int = 0
    guards: list[Guard] = field(default_factory=list)


@dataclass
class PieceGroup:
    """The pieces of one frame still in flight: ``parent`` is the frame (its trajectory's
    checkpoint once any piece is stored), ``left`` pieces to come back, ``stored`` so far."""

    parent: Atoms
    left: int
    stored: int = 0


@dataclass
class ALResult:
    reason: str
    md_steps: int
    labels_done: int
    labels_failed: int
    training_rounds: int
    labels_held: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class ALScheduler(SchedulerCheckpoint):
    def __init__(
        self,
        config: ALConfig,
        committee: CommitteeLike,
        executor: LabelSubmitter,
        sink: LabelSink,
        events: EventLog,
        reference_spec: dict,
        workdir_root: Path,
        *,
        train_set_size: Callable[[], int],
        budget_size: Callable[[], int] | None = None,
        faults: dict | None = None,
        clock: WallClock | None = None,
        seed: int = 0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        observers: list[Callable[[str], None]] | None = None,
        should_stop: Callable[[], int] | None = None,
        guards: Callable[[Atoms, Any], list[Guard]] | None = None,
        energy_gate: EnergyGate | None = None,
        trust_factor: float | None = None,
        labeller: Labeller | None = None,
        planner: PiecePlanner | None = None,
    ) -> None:
        self.config = config
        self.committee = committee
        self.sink = sink
        self.events = events
        self.train_set_size = train_set_size
        # What al.max_train_set_size is compared with (al.train_set_counts): the shared training
        # set by default, or the largest member's own IDG frames plus the shared ones.
        self.budget_size = budget_size or train_set_size
        self.clock = clock or WallClock()
        self.seed = seed
        # Every label goes through the campaign's one labelling path (folders, seeds, retries,
        # events, the stop rule); a scheduler built on its own (tests) gets a labeller of its own.
        self.labeller = labeller or Labeller.for_policy(
            executor, reference_spec, workdir_root, events, config.failures, faults=faults, seed=seed,
            clock=self.clock, should_stop=lambda: int(self.should_stop()),
        )
        self.on_progress = on_progress
        self.threshold = MovingAverageThreshold(config.window, config.c_x, config.warmup)
        self.trajectories: list[Trajectory] = []
        # Finished labels: ("al", trajectory, label id, future) or ("analysis", -1, label id, future).
        self._finished: queue.Queue[tuple[str, int, int, Future]] = queue.Queue()
        self._in_flight: dict[int, tuple[int, Atoms, dict[str, Any]]] = {}
        self._withholding = False  # a label was held back because the training set is (nearly) full
        self._next_label = 0
        self.training_rounds = 0
        self.continues = config.while_labelling == "continue"
        self.max_in_flight = config.max_labels_in_flight or config.num_trajectories * config.labels_per_trajectory
        self.training_debt = 0  # epochs owed to returned points ('continue' policy)
        self.observers = list(observers or [])
        self.attempts: dict[int, int] = {}  # label id -> retries used so far
        self.should_stop = should_stop or (lambda: 0)
        self.make_guards = guards  # (start structure, MD config) -> physical sanity checks
        self.energy_gate = energy_gate  # keeps labels far above the seen energies out of training
        self.trust_factor = trust_factor  # DP-GEN's upper trust bound, as a multiple of the threshold
        self.held: list[tuple[Atoms, LabelOutcome, dict[str, Any]]] = []  # stored, not trained on
        self._steps_at_launch: dict[int, tuple[int, int]] = {}  # label id -> (all steps, own steps)
        # Ground-truth analysis points (al.analysis_every): labelled whatever their uncertainty.
        self.analysis = None if config.analysis_every is None else AnalysisPoints(
            config.analysis_every, self.labeller, sink, events,
            on_submitted=lambda lid, f: f.add_done_callback(
                lambda done, lid=lid: self._finished.put(("analysis", -1, lid, done))),
        )
        self._probes: dict[int, tuple[Atoms, Probe]] = {}  # trajectory -> this step's analysis frame
        self._rejected: set[int] = set()  # trajectories whose frame the energy gate refused this step
        self.planner = planner  # al.substructures: large frames are labelled as pieces
        self._groups: dict[tuple[int, int], PieceGroup] = {}  # (trajectory, md_step) -> pieces in flight

    def _notify(self, event: str) -> None:
        for observer in self.observers:
            observer(event)

    # ------------------------------------------------------------------ set-up

    def add_trajectory(self, atoms: Atoms) -> Trajectory:
        index = len(self.trajectories)
        md_config = self.config.md_for(index)
        rng = np.random.default_rng([self.seed, index])
        start = atoms.copy()
        start.calc = None
        start.set_momenta(maxwell_boltzmann(start, md_config.temperature_K, rng))
        trajectory = Trajectory(index, MDState(start, md_config, rng), checkpoint=start.copy())
        # Without guards a trajectory still stops at non-finite numbers (every guard list starts so).
        trajectory.guards = self.make_guards(start.copy(), md_config) if self.make_guards else [FiniteGuard()]
        self.trajectories.append(trajectory)
        return trajectory

    def _set_status(self, trajectory: Trajectory, status: Status) -> None:
        if trajectory.status != status:
            self.events.emit(
                "state", trajectory=trajectory.index, old=trajectory.status.value, new=status.value,
                step=trajectory.md.step,
            )
            trajectory.status = status

    # ------------------------------------------------------------------ main loop

    def run(self) -> ALResult:
        if not self.trajectories:
            raise ValueError("the scheduler has no trajectories")
        self.events.emit("al_start", mode=self.config.mode, trajectories=len(self.trajectories))
        while True:
            self._take_finished(block=False)
            signum = int(self.should_stop())
            if signum:
                self._notify("interrupted")
                self.events.emit("al_interrupted", signal=signum, in_flight=len(self._in_flight))
                raise CampaignInterrupted(signum)
            reason = self._stop_reason()
            if reason:
                break
            self._train_if_needed()
            self._step_running()
            if not self._any(Status.RUNNING, Status.TRAINING) and not self.training_debt and self._in_flight:
                with self.clock.measure("waiting"):
                    self._take_finished(block=True)
            self._report_progress()
        self._drain_in_flight()
        result = ALResult(
            reason=reason,
            md_steps=sum(t.md.step for t in self.trajectories),
            labels_done=sum(t.labels_done for t in self.trajectories),
            labels_failed=sum(t.labels_failed for t in self.trajectories),
            training_rounds=self.training_rounds,
            labels_held=sum(t.labels_held for t in self.trajectories),
        )
        self.events.emit("al_stop", **result.__dict__)
        self._notify("stopped")
        return result

    def _any(self, *statuses: Status) -> bool:
        return any(t.status in statuses for t in self.trajectories)

    def _stop_reason(self) -> str:
        if self.budget_size() >= self.config.max_train_set_size:
            return "max_train_set_size"
        desired = self.config.desired_acc
        if desired is not None and self.committee.valid_force_mae() < desired:
            return "desired_acc"
        for trajectory in self.trajectories:
            if trajectory.status == Status.RUNNING and trajectory.md.step >= self.config.max_md_steps:
                self._set_status(trajectory, Status.DONE)
        if all(t.status == Status.DONE for t in self.trajectories):
            return "max_md_steps"
        return ""

    # ------------------------------------------------------------------ sampling

    @property
    def _stresses(self) -> Any:
        """The committee's stresses, asked for only when an NPT trajectory is in the batch."""
        return getattr(self.committee, "committee_stresses", None)

    def _step_running(self) -> None:
        running = [t for t in self.trajectories if t.status == Status.RUNNING]
        if not running:
            return
        with self.clock.measure("md"):
            step_batch([t.md for t in running], self.committee.committee_forces, self._stresses)
        # Guards, Eq. 1 against Eq. 2 and the energy gate: the clock's 'uncertainty' bucket (a
        # serial label wait or a checkpoint inside it is its own bucket, see WallClock.measure).
        with self.clock.measure("uncertainty"):
            self._check_running(running)

    def _check_running(self, running: list[Trajectory]) -> None:
        """After an MD step: guards first, then analysis frames, then the uncertainty checks."""
        unstable = []
        for trajectory in running:
            md = trajectory.md
            reason = first_failure(trajectory.guards, md)
            if reason:
                unstable.append(trajectory)
                self.events.emit("md_unstable", trajectory=trajectory.index, step=trajectory.md.step, reason=reason)
                self._rewind(trajectory)
        checked = [t for t in running if t not in unstable and t.md.step % self.config.check_every == 0]
        self._capture_probes([t for t in running if t not in unstable])
        if checked:
            self._check_uncertainty(checked)
        self._submit_probes()

    def _capture_probes(self, stable: list[Trajectory]) -> None:
        """This step's analysis frames, with the committee's forces, before anything rewinds."""
        self._probes, self._rejected = {}, set()
        if self.analysis is None:
            return
        for trajectory in stable:
            if self.analysis.due(trajectory.md.step):
                frame = trajectory.md.atoms.copy()
                frame.calc = None
                probe = Probe.of(trajectory.index, trajectory.md.step, trajectory.md.member_forces,
                                 self.threshold.value, self.train_set_size())
                self._probes[trajectory.index] = (frame, probe)

    def _submit_probes(self) -> None:
        """Analysis frames no AL label took along go to the reference on their own."""
        for index, (frame, probe) in self._probes.items():
            if index not in self._rejected:
                self.analysis.submit(frame, probe)
        self._probes = {}

    def _check_uncertainty(self, checked: list[Trajectory]) -> None:
        threshold = self.threshold.value
        deltas = [max_atomic_uncertainty(t.md.member_forces) for t in checked]
        trusted = []
        for trajectory, delta in zip(checked, deltas, strict=True):
            atoms = trajectory.md.atoms
            cell = {"volume": float(atoms.get_volume())} if atoms.pbc.all() else {}  # NPT traces in the report
            self.events.emit(
                "uncertainty", trajectory=trajectory.index, step=trajectory.md.step,
                delta=delta, threshold=threshold, **cell,
            )
            if self.trust_factor is not None and delta > self.trust_factor * threshold:
                # Far beyond the threshold: a region where one label cannot help (DP-GEN's
                # upper trust bound). Not labelled, not in the window; the trajectory rewinds.
                self.events.emit("trust_exceeded", trajectory=trajectory.index, step=trajectory.md.step,
                                 delta=delta, limit=self.trust_factor * threshold)
                self._rewind(trajectory)
                continue
            if (delta > threshold or self._stress_uncertain(trajectory)) and self._may_submit(trajectory):
                reason = self._predicted_energy_too_high(trajectory)
                if reason:
                    # The committee places this frame far above the energies the system visits:
                    # the energy gate would hold its label anyway, so the reference is not asked.
                    self.events.emit("md_unstable", trajectory=trajectory.index, step=trajectory.md.step,
                                     reason=reason)
                    self._rejected.add(trajectory.index)
                    self._rewind(trajectory)
                    continue
                self._submit(trajectory, delta, threshold)
            trusted.append(delta)
        self.threshold.update(trusted)
        if (
            self.config.freeze_threshold_at is not None
            and not self.threshold.frozen
            and self.train_set_size() >= self.config.freeze_threshold_at
        ):
            self.threshold.freeze()
            self.events.emit("threshold_frozen", value=self.threshold.value)

    def _stress_uncertain(self, trajectory: Trajectory) -> bool:
        """The optional stress trigger (``al.stress_uncertainty``), for trajectories with a barostat."""
        limit, stresses = self.config.stress_uncertainty, trajectory.md.member_stress
        if limit is None or stresses is None:
            return False
        spread = stress_uncertainty(stresses)
        if spread <= limit:
            return False
        self.events.emit("stress_uncertain", trajectory=trajectory.index, step=trajectory.md.step,
                         spread=spread, limit=limit)
        return True

    def _predicted_energy_too_high(self, trajectory: Trajectory) -> str | None:
        """The energy gate applied to the committee's mean energy, before any reference call."""
        predict = getattr(self.committee, "committee_energies", None)
        if self.energy_gate is None or predict is None:
            return None
        atoms = trajectory.md.atoms
        energy = float(np.mean(predict([atoms])[:, 0]))
        reason = self.energy_gate.outlier(atoms.numbers, energy)
        return f"predicted {reason}" if reason else None

    def _may_submit(self, trajectory: Trajectory) -> bool:
        if len(self._in_flight) >= self.max_in_flight or trajectory.status != Status.RUNNING:
            return False
        if self.budget_size() + len(self._in_flight) >= self.config.max_train_set_size:
            # Labels in flight may all land in the training set and fill it: another one
            # could only be reference time spent past the stop. (Should some of them be
            # validation points or fail, the next check submits again.) Logged once per stretch.
            if not self._withholding:
                self._withholding = True
                self.events.emit("label_withheld", trajectory=trajectory.index, step=trajectory.md.step,
                                 in_flight=len(self._in_flight), train_size=self.train_set_size(),
                                 budget_size=self.budget_size())
            return False
        self._withholding = False
        return trajectory.labels_in_flight < self.config.labels_per_trajectory

    def _submit(self, trajectory: Trajectory, delta: float, threshold: float) -> None:
        frame = trajectory.md.atoms.copy()
        frame.calc = None
        if self.planner is not None and self.planner.applies(frame) and self._submit_pieces(
                trajectory, frame, delta, threshold):
            return
        label_id = self._send(trajectory, frame, delta, threshold)
        if not self.continues:
            self._set_status(trajectory, Status.WAITING)
        probe = self._probes.pop(trajectory.index, None)
        if probe is not None:  # this frame is also the step's analysis point: one label answers both
            self.analysis.ride(label_id, probe[1])
        self._notify("submitted")
        self._wait_if_serial(lambda: label_id in self._in_flight)

    def _send(self, trajectory: Trajectory, atoms: Atoms, delta: float, threshold: float,
              piece: tuple[int, Any] | None = None) -> int:
        """One label to the reference (a frame, or ``piece`` = (number, Substructure) of one): a
        new label number, its ``label_submitted`` event, the launch. Returns the label number."""
        label_id = self._next_label
        self._next_label += 1
        step = trajectory.md.step
        provenance = {"origin": "al", "trajectory": trajectory.index, "md_step": step, "uncertainty": delta}
        fields: dict[str, Any] = {}
        if piece is not None:
            k, sub = piece
            provenance.update(piece=k, force_mask=sub.core.tolist(), parent_index=sub.parent_indices.tolist())
            fields = {"piece": k, "atoms": len(sub.atoms), "core": sub.n_core}
        self.events.emit(
            "label_submitted", phase="al", label=label_id, trajectory=trajectory.index, step=step,
            delta=delta, threshold=threshold, in_flight=len(self._in_flight) + 1, **fields,
        )
        self.launch(label_id, trajectory.index, atoms, provenance)
        return label_id

    def _wait_if_serial(self, outstanding: Callable[[], bool]) -> None:
        """Serial mode: the whole loop waits while ``outstanding()`` (its label, or a frame's pieces)."""
        if self.config.mode == "serial":
            with self.clock.measure("waiting"):
                while outstanding() and not self.should_stop():
                    self._take_finished(block=True)

    def _submit_pieces(self, trajectory: Trajectory, frame: Atoms, delta: float, threshold: float) -> bool:
        """Send the pieces of ``frame`` to the reference; False: label the frame whole after all."""
        started = time.perf_counter()
        plan = self.planner.plan(frame, trajectory.md.member_forces, threshold)
        carve_s = time.perf_counter() - started
        step = trajectory.md.step
        if not plan.pieces:
            self.events.emit("substructures_skipped", trajectory=trajectory.index, step=step, reason=plan.reason,
                             atoms=len(frame))
            return False
        # No piece is sent past the training-set budget (as no frame is, see ``_may_submit``); the
        # most uncertain pieces come first. A frame's pieces go together even past the in-flight cap.
        room = self.config.max_train_set_size - self.budget_size() - len(self._in_flight)
        del plan.pieces[max(1, room):]
        self.events.emit(
            "substructures", trajectory=trajectory.index, step=step, atoms=len(frame),
            uncertain_atoms=plan.uncertain_atoms, pieces=[len(p.atoms) for p in plan.pieces],
            core=[p.n_core for p in plan.pieces], periodic=bool(np.all(plan.pieces[0].atoms.pbc)),
            carve_s=round(carve_s, 4),
            **{key: [float(p.info[key]) for p in plan.pieces] for key in
               ("buffer_uncertainty_before", "buffer_uncertainty_after", "caps", "closest_pair")
               if key in plan.pieces[0].info},
        )
        self._groups[(trajectory.index, step)] = PieceGroup(frame, len(plan.pieces))
        if not self.continues:
            self._set_status(trajectory, Status.WAITING)
        for k, piece in enumerate(plan.pieces):
            self._send(trajectory, piece.atoms, delta, threshold, piece=(k, piece))
        self._notify("submitted")
        self._wait_if_serial(lambda: (trajectory.index, step) in self._groups)
        return True

    def _piece_back(self, trajectory: Trajectory, provenance: dict[str, Any], stored: bool) -> None:
        """One piece came back (stored, or failed for good): once it was its frame's last, the
        frame counts as labelled if any piece was stored, else the trajectory rewinds."""
        key = (trajectory.index, int(provenance["md_step"]))
        group = self._groups.get(key)
        if group is None:  # cannot happen within one process; a checkpoint keeps its groups
            return
        group.left -= 1
        group.stored += int(stored)
        if group.left > 0:
            return
        del self._groups[key]
        if group.stored:
            self._after_stored(trajectory, group.parent)
        else:
            self._rewind_if_waiting_on_it(trajectory)

    def launch(self, label_id: int, index: int, frame: Atoms, provenance: dict[str, Any]) -> None:
        """Send one frame to the reference (also on a retry, and on resume for labels in flight)."""
        attempt = self.attempts.get(label_id, 0)
        self._in_flight[label_id] = (index, frame, provenance)
        self.trajectories[index].labels_in_flight += 1
        self._steps_at_launch[label_id] = (self._total_steps(), self.trajectories[index].md.step)
        future = self.labeller.submit("al", label_id, frame, attempt, announce=False)
        future.add_done_callback(lambda f, i=index, lid=label_id: self._finished.put(("al", i, lid, f)))

    # ------------------------------------------------------------------ labels back

    def _take_finished(self, block: bool) -> None:
        """Handle every finished label; with ``block`` wait for at least one first.

        A blocking wait wakes twice a second to notice a stop request: a DFT label may take hours.
        """
        while True:
            try:
                item = self._finished.get(block=block, timeout=0.5 if block else None)
                break
            except queue.Empty:
                if not block or self.should_stop():
                    return
        while True:
            self._handle(*item)
            try:
                item = self._finished.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, index: int, label_id: int, future: Future) -> None:
        if kind == "analysis":
            self.analysis.handle(label_id, future)
            self._notify("label")
            return
        trajectory = self.trajectories[index]
        _, frame, provenance = self._in_flight.pop(label_id)
        outcome = outcome_of(future)
        trajectory.labels_in_flight -= 1
        others = self._steps_by_others(label_id, trajectory)
        if isinstance(outcome, LabelFailure):
            retry = self.labeller.may_retry(outcome, self.attempts.get(label_id, 0))
            # May raise LabelsKeepFailing: the last checkpoint still holds this label in flight,
            # so a resume submits it again.
            self.labeller.record_failure("al", outcome, retry=retry, label=label_id, trajectory=index,
                                         others_md_steps=others)
            if retry:
                self.attempts[label_id] = self.attempts.get(label_id, 0) + 1
                self.launch(label_id, index, frame, provenance)
                self._notify("label")
                return
            trajectory.labels_failed += 1
            if self.analysis is not None:
                self.analysis.al_label_dropped(label_id)
            if provenance.get("piece", -1) >= 0:
                self._piece_back(trajectory, provenance, stored=False)
            else:
                self._rewind_if_waiting_on_it(trajectory)
            self._notify("label")
            return
        self.labeller.record_success(outcome)
        if provenance.get("piece", -1) >= 0:
            self._store_piece(trajectory, label_id, frame, outcome, provenance, others)
            return
        if self.analysis is not None:
            self.analysis.al_label_stored(label_id, outcome.forces)
        outlier = self.energy_gate.outlier(frame.numbers, outcome.energy) if self.energy_gate else None
        if outlier:
            # Paid for, so stored; but far above every energy seen so far: kept out of training
            # until the data reach it, and the trajectory that found it rewinds.
            self.sink(frame, outcome, {**provenance, "held": True})
            self.held.append((frame, outcome, provenance))
            self.events.emit("label_held", phase="al", label=label_id, trajectory=index, energy=outcome.energy,
                             reason=outlier, others_md_steps=others)
            trajectory.labels_held += 1
            self._rewind_if_waiting_on_it(trajectory)
            self._notify("label")
            return
        stored = self.sink(frame, outcome, provenance)
        self.committee.add(stored)
        if self.energy_gate is not None:
            self.energy_gate.add(frame.numbers, outcome.energy)
        self.events.emit(
            "label_done", phase="al", label=label_id, trajectory=index, split=stored.split,
            **outcome.cost(), energy=outcome.energy, train_size=self.train_set_size(),
            others_md_steps=others,
        )
        self._after_stored(trajectory, frame)
        self._release_held(frame.numbers, outcome.energy)
        self._notify("label")

    def _store_piece(self, trajectory: Trajectory, label_id: int, frame: Atoms, outcome: Any,
                     provenance: dict[str, Any], others: int) -> None:
        """A piece's label: stored and trained on (core forces only). The energy gate does not
        see it: a piece's energy includes its cut surface and compares with nothing else."""
        stored = self.sink(frame, outcome, provenance)
        self.committee.add(stored)
        self.events.emit(
            "label_done", phase="al", label=label_id, trajectory=trajectory.index, split=stored.split,
            **outcome.cost(), energy=outcome.energy, train_size=self.train_set_size(),
            others_md_steps=others, piece=int(provenance["piece"]), atoms=len(frame),
        )
        self._piece_back(trajectory, provenance, stored=True)
        self._notify("label")

    def _release_held(self, numbers: np.ndarray, accepted_energy: float) -> None:
        """Held labels that an accepted label now confirms join training (in the order found)."""
        if self.energy_gate is None:
            return
        for item in list(self.held):
            frame, outcome, provenance = item
            same = len(frame) == len(numbers) and np.array_equal(np.sort(frame.numbers), np.sort(numbers))
            if same and self.energy_gate.confirms(numbers, outcome.energy, accepted_energy):
                self.held.remove(item)
                stored = self.sink(frame, outcome, {**provenance, "release": True})
                self.committee.add(stored)
                self.energy_gate.add(frame.numbers, outcome.energy)
                self.events.emit("label_released", trajectory=provenance["trajectory"],
                                 step=provenance["md_step"], split=stored.split, energy=outcome.energy)

    def _total_steps(self) -> int:
        return sum(t.md.step for t in self.trajectories)

    def _steps_by_others(self, label_id: int, trajectory: Trajectory) -> int:
        """MD steps the other trajectories took while this label was in flight."""
        all0, own0 = self._steps_at_launch.pop(label_id, (self._total_steps(), trajectory.md.step))
        return (self._total_steps() - all0) - (trajectory.md.step - own0)

    def adopt(self, label_id: int, index: int, frame: Atoms, held: bool = False,
              provenance: dict[str, Any] | None = None) -> None:
        """A label of a checkpoint that was stored before the kill: count it, never store it again.

        The frame is already in the dataset (and in the committee, which is rebuilt from it,
        unless the energy gate held it: then its trajectory rewinds, as it would have).
        """
        self.events.emit("label_adopted", label=label_id, trajectory=index, held=held)
        trajectory = self.trajectories[index]
        if provenance is not None and provenance.get("piece", -1) >= 0:
            self._piece_back(trajectory, provenance, stored=True)
            return
        if held:
            trajectory.labels_held += 1
            self._rewind_if_waiting_on_it(trajectory)
            return
        self._after_stored(trajectory, frame)

    def _after_stored(self, trajectory: Trajectory, frame: Atoms) -> None:
        trajectory.labels_done += 1
        trajectory.checkpoint = frame.copy()
        if self.continues:
            self.training_debt += self.config.max_epochs_per_point
        elif trajectory.status == Status.WAITING:
            trajectory.epochs_for_point = 0
            self._set_status(trajectory, Status.TRAINING)

    def _drain_in_flight(self) -> None:
        """At the stop, wait for labels still running and keep them: they cost reference time."""
        while self._in_flight or (self.analysis is not None and self.analysis.in_flight):
            with self.clock.measure("waiting"):
                self._take_finished(block=True)
            signum = int(self.should_stop())
            if signum:
                self._notify("interrupted")
                raise CampaignInterrupted(signum)

    def _rewind_if_waiting_on_it(self, trajectory: Trajectory) -> None:
        """A label that will not train (failed, or held by the energy gate): the trajectory that
        waits for it, or samples on past it ('continue'), goes back to its checkpoint geometry."""
        if trajectory.status == Status.WAITING or (self.continues and trajectory.status == Status.RUNNING):
            self._rewind(trajectory)

    def _rewind(self, trajectory: Trajectory) -> None:
        """Back to the checkpoint geometry with fresh velocities."""
        state = trajectory.md
        state.atoms.set_positions(trajectory.checkpoint.get_positions())
        state.atoms.set_cell(trajectory.checkpoint.get_cell())
        state.atoms.set_momenta(maxwell_boltzmann(state.atoms, state.md.temperature_K, state.rng))
        state.cell_momentum = state.barostat_chain = None  # the restored cell starts at rest (MTK)
        state.invalidate_forces()
        self.events.emit("rewind", trajectory=trajectory.index, step=state.step)
        self._set_status(trajectory, Status.RUNNING)

    # ------------------------------------------------------------------ training

    def _train_if_needed(self) -> None:
        training = [t for t in self.trajectories if t.status == Status.TRAINING]
        if not training and not self.training_debt:
            return
        epochs = self.config.intermediate_epochs
        self.training_debt = max(0, self.training_debt - epochs)
        with self.clock.measure("training"):
            metrics = self.committee.train_round(epochs)
        self.training_rounds += 1
        self.events.emit(
            "training_round", phase="al", epochs=epochs, trajectories=[t.index for t in training],
            train_size=self.train_set_size(),
            members=[m.__dict__ if hasattr(m, "__dict__") else m for m in metrics],
            **getattr(self.committee, "last_round", {}),
        )
        for trajectory in self.trajectories:
            trajectory.md.invalidate_forces()  # sample with the new weights at once
        for trajectory in training:
            trajectory.epochs_for_point += epochs
            if trajectory.epochs_for_point >= self.config.max_epochs_per_point:
                self._set_status(trajectory, Status.RUNNING)
        self._notify("training")

    # ------------------------------------------------------------------ progress

    def progress(self) -> dict[str, Any]:
        by_status = {s.value: sum(t.status == s for t in self.trajectories) for s in Status}
        return {
            "phase": "al",
            "steps": sum(t.md.step for t in self.trajectories),
            "train": self.train_set_size(),
            "in_flight": len(self._in_flight) + (len(self.analysis.in_flight) if self.analysis else 0),
            "threshold": self.threshold.value,
            "valid_mae": self.committee.valid_force_mae(),
            **by_status,
        }

    def _report_progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress())

