"""The batch: contiguous buffers and per-system settings of the trajectories that step together.

Building a ``Batch`` costs a pass over its trajectories; it is kept (each state points to it)
and reused for as long as the same states, in the same order, with the same settings and
untouched views, are stepped together, which in active learning is every step between two
label events. Anything else (a trajectory joins or leaves, ASE replaced an array) builds a
new one from the current values, so the views can never go stale silently.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import numpy as np
from ase import units

from aimspax_like.sampling import mtk
from aimspax_like.sampling import thermostats as th
from aimspax_like.sampling.state import (
    BAROSTAT_NOISE,
    THERMOSTAT,
    ForceFn,
    MDState,
    StressFn,
    degrees_of_freedom,
    fixed_atoms,
)

AtomsPerCall = int | None | Literal["auto"]

# Measured on this project's 2-core CPU with the paper's model (32 channels, max_L 1, r_max 6,
# one thread, 4 members): the cost per structure of one call falls while the call's fixed
# overhead is shared (9-atom ethanol: 129 ms alone, 44-49 ms in calls of 8-16 molecules, 56-58
# ms in calls of 32-64), and rises once a call's edge tensors outgrow the cache (a 99-atom
# cluster, 4.1k edges: 874 ms alone, 934 in pairs, 1146 in fours; a 160-atom Cu cell, 12.5k
# edges: 3.1 s alone, 3.9 s in pairs). So a CPU gets chunks of about this many atoms (and a
# larger structure a call of its own); a GPU gets every structure in one call.
CPU_ATOMS_PER_CALL = 64


def atoms_per_call(device: str | None = None) -> int | None:
    """Chunk size of the batched force call on ``device`` (None: all structures in one call).

    Without a device, assume what ``device: auto`` picks: the GPU when torch is loaded and
    sees one, else the CPU.
    """
    if device is None:
        torch = sys.modules.get("torch")
        device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    return CPU_ATOMS_PER_CALL if str(device).startswith("cpu") else None


T = TypeVar("T")


def chunks(
    items: Sequence[T], max_atoms: int | None, n_atoms: Callable[[T], int] = lambda state: len(state.atoms)
) -> list[list[T]]:
    """Consecutive groups of at most ``max_atoms`` atoms (a larger structure goes alone).

    ``items`` are MD states by default; ``n_atoms`` tells the size of anything else (validation
    chunks frame indices with it).
    """
    if max_atoms is None:
        return [list(items)]
    groups: list[list[T]] = []
    current: list[T] = []
    size = 0
    for item in items:
        n = n_atoms(item)
        if current and size + n > max_atoms:
            groups.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        groups.append(current)
    return groups


def evaluate(
    states: Sequence[MDState],
    force_fn: ForceFn,
    stress_fn: StressFn | None = None,
    max_atoms_per_call: AtomsPerCall = "auto",
) -> None:
    """Fresh member forces (and, for NPT trajectories, stresses) for every state."""
    limit = atoms_per_call() if max_atoms_per_call == "auto" else max_atoms_per_call
    for group in chunks(states, limit):
        for state, forces in zip(group, force_fn([s.atoms for s in group]), strict=True):
            state.member_forces = forces
    stressed = [s for s in states if s.needs_stress]
    if not stressed:
        return
    if stress_fn is None:
        raise ValueError(f"ensemble {stressed[0].md.ensemble!r} needs stresses: pass stress_fn")
    for group in chunks(stressed, limit):
        for state, stress in zip(group, stress_fn([s.atoms for s in group]), strict=True):
            state.member_stress = np.asarray(stress, dtype=float).reshape(-1, 3, 3)


class _Group:
    """The systems of a batch that one thermostat (or the barostat) acts on."""

    def __init__(self, batch: Batch, systems: list[int]) -> None:
        self.states = [batch.states[i] for i in systems]
        self.systems = np.asarray(systems, dtype=int)
        sizes = batch.sizes[self.systems]
        if len(systems) == len(batch.states):
            self.atoms: slice | np.ndarray = slice(None)
        else:
            self.atoms = np.concatenate(
                [np.arange(batch.bounds[i], batch.bounds[i + 1]) for i in systems] or [np.zeros(0, int)]
            )
        self.local = np.repeat(np.arange(len(systems)), sizes)  # atom -> index in this group
        self.n = len(systems)

    def __bool__(self) -> bool:
        return self.n > 0

    def param(self, values: np.ndarray) -> np.ndarray:
        return values[self.systems]


class Batch:
    """Phase-space buffers of several trajectories and one step of their integrators."""

    def __init__(self, states: Sequence[MDState]) -> None:
        fixed = np.concatenate([fixed_atoms(s.atoms) for s in states])  # raises on other constraints
        for s in states:
            if s.needs_stress and (not s.atoms.pbc.all() or s.atoms.get_volume() <= 0):
                raise ValueError(f"ensemble {s.md.ensemble!r} needs a periodic cell (pbc on all axes)")
        self.states = tuple(states)
        self.settings = tuple(s.md for s in states)
        self.sizes = np.array([len(s.atoms) for s in states], dtype=int)
        self.bounds = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n = len(states)
        self.system = np.repeat(np.arange(self.n), self.sizes)
        for s in states:
            if "momenta" not in s.atoms.arrays:
                s.atoms.arrays["momenta"] = np.zeros((len(s.atoms), 3))
        self.positions = np.concatenate([s.atoms.arrays["positions"] for s in states]).astype(float)
        self.momenta = np.concatenate([s.atoms.arrays["momenta"] for s in states]).astype(float)
        views = []
        for s, a, b in zip(states, self.bounds[:-1], self.bounds[1:], strict=True):
            s.atoms.arrays["positions"] = self.positions[a:b]
            s.atoms.arrays["momenta"] = self.momenta[a:b]
            views.append((s.atoms.arrays["positions"], s.atoms.arrays["momenta"]))
            s.batch = self
        self.position_views, self.momentum_views = (tuple(v) for v in zip(*views, strict=True))
        self.masses = np.concatenate([s.atoms.get_masses() for s in states])[:, None]
        self.mobile = (~fixed).astype(float)[:, None] if fixed.any() else None
        self.n_dof = np.array([degrees_of_freedom(s.atoms) for s in states], dtype=float)

        def setting(name: str) -> np.ndarray:
            return np.array([getattr(s.md, name) for s in states], dtype=float)

        self.dt = setting("timestep_fs") * units.fs
        verlet = np.array([s.md.ensemble != mtk.ENSEMBLE for s in states])  # MTK has its own step
        self.half_dt_atom = np.where(verlet, 0.5 * self.dt, 0.0)[self.system][:, None]
        self.kT = setting("temperature_K") * units.kB
        self.taut = setting("taut_fs") * units.fs
        kinds = [THERMOSTAT[s.md.ensemble] for s in states]
        self.langevin = _Group(
            self, [i for i, k in enumerate(kinds) if k == "langevin" and states[i].md.friction_per_fs > 0]
        )
        self._init_langevin(setting("friction_per_fs") / units.fs)
        self.bussi = _Group(self, [i for i, k in enumerate(kinds) if k == "bussi"])
        self.bussi_decay = np.exp(-self.bussi.param(self.dt) / self.bussi.param(self.taut))
        self.nose_hoover = _Group(self, [i for i, k in enumerate(kinds) if k == "nose_hoover"])
        self._init_chains()
        self.npt = _Group(self, [i for i, s in enumerate(states) if s.md.ensemble in BAROSTAT_NOISE])
        self._init_barostat(setting)
        self.mtk = mtk.MTKSystems(_Group(self, [i for i, k in enumerate(kinds) if k == "mtk"]), self)

    def _init_langevin(self, gamma: np.ndarray) -> None:
        """Per-atom O-step factors: ``p <- c1 p + c2 sqrt(m kT) R``."""
        g = self.langevin
        c1, c2 = th.langevin_coefficients(g.param(gamma), g.param(self.dt))
        self.langevin_c1 = c1[g.local][:, None]
        self.langevin_c2 = c2[g.local][:, None] * np.sqrt(self.masses[g.atoms] * g.param(self.kT)[g.local][:, None])
        self.langevin_drift_free = np.array([len(s.atoms) > 1 and not fixed_atoms(s.atoms).any() for s in g.states])

    def _init_chains(self) -> None:
        g = self.nose_hoover
        self.chain = np.zeros((g.n, 2, th.CHAIN_LENGTH))
        for k, s in enumerate(g.states):
            if s.chain is not None:
                self.chain[k] = s.chain
            s.chain = self.chain[k]
        self.chain_views = tuple(s.chain for s in g.states)
        self.chain_q = th.chain_masses(g.param(self.n_dof), g.param(self.kT), g.param(self.taut))

    def _init_barostat(self, setting: Callable[[str], np.ndarray]) -> None:
        g = self.npt
        self.pressure_target = g.param(setting("pressure_bar")) * units.bar
        self.compressibility = g.param(setting("compressibility_per_bar")) / units.bar
        self.taup = g.param(setting("taup_fs")) * units.fs
        self.barostat_noise = np.array([BAROSTAT_NOISE[s.md.ensemble] for s in g.states])

    def matches(self, states: Sequence[MDState]) -> bool:
        """Same states in the same order, same settings, and ASE still holds our views."""
        return (
            len(states) == self.n
            and all(map(operator.is_, states, self.states))
            and all(map(operator.is_, (s.md for s in states), self.settings))
            and all(map(operator.is_, (s.atoms.arrays["positions"] for s in states), self.position_views))
            and all(map(operator.is_, (s.atoms.arrays.get("momenta") for s in states), self.momentum_views))
            and all(map(operator.is_, (s.chain for s in self.nose_hoover.states), self.chain_views))
            and self.mtk.views_intact()
        )

    # ------------------------------------------------------------------ one step

    def step(self, force_fn: ForceFn, stress_fn: StressFn | None, max_atoms_per_call: AtomsPerCall) -> None:
        pressure = self._pressure() if self.npt else None
        forces = self._mean_forces()
        self._kick(forces)
        self.positions += self.half_dt_atom * self.momenta / self.masses
        self._thermostats()
        self.positions += self.half_dt_atom * self.momenta / self.masses
        if pressure is not None:
            self._barostat(pressure)
        if self.mtk:
            self.mtk.before_forces(forces)
        evaluate(self.states, force_fn, stress_fn, max_atoms_per_call)
        forces = self._mean_forces()
        self._kick(forces)
        if self.mtk:
            self.mtk.after_forces(forces)
        for state in self.states:
            state.step += 1

    def _mean_forces(self) -> np.ndarray:
        return np.concatenate([s.member_forces for s in self.states], axis=1).mean(axis=0)

    def _kick(self, forces: np.ndarray) -> None:
        self.momenta += self.half_dt_atom * forces
        if self.mobile is not None:
            self.momenta *= self.mobile

    def _thermostats(self) -> None:
        g = self.langevin
        if g:
            noise = np.concatenate([s.rng.normal(size=(len(s.atoms), 3)) for s in g.states])
            p = self.langevin_c1 * self.momenta[g.atoms] + self.langevin_c2 * noise
            th.remove_drift(p, self.masses[g.atoms], g.local, g.n, self.langevin_drift_free)
            self.momenta[g.atoms] = p
        g = self.bussi
        if g:
            n_dof = g.param(self.n_dof)
            normal = np.array([s.rng.standard_normal() for s in g.states])
            chi2 = np.array([2.0 * s.rng.standard_gamma(0.5 * (f - 1)) if f > 1 else 0.0
                             for s, f in zip(g.states, n_dof, strict=True)])
            kin2 = th.twice_kinetic(self.momenta[g.atoms], self.masses[g.atoms], g.local, g.n)
            alpha = th.bussi_scale(kin2, n_dof, g.param(self.kT), self.bussi_decay, normal, chi2)
            self.momenta[g.atoms] *= alpha[g.local][:, None]
        g = self.nose_hoover
        if g:
            kin2 = th.twice_kinetic(self.momenta[g.atoms], self.masses[g.atoms], g.local, g.n)
            scale = th.nose_hoover_chain(
                self.chain, self.chain_q, kin2, g.param(self.n_dof), g.param(self.kT), g.param(self.dt)
            )
            self.momenta[g.atoms] *= scale[g.local][:, None]
        if self.mobile is not None:
            self.momenta *= self.mobile

    def _volumes(self) -> np.ndarray:
        return np.array([s.atoms.get_volume() for s in self.npt.states])

    def _pressure(self) -> np.ndarray:
        """Instantaneous pressure of each NPT system: kinetic part plus the committee's virial."""
        g = self.npt
        kin2 = th.twice_kinetic(self.momenta[g.atoms], self.masses[g.atoms], g.local, g.n)
        virial = np.array([np.trace(s.member_stress.mean(axis=0)) for s in g.states])
        return kin2 / (3.0 * self._volumes()) - virial / 3.0

    def _barostat(self, pressure: np.ndarray) -> None:
        g = self.npt
        noise = np.array(
            [s.rng.standard_normal() if w else 0.0 for s, w in zip(g.states, self.barostat_noise, strict=True)]
        )
        strain = th.cell_rescaling_strain(
            pressure, self.pressure_target, self._volumes(), g.param(self.kT), self.compressibility,
            self.taup, g.param(self.dt), noise,
        )
        mu = np.exp(strain / 3.0)
        self.positions[g.atoms] *= mu[g.local][:, None]
        self.momenta[g.atoms] /= mu[g.local][:, None]
        for state, factor in zip(g.states, mu, strict=True):
            state.atoms.set_cell(state.atoms.cell.array * factor, scale_atoms=False)
