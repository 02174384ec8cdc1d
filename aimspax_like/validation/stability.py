"""MD stability of a model, in the shape of the aims-PAX paper's Table III.

A model can have small test errors and still drive MD into nonsense within picoseconds: the
test set only probes where the reference went, MD goes where the model's errors lead it. So
``K`` Langevin runs per temperature (1 fs, friction 0.001/fs by default, as in the paper) start
from the run's start structures with Maxwell-Boltzmann velocities, each with its own seed, and
every step is checked against a criterion; a run that fails stops there, and the step it failed
at is reported.

All ``K x T`` runs step together through the engine's batched dynamics (``step_batch``): one
batched model call per MD step for every running trajectory, as in active learning, instead of
``K x T`` separate ASE loops. A failed run leaves the batch; the others go on.

The criterion depends on what the system is:

* a molecule or cluster (no periodic direction): the paper's "no bonded atoms separated by more
  than 2 A". Bonds are the pairs of the start structure closer than 1.2 times the sum of their
  covalent radii (ASE's ``natural_cutoffs`` with the AL guards' bond factor: the plain sum, 1.07 A
  for C-H and 0.62 A for H-H, misses C-H bonds of 1.09 A and H2's 0.74 A). The paper's 2 A
  limit was written for covalent bonds between non-metal atoms (all shorter than 1.8 A), and it
  holds them exactly. A bond with a metal atom is 2.3-2.9 A long at equilibrium (Cu-Cu 2.5 A)
  and would fail at once, so it is held to ``bond_stretch_factor`` times the longer of its start
  length and its covalent-radius sum instead (a metal atom leaving its cluster fails,
  rearranging inside it does not);
* a solid (any periodic direction): bonds may rearrange (diffusion, melting), so what fails is
  two atoms closer than ``min_distance_factor`` times their covalent-radius sum, or a volume
  that leaves ``[start / volume_factor, start * volume_factor]`` (possible with NPT blocks);
* either: positions, momenta or forces that are not finite numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.neighborlist import natural_cutoffs, neighbor_list

from aimspax_like.guards import BOND_FACTOR, NON_METALS, bond_lengths

MAX_BOND_A = 2.0  # the paper's limit for bonded atoms
BOND_STRETCH_FACTOR = 1.5  # bonds with a metal atom: this times max(start length, covalent-radius sum)
MIN_DISTANCE_FACTOR = 0.6  # solids: the AL guards' close-contact factor
VOLUME_FACTOR = 1.5  # solids: the AL guards' volume factor


@dataclass
class StabilityCriterion:
    """Decides whether one geometry of one run is still physical (see the module docstring)."""

    periodic: bool
    i: np.ndarray  # start bonds (molecules)
    j: np.ndarray
    limit: np.ndarray  # longest allowed length of each bond (A)
    radii: np.ndarray
    volume0: float
    max_bond_A: float
    bond_stretch_factor: float
    min_distance_factor: float
    volume_factor: float
    metal_bonds: int = 0  # start bonds with a metal atom (held to the stretch factor)

    @classmethod
    def from_start(
        cls,
        start: Atoms,
        max_bond_A: float = MAX_BOND_A,
        bond_stretch_factor: float = BOND_STRETCH_FACTOR,
        min_distance_factor: float = MIN_DISTANCE_FACTOR,
        volume_factor: float = VOLUME_FACTOR,
    ) -> StabilityCriterion:
        periodic = bool(start.pbc.any())
        i = j = np.zeros(0, dtype=int)
        limit = np.zeros(0)
        metal_bonds = 0
        if not periodic and len(start) > 1:
            i, j = neighbor_list("ij", start, natural_cutoffs(start, mult=BOND_FACTOR))
            keep = i < j
            i, j = i[keep], j[keep]
            length0 = bond_lengths(start, i, j)
            radii = covalent_radii[start.numbers]
            covalent = np.isin(start.numbers[i], list(NON_METALS)) & np.isin(start.numbers[j], list(NON_METALS))
            metal_limit = bond_stretch_factor * np.maximum(length0, radii[i] + radii[j])
            limit = np.where(covalent, max_bond_A, metal_limit)
            metal_bonds = int((~covalent).sum())
        volume0 = float(abs(np.linalg.det(start.cell.array))) if start.pbc.all() else 0.0
        return cls(periodic, i, j, limit, covalent_radii[start.numbers], volume0, max_bond_A, bond_stretch_factor,
                   min_distance_factor, volume_factor, metal_bonds)

    def describe(self) -> str:
        """The criterion in one line (``stability.criterion`` in the report)."""
        if self.periodic:
            return (f"periodic: no two atoms closer than {self.min_distance_factor:g} x their covalent-radius sum, "
                    f"volume within a factor {self.volume_factor:g} of the start; finite numbers")
        metal = (f" (bonds with a metal atom: {self.bond_stretch_factor:g} x the longer of their start length and "
                 "covalent-radius sum)") if self.metal_bonds else ""
        return (f"non-periodic: no atoms bonded at the start (within {BOND_FACTOR:g} x covalent radii) more than "
                f"{self.max_bond_A:g} A apart{metal}; finite numbers")

    def check(self, atoms: Atoms, momenta: np.ndarray | None = None, forces: np.ndarray | None = None) -> str | None:
        """``None`` while the geometry is fine, else a short reason."""
        positions = atoms.positions
        if not np.isfinite(positions).all() or (momenta is not None and not np.isfinite(momenta).all()):
            return "non-finite positions or momenta"
        if forces is not None and not np.isfinite(forces).all():
            return "non-finite forces"
        if self.periodic:
            return self._check_solid(atoms)
        if len(self.i):
            lengths = bond_lengths(atoms, self.i, self.j)
            over = lengths > self.limit
            if over.any():
                k = int(np.argmax(lengths - self.limit))
                return (f"atoms {self.i[k]} and {self.j[k]} (bonded at the start) {lengths[k]:.2f} A apart "
                        f"(limit {self.limit[k]:.2f} A)")
        return None

    def _check_solid(self, atoms: Atoms) -> str | None:
        if not np.isfinite(atoms.cell.array).all():
            return "non-finite cell"
        if self.volume0 > 0:
            ratio = float(abs(np.linalg.det(atoms.cell.array))) / self.volume0
            if not (1.0 / self.volume_factor <= ratio <= self.volume_factor):
                return f"volume {ratio:.2f} x the start (allowed 1/{self.volume_factor:g} to {self.volume_factor:g})"
        cutoff = self.min_distance_factor * 2.0 * float(self.radii.max())
        i, j, d = neighbor_list("ijd", atoms, cutoff)
        if len(i):
            close = d < self.min_distance_factor * (self.radii[i] + self.radii[j])
            if close.any():
                k = int(np.flatnonzero(close)[np.argmin(d[close])])
                return (f"atoms {i[k]} and {j[k]} {d[k]:.2f} A apart (limit {self.min_distance_factor:g} x "
                        f"covalent radii = {self.min_distance_factor * (self.radii[i[k]] + self.radii[j[k]]):.2f} A)")
        return None


@dataclass
class RunOutcome:
    temperature_K: float
    run: int
    structure: int
    failed_at: int | None = None  # MD step of the first failure; None: stable to the end
    reason: str = ""


@dataclass
class StabilityResult:
    criterion: str
    steps: int
    timestep_fs: float
    runs: int  # per temperature
    outcomes: list[RunOutcome]
    samples: dict[float, list[Atoms]] = field(default_factory=dict)  # model-MD frames per sampled temperature
    md_steps: int = 0  # trajectory-steps taken in all

    def per_temperature(self, temperatures: Sequence[float]) -> list[dict[str, Any]]:
        rows = []
        for t in temperatures:
            mine = [o for o in self.outcomes if o.temperature_K == t]
            failed = sorted(o.failed_at for o in mine if o.failed_at is not None)
            rows.append({"temperature_K": float(t), "stable": len(mine) - len(failed), "runs": len(mine),
                         "failed_at_steps": failed})
        return rows


def run_stability(
    force_fn: Callable[[list[Atoms]], list[np.ndarray]],
    starts: Sequence[Atoms],
    temperatures: Sequence[float],
    runs: int,
    steps: int,
    *,
    timestep_fs: float = 1.0,
    friction_per_fs: float = 0.001,
    seed: int = 0,
    criterion: Callable[[Atoms], StabilityCriterion] = StabilityCriterion.from_start,
    sample_temperatures: Sequence[float] = (),
    sample_every: int = 10,
    sample_after: int = 0,
    on_step: Callable[[int, int], None] | None = None,
    max_atoms_per_call: Any = "auto",
) -> StabilityResult:
    """``runs`` Langevin runs per temperature, all stepped together; see the module docstring.

    Run ``k`` starts from ``starts[k % len(starts)]``; its seed is ``(seed, temperature index,
    k)``. Frames of the runs at ``sample_temperatures`` are kept every ``sample_every`` steps
    after step ``sample_after`` while the run is stable (for the RDF). ``on_step(step,
    running)`` is called after every step (progress).
    """
    from aimspax_like.config import MDConfig
    from aimspax_like.sampling.dynamics import MDState, maxwell_boltzmann, step_batch

    states: list[MDState] = []
    checks: list[StabilityCriterion] = []
    outcomes: list[RunOutcome] = []
    criteria = [criterion(s) for s in starts]
    for t_index, temperature in enumerate(temperatures):
        md = MDConfig(ensemble="langevin", temperature_K=float(temperature), timestep_fs=timestep_fs,
                      friction_per_fs=friction_per_fs)
        for k in range(runs):
            structure = k % len(starts)
            rng = np.random.default_rng([seed, t_index, k])
            atoms = starts[structure].copy()
            atoms.calc = None
            atoms.set_momenta(maxwell_boltzmann(atoms, float(temperature), rng))
            states.append(MDState(atoms, md, rng))
            checks.append(criteria[structure])
            outcomes.append(RunOutcome(float(temperature), k, structure))
    sampled = {float(t) for t in sample_temperatures}
    samples: dict[float, list[Atoms]] = {t: [] for t in sampled}
    active = list(range(len(states)))
    md_steps = 0
    for step in range(1, steps + 1):
        if not active:
            break
        step_batch([states[a] for a in active], force_fn, max_atoms_per_call=max_atoms_per_call)
        md_steps += len(active)
        still = []
        for a in active:
            state = states[a]
            forces = state.member_forces
            reason = checks[a].check(state.atoms, state.atoms.get_momenta(), forces)
            if reason:
                outcomes[a].failed_at = step
                outcomes[a].reason = reason
                continue
            still.append(a)
            t = outcomes[a].temperature_K
            if t in sampled and step > sample_after and step % sample_every == 0:
                frame = state.atoms.copy()
                frame.calc = None
                samples[t].append(frame)
        active = still
        if on_step is not None:
            on_step(step, len(active))
    describe = criteria[0].describe() if criteria else ""
    if len({c.periodic for c in criteria}) > 1:
        describe = "; ".join(sorted({c.describe() for c in criteria}))
    return StabilityResult(describe, steps, timestep_fs, runs, outcomes, samples, md_steps)
