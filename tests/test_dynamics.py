"""The batched integrator against ASE's own, on EMT copper."""

from __future__ import annotations

import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.verlet import VelocityVerlet

from aimspax_like.config import MDConfig
from aimspax_like.sampling.dynamics import MDState, maxwell_boltzmann, step_batch


def emt_committee(structures):
    out = []
    for atoms in structures:
        probe = atoms.copy()
        probe.calc = EMT()
        out.append(probe.get_forces()[None])
    return out


def _copper(seed: int, repeat=(2, 2, 2)):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.03, seed=seed)
    return atoms


def test_nve_follows_ase_velocity_verlet():
    atoms = _copper(0, (1, 1, 2))
    atoms.set_momenta(maxwell_boltzmann(atoms, 300, np.random.default_rng(0)))
    reference = atoms.copy()
    reference.calc = EMT()
    VelocityVerlet(reference, timestep=2 * units.fs).run(100)
    state = MDState(atoms.copy(), MDConfig(ensemble="nve", timestep_fs=2.0), np.random.default_rng(1))
    for _ in range(100):
        step_batch([state], emt_committee)
    np.testing.assert_allclose(state.atoms.get_positions(), reference.get_positions(), atol=1e-8)
    np.testing.assert_allclose(state.atoms.get_momenta(), reference.get_momenta(), atol=1e-8)


def test_batch_equals_one_by_one():
    md = MDConfig(ensemble="langevin", temperature_K=400, friction_per_fs=0.01)
    batched = [MDState(_copper(s, (1, 1, 1 + s)), md, np.random.default_rng(s)) for s in range(3)]
    singles = [MDState(_copper(s, (1, 1, 1 + s)), md, np.random.default_rng(s)) for s in range(3)]
    for _ in range(20):
        step_batch(batched, emt_committee)
        for state in singles:
            step_batch([state], emt_committee)
    for a, b in zip(batched, singles, strict=True):
        np.testing.assert_allclose(a.atoms.get_positions(), b.atoms.get_positions(), atol=1e-12)


def test_langevin_holds_each_trajectorys_temperature():
    temperatures = (200.0, 600.0)
    states = [
        MDState(_copper(k, (1, 1, 2)), MDConfig(temperature_K=t, timestep_fs=2.0, friction_per_fs=0.1),
                np.random.default_rng(k))
        for k, t in enumerate(temperatures)
    ]
    for state in states:
        state.atoms.set_momenta(maxwell_boltzmann(state.atoms, state.md.temperature_K, state.rng))
    samples = [[] for _ in states]
    for step in range(1500):
        step_batch(states, emt_committee)
        if step >= 300:
            for k, state in enumerate(states):
                samples[k].append(state.temperature())
    for target, values in zip(temperatures, samples, strict=True):
        assert abs(np.mean(values) / target - 1.0) < 0.08, (target, np.mean(values))
