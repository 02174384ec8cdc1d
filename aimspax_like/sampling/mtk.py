"""Martyna-Tobias-Klein NPT (``npt_mtk``), vectorised over the trajectories of a batch.

The equations are MTK's (Martyna, Tobias, Klein, J. Chem. Phys. 101, 4177 (1994)) with a
Nose-Hoover chain on the particles and another on the barostat, integrated with the
time-reversible Liouville splitting of Tuckerman et al. (J. Phys. A 39, 5629 (2006))::

    chains(dt/2)  cell kick(dt/2)  particle kick(dt/2)  drift(dt)  | forces |
    particle kick(dt/2)  cell kick(dt/2)  chains(dt/2)

Every system carries a symmetric barostat momentum ``P`` (3x3, ASE units) with mass ``W``:

    dq/dt = p/m + (P/W) q                     dh/dt = (P/W) h    (rows of the cell and q alike)
    dp/dt = F - (P/W + tr(P)/(N_f W)) p       dP/dt = V (Pi - P_ext) + (2K / N_f) 1

where ``Pi`` is the instantaneous pressure tensor (kinetic plus virial) and ``N_f`` the
particle degrees of freedom (``degrees_of_freedom``: 3N - 3, the centre of mass stays at
rest). ``isotropic`` keeps ``P = p 1`` (the driving force is projected on its trace: one
barostat degree of freedom, the cell keeps its shape); ``anisotropic`` lets the full symmetric
``P`` act (six degrees of freedom: every cell length and angle fluctuates, the cell does not
rotate). The particle kick and the drift are solved exactly for constant ``P`` in the
eigenbasis of ``P`` (``exprel`` keeps them regular as ``P -> 0``).

Masses follow ASE's choice from the time constants: particle chain ``Q = (N_f kT, kT, ...)
taut^2``, barostat ``W = (N_f + 3) kT taup^2 / 3`` (per diagonal component; ``3 W`` for the
isotropic ``p_eps = tr P``), barostat chain ``R = (n_cell kT, kT, ...) taup^2``.

The conserved extended energy is ``E_pot + K + P_ext V + |P|^2 / 2W`` plus both chains'
energies (``extra_energy``). With the centre of mass held at rest, MTK's volume distribution
differs from the exact isothermal-isobaric one by about one particle's share (a shift of
``<V>`` of order ``kT / B``, far below the volume fluctuations of a condensed phase).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import units
from scipy.special import exprel

from aimspax_like.sampling import thermostats as th

ENSEMBLE = "npt_mtk"
CELL_DOF = {"isotropic": 1, "anisotropic": 6}


def barostat_mass(n_dof: np.ndarray, kT: np.ndarray, taup: np.ndarray) -> np.ndarray:
    """``W`` of one diagonal component of ``P`` (the isotropic ``p_eps = tr P`` has ``3 W``)."""
    return (n_dof + 3.0) * kT * taup**2 / 3.0


def barostat_chain_masses(cell_dof: np.ndarray, kT: np.ndarray, taup: np.ndarray) -> np.ndarray:
    """The barostat chain's masses: ``(n_cell kT, kT, ...) taup^2`` (as the particles' chain)."""
    return th.chain_masses(cell_dof, kT, taup)


def extra_energy(
    chain: np.ndarray,
    barostat_chain: np.ndarray,
    cell_momentum: np.ndarray,
    volume: np.ndarray,
    n_dof: np.ndarray,
    kT: np.ndarray,
    taut: np.ndarray,
    taup: np.ndarray,
    pressure: np.ndarray,
    cell_dof: np.ndarray,
) -> np.ndarray:
    """What the extended system adds to ``E_pot + K``, per system: chains, cell kinetic, ``P V``."""
    q = th.chain_masses(n_dof, kT, taut)
    r = barostat_chain_masses(cell_dof, kT, taup)
    w = barostat_mass(n_dof, kT, taup)
    return (
        th.chain_energy(chain, q, n_dof, kT)
        + th.chain_energy(barostat_chain, r, cell_dof, kT)
        + (cell_momentum**2).sum(axis=(1, 2)) / (2.0 * w)
        + pressure * volume
    )


def per_system_tensor(a: np.ndarray, b: np.ndarray, system: np.ndarray, n_systems: int) -> np.ndarray:
    """``sum_i a_i b_i^T`` per system, ``[n_systems, 3, 3]``, from per-atom ``[n, 3]`` rows."""
    outer = (a[:, :, None] * b[:, None, :]).reshape(-1, 9)
    return np.stack(
        [np.bincount(system, weights=outer[:, k], minlength=n_systems) for k in range(9)], axis=1
    ).reshape(n_systems, 3, 3)


def _rotate(rows: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Per-atom rows times their system's matrix: ``rows[i] @ basis[i]``."""
    return np.einsum("ni,nij->nj", rows, basis)


