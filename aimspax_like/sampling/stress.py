"""Committee stresses for NPT trajectories driven by a MACE ensemble.

``MACEEnsemble.predict`` returns energies and forces only, and the barostat also needs each
member's stress. ``ensemble_stress_fn`` turns an ensemble into the ``StressFn`` that
``step_batch`` takes: one more batched graph with MACE's cell-displacement derivative, for the
NPT trajectories only. (Computing it inside the force pass would save that second pass; that
needs ``predict`` to take ``compute_stress``, see ``models/ensemble.py``.)
"""

from __future__ import annotations

from collections.abc import Sequence

import mace  # noqa: F401  (first: e3nn needs the torch.load switch mace sets)
import numpy as np
import torch
from ase import Atoms

from aimspax_like.models.ensemble import MACEEnsemble
from aimspax_like.sampling.state import StressFn


def member_stresses(ensemble: MACEEnsemble, structures: Sequence[Atoms]) -> list[np.ndarray]:
    """``[n_members, 3, 3]`` stress per structure (ASE convention, eV/A^3, potential part)."""
    graph = ensemble.graphs.md_batch(structures, ensemble.device)
    # MACE's stress pass replaces the dict's positions and shifts with displaced ones, so each
    # member gets its own (shallow) copy of the dict; the tensors themselves are shared.
    stresses = [
        member(dict(graph), training=False, compute_force=True, compute_stress=True)["stress"].detach()
        for member in ensemble.members
    ]
    stacked = torch.stack(stresses).cpu().numpy().astype(np.float64)  # [M, S, 3, 3], one copy to the host
    return [stacked[:, s] for s in range(len(structures))]


def ensemble_stress_fn(ensemble: MACEEnsemble) -> StressFn:
    """A ``StressFn`` over the ensemble's live weights (it follows further training)."""

    def stresses(structures: list[Atoms]) -> list[np.ndarray]:
        return member_stresses(ensemble, structures)

    return stresses
