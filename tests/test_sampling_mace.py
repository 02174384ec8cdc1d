"""Batched sampling with a real (tiny, float64) MACE committee, against ASE's own MD."""

from __future__ import annotations

import mace  # noqa: F401  (first: e3nn needs the torch.load switch mace sets)
import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule
from ase.md.verlet import VelocityVerlet

from aimspax_like.config import MDConfig, ModelConfig
from aimspax_like.models.ensemble import MACEEnsemble
from aimspax_like.sampling.dynamics import MDState, maxwell_boltzmann, step_batch

TINY = {"channels": 8, "max_L": 0, "r_max": 4.0, "num_interactions": 2, "correlation": 2,
        "radial_mlp": [8], "max_ell": 2, "device": "cpu", "dtype": "float64"}


@pytest.fixture(scope="module")
def ensemble() -> MACEEnsemble:
    return MACEEnsemble.build(
        ModelConfig(**TINY, ensemble_size=3), seeds=[0, 1, 2], atomic_numbers=[1, 6, 8],
        atomic_energies={1: -13.6, 6: -1029.0, 8: -2042.0}, avg_num_neighbors=6.0, scale=0.5,
    )


def committee(ensemble: MACEEnsemble, members: list[int] | None = None):
    """What ``Committee.committee_forces`` does: one batched prediction, split per structure."""

    def forces(structures):
        prediction = ensemble.predict(structures, members=members)
        return [prediction.forces_of(i) for i in range(len(structures))]

    return forces


def start(name: str, md: MDConfig, seed: int) -> MDState:
    atoms = molecule(name)
    atoms.rattle(0.05, seed=seed)
    rng = np.random.default_rng(seed)
    atoms.set_momenta(maxwell_boltzmann(atoms, md.temperature_K, rng))
    return MDState(atoms, md, rng)


def test_nve_follows_ase_velocity_verlet_on_the_saved_member(ensemble, tmp_path):
    """Ethanol in NVE, batched beside a Langevin methanol, against MACECalculator + VelocityVerlet."""
    from mace.calculators import MACECalculator

    path = ensemble.save(tmp_path)[0]
    nve = start("CH3CH2OH", MDConfig(ensemble="nve", timestep_fs=0.5, temperature_K=300), 0)
    neighbour = start("CH3OH", MDConfig(temperature_K=300, friction_per_fs=0.01), 1)
    reference = nve.atoms.copy()
    initial = nve.atoms.get_positions()
    reference.calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")
    verlet = VelocityVerlet(reference, timestep=0.5 * units.fs)

    def energy_ase() -> float:
        return reference.get_potential_energy() + reference.get_kinetic_energy()

    def energy_ours() -> float:
        potential = ensemble.predict([nve.atoms], members=[0]).energies[0, 0]
        return potential + nve.atoms.get_kinetic_energy()

    forces = committee(ensemble, members=[0])
    ours, theirs = [energy_ours()], [energy_ase()]
    for step in range(1, 201):
        verlet.run(1)
        step_batch([nve, neighbour], forces, max_atoms_per_call=None)
        if step % 20 == 0:
            ours.append(energy_ours())
            theirs.append(energy_ase())
    np.testing.assert_allclose(nve.atoms.positions, reference.positions, rtol=0, atol=1e-6)
    np.testing.assert_allclose(nve.atoms.get_momenta(), reference.get_momenta(), rtol=0, atol=1e-6)
    assert np.abs(nve.atoms.positions - initial).max() > 0.05  # it did move
    drift_ours = np.abs(np.array(ours) - ours[0]).max()
    drift_ase = np.abs(np.array(theirs) - theirs[0]).max()
    assert drift_ours <= 1.01 * drift_ase + 1e-9, (drift_ours, drift_ase)
    assert neighbour.step == nve.step == 200


def test_member_forces_are_each_structures_own_with_the_latest_weights(ensemble):
    """Per-member forces for Eq. 1 after batched, chunked steps equal a lone prediction, also
    right after the weights change (the scheduler invalidates; the next step uses new weights)."""
    setups = [
        ("CH3CH2OH", MDConfig(temperature_K=500, friction_per_fs=0.05)),
        ("H2O", MDConfig(ensemble="nose_hoover", temperature_K=300, taut_fs=20)),
        ("CH3OH", MDConfig(ensemble="bussi", temperature_K=400, timestep_fs=0.5)),
    ]
    states = [start(name, md, seed) for seed, (name, md) in enumerate(setups)]
    twins = [start(name, md, seed) for seed, (name, md) in enumerate(setups)]
    forces = committee(ensemble)
    for _ in range(5):
        step_batch(states, forces, max_atoms_per_call=None)
        step_batch(twins, forces, max_atoms_per_call=7)  # one call per structure here
    for state, twin in zip(states, twins, strict=True):
        np.testing.assert_allclose(state.atoms.positions, twin.atoms.positions, rtol=0, atol=1e-10)
        alone = ensemble.predict([state.atoms]).forces
        assert state.member_forces.shape == (3, len(state.atoms), 3)
        np.testing.assert_allclose(state.member_forces, alone, rtol=0, atol=1e-10)
    assert np.std(states[0].member_forces, axis=0).max() > 1e-3  # members disagree: Eq. 1 sees it

    member = ensemble.members[1]
    saved = {k: v.clone() for k, v in member.state_dict().items()}
    try:
        with torch.no_grad():
            for parameter in member.parameters():
                parameter.mul_(1.2)
        for state in states:
            state.invalidate_forces()
        step_batch(states, forces, max_atoms_per_call=None)
        for state in states:
            np.testing.assert_allclose(state.member_forces, ensemble.predict([state.atoms]).forces, atol=1e-10)
    finally:
        member.load_state_dict(saved)


def test_npt_with_committee_stresses_matches_mace_calculator(ensemble, tmp_path):
    """The StressFn over the ensemble gives each member's MACECalculator stress, and drives NPT."""
    from mace.calculators import MACECalculator

    from aimspax_like.sampling.stress import ensemble_stress_fn

    box = molecule("CH3OH")
    box.rattle(0.05, seed=5)
    box.center(vacuum=1.5)
    box.pbc = True
    stresses = ensemble_stress_fn(ensemble)([box, box.copy()])
    assert stresses[0].shape == (3, 3, 3)
    for k, path in enumerate(ensemble.save(tmp_path)):
        probe = box.copy()
        probe.calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")
        np.testing.assert_allclose(stresses[0][k], probe.get_stress(voigt=False), rtol=0, atol=1e-10)
    np.testing.assert_allclose(stresses[1], stresses[0], rtol=0, atol=1e-12)

    md = MDConfig(ensemble="npt_crescale", temperature_K=300, timestep_fs=0.5, taup_fs=50, compressibility_per_bar=1e-3)
    state = MDState(box, md, np.random.default_rng(0))
    volume = box.get_volume()
    for _ in range(5):
        step_batch([state], committee(ensemble), ensemble_stress_fn(ensemble))
    assert state.member_stress.shape == (3, 3, 3)
    assert box.get_volume() != pytest.approx(volume, rel=1e-6)  # the barostat acted on the cell
