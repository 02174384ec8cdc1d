"""Radial distribution: does MD with the model sample the same structure as MD with the reference?

Errors on test frames say how well the model reproduces single geometries; the distribution of
interatomic distances along its own MD says whether it samples the right ensemble at all (a
soft bond, a missing repulsion, a wrong equilibrium length all show as shifted or broadened
peaks). Both curves use the same estimator, so they compare directly:

* periodic cells: the radial distribution function g(r) over all pairs within ``r_max`` (minimum
  image and beyond, from ASE's ``neighbor_list``), normalised by the ideal-gas pair count;
* molecules and clusters: g(r) has no volume to be normalised by, so it is the pair-distance
  distribution, the histogram of all pair distances normalised to unit area over ``[0, r_max]``.

The reference curve comes from reference MD: the run's own test frames when they are
reference-MD samples, else (``reference_md_frames``) MD driven by the reference in this process,
on the engine's integrator (the same BAOAB Langevin as the model's MD, so the two curves differ
by the potential, not by the thermostat). That costs one reference call per MD step, so only
the cheap references (``CHEAP_REFERENCES``) run it unless asked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list

CHEAP_REFERENCES = frozenset({"emt", "lj", "xtb"})
R_MAX = 6.0
BINS = 100


def pair_distances(atoms: Atoms, r_max: float = R_MAX) -> np.ndarray:
    """Every pair distance up to ``r_max`` (each pair once; periodic images counted)."""
    if atoms.pbc.any():
        i, j, d, shift = neighbor_list("ijdS", atoms, r_max)
        # neighbor_list lists every pair twice (i->j and j->i, or an atom's image at S and -S)
        first = shift[np.arange(len(shift)), np.argmax(shift != 0, axis=1)] if len(shift) else np.zeros(0)
        return d[(i < j) | ((i == j) & (first > 0))]
    positions = atoms.positions
    diff = positions[:, None, :] - positions[None, :, :]
    dist = np.linalg.norm(diff, axis=-1)[np.triu_indices(len(atoms), k=1)]
    return dist[dist <= r_max]


def distribution(frames: Sequence[Atoms], r_max: float = R_MAX, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """``(r, value)`` at bin centres: g(r) for periodic frames, else the pair-distance density."""
    edges = np.linspace(0.0, r_max, bins + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    if not frames:
        return centres, np.zeros(bins)
    counts = np.zeros(bins)
    for atoms in frames:
        counts += np.histogram(pair_distances(atoms, r_max), bins=edges)[0]
    if frames[0].pbc.all():
        n = np.mean([len(a) for a in frames])
        volume = np.mean([abs(np.linalg.det(a.cell.array)) for a in frames])
        shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
        ideal = 0.5 * n * (n / volume) * shell * len(frames)  # pairs an ideal gas puts in each shell
        return centres, counts / ideal
    total = counts.sum()
    return centres, counts / (total * (edges[1] - edges[0])) if total else counts


def overlap(a: np.ndarray, b: np.ndarray, r: np.ndarray) -> float:
    """Shared area of two unit-area densities (1 identical, 0 disjoint); for the caption."""
    width = float(r[1] - r[0]) if len(r) > 1 else 1.0
    sa, sb = float(a.sum() * width), float(b.sum() * width)
    if sa <= 0 or sb <= 0:
        return 0.0
    return float(np.minimum(a / sa, b / sb).sum() * width)


def reference_md_frames(spec: dict, structures: Sequence[Atoms], temperature_K: float, frames: int,
                        every: int, seed: int, workdir: str, timestep_fs: float = 1.0,
                        friction_per_fs: float = 0.001) -> list[Atoms]:
    """``frames`` snapshots, one every ``every`` steps, of Langevin MD driven by the reference."""
    from aimspax_like.config import MDConfig
    from aimspax_like.reference.calculators import make_calculator
    from aimspax_like.sampling.ase_md import StridedSampler

    md = MDConfig(ensemble="langevin", temperature_K=float(temperature_K), timestep_fs=timestep_fs,
                  friction_per_fs=friction_per_fs)
    sampler = StridedSampler(list(structures), lambda: make_calculator(spec, workdir), md, every, seed=seed)
    return [sampler.next_frame().atoms for _ in range(frames)]
