"""Farthest point sampling of MD frames on MACE descriptors: a small test set that spans the MD.

Consecutive MD frames, even strided, crowd around the most likely geometries; a test set picked
at random spends most of its (expensive) labels there. Farthest point sampling picks the frame
most different from everything picked so far, again and again, so ``n`` frames cover the
sampled region, rare excursions included.

"Different" is measured on what a MACE model sees: the invariant node features of its
interaction layers (``MACECalculator.get_descriptors(invariants_only=True)``), one vector per
atom. A frame needs one vector of fixed length whatever its atom count and order, so atoms are
averaged per element and the element means are concatenated in a fixed element order:

* a mean over atoms is invariant to atom order and permutation, as a frame's identity should be;
* averaging per element (instead of over all atoms) keeps an O-H environment from being washed
  out by the many C-H ones, and keeps frames of different compositions apart;
* an element absent from a frame contributes zeros, so frames of different compositions are
  still comparable.

The features are standardised (each column to unit spread over the candidates) before the
Euclidean distances, so that no channel dominates merely because its values are large.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms


def frame_vectors(atom_descriptors: Sequence[np.ndarray], numbers: Sequence[np.ndarray],
                  elements: Sequence[int] | None = None) -> np.ndarray:
    """One row per frame: per-element means of its atoms' descriptors, concatenated by element."""
    if elements is None:
        elements = sorted({int(z) for n in numbers for z in n})
    width = int(atom_descriptors[0].shape[-1]) if len(atom_descriptors) else 0
    rows = np.zeros((len(atom_descriptors), len(elements) * width))
    for f, (descriptors, zs) in enumerate(zip(atom_descriptors, numbers, strict=True)):
        descriptors = np.asarray(descriptors, dtype=float).reshape(len(zs), -1)
        for k, z in enumerate(elements):
            mask = np.asarray(zs) == z
            if mask.any():
                rows[f, k * width:(k + 1) * width] = descriptors[mask].mean(axis=0)
    return rows


def descriptor_calculator(model_path: str, device: str = "cpu"):  # -> MACECalculator
    """mace's ASE calculator for the model file, in the file's own dtype (no conversion)."""
    import mace  # noqa: F401  (before torch.load of a MACE file, see models.graphs)
    import torch
    from mace.calculators import MACECalculator

    from aimspax_like.models.torch_utils import quiet_torchscript

    with quiet_torchscript():
        model = torch.load(str(model_path), map_location="cpu", weights_only=False)
        dtype = "float32" if next(model.parameters()).dtype == torch.float32 else "float64"
        return MACECalculator(model_paths=str(model_path), device=device, default_dtype=dtype)


def mace_descriptors(calculator, frames: Sequence[Atoms]) -> list[np.ndarray]:
    """The invariant per-atom descriptors of every frame (``[n_atoms, n_features]`` each)."""
    return [np.asarray(calculator.get_descriptors(atoms, invariants_only=True), dtype=float).reshape(len(atoms), -1)
            for atoms in frames]


def standardise(vectors: np.ndarray) -> np.ndarray:
    """Each column to zero mean and unit spread; constant columns become zero."""
    vectors = np.asarray(vectors, dtype=float)
    spread = vectors.std(axis=0)
    spread[spread == 0] = 1.0
    return (vectors - vectors.mean(axis=0)) / spread


def farthest_point_sampling(vectors: np.ndarray, n: int) -> list[int]:
    """Indices of ``n`` rows picked greedily, each the farthest from all picked before.

    Deterministic: the first pick is the row farthest from the mean of all rows (an extreme
    frame rather than an arbitrary one); ties go to the lower index. ``n`` at least the number of
    rows returns every row, in pick order.
    """
    vectors = np.asarray(vectors, dtype=float)
    count = len(vectors)
    if count == 0 or n <= 0:
        return []
    first = int(np.argmax(np.linalg.norm(vectors - vectors.mean(axis=0), axis=1)))
    picked = [first]
    nearest = np.linalg.norm(vectors - vectors[first], axis=1)
    while len(picked) < min(n, count):
        nearest[picked] = -1.0
        nxt = int(np.argmax(nearest))
        picked.append(nxt)
        nearest = np.minimum(nearest, np.linalg.norm(vectors - vectors[nxt], axis=1))
    return picked
