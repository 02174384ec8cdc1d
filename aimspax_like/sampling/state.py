"""One trajectory's MD state and the call contracts the batched integrator relies on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.constraints import FixAtoms

from aimspax_like.config import MDConfig
from aimspax_like.sampling import mtk
from aimspax_like.sampling import thermostats as th

# A force call: structures in, committee forces out, one ``[n_members, n_atoms, 3]`` array per
# structure (n_members = 1 for a single model). Propagation uses the committee mean.
ForceFn = Callable[[list[Atoms]], list[np.ndarray]]
# A stress call, made for NPT trajectories only: one ``[n_members, 3, 3]`` (or ``[3, 3]``)
# stress per structure in ASE's convention (eV/A^3, pressure = -trace / 3), potential part only
# (what ``atoms.get_stress(voigt=False)`` returns); the integrator adds the kinetic part.
StressFn = Callable[[list[Atoms]], list[np.ndarray]]

# Which thermostat acts in the middle of the step, and which ensembles rescale the cell
# (with the weight of the barostat noise: 1 samples NPT, 0 is Berendsen's weak coupling).
# ``npt_mtk`` has its own chains at both ends of the step (``sampling.mtk``), none in the middle.
THERMOSTAT: dict[str, str | None] = {
    "nve": None, "langevin": "langevin", "bussi": "bussi", "nose_hoover": "nose_hoover",
    "npt_crescale": "bussi", "npt_berendsen": "bussi", "npt_mtk": "mtk",
}
BAROSTAT_NOISE: dict[str, float] = {"npt_crescale": 1.0, "npt_berendsen": 0.0}


@dataclass(eq=False)
class MDState:
    """One trajectory's phase-space point and integrator settings (ASE units throughout).

    While it is part of a batch its ``atoms`` hold views into the batch's buffers; ASE's own
    setters (``set_positions``, ``set_momenta``, ``set_cell``) write through them, so a rewind
    by the scheduler needs nothing special. Equality is identity: a state is a trajectory.
    """

    atoms: Atoms
    md: MDConfig
    rng: np.random.Generator
    member_forces: np.ndarray | None = None  # [n_members, n_atoms, 3] at the current positions
    step: int = 0
    member_stress: np.ndarray | None = None  # [n_members, 3, 3], NPT trajectories only
    chain: np.ndarray | None = None  # Nose-Hoover chain [2, CHAIN_LENGTH]: eta, p_eta
    # npt_mtk only (with ``chain`` for its particles): the barostat's chain [2, CHAIN_LENGTH]
    # (xi, p_xi) and the symmetric barostat momentum [3, 3]; None means at rest.
    barostat_chain: np.ndarray | None = None
    cell_momentum: np.ndarray | None = None
    batch: Any = field(default=None, repr=False)  # the Batch whose buffers ``atoms`` views

    @property
    def forces(self) -> np.ndarray:
        """Committee-mean forces that propagate the trajectory."""
        return self.member_forces.mean(axis=0)

    @property
    def needs_stress(self) -> bool:
        return self.md.ensemble in BAROSTAT_NOISE or self.md.ensemble == mtk.ENSEMBLE

    def invalidate_forces(self) -> None:
        """Forget cached forces (after a rewind or a model update)."""
        self.member_forces = None
        self.member_stress = None

    @property
    def masses(self) -> np.ndarray:
        return self.atoms.get_masses()[:, None]

    def temperature(self) -> float:
        kinetic = 0.5 * float((self.atoms.get_momenta() ** 2 / self.masses).sum())
        return 2.0 * kinetic / (degrees_of_freedom(self.atoms) * units.kB)

    def thermostat_energy(self) -> float:
        """Energy held by a Nose-Hoover chain (0 otherwise); E_pot + E_kin + this is conserved.

        For ``npt_mtk`` it is the whole extension: both chains, the barostat's kinetic energy
        and ``P_ext V``.
        """
        if self.md.ensemble == mtk.ENSEMBLE:
            n_dof = np.array([degrees_of_freedom(self.atoms)], dtype=float)
            return float(mtk.state_extra_energy([self], n_dof)[0])
        if self.chain is None or THERMOSTAT[self.md.ensemble] != "nose_hoover":
            return 0.0
        n_dof = np.array([degrees_of_freedom(self.atoms)], dtype=float)
        kT = np.array([units.kB * self.md.temperature_K])
        q = th.chain_masses(n_dof, kT, np.array([self.md.taut_fs * units.fs]))
        return float(th.chain_energy(self.chain[None], q, n_dof, kT)[0])

    def conserved_energy(self, potential_energy: float | None = None) -> float:
        """``E_pot + E_kin + thermostat_energy()``: constant up to integration error for ``nve``,
        ``nose_hoover`` and ``npt_mtk`` (its drift measures the integrator). ``potential_energy``
        defaults to the attached calculator's."""
        if potential_energy is None:
            potential_energy = self.atoms.get_potential_energy()
        kinetic = 0.5 * float((self.atoms.get_momenta() ** 2 / self.masses).sum())
        return float(potential_energy) + kinetic + self.thermostat_energy()


def phase_space_dict(state: MDState) -> dict[str, Any]:
    """A trajectory's exact point as plain data for a checkpoint: geometry, momenta, step,
    thermostat and barostat chains, cell momentum and the random generator's state."""
    from aimspax_like.structures import atoms_to_arrays

    def copy(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else np.array(array, copy=True)

    return {"atoms": atoms_to_arrays(state.atoms), "momenta": state.atoms.get_momenta(), "step": state.step,
            "chain": copy(state.chain), "barostat_chain": copy(state.barostat_chain),
            "cell_momentum": copy(state.cell_momentum), "rng": state.rng.bit_generator.state}


def load_phase_space(state: MDState, saved: dict[str, Any]) -> None:
    """Inverse of ``phase_space_dict``. Cached forces are left to the caller (a scheduler
    recomputes them, an on-the-fly run puts back the ones it saved). A checkpoint written before
    MTK NPT existed has no barostat entries: the barostat is at rest."""
    state.atoms.set_cell(saved["atoms"]["cell"])
    state.atoms.set_positions(saved["atoms"]["positions"])
    state.atoms.set_momenta(saved["momenta"])
    state.step = saved["step"]
    state.chain = saved["chain"]
    state.barostat_chain = saved.get("barostat_chain")
    state.cell_momentum = saved.get("cell_momentum")
    state.rng.bit_generator.state = saved["rng"]


def fixed_atoms(atoms: Atoms) -> np.ndarray:
    """Boolean mask of atoms held by ``FixAtoms``, the one constraint batched MD honours."""
    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if not isinstance(constraint, FixAtoms):
            raise ValueError(f"batched MD supports FixAtoms only, not {type(constraint).__name__}")
        mask[constraint.index] = True
    return mask


def degrees_of_freedom(atoms: Atoms) -> int:
    """3N - 3: momenta start with the centre of mass at rest and the thermostats keep it there.

    With fixed atoms the centre of mass is not conserved, so it is 3 per mobile atom.
    """
    fixed = fixed_atoms(atoms)
    if fixed.any() or len(atoms) == 1:
        return max(3 * int((~fixed).sum()), 1)
    return 3 * len(atoms) - 3


def maxwell_boltzmann(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> np.ndarray:
    """Momenta drawn at ``temperature_K`` with the centre-of-mass motion removed."""
    masses = atoms.get_masses()[:, None]
    momenta = rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * temperature_K)
    if len(atoms) > 1:
        momenta -= masses * (momenta.sum(axis=0) / masses.sum())
    return momenta
