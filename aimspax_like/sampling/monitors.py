"""MD stability monitors: cheap checks that tell when an ML-driven trajectory has gone unphysical.

An undertrained committee can pull a trajectory into regions no reference would ever visit:
atoms fused together, bonds torn apart, the temperature running away, numbers overflowing.
Sampling on from there wastes MD steps and, worse, labels. Each monitor looks at one trajectory's
``MDState`` and returns ``None`` when all is well or a short reason; ``first_instability`` runs a
list of them. They hold only what they were built with (start geometry, limits), so one set per
trajectory is cheap and needs no checkpoint.

The scheduler takes them through ``ALScheduler(..., monitors=...)`` (a callable that gives a
trajectory's monitors); a flagged trajectory is logged (``md_unstable`` with the reason) and
rewound to its checkpoint geometry, as a non-finite step always was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from ase import Atoms
from ase.neighborlist import natural_cutoffs, neighbor_list

from aimspax_like.sampling.state import MDState

Monitor = Callable[[MDState], "str | None"]


def _distances(atoms: Atoms, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    vectors = atoms.positions[j] - atoms.positions[i]
    if atoms.pbc.any():
        from ase.geometry import find_mic

        vectors, _ = find_mic(vectors, atoms.cell, atoms.pbc)
    return np.linalg.norm(vectors, axis=1)


class FiniteMonitor:
    """Positions, momenta and committee forces must be finite numbers."""

    def __call__(self, state: MDState) -> str | None:
        atoms = state.atoms
        if not np.isfinite(atoms.get_positions()).all() or not np.isfinite(atoms.get_momenta()).all():
            return "non-finite positions or momenta"
        if state.member_forces is not None and not np.isfinite(state.member_forces).all():
            return "non-finite forces"
        return None


class BondStretchMonitor:
    """No bond of the start structure may stretch by more than ``max_stretch`` (A).

    Bonds are the pairs closer than the sum of their covalent radii (times ``bond_factor``) in the
    start structure; dissociation of a bonded pair is the commonest ML-MD failure in molecules.
    """

    def __init__(self, start: Atoms, max_stretch: float = 2.0, bond_factor: float = 1.2) -> None:
        self.max_stretch = max_stretch
        cutoffs = [bond_factor * c for c in natural_cutoffs(start)]
        i, j = neighbor_list("ij", start, cutoffs)
        keep = i < j
        self.i, self.j = i[keep], j[keep]
        self.length0 = _distances(start, self.i, self.j)

    def __call__(self, state: MDState) -> str | None:
        if len(self.i) == 0:
            return None
        stretch = _distances(state.atoms, self.i, self.j) - self.length0
        worst = int(np.argmax(stretch))
        if stretch[worst] > self.max_stretch:
            return (f"bond {self.i[worst]}-{self.j[worst]} stretched by {stretch[worst]:.2f} A "
                    f"(limit {self.max_stretch} A)")
        return None


class MinDistanceMonitor:
    """No two atoms closer than ``min_distance`` (A): fused atoms mean a collapsed potential."""

    def __init__(self, min_distance: float = 0.5) -> None:
        self.min_distance = min_distance

    def __call__(self, state: MDState) -> str | None:
        atoms = state.atoms
        if len(atoms) < 2:
            return None
        i, j, d = neighbor_list("ijd", atoms, self.min_distance)
        if len(d):
            k = int(np.argmin(d))
            return f"atoms {i[k]} and {j[k]} only {d[k]:.2f} A apart (limit {self.min_distance} A)"
        return None


class TemperatureMonitor:
    """The kinetic temperature must stay below ``factor`` times the target (energy blowing up)."""

    def __init__(self, target_K: float, factor: float = 5.0) -> None:
        self.limit = factor * target_K

    def __call__(self, state: MDState) -> str | None:
        temperature = state.temperature()
        if temperature > self.limit:
            return f"temperature {temperature:.0f} K above {self.limit:.0f} K"
        return None


def default_monitors(start: Atoms, target_K: float) -> list[Monitor]:
    """The four checks with their default limits, for one trajectory started from ``start``."""
    return [FiniteMonitor(), MinDistanceMonitor(), BondStretchMonitor(start), TemperatureMonitor(target_K)]


def first_instability(monitors: Sequence[Monitor], state: MDState) -> str | None:
    """The first reason any monitor gives, or None. Finite checks should come first."""
    for monitor in monitors:
        reason = monitor(state)
        if reason:
            return reason
    return None
