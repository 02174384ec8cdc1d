"""Dataset statistics that fix a MACE model's normalisation before its first training step.

These mirror what ``mace_run_train`` computes (``compute_average_E0s``,
``compute_avg_num_neighbors``, ``rms_forces_scaling``) but read ``ase.Atoms`` with the engine's
REF_* keys directly, because the ensemble is built from the first labelled frames of a campaign,
not from an xyz file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms
from mace.data import get_neighborhood


def atomic_energies_from_data(frames: Sequence[Atoms], atomic_numbers: Sequence[int]) -> dict[int, float]:
    """Per-element reference energies E0 by least squares of REF_energy on element counts.

    ``numpy.linalg.lstsq`` returns the minimum-norm solution, which is what makes this usable
    on the first frames of a campaign: they usually share one composition, so the counts matrix
    has rank one and the energy is split between elements in proportion to their counts
    (E0_z = n_z E / sum n^2). With a single element that is exactly the mean energy per atom,
    so the model's interaction energies start centred on zero. Elements absent from every frame
    get E0 = 0. Frames without REF_energy are skipped; no usable frame gives all zeros.
    """
    zs = [int(z) for z in atomic_numbers]
    rows, energies = [], []
    for atoms in frames:
        if "REF_energy" not in atoms.info:
            continue
        numbers = atoms.numbers
        rows.append([np.count_nonzero(numbers == z) for z in zs])
        energies.append(float(atoms.info["REF_energy"]))
    if not rows:
        return dict.fromkeys(zs, 0.0)
    e0, *_ = np.linalg.lstsq(np.asarray(rows, float), np.asarray(energies), rcond=None)
    return {z: float(value) for z, value in zip(zs, e0, strict=True)}


def average_neighbors(frames: Sequence[Atoms], r_max: float) -> float:
    """Mean number of neighbours within ``r_max`` (MACE divides messages by it).

    Like mace's ``compute_avg_num_neighbors`` only atoms with at least one neighbour count;
    a data set of isolated atoms gives 1.0 so the normalisation stays finite.
    """
    counts: list[np.ndarray] = []
    for atoms in frames:
        edge_index, *_ = get_neighborhood(
            positions=atoms.positions, cutoff=float(r_max), pbc=tuple(atoms.pbc), cell=np.array(atoms.cell)
        )
        per_atom = np.bincount(edge_index[1], minlength=len(atoms))
        counts.append(per_atom[per_atom > 0])
    joined = np.concatenate(counts) if counts else np.zeros(0)
    return float(joined.mean()) if joined.size else 1.0


def force_scale(frames: Sequence[Atoms]) -> float:
    """RMS of all REF_forces components: mace's default ``rms_forces_scaling``.

    Used as the ScaleShift scale so that an untrained model's forces already have the size of
    the reference forces. Returns 1.0 when there are no (or only zero) forces.
    """
    chunks = [np.asarray(a.arrays["REF_forces"], float).ravel() for a in frames if "REF_forces" in a.arrays]
    values = np.concatenate(chunks) if chunks else np.zeros(0)
    rms = float(np.sqrt(np.mean(values**2))) if values.size else 0.0
    return rms if rms > 0 else 1.0
