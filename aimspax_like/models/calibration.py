"""Refit a trained member's per-element reference energies E0 to its training frames.

With the paper's loss weights (energy 1, forces 1000) a member learns forces well long before
the constant part of its energy is right: an offset common to all frames of one composition
costs almost nothing in the loss and has no effect on forces. A least-squares fit of the
remaining energy residuals on element counts, added to the model's E0 buffer, removes that
offset exactly without touching forces (E0s are constants per atom). With a single
composition the fit is the minimum-norm split of the mean residual between elements.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ase import Atoms

from aimspax_like.models.ensemble import MACEEnsemble


def refit_atomic_energies(ensemble: MACEEnsemble, member: int, frames: Sequence[Atoms]) -> dict[int, float]:
    """Shift member ``member``'s E0s by the lstsq fit of its energy residuals; returns the shifts."""
    labelled = [a for a in frames if "REF_energy" in a.info]
    if not labelled:
        return {}
    zs = [int(z) for z in ensemble.z_table.zs]
    predicted = ensemble.predict(labelled, members=[member]).energies[0]
    residual = np.array([a.info["REF_energy"] for a in labelled]) - predicted
    counts = np.array([[np.count_nonzero(a.numbers == z) for z in zs] for a in labelled], dtype=float)
    shift, *_ = np.linalg.lstsq(counts, residual, rcond=None)
    block = ensemble.members[member].atomic_energies_fn
    with torch.no_grad():
        delta = torch.as_tensor(shift, dtype=block.atomic_energies.dtype, device=block.atomic_energies.device)
        if block.atomic_energies.ndim == 2:  # [n_elements, n_heads]
            delta = delta[:, None]
        block.atomic_energies += delta
    return {z: float(s) for z, s in zip(zs, shift, strict=True)}
