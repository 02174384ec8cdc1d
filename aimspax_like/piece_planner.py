"""Which substructures of an uncertain frame to label: the policy on top of ``substructures``.

The scheduler hands over a frame that Eq. 1 sent to the reference, with its committee forces;
``PiecePlanner.plan`` answers with the pieces to label instead (``al.substructures``), or with
nothing when the frame should be labelled whole: it is smaller than ``min_atoms``, a piece would
hold most of its atoms anyway, or no box fits its cell. Each piece is

1. centred on the most uncertain atom of a group of uncertain atoms (Eq. 1's per-atom term
   above the atom threshold, grouped within ``group_radius`` of it, most uncertain first, at
   most ``max_per_frame`` groups),
2. carved with a core of ``core_radius`` around that atom (default: the model's receptive
   field), which holds the whole group, and a buffer of ``buffer`` A, in vacuum (optionally
   with hydrogen caps) or as a periodic box,
3. optionally embedded in distribution (IDEAL): its buffer atoms, and only those, descend the
   committee's force disagreement for a few steps, so that the reference labels a core whose
   surroundings look like what the committee knows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.substructures import (
    CROP_JITTER,
    Substructure,
    cap_cut_bonds,
    carve,
    crop_periodic,
    group_uncertain_atoms,
    min_width,
)
from aimspax_like.uncertainty import atomic_force_std

# A piece holding more than this share of its frame's atoms saves too little: the frame is labelled whole.
_WHOLE_FRAME_SHARE = 0.8


@dataclass
class Plan:
    """The planner's answer for one frame: ``pieces`` (empty: label the frame whole) and why."""

    pieces: list[Substructure]
    reason: str
    uncertain_atoms: int = 0
    details: dict[str, Any] = field(default_factory=dict)


class PiecePlanner:
    """Turns uncertain frames into substructures per an ``al.substructures`` section."""

    def __init__(self, config: Any, receptive_field: float, ensemble: Any = None, seed: int = 0,
                 vacuum: bool = True) -> None:
        self.config = config
        self.vacuum = vacuum  # False: the reference labels periodic cells only (no piece in vacuum)
        self.core_radius = float(config.core_radius if config.core_radius is not None else receptive_field)
        # A grouped atom must lie in the core to be labelled (the config refuses a larger explicit value).
        self.group_radius = min(self.core_radius, float(
            config.group_radius if config.group_radius is not None else self.core_radius))
        self.ensemble = ensemble  # for the buffer relaxation only
        self.rng = np.random.default_rng(seed)

    def applies(self, atoms: Atoms) -> bool:
        return bool(self.config.enabled) and len(atoms) >= self.config.min_atoms

    def periodic(self, atoms: Atoms) -> bool:
        box = self.config.box
        if box == "auto":
            reach = 2 * (self.core_radius + self.config.buffer + CROP_JITTER)
            return bool(np.all(atoms.pbc)) and reach < min_width(atoms)
        return box == "periodic"

    def plan(self, atoms: Atoms, member_forces: np.ndarray, threshold: float) -> Plan:
        """The pieces to label for ``atoms`` (committee forces ``[members, atoms, 3]``)."""
        if not self.applies(atoms):
            return Plan([], "small")
        per_atom = atomic_force_std(member_forces)
        limit = self.config.atom_threshold if self.config.atom_threshold is not None else threshold
        # The most uncertain atom always gets a piece, even below the limit (a frame sent for its
        # stress, or an infinite threshold during the warm-up).
        below_max = float(np.nextafter(per_atom.max(), -np.inf))
        groups = group_uncertain_atoms(atoms, per_atom, min(limit, below_max), self.group_radius,
                                       self.config.max_per_frame)
        uncertain = int((per_atom > limit).sum())
        pieces = []
        try:
            for group in groups:
                piece = self._piece(atoms, group.centre)
                piece.info["group"] = float(len(group.members))
                pieces.append(piece)
        except ValueError as exc:  # the box or sphere does not fit this cell's minimum image
            return Plan([], f"does not fit: {exc}", uncertain)
        if max(len(p.atoms) for p in pieces) > _WHOLE_FRAME_SHARE * len(atoms):
            return Plan([], "piece nearly as large as the frame", uncertain)
        return Plan(pieces, "pieces", uncertain)

    def _piece(self, atoms: Atoms, centre: int) -> Substructure:
        """The piece around one group's centre: its core (``core_radius`` around the centre) holds
        every atom of the group (``group_radius`` <= ``core_radius``), and each core atom has the
        whole buffer around it. A core grown around every member instead would grow the piece
        by the group's width, up to twice the core radius."""
        cfg = self.config
        centres = (centre,)
        piece = None
        if self.periodic(atoms):
            try:
                piece = crop_periodic(atoms, centres, self.core_radius, cfg.buffer, rng=self.rng, tries=cfg.crop_tries)
            except ValueError:
                if cfg.box == "periodic" or not self.vacuum:
                    raise
                # auto: the cores of a group spread wider than one centre's; a sphere in vacuum still fits
        if piece is None:
            if not self.vacuum:
                raise ValueError("the reference labels periodic cells only and no periodic box fits this frame")
            piece = carve(atoms, centres, self.core_radius, cfg.buffer)
            if cfg.cap_hydrogen:
                piece = cap_cut_bonds(atoms, piece)
        if cfg.relax_buffer_steps and self.ensemble is not None:
            before, after = relax_buffer(self.ensemble, piece, cfg.relax_buffer_steps, cfg.relax_buffer_max_step)
            piece.info.update({"buffer_uncertainty_before": before, "buffer_uncertainty_after": after})
        return piece


