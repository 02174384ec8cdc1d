"""Reference-driven MD for IDG and the test set, run as segments on the label workers.

With ``sampler: reference`` every MD step is a reference calculation. The driver never runs one
itself: each trajectory advances by ``stride`` steps at a time as one task on a label worker
(``reference.md_segment``), and the frame at the end of each segment is a labelled frame. The
driver keeps every trajectory's phase-space point between segments, so trajectories of many
start structures, or several per structure, run side by side on as many workers.

Failures follow the labels' rules: a failed segment is a ``label_failed`` event that counts
towards ``al.failures.max_consecutive``, and its trajectory restarts from its last handed-out
frame with fresh velocities (the same geometry with the same velocities would fail again).

Resume. The segment state is not checkpointed. A trajectory starts again from its newest stored
frame (fresh velocities) at that frame's MD step, so nothing stored is labelled again and no
label that was paid for is lost; only the segments in flight at the kill are run again.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.config import MDConfig
from aimspax_like.errors import CampaignInterrupted
from aimspax_like.labelling import Labeller, outcome_of
from aimspax_like.reference.md_segment import SegmentRequest, SegmentResult
from aimspax_like.reference.results import LabelFailure
from aimspax_like.sampling.ase_md import SampledFrame
from aimspax_like.sampling.state import maxwell_boltzmann


@dataclass
class TrajectoryStart:
    """Where one trajectory begins: its id (the stored frames' ``trajectory``), its start
    structure, the geometry and the MD step it starts at (0, or a stored frame's on resume)."""

    trajectory: int
    structure: int
    atoms: Atoms
    md_step: int = 0


@dataclass
class _Trajectory:
    start: TrajectoryStart
    atoms: Atoms  # the current point (positions, cell); a copy without calculator
    momenta: np.ndarray
    step: int
    extra: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0  # failed segments since the last good frame
    future: Future | None = None


class ReferenceMD:
    """Hands out every ``stride``-th frame of reference MD computed on the workers.

    ``next_frames(n)`` keeps up to ``n`` segments in flight (one per trajectory, the least
    advanced trajectories first) and returns as soon as ``n`` frames have come back; segments are
    never submitted beyond what was asked for, so no label is paid for that nobody stores.
    """

    def __init__(
        self,
        labeller: Labeller,
        phase: str,
        starts: list[TrajectoryStart],
        md: MDConfig,
        stride: int,
        seed: int,
        should_stop: Callable[[], int] = lambda: 0,
        fields: dict[str, Any] | None = None,
    ) -> None:
        if not starts:
            raise ValueError("reference MD needs at least one trajectory")
        self.labeller = labeller
        self.phase = phase
        self.md = md
        self.stride = stride
        self.seed = seed
        self.should_stop = should_stop
        self.fields = dict(fields or {})
        self.trajectories = []
        for start in starts:
            atoms = _bare(start.atoms)
            fixed = fixed_indices(start.atoms)
            if fixed:
                from ase.constraints import FixAtoms

                atoms.set_constraint(FixAtoms(indices=fixed))
            momenta = maxwell_boltzmann(atoms, md.temperature_K, self._rng(start.trajectory, start.md_step, 0))
            self.trajectories.append(_Trajectory(start, atoms, momenta, start.md_step))
        n_structures = max(s.structure for s in starts) + 1
        self.max_temperature = [0.0] * n_structures  # hottest handed-out frame per start structure
        self.steps_run = 0

    @property
    def total_steps(self) -> int:
        return self.steps_run

    @property
    def in_flight(self) -> int:
        return sum(t.future is not None for t in self.trajectories)

    def _rng(self, trajectory: int, step: int, attempt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, trajectory, step, attempt, 7])

    def _number(self, traj: _Trajectory) -> int:
        """The segment's label number (scratch folder and fault seed): unique per trajectory and step."""
        return traj.start.trajectory * 10_000_000 + traj.step

    def _submit(self, traj: _Trajectory) -> None:
        rng_seed = int(self._rng(traj.start.trajectory, traj.step, traj.attempt).integers(2**31))
        request = SegmentRequest(self.md.model_dump(mode="json"), self.stride, traj.momenta, dict(traj.extra),
                                 rng_seed, fixed=fixed_indices(traj.start.atoms))
        atoms = traj.atoms.copy()
        traj.future = self.labeller.submit_segment(
            self.phase, self._number(traj), atoms, request, attempt=traj.attempt,
            structure=traj.start.structure, trajectory=traj.start.trajectory, step=traj.step + self.stride,
            **self.fields,
        )

    def next_frames(self, wanted: int) -> list[SampledFrame]:
        """At least ``wanted`` (>= 1) new frames, fewer only if a stop interrupts (it raises)."""
        wanted = max(1, wanted)
        ready: list[SampledFrame] = []
        while len(ready) < wanted:
            idle = sorted((t for t in self.trajectories if t.future is None), key=lambda t: t.step)
            for traj in idle[: max(0, wanted - len(ready) - self.in_flight)]:
                self._submit(traj)
            running = {t.future: t for t in self.trajectories if t.future is not None}
            done, _ = futures_wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                frame = self._finish(running[future])
                if frame is not None:
                    ready.append(frame)
            signum = int(self.should_stop())
            if signum:
                raise CampaignInterrupted(signum)
        return ready

    def _finish(self, traj: _Trajectory) -> SampledFrame | None:
        assert traj.future is not None
        outcome = outcome_of(traj.future)
        traj.future = None
        fields = {"structure": traj.start.structure, "trajectory": traj.start.trajectory,
                  "step": traj.step + self.stride, **self.fields}
        if isinstance(outcome, LabelFailure):
            self.labeller.record_failure(self.phase, outcome, retry=True, **fields)
            traj.attempt += 1  # rewind: same point, fresh velocities
            traj.momenta = maxwell_boltzmann(traj.atoms, self.md.temperature_K,
                                             self._rng(traj.start.trajectory, traj.step, traj.attempt))
            traj.extra = {}
            return None
        assert isinstance(outcome, SegmentResult)
        # The segment's wall and CPU time: what the frame cost.
        label = replace(outcome.label, wall_s=outcome.wall_s, cpu_s=outcome.cpu_s)
        self.labeller.record_success(label)
        self.labeller.events.emit("label_done", phase=self.phase, **label.cost(), **fields)
        traj.atoms.set_positions(outcome.positions)
        traj.atoms.set_cell(outcome.cell)
        traj.momenta, traj.extra, traj.attempt = outcome.momenta, outcome.extra, 0
        traj.step += self.stride
        self.steps_run += self.stride
        structure = traj.start.structure
        self.max_temperature[structure] = max(self.max_temperature[structure], outcome.temperature_K)
        return SampledFrame(traj.atoms.copy(), label.energy, label.forces, structure, traj.step, label.stress,
                            trajectory=traj.start.trajectory, label=label)


def fixed_indices(atoms: Atoms) -> list[int]:
    """Atoms a ``FixAtoms`` constraint holds (the one constraint the integrators honour)."""
    from aimspax_like.sampling.state import fixed_atoms

    return [int(i) for i in np.flatnonzero(fixed_atoms(atoms))]


def _bare(atoms: Atoms) -> Atoms:
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)


def resume_starts(
    structures: list[Atoms], trajectories_per_structure: int, stored: list[Any], offset: int = 0,
) -> list[TrajectoryStart]:
    """One start per trajectory: ``trajectory = offset + structure + n_structures * k``.

    A trajectory with stored frames (``stored``: frames of this phase) starts from its newest one.
    """
    n = len(structures)
    newest: dict[int, Any] = {}
    for frame in stored:
        if frame.trajectory not in newest or frame.md_step > newest[frame.trajectory].md_step:
            newest[frame.trajectory] = frame
    starts = []
    for k in range(trajectories_per_structure):
        for s, atoms in enumerate(structures):
            trajectory = offset + s + n * k
            frame = newest.get(trajectory)
            if frame is None:
                starts.append(TrajectoryStart(trajectory, s, atoms))
            else:
                geometry = Atoms(numbers=frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
                geometry.set_constraint([c.copy() for c in atoms.constraints])  # the start's FixAtoms
                starts.append(TrajectoryStart(trajectory, s, geometry, frame.md_step))
    return starts
