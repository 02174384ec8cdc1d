"""mace's weighted energy/forces(/stress) losses with a per-atom force mask.

A substructure (``LabelledFrame.piece``) is labelled for the forces of its core atoms only: its
buffer atoms sit next to a cut surface, and their reference forces describe that surface, not
the system. Every graph the engine builds carries a node-level ``force_mask`` (1: a label, 0: a
buffer atom; see ``GraphBuilder.build``), and the force term here is

    sum_atoms(weight * forces_weight * mask * |F - F_ref|^2) / (3 * sum_atoms(mask))

which is mace's ``mean_squared_error_forces`` whenever every mask is 1 (whole frames), and which
counts a core atom exactly like an atom of a whole frame. The energy and stress terms are mace's
own: a substructure has no energy or stress label (energy weight 0, see ``LabelledFrame.to_atoms``).
"""

from __future__ import annotations

import mace  # noqa: F401  (first: sets the torch.load switch e3nn needs under torch >= 2.6)
import torch
from mace.modules import WeightedEnergyForcesLoss, WeightedEnergyForcesStressLoss
from mace.modules.loss import weighted_mean_squared_error_energy, weighted_mean_squared_stress


def node_force_weights(ref) -> torch.Tensor:
    """Per-atom weight of the force term, [atoms, 1]: the frame's weights times the atom's mask."""
    per_graph = ref.weight * ref.forces_weight
    weights = torch.repeat_interleave(per_graph, ref.ptr[1:] - ref.ptr[:-1])
    mask = getattr(ref, "force_mask", None)
    if mask is not None:
        weights = weights * mask.to(weights.dtype)
    return weights.unsqueeze(-1)


def masked_mean_squared_error_forces(ref, pred) -> torch.Tensor:
    """Mean squared force error over the labelled (unmasked) components of the batch."""
    squared = node_force_weights(ref) * torch.square(ref["forces"] - pred["forces"])
    mask = getattr(ref, "force_mask", None)
    if mask is None:  # a graph built without the engine's mask: every atom a label, mace's mean
        return squared.mean()
    return squared.sum() / (3.0 * mask.sum()).clamp(min=1.0)


class MaskedEnergyForcesLoss(WeightedEnergyForcesLoss):
    """``w_E * mace energy term + w_F * masked force term``."""

    def forward(self, ref, pred, ddp: bool | None = None) -> torch.Tensor:
        loss_energy = weighted_mean_squared_error_energy(ref, pred, False)
        return self.energy_weight * loss_energy + self.forces_weight * masked_mean_squared_error_forces(ref, pred)


class MaskedEnergyForcesStressLoss(WeightedEnergyForcesStressLoss):
    """``MaskedEnergyForcesLoss`` plus mace's stress term."""

    def forward(self, ref, pred, ddp: bool | None = None) -> torch.Tensor:
        loss_energy = weighted_mean_squared_error_energy(ref, pred, False)
        loss_stress = weighted_mean_squared_stress(ref, pred, False)
        return (self.energy_weight * loss_energy + self.forces_weight * masked_mean_squared_error_forces(ref, pred)
                + self.stress_weight * loss_stress)
