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
first centre, so it comes out whole: ``carve`` leaves it in vacuum (clusters, molecules,
surfaces; ``cap_cut_bonds`` puts hydrogens on the covalent bonds it cut), ``crop_periodic`` cuts
a hexahedral box that is periodic itself (bulk: no surface at all, IDEAL's crop), choosing
among randomly shifted boundaries one where no atoms meet too closely across the box faces and
the stoichiometry stays closest to the frame's. How large the buffer must be is a property of
the reference: ``force_locality`` measures it (IDEAL's locality check).

Pure geometry on ASE ``Atoms`` and NumPy arrays: no model, no reference, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.geometry import get_distances

__all__ = ["Group", "Substructure", "cap_cut_bonds", "carve", "crop_periodic", "distances_from", "force_locality",
           "group_uncertain_atoms", "min_width"]


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
    nearest = _nearest_centre(atoms, centres)
    keep = np.flatnonzero(nearest <= core_radius + buffer)
    core = nearest[keep] <= core_radius
    # Minimum-image vectors from the first centre: the piece comes out whole. Centres farther
    # apart than half the cell would need a larger image search; grouping keeps them close.
    positions = atoms.positions[origin] + to_origin[keep]
    piece = Atoms(numbers=atoms.numbers[keep], positions=positions, pbc=False)
    info = {"core_radius": float(core_radius), "buffer": float(buffer)}
    return Substructure(piece, keep, core, tuple(centres), info)


def _nearest_centre(atoms: Atoms, centres: Sequence[int]) -> np.ndarray:
    """Each atom's distance to the nearest of ``centres`` (minimum image when periodic)."""
    nearest = np.full(len(atoms), np.inf)
    for c in centres:
        _, lengths = distances_from(atoms, int(c))
        nearest = np.minimum(nearest, lengths)
    return nearest


def _composition_gap(numbers: np.ndarray, reference: np.ndarray) -> float:
    """L1 distance between the element fractions of ``numbers`` and of ``reference``."""
    elements = np.union1d(numbers, reference)
    mine = np.array([np.mean(numbers == z) for z in elements])
    theirs = np.array([np.mean(reference == z) for z in elements])
    return float(np.abs(mine - theirs).sum())


def _closest_pair(positions: np.ndarray, cell: np.ndarray | None) -> float:
    if len(positions) < 2:
        return np.inf
    _, lengths = get_distances(positions, cell=cell, pbc=None if cell is None else True)
    np.fill_diagonal(lengths, np.inf)
    return float(lengths.min())


CROP_JITTER = 1.5  # A a periodic crop's faces may move out: half a typical lattice period


def _face_gap(points: np.ndarray, axis: int, low: float, high: float, reach: float = 3.5) -> float:
    """Closest approach across the two faces of one axis once the box is periodic along it:
    atoms within ``reach`` of the low face against those within ``reach`` of the high face,
    moved down by the box length."""
    inside = points[(points[:, axis] >= low) & (points[:, axis] < high)]
    bottom = inside[inside[:, axis] < low + reach]
    top = inside[inside[:, axis] >= high - reach].copy()
    if not len(bottom) or not len(top):
        return np.inf
    top[:, axis] -= high - low
    return float(np.min(np.linalg.norm(bottom[:, None, :] - top[None, :, :], axis=-1)))


def crop_periodic(
    atoms: Atoms, centres: Sequence[int], core_radius: float, buffer: float,
    rng: np.random.Generator | None = None, tries: int = 32, jitter: float = CROP_JITTER, keep: int = 4,
) -> Substructure:
    """A periodic hexahedral box cut out of a periodic frame around ``centres`` (IDEAL's crop).

    The box holds every core atom (within ``core_radius`` of a centre) with at least ``buffer``
    to each face, so within ``buffer`` a core atom sees the frame's own atoms. The box becomes
    the piece's cell: across its faces atoms meet neighbours that were not there in the frame,
    harmless for the core beyond ``buffer`` but they must not land on top of each other, which
    in a crystal happens unless the box length fits the lattice. So each face is pushed out by
    up to ``jitter`` A: per axis, ``tries`` random placements (the first unshifted) are ranked,
    those whose faces bring no pair closer than 0.8 times the frame's closest pair there first,
    then the shortest; of the ``keep`` best per axis every combination is scored: no pair too
    close, then the element fractions closest to the frame's (to 0.01), then the fewest atoms
    (the cheapest label). ``info``
    reports the chosen box's closest pair, composition gap and whether its seam is too close.
    """
    import itertools

    if not centres:
        raise ValueError("crop_periodic needs at least one centre")
    if not np.all(atoms.pbc):
        raise ValueError("crop_periodic cuts boxes out of frames periodic in all three directions")
    rng = rng or np.random.default_rng(0)
    centres = [int(c) for c in centres]
    to_origin, _ = distances_from(atoms, centres[0])
    core = _nearest_centre(atoms, centres) <= core_radius
    lo = to_origin[core].min(axis=0) - buffer
    hi = to_origin[core].max(axis=0) + buffer
    if np.any(hi - lo + 2 * jitter >= min_width(atoms)):
        raise ValueError(f"a box of {np.max(hi - lo):.1f} A does not fit the minimum image of this cell "
                         f"(narrowest width {min_width(atoms):.2f} A)")
    # Atoms that may fall into any of the boxes: their minimum-image vectors are the piece's positions.
    near = np.flatnonzero(np.all((to_origin >= lo - jitter - 1e-9) & (to_origin < hi + jitter), axis=1))
    points = to_origin[near]
    closest = _closest_pair(points, None)
    per_axis = []
    for axis in range(3):
        placements = [(lo[axis], hi[axis])] + [
            (lo[axis] - a, hi[axis] + b) for a, b in rng.uniform(0.0, jitter, size=(max(0, int(tries) - 1), 2))]
        gaps = [_face_gap(points, axis, low, high) for low, high in placements]
        order = sorted(range(len(placements)),
                       key=lambda k: (gaps[k] < 0.8 * closest, placements[k][1] - placements[k][0]))
        per_axis.append([placements[k] for k in order[:keep]])
    best: tuple[tuple[float, float, float], np.ndarray, np.ndarray] | None = None
    for combo in itertools.product(*per_axis):
        low, high = np.array([c[0] for c in combo]), np.array([c[1] for c in combo])
        inside = near[np.all((points >= low) & (points < high), axis=1)]
        seam = _closest_pair(to_origin[inside] - low, np.diag(high - low))
        gap = _composition_gap(atoms.numbers[inside], atoms.numbers)
        score = (float(seam < 0.8 * closest), round(gap, 2), len(inside), gap, -seam)
        if best is None or score < best[0]:
            best = (score, inside, np.array([low, high]))
    assert best is not None
    (too_close, _, _, gap, seam), chosen, (low, high) = best
    piece = Atoms(numbers=atoms.numbers[chosen], positions=to_origin[chosen] - low, cell=np.diag(high - low),
                  pbc=True)
    info = {"core_radius": float(core_radius), "buffer": float(buffer), "closest_pair": -seam,
            "composition_gap": gap, "seam_too_close": too_close}
    return Substructure(piece, chosen, core[chosen], tuple(centres), info)


def cap_cut_bonds(parent: Atoms, piece: Substructure, slack: float = 1.15) -> Substructure:
    """Hydrogen caps on the covalent bonds that carving a vacuum piece cut.

    A kept atom ``i`` and a dropped atom ``j`` closer than ``slack`` times the sum of their
    covalent radii were bonded; a hydrogen goes on the line from ``i`` to ``j`` at the i-H bond
    length (sum of covalent radii). Hydrogen atoms are not capped. The caps are buffer atoms
    (their forces never train) and have parent index -1.
    """
    from ase.data import covalent_radii

    if np.any(piece.atoms.pbc):
        raise ValueError("cap_cut_bonds caps vacuum pieces (carve), not periodic boxes")
    kept = np.zeros(len(parent), dtype=bool)
    kept[piece.parent_indices] = True
    caps = []
    for local, i in enumerate(piece.parent_indices):
        if parent.numbers[i] == 1:
            continue
        vectors, lengths = distances_from(parent, int(i))
        bonded = (~kept) & (lengths > 0) & (parent.numbers != 0)
        bonded &= lengths < slack * (covalent_radii[parent.numbers[i]] + covalent_radii[parent.numbers])
        for j in np.flatnonzero(bonded):
            bond = covalent_radii[parent.numbers[i]] + covalent_radii[1]
            caps.append(piece.atoms.positions[local] + bond * vectors[j] / lengths[j])
    if not caps:
        return piece
    atoms = piece.atoms.copy()
    atoms += Atoms(numbers=[1] * len(caps), positions=np.array(caps))
    return Substructure(atoms, np.concatenate([piece.parent_indices, np.full(len(caps), -1)]),
                        np.concatenate([piece.core, np.zeros(len(caps), dtype=bool)]), piece.centres,
                        {**piece.info, "caps": float(len(caps))})


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