class MTKSystems:
    """The ``npt_mtk`` systems of a batch: their extended variables and both halves of a step.

    ``group`` is the batch's group of these systems (``states``, ``atoms``, ``local``, ``n``,
    ``param``) and ``batch`` the ``Batch`` whose position and momentum buffers they share.
    The chains and the barostat momentum live in per-batch buffers; each state's ``chain``,
    ``barostat_chain`` and ``cell_momentum`` are views into them (what a checkpoint saves).
    """

    def __init__(self, group: Any, batch: Any) -> None:
        self.group = group
        self.batch = batch
        g = group
        if batch.mobile is not None and not batch.mobile[g.atoms].all():
            raise ValueError("ensemble 'npt_mtk' does not support fixed atoms (FixAtoms)")
        n = g.n
        self.chain = np.zeros((n, 2, th.CHAIN_LENGTH))
        self.barostat_chain = np.zeros((n, 2, th.CHAIN_LENGTH))
        self.cell_momentum = np.zeros((n, 3, 3))
        for k, s in enumerate(g.states):
            for buffer, name in ((self.chain, "chain"), (self.barostat_chain, "barostat_chain"),
                                 (self.cell_momentum, "cell_momentum")):
                saved = getattr(s, name)
                if saved is not None:
                    buffer[k] = saved
                setattr(s, name, buffer[k])
        self.views = tuple((s.chain, s.barostat_chain, s.cell_momentum) for s in g.states)
        self.n_dof = g.param(batch.n_dof)
        self.kT = g.param(batch.kT)
        self.dt = g.param(batch.dt)
        taup = np.array([s.md.taup_fs for s in g.states]) * units.fs
        self.isotropic = np.array([s.md.cell_flexibility == "isotropic" for s in g.states])
        self.cell_dof = np.array([CELL_DOF[s.md.cell_flexibility] for s in g.states], dtype=float)
        self.pressure = np.array([s.md.pressure_bar for s in g.states]) * units.bar
        self.q = th.chain_masses(self.n_dof, self.kT, g.param(batch.taut))
        self.r = barostat_chain_masses(self.cell_dof, self.kT, taup)
        self.w = barostat_mass(self.n_dof, self.kT, taup)
        self.masses = batch.masses[g.atoms]
        self._eigen: tuple[np.ndarray, np.ndarray] | None = None

    def __bool__(self) -> bool:
        return self.group.n > 0

    def views_intact(self) -> bool:
        return all(
            a is b for s, views in zip(self.group.states, self.views, strict=True)
            for a, b in zip((s.chain, s.barostat_chain, s.cell_momentum), views, strict=True)
        )

    # ------------------------------------------------------------------ the two halves

    def before_forces(self, forces: np.ndarray) -> None:
        """Everything up to the force call: chains, cell and particle half kicks, full drift."""
        half = 0.5 * self.dt
        self._chains(half)
        self._cell_kick(half)
        self._eigen = self._eigenbasis()
        self._particle_kick(forces[self.group.atoms], half)
        self._drift(self.dt)

    def after_forces(self, forces: np.ndarray) -> None:
        """The rest, with the forces and stresses at the new positions and cell."""
        half = 0.5 * self.dt
        self._particle_kick(forces[self.group.atoms], half)
        self._eigen = None
        self._cell_kick(half)
        self._chains(half)

    # ------------------------------------------------------------------ the pieces

    def _momenta(self) -> np.ndarray:
        return self.batch.momenta[self.group.atoms]

    def _chains(self, delta: np.ndarray) -> None:
        """Both Nose-Hoover chains over ``delta`` (they act on disjoint variables and commute)."""
        g = self.group
        kin2_cell = (self.cell_momentum**2).sum(axis=(1, 2)) / self.w
        scale = th.nose_hoover_chain(self.barostat_chain, self.r, kin2_cell, self.cell_dof, self.kT, delta)
        self.cell_momentum *= scale[:, None, None]
        kin2 = th.twice_kinetic(self._momenta(), self.masses, g.local, g.n)
        scale = th.nose_hoover_chain(self.chain, self.q, kin2, self.n_dof, self.kT, delta)
        self.batch.momenta[g.atoms] *= scale[g.local][:, None]

    def cells(self) -> np.ndarray:
        return np.stack([s.atoms.cell.array for s in self.group.states])

    def _cell_kick(self, delta: np.ndarray) -> None:
        """``P += delta (V (Pi - P_ext) + 2K / N_f)``, projected on ``1`` for isotropic systems."""
        g = self.group
        p = self._momenta()
        kinetic = per_system_tensor(p / self.masses, p, g.local, g.n)  # sum p p^T / m
        volume = np.abs(np.linalg.det(self.cells()))
        stress = np.stack([s.member_stress.mean(axis=0) for s in g.states])  # potential part
        eye = np.eye(3)
        force = kinetic - volume[:, None, None] * (stress + self.pressure[:, None, None] * eye)
        force += (np.trace(kinetic, axis1=1, axis2=2) / self.n_dof)[:, None, None] * eye
        force = 0.5 * (force + force.transpose(0, 2, 1))
        trace = np.trace(force, axis1=1, axis2=2) / 3.0
        force[self.isotropic] = trace[self.isotropic, None, None] * eye
        self.cell_momentum += delta[:, None, None] * force

    def _eigenbasis(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues of ``P / W`` and the eigenvectors (columns), per system."""
        values, vectors = np.linalg.eigh(self.cell_momentum)
        return values / self.w[:, None], vectors

    def _particle_kick(self, forces: np.ndarray, delta: np.ndarray) -> None:
        """``dp/dt = F - (P/W + tr(P)/(N_f W)) p`` over ``delta`` with ``F`` and ``P`` fixed."""
        g = self.group
        values, vectors = self._eigen if self._eigen is not None else self._eigenbasis()
        rate = values + (values.sum(axis=1) / self.n_dof)[:, None]
        x = (rate * delta[:, None])[g.local]  # [n_atoms, 3] in the eigenbasis
        basis = vectors[g.local]
        p = _rotate(self._momenta(), basis) * np.exp(-x) + delta[g.local][:, None] * _rotate(forces, basis) * exprel(-x)
        self.batch.momenta[g.atoms] = np.einsum("nj,nij->ni", p, basis)

    def _drift(self, delta: np.ndarray) -> None:
        """``dq/dt = p/m + (P/W) q`` and ``dh/dt = (P/W) h`` over ``delta`` (exact, ``p`` fixed)."""
        g = self.group
        values, vectors = self._eigen if self._eigen is not None else self._eigenbasis()
        x = values * delta[:, None]  # [n_systems, 3]
        basis = vectors[g.local]
        xa = x[g.local]
        q = _rotate(self.batch.positions[g.atoms], basis) * np.exp(xa)
        q += delta[g.local][:, None] * _rotate(self._momenta() / self.masses, basis) * exprel(xa)
        self.batch.positions[g.atoms] = np.einsum("nj,nij->ni", q, basis)
        stretch = np.einsum("sij,sj,skj->sik", vectors, np.exp(x), vectors)  # U exp(x) U^T
        cells = self.cells() @ stretch
        for state, cell in zip(g.states, cells, strict=True):
            state.atoms.set_cell(cell, scale_atoms=False)


def state_extra_energy(states: Sequence[Any], n_dof: np.ndarray) -> np.ndarray:
    """``extra_energy`` of ``npt_mtk`` states read from their own fields (zeros where unset)."""
    zeros_chain = np.zeros((2, th.CHAIN_LENGTH))

    def stack(name: str, empty: np.ndarray) -> np.ndarray:
        return np.stack([empty if getattr(s, name) is None else getattr(s, name) for s in states])

    md = [s.md for s in states]
    return extra_energy(
        stack("chain", zeros_chain), stack("barostat_chain", zeros_chain), stack("cell_momentum", np.zeros((3, 3))),
        np.array([s.atoms.get_volume() for s in states]), n_dof,
        np.array([m.temperature_K for m in md]) * units.kB, np.array([m.taut_fs for m in md]) * units.fs,
        np.array([m.taup_fs for m in md]) * units.fs, np.array([m.pressure_bar for m in md]) * units.bar,
        np.array([CELL_DOF[m.cell_flexibility] for m in md], dtype=float),
    )
