"""Round-robin MD over the start structures with one ASE calculator (IDG and test-set sampling).

Initial dataset generation drives MD either with the reference itself or with a foundation
model; both are ASE calculators. They run on the same integrators as the active-learning
trajectories (``sampling.dynamics``), so every phase samples the same ensemble (NPT blocks take
the calculator's stress). Every ``stride`` steps a frame is handed out (with the calculator's
energy and forces at that point). A step that raises (an SCF that does not converge during
reference MD) rewinds that structure's MD to its last handed-out frame with fresh velocities
instead of ending the phase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from aimspax_like.config import MDConfig
from aimspax_like.sampling.dynamics import MDState, maxwell_boltzmann, step_batch


@dataclass
class SampledFrame:
    atoms: Atoms  # a copy without calculator
    energy: float
    forces: np.ndarray
    structure: int
    md_step: int
    stress: np.ndarray | None = None  # Voigt, eV/A^3: reference MD of periodic cells with stress labels
    trajectory: int = -1  # the trajectory id when several run per structure (-1: the structure's one)
    label: Any = None  # reference MD on the workers: the LabelResult (its wall time, scratch folder)

    @property
    def trajectory_id(self) -> int:
        return self.structure if self.trajectory < 0 else self.trajectory


class StridedSampler:
    """Hands out every ``stride``-th MD frame, cycling over the start structures."""

    def __init__(
        self,
        structures: list[Atoms],
        make_calculator: Callable[[], Calculator],
        md: MDConfig,
        stride: int,
        seed: int,
        on_failure: Callable[[int, Exception], None] | None = None,
        max_failures: int = 20,
        on_success: Callable[[], None] | None = None,
        with_stress: bool = False,
    ) -> None:
        self.md = md
        self.with_stress = with_stress  # hand out the calculator's stress with each frame (periodic cells)
        self.stride = stride
        self.on_failure = on_failure
        self.on_success = on_success
        self.max_failures = max_failures
        self.rng = np.random.default_rng(seed)
        self.states: list[MDState] = []
        self.last_good: list[Atoms] = []
        self.steps = [0] * len(structures)
        self.max_temperature = [0.0] * len(structures)  # hottest handed-out frame per structure
        for structure in structures:
            atoms = structure.copy()
            atoms.calc = make_calculator()
            atoms.set_momenta(maxwell_boltzmann(atoms, md.temperature_K, self.rng))
            self.states.append(MDState(atoms, md, self.rng))
            self.last_good.append(atoms.copy())
        self._next = 0

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    def next_frame(self) -> SampledFrame:
        index = self._next
        self._next = (self._next + 1) % len(self.states)
        state, failures = self.states[index], 0
        atoms = state.atoms
        while True:
            try:
                for _ in range(self.stride):
                    step_batch([state], calculator_forces, calculator_stresses, None)
                energy = float(atoms.get_potential_energy())
                forces = np.array(atoms.get_forces())
                stress = np.array(atoms.get_stress()) if self.with_stress and atoms.pbc.all() else None
                # Positions too: non-finite forces at an intermediate step move the atoms to NaN
                # even when the forces of the handed-out frame happen to be finite again.
                finite = np.isfinite(energy) and np.isfinite(forces).all() and np.isfinite(atoms.positions).all()
                if not finite or (stress is not None and not np.isfinite(stress).all()):
                    raise FloatingPointError("non-finite energy, forces, stress or positions")
                break
            except Exception as exc:  # reference MD failures are expected data, not crashes
                failures += 1
                if self.on_failure is not None:
                    self.on_failure(index, exc)
                if failures >= self.max_failures:
                    from aimspax_like.errors import LabelsKeepFailing

                    raise LabelsKeepFailing(failures, "MD", f"{type(exc).__name__}: {exc}"[:200]) from None
                self._rewind(index)
        if self.on_success is not None:
            self.on_success()
        self.steps[index] += self.stride
        self.max_temperature[index] = max(self.max_temperature[index], state.temperature())
        frame = atoms.copy()
        frame.calc = None
        self.last_good[index] = frame.copy()
        return SampledFrame(frame, energy, forces, index, self.steps[index], stress)

    def _rewind(self, index: int) -> None:
        state = self.states[index]
        state.atoms.set_positions(self.last_good[index].get_positions())
        state.atoms.set_cell(self.last_good[index].get_cell())
        state.atoms.set_momenta(maxwell_boltzmann(state.atoms, self.md.temperature_K, self.rng))
        state.invalidate_forces()


def calculator_forces(structures: list[Atoms]) -> list[np.ndarray]:
    """Forces of the structures' own calculators, as a one-member committee."""
    return [np.asarray(atoms.get_forces())[None] for atoms in structures]


def calculator_stresses(structures: list[Atoms]) -> list[np.ndarray]:
    """Stresses of the structures' own calculators (NPT only), same convention."""
    return [np.asarray(atoms.get_stress(voigt=False))[None] for atoms in structures]
