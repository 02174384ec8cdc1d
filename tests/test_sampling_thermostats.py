"""Thermostats and barostats of the batched integrator, on EMT copper (cheap, periodic, stable).

Every trajectory keeps its own ASE calculator, so EMT reuses its neighbour list between steps.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT

from aimspax_like.config import MDConfig
from aimspax_like.sampling.dynamics import MDState, maxwell_boltzmann, step_batch


def own_forces(structures):
    return [atoms.get_forces()[None] for atoms in structures]


def own_stresses(structures):
    return [atoms.get_stress(voigt=False)[None] for atoms in structures]


def copper(md: MDConfig, seed: int, a: float = 3.61, repeat=(2, 2, 2), start_K: float | None = None) -> MDState:
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(repeat)
    atoms.rattle(0.02, seed=seed)
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    atoms.set_momenta(maxwell_boltzmann(atoms, start_K or md.temperature_K, rng))
    return MDState(atoms, md, rng)


def test_mixed_batch_holds_every_target_temperature():
    """Langevin, Bussi and a Nose-Hoover chain, each at its own T and timestep, in one batch.

    The runs start at twice the target (a solid moves half of it into potential energy) and
    the mean temperature after equilibration must sit within 5 % of each target. The
    deterministic chain must also conserve its extended energy.
    """
    setups = [
        MDConfig(ensemble="langevin", temperature_K=250, timestep_fs=2.0, friction_per_fs=0.05),
        MDConfig(ensemble="bussi", temperature_K=600, timestep_fs=2.5, taut_fs=10),
        MDConfig(ensemble="nose_hoover", temperature_K=400, timestep_fs=2.0, taut_fs=10),
    ]
    states = [copper(md, seed, start_K=2 * md.temperature_K) for seed, md in enumerate(setups)]
    chain = states[2]

    def conserved() -> float:
        kinetic = chain.atoms.get_kinetic_energy()
        return chain.atoms.get_potential_energy() + kinetic + chain.thermostat_energy()

    temperatures: list[list[float]] = [[] for _ in states]
    extended, kinetic = [], []
    for step in range(700):
        step_batch(states, own_forces)
        if step >= 150:
            for values, state in zip(temperatures, states, strict=True):
                values.append(state.temperature())
            extended.append(conserved())
            kinetic.append(chain.atoms.get_kinetic_energy())
    for state, values in zip(states, temperatures, strict=True):
        assert np.mean(values) == pytest.approx(state.md.temperature_K, rel=0.05), state.md.ensemble
    assert chain.chain is not None and np.abs(chain.chain[1]).max() > 0  # the chain did act
    assert np.ptp(extended) < 0.02 * np.ptp(kinetic)


def emt_equilibrium() -> tuple[float, float]:
    """EMT copper's lattice constant and bulk modulus (eV/A^3) from a parabola fit of E(a)."""
    lattice = np.linspace(3.55, 3.63, 9)
    energies = []
    for a in lattice:
        atoms = bulk("Cu", "fcc", a=a, cubic=True)
        atoms.calc = EMT()
        energies.append(atoms.get_potential_energy() / len(atoms))
    c2, c1, _ = np.polyfit(lattice, energies, 2)
    a0 = -c1 / (2 * c2)
    volume = a0**3 / 4  # per atom; dE/dV = dE/da / (3 a^2 / 4)
    return a0, volume * 2 * c2 / (3 * a0**2 / 4) ** 2


def test_npt_relaxes_to_emt_lattice_constant_and_fluctuates_stably():
    """Stochastic cell rescaling from a stretched cell and Berendsen from a squeezed one.

    Both at zero pressure must end at EMT's lattice constant (plus a little thermal
    expansion), hold it without drift, and the stochastic version must show the NPT volume
    spread sqrt(kT / (B V)), which Berendsen suppresses.
    """
    a0, modulus = emt_equilibrium()
    beta = units.bar / modulus  # per bar: the true compressibility
    common = {"temperature_K": 150, "timestep_fs": 2.0, "taut_fs": 50, "taup_fs": 50, "compressibility_per_bar": beta}
    states = [
        copper(MDConfig(ensemble="npt_crescale", **common), 0, a=3.70, repeat=(1, 2, 2)),
        copper(MDConfig(ensemble="npt_berendsen", **common), 1, a=3.50, repeat=(1, 2, 2)),
    ]
    n_atoms = len(states[0].atoms)
    volumes = []
    for _ in range(500):
        step_batch(states, own_forces, own_stresses)
        volumes.append([s.atoms.get_volume() for s in states])
    production = np.array(volumes)[100:]
    lattice = (production / n_atoms * 4) ** (1 / 3)
    for k in range(2):
        assert lattice[:, k].mean() == pytest.approx(a0, rel=0.01)
        first, second = np.array_split(lattice[:, k], 2)
        assert first.mean() == pytest.approx(second.mean(), rel=0.006)  # no drift
    assert lattice[:, 0].mean() == pytest.approx(lattice[:, 1].mean(), rel=0.006)  # same state
    spread = production.std(axis=0) / production.mean(axis=0)
    expected = np.sqrt(units.kB * 150 / (modulus * production[:, 0].mean()))
    assert 0.6 * expected < spread[0] < 1.6 * expected
    assert spread[1] < 0.5 * spread[0]
    assert all(np.isfinite(s.atoms.cell.array).all() for s in states)


def test_npt_needs_stresses_and_a_periodic_cell():
    md = MDConfig(ensemble="npt_crescale")
    state = copper(md, 0, repeat=(1, 1, 1))
    with pytest.raises(ValueError, match="stress"):
        step_batch([state], own_forces)
    molecule = copper(md, 1, repeat=(1, 1, 1))
    molecule.atoms.pbc = False
    with pytest.raises(ValueError, match="periodic"):
        step_batch([molecule], own_forces, own_stresses)
