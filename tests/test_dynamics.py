"""The batched integrator against ASE's own, and its bookkeeping, on EMT copper.

Each structure keeps its own EMT calculator (``own_forces``): EMT then reuses its neighbour
list between steps, which makes these tests several times faster than a fresh calculator.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms, FixBondLength
from ase.md.verlet import VelocityVerlet

from aimspax_like.config import MDConfig
from aimspax_like.sampling.dynamics import MDState, atoms_per_call, chunks, maxwell_boltzmann, step_batch


def own_forces(structures):
    return [atoms.get_forces()[None] for atoms in structures]


def _copper(seed: int, repeat=(2, 2, 2)):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.03, seed=seed)
    atoms.calc = EMT()
    return atoms


def _state(seed: int, md: MDConfig, repeat=(1, 1, 2)) -> MDState:
    atoms = _copper(seed, repeat)
    rng = np.random.default_rng(seed)
    atoms.set_momenta(maxwell_boltzmann(atoms, md.temperature_K, rng))
    return MDState(atoms, md, rng)


def test_nve_follows_ase_velocity_verlet():
    atoms = _copper(0, (1, 1, 2))
    atoms.set_momenta(maxwell_boltzmann(atoms, 300, np.random.default_rng(0)))
    reference = atoms.copy()
    reference.calc = EMT()
    VelocityVerlet(reference, timestep=2 * units.fs).run(100)
    state = MDState(atoms, MDConfig(ensemble="nve", timestep_fs=2.0), np.random.default_rng(1))
    for _ in range(100):
        step_batch([state], own_forces)
    np.testing.assert_allclose(state.atoms.get_positions(), reference.get_positions(), atol=1e-8)
    np.testing.assert_allclose(state.atoms.get_momenta(), reference.get_momenta(), atol=1e-8)


def test_mixed_batch_equals_one_by_one_in_any_chunking():
    """Different sizes and ensembles in one batch, one call or chunked, versus each alone."""
    setups = [
        MDConfig(ensemble="langevin", temperature_K=400, friction_per_fs=0.01),
        MDConfig(ensemble="bussi", temperature_K=300, timestep_fs=2.0, taut_fs=30),
        MDConfig(ensemble="nose_hoover", temperature_K=500, timestep_fs=0.5),
        MDConfig(ensemble="nve", temperature_K=200),
    ]
    sizes = [(1, 1, 1), (1, 1, 1), (1, 1, 2), (1, 1, 3)]
    runs = {limit: [_state(s, md, sizes[s]) for s, md in enumerate(setups)] for limit in (None, 8, 1)}
    singles = [_state(s, md, sizes[s]) for s, md in enumerate(setups)]
    assert [len(g) for g in chunks(runs[8], 8)] == [2, 1, 1]
    for _ in range(20):
        for limit, states in runs.items():
            step_batch(states, own_forces, max_atoms_per_call=limit)
        for state in singles:
            step_batch([state], own_forces)
    for states in runs.values():
        for a, b in zip(states, singles, strict=True):
            np.testing.assert_allclose(a.atoms.positions, b.atoms.positions, rtol=0, atol=1e-12)
            np.testing.assert_allclose(a.atoms.get_momenta(), b.atoms.get_momenta(), rtol=0, atol=1e-12)
            assert a.step == 20


def test_trajectories_leave_rejoin_and_rewind_as_the_scheduler_does():
    """A waiting trajectory sits out, is rewound with ASE's setters, and rejoins; the buffers
    behind the views are rebuilt each time, so every path equals the one-by-one run."""
    md = MDConfig(temperature_K=300, friction_per_fs=0.02)
    batched = [_state(s, md) for s in range(3)]
    alone = [_state(s, md) for s in range(3)]
    checkpoint = batched[1].atoms.copy()
    frame = batched[0].atoms.copy()

    def run(indices, steps):
        for _ in range(steps):
            step_batch([batched[i] for i in indices], own_forces)
            for i in indices:
                step_batch([alone[i]], own_forces)

    run([0, 1, 2], 3)
    run([0, 2], 4)
    for state in (batched[1], alone[1]):
        state.atoms.set_positions(checkpoint.positions)
        state.atoms.set_momenta(maxwell_boltzmann(state.atoms, 300, state.rng))
        state.invalidate_forces()
    run([0, 1, 2], 3)
    for a, b in zip(batched, alone, strict=True):
        np.testing.assert_allclose(a.atoms.positions, b.atoms.positions, rtol=0, atol=1e-12)
    assert [s.step for s in batched] == [10, 6, 10]
    assert not np.allclose(frame.positions, batched[0].atoms.positions)  # copies never alias buffers
    np.testing.assert_allclose(frame.positions, _copper(0, (1, 1, 2)).positions)


def test_fixed_atoms_stay_put_and_other_constraints_are_refused():
    state = _state(0, MDConfig(temperature_K=600, friction_per_fs=0.05))
    state.atoms.set_constraint(FixAtoms(indices=[0, 3]))
    before = state.atoms.positions[[0, 3]].copy()
    for _ in range(10):
        step_batch([state], own_forces)
    np.testing.assert_array_equal(state.atoms.positions[[0, 3]], before)
    assert np.abs(state.atoms.get_momenta()[[0, 3]]).max() == 0.0
    assert np.abs(state.atoms.get_momenta()[[1, 2]]).max() > 0.0
    other = _state(1, MDConfig())
    other.atoms.set_constraint(FixBondLength(0, 1))
    with pytest.raises(ValueError, match="FixAtoms"):
        step_batch([other], own_forces)


def test_chunk_size_follows_the_device():
    assert atoms_per_call("cpu") is not None and atoms_per_call("cuda") is None
    assert atoms_per_call("cuda:1") is None
