"""On-the-fly learning inside any ASE simulation (FALCON-style): an ASE calculator that learns as it goes.

The campaign's active learning runs its own MD; this calculator instead lets a user's own ASE
driver (Langevin, an optimiser, NEB, a Monte Carlo loop) steer the committee. Every call asks
the committee first. When the committee disagrees more than the trigger allows, the reference
labels the structure, the label is stored durably, the committee trains on it, and the call
answers with the reference's numbers: the simulation never takes a step on a prediction that
was judged untrustworthy. Below the trigger the committee mean is returned, which is the cheap
path that makes the whole scheme worth it.

Uncertainty measures (both are computed every call, one of them drives the trigger):

- ``"energy"``: FALCON's energy disagreement, the standard deviation of the members' total
  energies (per atom with ``energy_per_atom``, so one threshold fits systems of any size);
- ``"forces"``: Eq. 1, the largest per-atom force standard deviation (``max_atomic_uncertainty``).

Trigger: a fixed ``threshold`` (FALCON's epsilon) or ``"moving_average"`` (Eq. 2,
``MovingAverageThreshold``). The moving average follows the scheduler's semantics: the value is
read before this call's uncertainty is added, it is infinite during the warm-up (nothing is
labelled while the average means nothing), and only unlabelled (trusted) uncertainties enter
the window.

A failed reference calculation (crash, SCF failure, timeout, non-finite numbers) raises
``ReferenceLabelError``: the structure was judged too uncertain for the committee, so
continuing on the committee's guess would silently defeat the point; nothing is stored or
trained on for it.

Large systems (``planner``, ``otf.substructures``): a call judged too uncertain on a frame of at
least ``min_atoms`` atoms labels the substructures carved around its uncertain atoms instead of
the frame (in parallel threads), stores them with their core masks, trains on their core forces,
and answers with the retrained committee, as there is no reference answer for the whole frame.

Labels are stored with origin ``"al"`` (on-the-fly labels are active-learning labels: the
same dataset tools, exports and training read them) and ``source="otf"``, which tells them
apart from a campaign's own.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from aimspax_like.committee import Committee
from aimspax_like.config import CampaignConfig
from aimspax_like.data import DatasetStore, LabelledFrame, reference_fingerprint
from aimspax_like.data.splits import SplitCounter
from aimspax_like.events import EventLog
from aimspax_like.piece_planner import PiecePlanner
from aimspax_like.reference.label import label
from aimspax_like.reference.results import LabelResult
from aimspax_like.uncertainty import MovingAverageThreshold, max_atomic_uncertainty

__all__ = ["OTF_ORIGIN", "OTF_SOURCE", "OnTheFlyCalculator", "ReferenceLabelError"]

OTF_ORIGIN = "al"
OTF_SOURCE = "otf"
MEASURES = ("energy", "forces")
TIMED = ("model", "training", "reference")
# Training frames per member whose energies set the members' E0s after each round (the latest
# ones): enough to pin a constant, few enough that the refit stays cheap as the set grows.
REFIT_FRAMES = 64


class ReferenceLabelError(RuntimeError):
    """The reference could not label a structure the committee was too uncertain about."""


class OnTheFlyCalculator(Calculator):
    """Committee-mean predictions, replaced by reference labels (which the committee then learns)
    wherever the committee's uncertainty exceeds the trigger.

    ``results`` carry, besides ``energy``/``free_energy``/``forces`` (and ``stress``),
    ``uncertainty_energy``, ``uncertainty_forces``, ``threshold`` and ``labelled``, so a driver's
    observer can see every decision without a second evaluation.

    Stress: for a fully periodic cell it is computed on every call (committee mean, or the
    reference's on a labelled call) unless ``compute_stress=False``. Computing it only when asked
    would let ASE's later ``get_stress()`` on the same geometry re-enter ``calculate`` and take a
    second labelling decision for one structure.

    ``min_train``: while the committee holds fewer distinct training frames than this, every
    call is labelled, because a committee that has barely seen data can agree by chance.
    ``log_every``: an ``otf_step`` event every that many calls (and on every label), so that the
    event log of a long MD stays small.
    """

    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def __init__(
        self,
        committee: Committee,
        reference: Mapping[str, Any] | Any,
        store: DatasetStore | None = None,
        measure: str = "forces",
        threshold: float | str | MovingAverageThreshold = 0.1,
        energy_per_atom: bool = True,
        epochs: int = 2,
        valid_ratio: float = 0.2,
        events: EventLog | None = None,
        min_train: int = 0,
        *,
        log_every: int = 10,
        compute_stress: bool = True,
        trajectory: int = 0,
        scratch: str | os.PathLike[str] | None = None,
        window: int = 400,
        c_x: float = 0.0,
        warmup: int = 10,
        calibrate: bool = False,
        calibration_window: int = 25,
        planner: PiecePlanner | None = None,
    ) -> None:
        super().__init__()
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        if epochs < 1:
            raise ValueError("epochs must be at least 1")
        if not 0.0 <= valid_ratio < 1.0:
            raise ValueError(f"valid_ratio must lie in [0, 1), got {valid_ratio}")
        if log_every < 1:
            raise ValueError("log_every must be at least 1")
        if calibrate and isinstance(threshold, (str, MovingAverageThreshold)):
            raise ValueError("calibrate needs a fixed threshold (a moving average is relative already)")
        self.moving: MovingAverageThreshold | None = None
        self.fixed_threshold: float | None = None
        if isinstance(threshold, MovingAverageThreshold):
            self.moving = threshold
        elif isinstance(threshold, str):
            if threshold != "moving_average":
                raise ValueError(f"threshold must be a number or 'moving_average', got {threshold!r}")
            self.moving = MovingAverageThreshold(window=window, c_x=c_x, warmup=warmup)
        else:
            self.fixed_threshold = float(threshold)
            if not self.fixed_threshold > 0.0:
                raise ValueError(f"a fixed threshold must be positive, got {threshold}")
        self.committee = committee
        spec = reference.model_dump(mode="json") if hasattr(reference, "model_dump") else dict(reference)
        self.reference_spec: dict[str, Any] = spec
        self.fingerprint = reference_fingerprint(spec)
        self.store = store
        self.measure = measure
        self.energy_per_atom = energy_per_atom
        self.epochs = int(epochs)
        self.valid_ratio = float(valid_ratio)
        self.events = events
        self.min_train = int(min_train)
        self.log_every = int(log_every)
        self.compute_stress = compute_stress
        self.trajectory = int(trajectory)
        self.scratch = None if scratch is None else Path(scratch)
        # A store already holding this calculator's labels continues their train/valid pattern.
        done = 0
        if store is not None:
            identities = store.keys()  # (origin, trajectory, md_step, piece) of every stored frame
            done = sum(1 for origin, traj, *_ in identities if origin == OTF_ORIGIN and traj == self.trajectory)
        self.splits = None if self.valid_ratio == 0.0 else SplitCounter(self.valid_ratio, start=done)
        self.n_calls = 0
        self.n_labels = 0
        self.labelled_steps: list[int] = []
        self._guess: tuple[float, np.ndarray, float] = (float("nan"), np.zeros((0, 3)), float("nan"))
        self._label_next = False
        self.calibrate = bool(calibrate)
        self.calibration_window = int(calibration_window)
        self.ratios: list[float] = []  # true error / uncertainty at computed labels (calibrate)
        # Wall and CPU seconds of the three costs an on-the-fly run weighs against each other.
        self.timings: dict[str, float] = {f"{part}_{kind}": 0.0 for part in TIMED for kind in ("s", "cpu_s")}
        # Labels stored by an earlier process of a resumed run, by call number: a call that
        # meets one of them at the same geometry takes it instead of asking the reference again.
        self.stored_labels: dict[int, int] = {}
        self.stored_pieces: dict[tuple[int, int], int] = {}  # (call, piece) -> row, the same for pieces
        self.planner = planner  # large frames labelled as substructures (otf.substructures)
        if store is not None:
            for row, (origin, traj, step, piece) in enumerate(store.keys()):
                if origin == OTF_ORIGIN and traj == self.trajectory:
                    if piece < 0:
                        self.stored_labels[step] = row
                    else:
                        self.stored_pieces[(step, piece)] = row

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_files(
        cls,
        model_paths: Sequence[str | os.PathLike[str]],
        config: CampaignConfig,
        reference: Mapping[str, Any] | Any | None = None,
        store_path: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> OnTheFlyCalculator:
        """Continue from saved members (a campaign's ``models/``) with the frames of ``store_path``.

        The store is opened when it exists (its train/valid frames join the members' training
        sets, as in ``Committee.from_files``) and created otherwise. ``reference`` defaults to
        the config's own, so the new labels share the campaign's fingerprint.
        """
        store = None
        frames: list[LabelledFrame] = []
        if store_path is not None:
            path = Path(store_path)
            store = DatasetStore.open(path) if path.exists() else DatasetStore.create(path)
            frames = store.frames()
        committee = Committee.from_files(config, [Path(p) for p in model_paths], frames)
        spec = config.reference if reference is None else reference
        return cls(committee, spec, store, **options)

    @classmethod
    def from_frames(
        cls,
        config: CampaignConfig,
        frames: Sequence[LabelledFrame],
        reference: Mapping[str, Any] | Any | None = None,
        store: DatasetStore | None = None,
        initial_epochs: int = 5,
        atomic_numbers: Sequence[int] | None = None,
        **options: Any,
    ) -> OnTheFlyCalculator:
        """A fresh committee fitted ``initial_epochs`` epochs on a few labelled frames.

        ``atomic_numbers`` must name every element the simulation may meet (MACE cannot add one
        later); by default those of ``frames``.
        """
        numbers = set(atomic_numbers or ()) | {int(z) for f in frames for z in f.numbers}
        committee = Committee.from_data(config, list(frames), sorted(numbers))
        if initial_epochs > 0:
            committee.train_round(initial_epochs)
            committee.refit_energies(REFIT_FRAMES)
        spec = config.reference if reference is None else reference
        return cls(committee, spec, store, **options)

    # ------------------------------------------------------------------ ASE

    @property
    def threshold(self) -> float:
        """The trigger's current value on the chosen measure (infinite during a moving-average warm-up)."""
        if self.moving is not None:
            return self.moving.value
        assert self.fixed_threshold is not None
        return self.fixed_threshold

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        periodic = bool(np.all(atoms.pbc))
        want_stress = periodic and self.compute_stress
        if "stress" in properties and not want_stress:
            raise PropertyNotImplementedError(
                "stress needs a fully periodic cell (and compute_stress=True)")
        step = self.n_calls
        self.n_calls += 1

        with self._timed("model"):
            prediction = self.committee.ensemble.predict([atoms])
        member_forces = prediction.forces_of(0)
        member_energies = prediction.energies[:, 0]
        u_forces = max_atomic_uncertainty(member_forces)
        u_energy = float(np.std(member_energies))
        if self.energy_per_atom:
            u_energy /= len(atoms)
        raw = u_forces if self.measure == "forces" else u_energy
        factor = self.calibration
        measured = raw * factor
        threshold = self.threshold
        # all_train walks every member's frames: only asked for when min_train can matter.
        untrained = self.min_train > 0 and len(self.committee.all_train) < self.min_train
        asked, self._label_next = self._label_next, False
        labelled = untrained or asked or measured > threshold

        results: dict[str, Any]
        pieces = labelled and not asked and self.planner is not None and self.planner.applies(atoms)
        if labelled:
            self._guess = (float(member_energies.mean()), member_forces.mean(axis=0), raw)
            results = (self._label_pieces(atoms, step, raw, member_forces, threshold, want_stress) if pieces
                       else None) or self._label(atoms, step, raw, want_stress)
        else:
            energy = float(member_energies.mean())
            results = {"energy": energy, "free_energy": energy, "forces": member_forces.mean(axis=0)}
            if want_stress:
                with self._timed("model"):
                    member_stresses = self.committee.committee_stresses([atoms])[0]
                results["stress"] = full_3x3_to_voigt_6_stress(member_stresses.mean(axis=0))
            if self.moving is not None:
                self.moving.update(measured)  # only trusted steps feed Eq. 2, as in the scheduler
        results.update(uncertainty_energy=u_energy, uncertainty_forces=u_forces,
                       threshold=threshold, labelled=labelled, calibration=factor)
        self.results = results
        if self.events is not None and (labelled or step % self.log_every == 0):
            self.events.emit("otf_step", step=step, uncertainty_energy=u_energy, uncertainty_forces=u_forces,
                             measure=self.measure, threshold=threshold, labelled=labelled, calibration=factor,
                             reason="min_train" if untrained else "asked" if asked else None)

    @property
    def calibration(self) -> float:
        """The factor the measured uncertainty is multiplied by before the trigger compares it.

        1 unless ``calibrate``. With it: the median, over the latest ``calibration_window``
        computed labels, of the committee's true error there (before training on the label) over
        its uncertainty, on the trigger's measure (forces: the largest atomic error norm over
        sqrt(3), Eq. 1's scale), and never below 1. A committee whose members agree more than
        their errors warrant (usual when they share their training data) then labels where its
        *error*, not its disagreement, is expected to exceed the threshold. Three labels are
        needed before it acts.
        """
        recent = self.ratios[-self.calibration_window:]
        if not self.calibrate or len(recent) < 3:
            return 1.0
        return max(1.0, float(np.median(recent)))

    def label_now(self, atoms: Atoms) -> dict[str, Any]:
        """Have the reference label ``atoms`` now, whatever the uncertainty; returns the results.

        For the checks a driver's own criterion needs: an optimiser converged on committee
        forces has found the committee's minimum; one reference call there says whether it is
        the reference's too (and, stored and trained on, makes the committee better there). The
        call counts, is stored and logged like any label.
        """
        self.reset()  # the same geometry must not be answered from the cache
        self._label_next = True
        self.calculate(atoms, ["energy", "forces"], all_changes)
        # Copies: the arrays in ``results`` are what later get_forces() calls hand out.
        return {key: value.copy() if isinstance(value, np.ndarray) else value for key, value in self.results.items()}

    # ------------------------------------------------------------------ bookkeeping

    @contextlib.contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        wall, cpu = time.monotonic(), time.process_time()
        try:
            yield
        finally:
            self.timings[f"{part}_s"] += time.monotonic() - wall
            self.timings[f"{part}_cpu_s"] += time.process_time() - cpu

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the committee's own state: the call counter, the
        labels so far, the Eq. 2 window, the train/valid pattern and the time spent."""
        return {
            "n_calls": self.n_calls, "n_labels": self.n_labels, "labelled_steps": list(self.labelled_steps),
            "moving": None if self.moving is None else self.moving.state_dict(),
            "splits": None if self.splits is None else self.splits.k, "timings": dict(self.timings),
            "ratios": list(self.ratios),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``. The split counter is not rewound: labels stored after the
        checkpoint keep their split, and the next new label continues after them."""
        self.n_calls, self.n_labels = int(state["n_calls"]), int(state["n_labels"])
        self.labelled_steps = [int(k) for k in state["labelled_steps"]]
        if self.moving is not None and state["moving"] is not None:
            self.moving = MovingAverageThreshold.from_state_dict(state["moving"])
        self.timings.update(state["timings"])
        self.ratios = [float(r) for r in state.get("ratios", [])]

    # ------------------------------------------------------------------ labelling

    def _workdir(self, step: int) -> tuple[str, tempfile.TemporaryDirectory[str] | None]:
        """The label's scratch folder: under ``scratch``, else beside the store, else a temporary one."""
        base = self.scratch
        if base is None and self.store is not None:
            base = self.store.path.parent / "otf_scratch"
        if base is None:
            holder = tempfile.TemporaryDirectory(prefix="otf_label_")
            return holder.name, holder
        return str(base / f"traj{self.trajectory}_step{step}"), None

    def _run_reference(self, atoms: Atoms, spec: dict[str, Any], step: int, suffix: str = "") -> tuple[Any, bool]:
        """One reference calculation in the call's scratch folder (``suffix`` tells a piece's
        apart); returns the outcome and whether its folder is kept (not a temporary one)."""
        workdir, holder = self._workdir(step)
        try:
            return label(atoms, spec, workdir + (suffix if holder is None else "")), holder is None
        finally:
            if holder is not None:
                holder.cleanup()

    def _refuse(self, step: int, spec: dict[str, Any], outcome: Any, kept: bool, piece: int | None = None) -> None:
        """A failed reference call: ``otf_label_failed``, then ``ReferenceLabelError`` (nothing is stored)."""
        where = {} if piece is None else {"piece": piece}
        if self.events is not None:
            self.events.emit("otf_label_failed", step=step, **where, kind=str(outcome.kind.value),
                             message=outcome.message, wall_s=outcome.wall_s)
        raise ReferenceLabelError(
            f"reference ({spec.get('kind')}) failed{'' if piece is None else f' on piece {piece}'} at call {step}: "
            f"{outcome.kind.value}: {outcome.message}"
            + (f" (scratch kept in {outcome.workdir})" if outcome.workdir and kept else ""))

    def _stored_label(self, atoms: Atoms, step: int) -> LabelledFrame | None:
        """The frame an earlier process of this run stored for this call, if it is this geometry."""
        index = self.stored_labels.get(step)
        if index is None or self.store is None:
            return None
        frame = self.store.frame(index)
        same = (len(frame.numbers) == len(atoms) and np.array_equal(frame.numbers, atoms.numbers)
                and np.allclose(frame.positions, atoms.positions, rtol=0.0, atol=1e-6))
        return frame if same else None

    def _label(self, atoms: Atoms, step: int, measured: float, want_stress: bool) -> dict[str, Any]:
        stored = self._stored_label(atoms, step)
        if stored is not None and (stored.stress is not None or not want_stress):
            # A resumed run replaying the step it was killed after: the label is in the dataset
            # (and the committee was built with it); asking the reference again would repeat it.
            if self.events is not None:
                self.events.emit("otf_label", step=step, split=stored.split, index=self.stored_labels[step],
                                 uncertainty=measured, label_wall_s=0.0, reused=True)
            return self._learn(step, stored.energy, stored.forces, stored.stress if want_stress else None,
                               want_stress, new_frame=None)
        spec = dict(self.reference_spec)
        if want_stress:
            spec["compute_stress"] = True
        with self._timed("reference"):
            outcome, kept = self._run_reference(atoms, spec, step)
        if not isinstance(outcome, LabelResult):
            self._refuse(step, spec, outcome, kept)
        split = "train" if self.splits is None else self.splits.next()
        # LabelledFrame refuses non-finite numbers (label() already checked): nothing bad is stored.
        frame = LabelledFrame.from_atoms(
            atoms, energy=outcome.energy, forces=outcome.forces,
            stress=outcome.stress if want_stress else None,
            split=split, origin=OTF_ORIGIN, trajectory=self.trajectory, md_step=step,
            uncertainty=measured, reference=self.fingerprint, label_wall_s=outcome.wall_s, source=OTF_SOURCE,
        )
        if want_stress and outcome.stress is None:
            raise ReferenceLabelError(f"reference ({spec.get('kind')}) returned no stress at call {step}")
        guess_energy, guess_forces, raw = self._guess
        error_forces = float(np.linalg.norm(guess_forces - outcome.forces, axis=1).max())
        error_energy = abs(guess_energy - float(outcome.energy))
        if raw > 0:
            on_measure = error_forces / np.sqrt(3.0) if self.measure == "forces" else (
                error_energy / len(atoms) if self.energy_per_atom else error_energy)
            self.ratios.append(float(on_measure / raw))
        # Durable before anything learns from it: a kill from here on loses no label.
        index = self.store.append(frame) if self.store is not None else None
        if index is not None:
            self.stored_labels[step] = index
        if self.events is not None:
            # What the committee would have answered: its true error where it was unsure, the
            # evidence for (or against) trusting its uncertainty elsewhere.
            self.events.emit("otf_label", step=step, split=split, index=index, uncertainty=measured,
                             label_wall_s=outcome.wall_s, reused=False,
                             error_energy=error_energy, error_forces=error_forces)
        return self._learn(step, outcome.energy, outcome.forces, outcome.stress if want_stress else None,
                           want_stress, new_frame=frame)

    def _label_pieces(self, atoms: Atoms, step: int, measured: float, member_forces: np.ndarray, threshold: float,
                      want_stress: bool) -> dict[str, Any] | None:
        """Label the substructures of a large frame (``planner``) instead of the frame, in parallel
        threads (a DFT label is a subprocess), store them, train once, and answer the call with the
        retrained committee: no reference number exists for the whole frame. None: the planner
        found no piece worth carving (the caller labels the frame whole)."""
        from concurrent.futures import ThreadPoolExecutor

        # A resumed run replaying this call takes the pieces an earlier process stored for it, as
        # they are (the planner's random crops need not come out the same twice); none is redone.
        stored = self._stored_pieces_of(atoms, step)
        pieces: list[Any] = []
        if not stored:
            plan = self.planner.plan(atoms, member_forces, threshold if np.isfinite(threshold) else measured)
            if not plan.pieces:
                if self.events is not None:
                    self.events.emit("otf_substructures_skipped", step=step, reason=plan.reason, atoms=len(atoms))
                return None
            pieces = plan.pieces
        todo = list(range(len(pieces)))
        spec = dict(self.reference_spec)
        spec.pop("compute_stress", None)  # a piece's stress is no label
        with self._timed("reference"), ThreadPoolExecutor(max(1, len(todo))) as pool:
            outcomes = dict(zip(todo, pool.map(
                lambda k: self._run_reference(pieces[k].atoms, spec, step, f"_piece{k}"), todo), strict=True))
        for k, (outcome, kept) in outcomes.items():
            if not isinstance(outcome, LabelResult):
                self._refuse(step, spec, outcome, kept, piece=k)
        _, guess_forces, raw = self._guess
        for k in sorted(stored) or todo:
            if k in stored:
                frame, reused = stored[k], True
            else:
                piece = pieces[k]
                outcome = outcomes[k][0]
                frame = LabelledFrame.from_atoms(
                    piece.atoms, energy=outcome.energy, forces=outcome.forces, stress=None,
                    split="train" if self.splits is None else self.splits.next(), origin=OTF_ORIGIN,
                    trajectory=self.trajectory, md_step=step, uncertainty=measured, reference=self.fingerprint,
                    label_wall_s=outcome.wall_s, source=OTF_SOURCE, piece=k, force_mask=piece.core,
                    parent_index=piece.parent_indices)
                reused = False
            # The committee's error before training, on the core atoms the piece labels.
            core = frame.force_mask
            error_forces = float(np.linalg.norm(guess_forces[frame.parent_index[core]] - frame.forces[core],
                                                axis=1).max())
            if not reused and raw > 0 and self.measure == "forces":
                self.ratios.append(float(error_forces / np.sqrt(3.0) / raw))
            index = self.stored_pieces.get((step, k))
            if not reused and self.store is not None:
                index = self.store.append(frame)
                self.stored_pieces[(step, k)] = index
            if self.events is not None:
                self.events.emit("otf_label", step=step, split=frame.split, index=index, uncertainty=measured,
                                 label_wall_s=0.0 if reused else frame.label_wall_s, reused=reused, piece=k,
                                 atoms=len(frame), core=int(core.sum()), error_forces=error_forces)
            if not reused:  # a reused piece is in the committee already (rebuilt from the dataset)
                self.committee.add(frame)
        self._train(step)
        with self._timed("model"):
            prediction = self.committee.ensemble.predict([atoms])
        energy = float(prediction.energies[:, 0].mean())
        results: dict[str, Any] = {"energy": energy, "free_energy": energy,
                                   "forces": prediction.forces_of(0).mean(axis=0)}
        if want_stress:
            with self._timed("model"):
                member_stresses = self.committee.committee_stresses([atoms])[0]
            results["stress"] = full_3x3_to_voigt_6_stress(member_stresses.mean(axis=0))
        return results

    def _stored_pieces_of(self, atoms: Atoms, step: int) -> dict[int, LabelledFrame]:
        """The pieces stored for call ``step`` by an earlier process, if they were cut from this
        very geometry (each atom where its parent atom is, up to one shift of the whole piece and
        lattice vectors); else none."""
        if self.store is None:
            return {}
        found = {k: self.store.frame(row) for (s, k), row in self.stored_pieces.items() if s == step}
        for frame in found.values():
            if frame.parent_index.max() >= len(atoms) or not np.array_equal(
                    atoms.numbers[frame.parent_index[frame.parent_index >= 0]],
                    frame.numbers[frame.parent_index >= 0]):
                return {}
            real = frame.parent_index >= 0
            shift = frame.positions[real] - atoms.positions[frame.parent_index[real]]
            shift -= shift[0]
            if np.any(atoms.pbc):
                from ase.geometry import find_mic

                shift, _ = find_mic(shift, atoms.cell, atoms.pbc)
            if np.abs(shift).max() > 1e-6:
                return {}
        return found

    def _train(self, step: int) -> None:
        """One training round after a label (its frames joined the committee already)."""
        start = time.monotonic()
        with self._timed("training"):
            self.committee.train_round(self.epochs)
            self.committee.refit_energies(REFIT_FRAMES)
        self.n_labels += 1
        self.labelled_steps.append(step)
        if self.events is not None:
            self.events.emit("otf_train", step=step, train_wall_s=time.monotonic() - start,
                             train_set=len(self.committee.all_train),
                             valid_force_mae=self.committee.valid_force_mae())

    def _learn(self, step: int, energy: float, forces: np.ndarray, stress: np.ndarray | None, want_stress: bool,
               new_frame: LabelledFrame | None) -> dict[str, Any]:
        """Train on a label (``new_frame`` joins the committee first; a reused one is there already)
        and answer the call with the reference's numbers."""
        if new_frame is not None:
            self.committee.add(new_frame)
        self._train(step)
        results: dict[str, Any] = {"energy": float(energy), "free_energy": float(energy),
                                   "forces": np.array(forces, dtype=float)}
        if want_stress:
            assert stress is not None
            results["stress"] = np.asarray(stress, dtype=float).reshape(6).copy()
        return results
