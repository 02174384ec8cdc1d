"""Substructures of large systems: which atoms are uncertain, and the small piece carved around them.

A label of a 1,000-atom frame costs a DFT calculation of 1,000 atoms, while the committee is
usually unsure about a handful of local environments in it. IDEAL's answer, followed here: mark
the atoms whose own Eq. 1 term exceeds the threshold, group the ones close to each other so one
piece serves them, and carve around each group a piece that holds

- the **core**: every atom within ``core_radius`` of a selected atom (the model's receptive
  field, cutoff times interactions, is the natural choice): their forces are what the piece is
  labelled for, and
- a **buffer** shell of ``buffer`` more angstroms, which gives the core atoms the neighbours
  they have in the frame, so the reference sees the same local environments there.

A piece of a periodic frame is cut out with minimum-image distances and unwrapped around its
first centre, so it comes out whole, in vacuum (clusters, molecules and, with a buffer wider
than the reference's own reach, bulk). How large the buffer must be is a property of the
reference: ``force_locality`` measures it (IDEAL's locality check).

Pure geometry on ASE ``Atoms`` and NumPy arrays: no model, no reference, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.geometry import get_distances

__all__ = ["Group", "Substructure", "carve", "distances_from", "force_locality", "group_uncertain_atoms",
           "min_width"]


@dataclass(frozen=True)
class Group:
    """Uncertain atoms served by one substructure: the most uncertain one is the centre."""

    centre: int
    members: tuple[int, ...]


@dataclass
class Substructure:
    """A piece carved out of a parent frame.

    ``atoms`` is the piece (in vacuum, no cell, positions unwrapped around the first centre);
    ``parent_indices[k]`` is the parent index of the piece's atom ``k``; ``core`` marks the atoms
    whose labelled forces are meant to be used (the buffer's are not).
    """

    atoms: Atoms
    parent_indices: np.ndarray
    core: np.ndarray
    centres: tuple[int, ...]
    info: dict[str, float] = field(default_factory=dict)

    @property
    def n_core(self) -> int:
        return int(self.core.sum())


def distances_from(atoms: Atoms, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectors and distances from atom ``index`` to every atom, minimum image when periodic."""
    periodic = bool(np.any(atoms.pbc))
    vectors, lengths = get_distances(atoms.positions[index], atoms.positions,
                                     cell=atoms.cell if periodic else None, pbc=atoms.pbc if periodic else None)
    return vectors[0], lengths[0]


def min_width(atoms: Atoms) -> float:
    """The smallest distance between opposite faces of the cell (A)."""
    cell = np.asarray(atoms.cell)
    volume = abs(np.linalg.det(cell))
    return float(min(volume / np.linalg.norm(np.cross(cell[i], cell[j])) for i, j in ((1, 2), (2, 0), (0, 1))))


def group_uncertain_atoms(
    atoms: Atoms, per_atom: np.ndarray, threshold: float, group_radius: float, max_groups: int | None = None,
) -> list[Group]:
    """Uncertain atoms (``per_atom > threshold``) grouped greedily, most uncertain first.

    The most uncertain atom not yet served becomes a centre, and every uncertain atom within
    ``group_radius`` of it joins its group (its core will hold them). At most ``max_groups``
    groups are formed; the atoms left over are the least uncertain ones.
    """
    per_atom = np.asarray(per_atom, dtype=float)
    if per_atom.shape != (len(atoms),):
        raise ValueError(f"per_atom has shape {per_atom.shape}, expected ({len(atoms)},)")
    if group_radius < 0:
        raise ValueError("group_radius must not be negative")
    left = [int(i) for i in np.argsort(-per_atom) if per_atom[i] > threshold]
    groups: list[Group] = []
    while left and (max_groups is None or len(groups) < max_groups):
        centre = left[0]
        _, lengths = distances_from(atoms, centre)
        members = [i for i in left if lengths[i] <= group_radius]
        groups.append(Group(centre, tuple(members)))
        left = [i for i in left if i not in set(members)]
    return groups


def carve(atoms: Atoms, centres: Sequence[int], core_radius: float, buffer: float) -> Substructure:
    """The piece of ``atoms`` around ``centres``: core within ``core_radius`` of any centre, plus
    every atom within ``core_radius + buffer`` of one, unwrapped around the first centre."""
    if not centres:
        raise ValueError("carve needs at least one centre")
    if core_radius < 0 or buffer < 0:
        raise ValueError("core_radius and buffer must not be negative")
    reach = core_radius + buffer
    if np.all(atoms.pbc) and reach >= 0.5 * min_width(atoms):
        raise ValueError(f"a piece of radius {reach:g} A does not fit the minimum image of this cell (half its "
                         f"narrowest width is {0.5 * min_width(atoms):.2f} A)")
    centres = [int(c) for c in centres]
    origin = centres[0]
    to_origin, _ = distances_from(atoms, origin)
    nearest = np.full(len(atoms), np.inf)
    for c in centres:
        _, lengths = distances_from(atoms, c)
        nearest = np.minimum(nearest, lengths)
    keep = np.flatnonzero(nearest <= core_radius + buffer)
    core = nearest[keep] <= core_radius
    # Minimum-image vectors from the first centre: the piece comes out whole. Centres farther
    # apart than half the cell would need a larger image search; grouping keeps them close.
    positions = atoms.positions[origin] + to_origin[keep]
    piece = Atoms(numbers=atoms.numbers[keep], positions=positions, pbc=False)
    info = {"core_radius": float(core_radius), "buffer": float(buffer)}
    return Substructure(piece, keep, core, tuple(centres), info)


def force_locality(
    atoms: Atoms, centres: Sequence[int], radii: Sequence[float], calculator: Callable[[], object],
) -> list[dict[str, float]]:
    """IDEAL's locality check: how the force on a centre atom, computed on a piece of growing
    radius carved in vacuum, approaches its force in the whole frame.

    ``calculator()`` makes a fresh ASE calculator (the reference). Returns one row per radius:
    atoms in the piece (mean), mean and max over ``centres`` of the error norm of the centre's
    force (eV/A), and the largest force norm on a centre in the whole frame for scale.
    """
    whole = atoms.copy()
    whole.calc = calculator()
    forces = whole.get_forces()
    rows = []
    for radius in radii:
        errors, sizes = [], []
        for c in centres:
            piece = carve(atoms, [c], core_radius=float(radius), buffer=0.0)
            piece.atoms.calc = calculator()
            local = int(np.flatnonzero(piece.parent_indices == c)[0])
            errors.append(float(np.linalg.norm(piece.atoms.get_forces()[local] - forces[c])))
            sizes.append(len(piece.atoms))
        rows.append({"radius": float(radius), "atoms": float(np.mean(sizes)), "error_mean": float(np.mean(errors)),
                     "error_max": float(np.max(errors)),
                     "force_scale": float(np.linalg.norm(forces[list(centres)], axis=1).max())})
    return rows
