"""Guards: cheap physical sanity checks that keep ML-driven exploration on physical geometries.

An undertrained committee can pull a trajectory into regions no reference calculation would
ever visit: atoms fused together, bonds torn apart, the temperature running away, numbers
overflowing. Labelling such frames is the most expensive mistake active learning can make: the
reference happily returns energies several eV above anything the system visits at the target
temperature, the moving-average threshold (Eq. 2) follows the inflated uncertainties, and
training on the distorted frames spoils the model where it matters. So every MD step of every
trajectory passes through its guards, and a frame that fails one is never checked for
uncertainty, never enters the threshold's window and is never labelled; the scheduler rewinds
the trajectory instead.

Absolute limits (say, atoms closer than 0.5 A) are too loose for molecules whose bonds are
1.0-1.5 A long, so the guards follow the system's own chemistry:

- ``CloseContactGuard``: no two atoms closer than ``min_distance_factor`` times the sum of their
  covalent radii; for molecules (``topology``), no two non-metal atoms that were not bonded at
  the start closer than ``nonbonded_factor`` times that sum (a new bond is chemistry the
  campaign did not ask for); no bond of the start topology (non-metal pairs within 1.2 times
  their covalent radii) longer than ``bond_stretch_factor`` or shorter than
  ``bond_compress_factor`` times its start length.
- ``TemperatureGuard``: the kinetic temperature stays below ``temperature_factor`` times the
  target (widened for very small systems, whose temperature fluctuates more).
- ``VolumeGuard`` (periodic cells): the volume stays within a factor of the start volume.
- ``FiniteGuard``: positions, momenta and committee forces are finite numbers (always on).

Each guard looks at one trajectory's ``MDState`` and returns ``None`` or a short reason;
``first_failure`` runs a list of them, cheapest first. Guards hold only what they were built
with (start geometry, limits), so one set per trajectory costs nothing to checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.neighborlist import neighbor_list

from aimspax_like.sampling.state import MDState

if TYPE_CHECKING:
    from aimspax_like.config import GuardsConfig

Guard = Callable[[MDState], "str | None"]

# Elements whose bonds form a molecule's topology (everything else is treated as a metal,
# whose neighbours change freely in a hot cluster or melt).
NON_METALS = frozenset(
    {1, 2, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17, 18, 33, 34, 35, 36, 52, 53, 54}
)
BOND_FACTOR = 1.2  # a start pair closer than 1.2 x its covalent-radius sum is a bond


def _radii(atoms: Atoms) -> np.ndarray:
    return covalent_radii[atoms.numbers]


def bond_lengths(atoms: Atoms, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Distances of the atom pairs ``(i[k], j[k])`` (minimum image along periodic directions)."""
    vectors = atoms.positions[j] - atoms.positions[i]
    if atoms.pbc.any():
        from ase.geometry import find_mic

        vectors, _ = find_mic(vectors, atoms.cell, atoms.pbc)
    return np.linalg.norm(vectors, axis=1)


