"""Ground-truth analysis points: the true error next to the committee's uncertainty.

Eq. 1's uncertainty is only worth its threshold if it tracks the error the model actually
makes. With ``al.analysis_every: K`` the frame each trajectory reaches at every K-th MD step is
sent to the reference whatever its uncertainty (the aims-PAX paper's Fig. 2 study). The label
is stored with origin and split ``analysis``: never trained on, never in Eq. 2's window, never
counted against the training-set budget. The committee's forces at that step (the model as it
was when it sampled the frame) wait beside the label; when it returns, an ``analysis_point``
event records the uncertainty, the threshold and the true error, the largest per-atom norm of
(committee-mean force - reference force), in eV/A.

A frame the AL check sends to the reference at the same step is not paid for twice: its AL
label doubles as the analysis point (``source: "al"``) and is measured against the forces the
committee predicted before training on it. Frames that fail a guard are never labelled here
either: they are not on the physical path the study is about.

What is saved in a checkpoint (``state_dict``): the analysis labels in flight (frame and the
waiting committee forces) and the probes riding on AL labels; a resume submits the first again
unless the dataset already has them, and emits the point of a label stored before the kill.
A point may then appear twice in the event log (emitted, then killed before the checkpoint):
readers keep the last per (trajectory, step).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.events import EventLog
from aimspax_like.labelling import Labeller, outcome_of
from aimspax_like.reference.results import LabelFailure, LabelOutcome
from aimspax_like.structures import atoms_from_arrays, atoms_to_arrays
from aimspax_like.uncertainty import max_atomic_uncertainty

PHASE = "analysis"


def true_force_error(predicted: np.ndarray, reference: np.ndarray) -> float:
    """The largest per-atom norm of ``predicted - reference`` (eV/A); both ``[n_atoms, 3]``."""
    return float(np.linalg.norm(np.asarray(predicted) - np.asarray(reference), axis=1).max())


@dataclass
class Probe:
    """What the committee said about one frame, kept until the reference answers."""

    trajectory: int
    step: int
    delta: float  # Eq. 1, eV/A
    threshold: float  # Eq. 2 when the frame was sampled, eV/A (inf during warm-up)
    mean_forces: np.ndarray  # committee mean [n_atoms, 3], eV/A
    train_size: int

    @classmethod
    def of(cls, trajectory: int, step: int, member_forces: np.ndarray, threshold: float, train_size: int) -> Probe:
        return cls(trajectory, step, max_atomic_uncertainty(member_forces), float(threshold),
                   np.asarray(member_forces).mean(axis=0), int(train_size))


# Stores a successful analysis label durably (origin and split 'analysis').
AnalysisSink = Callable[[Atoms, LabelOutcome, dict[str, Any]], Any]


class AnalysisPoints:
    """The analysis labels of one AL phase: due steps, submission, outcomes, checkpoint state."""

    def __init__(
        self, every: int, labeller: Labeller, sink: AnalysisSink, events: EventLog,
        on_submitted: Callable[[int, Future], None],
    ) -> None:
        self.every = every
        self.labeller = labeller
        self.sink = sink
        self.events = events
        self.on_submitted = on_submitted  # hands each future to the scheduler's queue of finished labels
        self.in_flight: dict[int, tuple[Atoms, Probe]] = {}  # analysis label id -> (frame, probe)
        self.riding: dict[int, Probe] = {}  # AL label id -> the probe its result answers
        self.attempts: dict[int, int] = {}
        self.next_id = 0
        self.points = 0

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    # ------------------------------------------------------------------ sending

    def submit(self, frame: Atoms, probe: Probe) -> None:
        label_id = self.next_id
        self.next_id += 1
        self.events.emit("label_submitted", phase=PHASE, label=label_id, trajectory=probe.trajectory,
                         step=probe.step, delta=probe.delta, threshold=probe.threshold,
                         in_flight=len(self.in_flight) + 1)
        self.launch(label_id, frame, probe)

    def launch(self, label_id: int, frame: Atoms, probe: Probe) -> None:
        self.in_flight[label_id] = (frame, probe)
        future = self.labeller.submit(PHASE, label_id, frame, self.attempts.get(label_id, 0), announce=False)
        self.on_submitted(label_id, future)

    def ride(self, al_label: int, probe: Probe) -> None:
        """The AL label ``al_label`` labels this very frame: its result answers the probe too."""
        self.riding[al_label] = probe

    # ------------------------------------------------------------------ outcomes

    def handle(self, label_id: int, future: Future) -> None:
        frame, probe = self.in_flight.pop(label_id)
        outcome = outcome_of(future)
        if isinstance(outcome, LabelFailure):
            retry = self.labeller.may_retry(outcome, self.attempts.get(label_id, 0))
            self.labeller.record_failure(PHASE, outcome, retry=retry, label=label_id, trajectory=probe.trajectory,
                                         step=probe.step)
            if retry:
                self.attempts[label_id] = self.attempts.get(label_id, 0) + 1
                self.launch(label_id, frame, probe)
            return
        self.labeller.record_success(outcome)
        self.sink(frame, outcome, {"origin": PHASE, "trajectory": probe.trajectory, "md_step": probe.step,
                                   "uncertainty": probe.delta})
        self.events.emit("label_done", phase=PHASE, label=label_id, trajectory=probe.trajectory,
                         **outcome.cost(), energy=outcome.energy)
        self._point(probe, outcome.forces, source=PHASE, label=label_id)

    def al_label_stored(self, al_label: int, reference_forces: np.ndarray) -> None:
        probe = self.riding.pop(al_label, None)
        if probe is not None:
            self._point(probe, reference_forces, source="al", label=al_label)

    def al_label_dropped(self, al_label: int) -> None:
        self.riding.pop(al_label, None)

    def _point(self, probe: Probe, reference_forces: np.ndarray, source: str, label: int) -> None:
        self.points += 1
        self.events.emit(
            "analysis_point", phase="al", source=source, label=label, trajectory=probe.trajectory,
            step=probe.step, delta=probe.delta, threshold=probe.threshold,
            true_error=true_force_error(probe.mean_forces, reference_forces), train_size=probe.train_size,
        )

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {
            "next_id": self.next_id, "attempts": dict(self.attempts), "points": self.points,
            "in_flight": [{"label": k, "frame": atoms_to_arrays(frame), "probe": asdict(probe)}
                          for k, (frame, probe) in sorted(self.in_flight.items())],
            "riding": {int(k): asdict(p) for k, p in self.riding.items()},
        }

    def load_state_dict(
        self, state: dict[str, Any], stored_forces: Callable[[str, int, int], np.ndarray | None],
    ) -> dict[str, int]:
        """Put a ``state_dict`` back; labels the dataset already holds are answered from it.

        ``stored_forces(origin, trajectory, md_step)`` returns the stored reference forces of a
        frame, or None when the dataset does not have it. Riding probes whose AL label was stored
        are answered here (the scheduler adopts such labels instead of sending them again).
        """
        self.next_id, self.points = int(state["next_id"]), int(state.get("points", 0))
        self.attempts = {int(k): int(v) for k, v in state["attempts"].items()}
        counts = {"adopted": 0, "resubmitted": 0}
        for item in state["in_flight"]:
            probe = Probe(**item["probe"])
            forces = stored_forces(PHASE, probe.trajectory, probe.step)
            if forces is not None:
                self._point(probe, forces, source=PHASE, label=int(item["label"]))
                counts["adopted"] += 1
            else:
                self.launch(int(item["label"]), atoms_from_arrays(item["frame"]), probe)
                counts["resubmitted"] += 1
        for label, saved in state["riding"].items():
            probe = Probe(**saved)
            forces = stored_forces("al", probe.trajectory, probe.step)
            if forces is not None:
                self._point(probe, forces, source="al", label=int(label))
            else:
                self.riding[int(label)] = probe
        return counts