def buffer_disagreement(ensemble: Any, atoms: Atoms, buffer: np.ndarray, create_graph: bool = False):
    """Mean committee force variance over the buffer atoms (eV^2/A^2) and the positions tensor it
    depends on (``create_graph``: differentiable in the positions)."""
    import torch

    graph = ensemble.graphs.md_batch([atoms], ensemble.device)
    positions = graph["positions"].detach().requires_grad_(True)
    graph = {**graph, "positions": positions}
    forces = []
    for member in ensemble.members:
        out = member(dict(graph), training=create_graph, compute_force=True)
        forces.append(out["forces"])
    stacked = torch.stack(forces)  # [members, atoms, 3]
    variance = stacked.var(dim=0, unbiased=False).sum(dim=-1)  # [atoms]
    mask = torch.as_tensor(buffer, device=variance.device)
    return variance[mask].mean(), positions


def relax_buffer(ensemble: Any, piece: Substructure, steps: int, max_step: float) -> tuple[float, float]:
    """IDEAL's in-distribution embedding: move the buffer atoms (core frozen) down the gradient of
    the committee's disagreement on them, at most ``max_step`` A per atom and step; a step that
    raises the disagreement is undone and halves the step. Returns the RMS disagreement (eV/A)
    before and after. Changes ``piece.atoms`` in place."""
    import torch

    buffer = ~piece.core
    if not buffer.any() or steps <= 0:
        return math.nan, math.nan
    atoms = piece.atoms
    value, positions = buffer_disagreement(ensemble, atoms, buffer, create_graph=True)
    first = current = float(value.detach())
    step = float(max_step)
    for _ in range(int(steps)):
        (gradient,) = torch.autograd.grad(value, positions)
        g = gradient.detach().cpu().numpy().astype(float)
        g[~buffer] = 0.0
        largest = float(np.linalg.norm(g, axis=1).max())
        if largest == 0.0:
            break
        old = atoms.positions.copy()
        atoms.positions = old - step * g / largest
        value, positions = buffer_disagreement(ensemble, atoms, buffer, create_graph=True)
        if float(value.detach()) > current:
            atoms.positions = old
            step *= 0.5
            value, positions = buffer_disagreement(ensemble, atoms, buffer, create_graph=True)
            continue
        current = float(value.detach())
    return float(np.sqrt(first / 3)), float(np.sqrt(current / 3))

