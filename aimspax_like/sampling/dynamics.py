"""Batched molecular dynamics of many trajectories driven by one force call.

Every running trajectory advances together: positions of all of them go into one call of a
``ForceFn`` (in the engine, the committee's batched prediction), and each trajectory applies
its own integrator settings (temperature, timestep, friction, ensemble) to its slice.

The integrator is BAOAB Langevin (Leimkuhler & Matthews), which reduces to velocity Verlet
when the friction is zero (``ensemble: nve``). It needs one force evaluation per step, the same
as ASE's dynamics. torch-sim-atomistic offers batched integrators too; it is not used here
because the scheduler needs to stop, rewind and relabel single trajectories between steps and
the per-step cost on the tiny systems of active learning is dominated by the model call, not
by the integrator arithmetic (numpy on a few hundred atoms).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units

from aimspax_like.config import MDConfig

# A force call: structures in, committee forces out, one ``[n_members, n_atoms, 3]`` array per
# structure (n_members = 1 for a single model). Propagation uses the committee mean.
ForceFn = Callable[[list[Atoms]], list[np.ndarray]]


@dataclass
class MDState:
    """One trajectory's phase-space point and integrator settings (ASE units throughout)."""

    atoms: Atoms
    md: MDConfig
    rng: np.random.Generator
    member_forces: np.ndarray | None = None  # [n_members, n_atoms, 3] at the current positions
    step: int = 0

    @property
    def forces(self) -> np.ndarray:
        """Committee-mean forces that propagate the trajectory."""
        return self.member_forces.mean(axis=0)

    def invalidate_forces(self) -> None:
        """Forget cached forces (after a rewind or a model update)."""
        self.member_forces = None

    @property
    def masses(self) -> np.ndarray:
        return self.atoms.get_masses()[:, None]

    def temperature(self) -> float:
        n_dof = max(3 * len(self.atoms) - 3, 1)
        kinetic = 0.5 * float((self.atoms.get_momenta() ** 2 / self.masses).sum())
        return 2.0 * kinetic / (n_dof * units.kB)


def maxwell_boltzmann(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> np.ndarray:
    """Momenta drawn at ``temperature_K`` with the centre-of-mass motion removed."""
    masses = atoms.get_masses()[:, None]
    momenta = rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * temperature_K)
    if len(atoms) > 1:
        momenta -= masses * (momenta.sum(axis=0) / masses.sum())
    return momenta


def _half_kick(state: MDState, dt: float) -> None:
    state.atoms.set_momenta(state.atoms.get_momenta() + 0.5 * dt * state.forces)


def _half_drift(state: MDState, dt: float) -> None:
    momenta = state.atoms.get_momenta()
    state.atoms.set_positions(state.atoms.get_positions() + 0.5 * dt * momenta / state.masses)


def _ornstein_uhlenbeck(state: MDState, dt: float) -> None:
    if state.md.ensemble == "nve" or state.md.friction_per_fs == 0.0:
        return
    gamma = state.md.friction_per_fs / units.fs
    c1 = math.exp(-gamma * dt)
    c2 = math.sqrt(1.0 - c1 * c1)
    kT = units.kB * state.md.temperature_K
    noise = state.rng.normal(size=(len(state.atoms), 3))
    momenta = c1 * state.atoms.get_momenta() + c2 * np.sqrt(state.masses * kT) * noise
    if len(state.atoms) > 1:  # keep the centre of mass at rest (as ASE's fixcm), 3N - 3 dof
        momenta -= state.masses * (momenta.sum(axis=0) / state.masses.sum())
    state.atoms.set_momenta(momenta)


def ensure_forces(states: Sequence[MDState], force_fn: ForceFn) -> None:
    """Evaluate forces for the states that have none yet (new or rewound trajectories)."""
    missing = [s for s in states if s.member_forces is None]
    if missing:
        for state, forces in zip(missing, force_fn([s.atoms for s in missing]), strict=True):
            state.member_forces = forces


def step_batch(states: Sequence[MDState], force_fn: ForceFn) -> None:
    """Advance every state by one BAOAB step with a single batched force call."""
    if not states:
        return
    ensure_forces(states, force_fn)
    for state in states:
        dt = state.md.timestep_fs * units.fs
        _half_kick(state, dt)
        _half_drift(state, dt)
        _ornstein_uhlenbeck(state, dt)
        _half_drift(state, dt)
    new_forces = force_fn([s.atoms for s in states])
    for state, forces in zip(states, new_forces, strict=True):
        state.member_forces = forces
        _half_kick(state, state.md.timestep_fs * units.fs)
        state.step += 1