def start_bonds(start: Atoms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bonds of the start structure between non-metal atoms: ``(i, j, length)`` with i < j."""
    nonmetal = np.isin(start.numbers, list(NON_METALS))
    if nonmetal.sum() < 2:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    cutoffs = BOND_FACTOR * _radii(start) * nonmetal  # metals get a zero cutoff: no bonds
    i, j = neighbor_list("ij", start, cutoffs.tolist())
    keep = (i < j) & nonmetal[i] & nonmetal[j]
    i, j = i[keep], j[keep]
    pairs = sorted(set(zip(i.tolist(), j.tolist(), strict=True)))
    i = np.array([p[0] for p in pairs], dtype=int)
    j = np.array([p[1] for p in pairs], dtype=int)
    return i, j, bond_lengths(start, i, j) if len(i) else np.zeros(0)


class FiniteGuard:
    """Positions, momenta and committee forces must be finite numbers."""

    def __call__(self, state: MDState) -> str | None:
        atoms = state.atoms
        if not np.isfinite(atoms.get_positions()).all() or not np.isfinite(atoms.get_momenta()).all():
            return "non-finite positions or momenta"
        if state.member_forces is not None and not np.isfinite(state.member_forces).all():
            return "non-finite forces"
        return None


class CloseContactGuard:
    """Fused atoms, new bonds and torn bonds, all in units of covalent radii (see module doc)."""

    def __init__(
        self,
        start: Atoms,
        min_distance_factor: float = 0.6,
        topology: bool = True,
        nonbonded_factor: float = 1.2,
        bond_stretch_factor: float = 1.5,
        bond_compress_factor: float = 0.75,
    ) -> None:
        self.radii = _radii(start)
        self.nonmetal = np.isin(start.numbers, list(NON_METALS))
        self.min_factor = min_distance_factor
        self.topology = topology
        self.nonbonded_factor = nonbonded_factor
        self.stretch = bond_stretch_factor
        self.compress = bond_compress_factor
        if topology:
            self.i, self.j, self.length0 = start_bonds(start)
        else:
            self.i = self.j = np.zeros(0, int)
            self.length0 = np.zeros(0)
        self.bonded = set(zip(self.i.tolist(), self.j.tolist(), strict=True))
        reach = max(min_distance_factor, nonbonded_factor if topology else 0.0)
        self.cutoffs = (reach * self.radii).tolist()

    def __call__(self, state: MDState) -> str | None:
        return self.check(state.atoms)

    def check(self, atoms: Atoms) -> str | None:
        """The reason ``atoms`` fails, or None (usable on any frame, not only an MD state)."""
        if len(atoms) < 2:
            return None
        return self._contacts(atoms) or self._stretched(atoms)

    def _stretched(self, atoms: Atoms) -> str | None:
        if len(self.i):
            length = bond_lengths(atoms, self.i, self.j)
            ratio = length / self.length0
            worst = int(np.argmax(ratio))
            if ratio[worst] > self.stretch:
                return (f"bond {self.i[worst]}-{self.j[worst]} stretched to {length[worst]:.2f} A "
                        f"({ratio[worst]:.2f} x its start length; limit {self.stretch})")
            worst = int(np.argmin(ratio))
            if ratio[worst] < self.compress:
                return (f"bond {self.i[worst]}-{self.j[worst]} compressed to {length[worst]:.2f} A "
                        f"({ratio[worst]:.2f} x its start length; limit {self.compress})")
        return None

    def _contacts(self, atoms: Atoms) -> str | None:
        i, j, d = neighbor_list("ijd", atoms, self.cutoffs)
        if not len(d):
            return None
        keep = i < j
        i, j, d = i[keep], j[keep], d[keep]
        sums = self.radii[i] + self.radii[j]
        fused = d < self.min_factor * sums
        if fused.any():
            k = int(np.argmin(np.where(fused, d / sums, np.inf)))
            return (f"atoms {i[k]} and {j[k]} only {d[k]:.2f} A apart "
                    f"(limit {self.min_factor} x covalent radii = {self.min_factor * sums[k]:.2f} A)")
        if self.topology:
            new = (d < self.nonbonded_factor * sums) & self.nonmetal[i] & self.nonmetal[j]
            for k in np.flatnonzero(new):
                if (int(i[k]), int(j[k])) not in self.bonded:
                    return (f"atoms {i[k]} and {j[k]}, not bonded at the start, {d[k]:.2f} A apart "
                            f"(limit {self.nonbonded_factor} x covalent radii = "
                            f"{self.nonbonded_factor * sums[k]:.2f} A)")
        return None


class TemperatureGuard:
    """Kinetic temperature below ``factor`` x target (more for tiny systems).

    The instantaneous temperature of N atoms fluctuates with a relative width sqrt(2 / 3N), so
    the limit is ``max(factor, 1 + 7 sqrt(2 / 3N))`` times the target: a 3-atom molecule at its
    target temperature must not trip it by chance over thousands of steps.
    """

    def __init__(self, target_K: float, n_atoms: int, factor: float = 3.0) -> None:
        width = float(np.sqrt(2.0 / max(3 * n_atoms, 1)))
        self.limit = target_K * max(factor, 1.0 + 7.0 * width)

    def __call__(self, state: MDState) -> str | None:
        temperature = state.temperature()
        if not np.isfinite(temperature) or temperature > self.limit:
            return f"temperature {temperature:.0f} K above {self.limit:.0f} K"
        return None


class VolumeGuard:
    """A periodic cell's volume stays within [1/factor, factor] x its start volume."""

    def __init__(self, start: Atoms, factor: float = 1.5) -> None:
        self.volume0 = float(start.get_volume())
        self.factor = factor

    def __call__(self, state: MDState) -> str | None:
        ratio = float(state.atoms.get_volume()) / self.volume0
        if not np.isfinite(ratio) or ratio > self.factor or ratio < 1.0 / self.factor:
            return f"cell volume {ratio:.2f} x its start volume (limit {self.factor} x)"
        return None


def topology_applies(start: Atoms, mode: str) -> bool:
    """``auto``: a molecular topology exists (at least one bond between non-metal atoms)."""
    if mode == "off":
        return False
    if mode == "on":
        return True
    return len(start_bonds(start)[0]) > 0


def build_guards(start: Atoms, target_K: float, config: GuardsConfig) -> list[Guard]:
    """The guards of one trajectory started from ``start`` (cheapest first)."""
    guards: list[Guard] = [FiniteGuard()]
    if not config.enabled:
        return guards
    guards.append(TemperatureGuard(target_K, len(start), config.temperature_factor))
    if start.pbc.all() and start.cell.rank == 3:
        guards.append(VolumeGuard(start, config.volume_factor))
    guards.append(CloseContactGuard(
        start, config.min_distance_factor, topology_applies(start, config.topology),
        config.nonbonded_factor, config.bond_stretch_factor, config.bond_compress_factor,
    ))
    return guards


def first_failure(guards: Sequence[Guard], state: MDState) -> str | None:
    """The first reason any guard gives, or None."""
    for guard in guards:
        reason = guard(state)
        if reason:
            return reason
    return None
