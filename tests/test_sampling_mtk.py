"""The MTK NPT integrator (``npt_mtk``) of the batched sampler, against ASE's own MTK on EMT copper.

With ASE's conventions patched in (3N particle degrees of freedom, the barostat chain's first
mass 9 kT taup^2, 9 barostat degrees of freedom for the full cell) our step must reproduce
``IsotropicMTKNPT`` / ``MTKNPT`` to round-off; with our own conventions it must conserve its
extended energy, hold the target temperature and pressure, mix with NVT trajectories in one
batch without touching their paths, and continue identically from a checkpoint-style restore.
"""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

from aimspax_like.config import MDConfig
from aimspax_like.sampling import batch as batch_module
from aimspax_like.sampling import mtk
from aimspax_like.sampling import state as state_module
from aimspax_like.sampling import thermostats as th
from aimspax_like.sampling.dynamics import MDState, maxwell_boltzmann, step_batch

REPEAT = (1, 2, 2)  # 16 atoms: EMT rebuilds its neighbour list whenever the cell changes


def own_forces(structures):
    return [atoms.get_forces()[None] for atoms in structures]


def own_stresses(structures):
    return [atoms.get_stress(voigt=False)[None] for atoms in structures]


def copper(seed: int, start_K: float, a: float = 3.61, rattle: float = 0.02):
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(REPEAT)
    atoms.rattle(rattle, seed=seed)
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    atoms.set_momenta(maxwell_boltzmann(atoms, start_K, rng))
    return atoms, rng


def trajectory(seed: int, start_K: float, md: MDConfig, **kwargs) -> MDState:
    atoms, rng = copper(seed, start_K, **kwargs)
    return MDState(atoms, md, rng)


def mtk_config(flex: str = "isotropic", **changes) -> MDConfig:
    settings = {"ensemble": "npt_mtk", "temperature_K": 300, "timestep_fs": 2.0, "taut_fs": 50,
                "taup_fs": 250, "pressure_bar": 1.0, "cell_flexibility": flex} | changes
    return MDConfig(**settings)


@pytest.fixture
def ase_conventions(monkeypatch):
    """ASE's choices where ours differ on purpose (see ``scripts/check_mtk.py``)."""

    def three_n(atoms):
        return 3 * len(atoms)

    def first_mass_nine(cell_dof, kT, taup):
        r = th.chain_masses(cell_dof, kT, taup)
        r[:, 0] = 9 * kT * taup**2
        return r

    monkeypatch.setattr(batch_module, "degrees_of_freedom", three_n)
    monkeypatch.setattr(state_module, "degrees_of_freedom", three_n)
    monkeypatch.setattr(mtk, "barostat_chain_masses", first_mass_nine)
    monkeypatch.setitem(mtk.CELL_DOF, "anisotropic", 9)


@pytest.mark.parametrize(("flex", "ase_class"), [("isotropic", IsotropicMTKNPT), ("anisotropic", MTKNPT)])
def test_follows_ase_step_by_step_with_ase_conventions(ase_conventions, flex, ase_class):
    """A hot, strongly rattled start at 1 kbar: the cell and both chains move at once."""
    md = mtk_config(flex, pressure_bar=1000.0, taup_fs=150)
    state = trajectory(3, 600, md, rattle=0.05)
    ours = state.atoms
    theirs, _ = copper(3, 600, rattle=0.05)
    dyn = ase_class(theirs, timestep=md.timestep_fs * units.fs, temperature_K=md.temperature_K,
                    pressure_au=md.pressure_bar * units.bar, tdamp=md.taut_fs * units.fs,
                    pdamp=md.taup_fs * units.fs)
    start_volume = ours.get_volume()
    for _ in range(100):
        step_batch([state], own_forces, own_stresses)
        dyn.run(1)
    assert abs(ours.get_volume() / start_volume - 1) > 1e-3  # the barostat did act
    np.testing.assert_allclose(ours.positions, theirs.positions, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.cell.array, theirs.cell.array, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.get_momenta(), theirs.get_momenta(), rtol=0, atol=1e-9)
    assert state.conserved_energy() == pytest.approx(dyn.get_conserved_energy(), abs=1e-9)


def lattice_constant(volume: np.ndarray, n_atoms: int) -> np.ndarray:
    return (np.asarray(volume) / n_atoms * 4) ** (1 / 3)


def test_mixed_batch_conserves_energy_and_holds_temperature_and_pressure():
    """Isotropic and anisotropic MTK beside a Nose-Hoover NVT run, all in one batch.

    Every extended energy stays flat (its spread a small fraction of the kinetic energy's),
    MTK's mean temperature is the target (loosely: a short run) and both cells hold the lattice
    constant that ASE's ``IsotropicMTKNPT`` holds from the same start at 1 bar.
    """
    steps, settle = 500, 100
    states = [
        trajectory(0, 300, mtk_config("isotropic")),
        trajectory(1, 300, mtk_config("anisotropic")),
        trajectory(2, 600, MDConfig(ensemble="nose_hoover", temperature_K=300, timestep_fs=2.0, taut_fs=50)),
    ]
    n_atoms = len(states[0].atoms)
    start_cell = states[0].atoms.cell.array.copy()
    conserved, kinetic, temperature, volume = [], [], [], []
    for _ in range(steps):
        step_batch(states, own_forces, own_stresses)
        conserved.append([s.conserved_energy() for s in states])
        kinetic.append([s.atoms.get_kinetic_energy() for s in states])
        temperature.append([s.temperature() for s in states[:2]])
        volume.append([s.atoms.get_volume() for s in states[:2]])
    conserved, kinetic = np.array(conserved), np.array(kinetic)
    for k in range(3):
        assert np.ptp(conserved[:, k]) < 0.05 * np.ptp(kinetic[:, k]), states[k].md.ensemble
        slope = np.polyfit(np.arange(steps) * 2e-3, conserved[:, k], 1)[0] / n_atoms  # eV / atom / ps
        assert abs(slope) < 3e-4, states[k].md.ensemble  # seen: below 6e-5
    assert all(np.abs(s.chain[1]).max() > 0 for s in states)  # every particle chain acted
    assert all(np.abs(s.cell_momentum).max() > 0 for s in states[:2])
    off_diagonal = states[1].cell_momentum - np.diag(np.diag(states[1].cell_momentum))
    assert np.abs(off_diagonal).max() > 0 and np.allclose(states[1].cell_momentum, states[1].cell_momentum.T)
    stretch = np.linalg.solve(start_cell, states[0].atoms.cell.array)  # start_cell @ stretch = cell
    assert np.allclose(stretch, stretch[0, 0] * np.eye(3), rtol=0, atol=1e-12)  # isotropic: same shape

    production = slice(settle, None)
    assert np.mean(np.array(temperature)[production]) == pytest.approx(300, rel=0.1)  # 2 x 16 atoms, 0.8 ps
    lattice = lattice_constant(np.array(volume)[production], n_atoms)

    atoms, _ = copper(0, 300)
    md = mtk_config("isotropic")
    dyn = IsotropicMTKNPT(atoms, timestep=md.timestep_fs * units.fs, temperature_K=md.temperature_K,
                          pressure_au=md.pressure_bar * units.bar, tdamp=md.taut_fs * units.fs,
                          pdamp=md.taup_fs * units.fs)
    ase_volume = []
    for _ in range(steps):
        dyn.run(1)
        ase_volume.append(atoms.get_volume())
    ase_lattice = lattice_constant(np.array(ase_volume)[production], n_atoms).mean()
    assert lattice.mean(axis=0) == pytest.approx([ase_lattice, ase_lattice], rel=0.003)  # seeds differ by 0.0006


def test_mixing_leaves_every_trajectory_on_its_own_path():
    """MTK and NVT trajectories stepped together follow exactly the paths they follow alone."""

    def trajectories():
        return [
            trajectory(0, 300, mtk_config("anisotropic", pressure_bar=500.0)),
            trajectory(1, 300, MDConfig(ensemble="nose_hoover", temperature_K=300, timestep_fs=2.0, taut_fs=50)),
            trajectory(2, 300, MDConfig(ensemble="nve", timestep_fs=1.0)),
        ]

    together, alone = trajectories(), trajectories()
    for _ in range(40):
        step_batch(together, own_forces, own_stresses)
        for state in alone:
            step_batch([state], own_forces, own_stresses)
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a.atoms.positions, b.atoms.positions, rtol=0, atol=1e-12)
        np.testing.assert_allclose(a.atoms.get_momenta(), b.atoms.get_momenta(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(a.atoms.cell.array, b.atoms.cell.array, rtol=0, atol=1e-12)


def snapshot(state: MDState) -> dict:
    """What a checkpoint keeps of an npt_mtk trajectory."""
    return {
        "cell": state.atoms.get_cell().array.copy(), "positions": state.atoms.get_positions(),
        "momenta": state.atoms.get_momenta(), "step": state.step, "chain": state.chain.copy(),
        "barostat_chain": state.barostat_chain.copy(), "cell_momentum": state.cell_momentum.copy(),
    }


def restore(state: MDState, saved: dict) -> None:
    """As ``SchedulerCheckpoint.load_state_dict`` puts a trajectory back."""
    state.atoms.set_cell(saved["cell"])
    state.atoms.set_positions(saved["positions"])
    state.atoms.set_momenta(saved["momenta"])
    state.step = saved["step"]
    state.chain = saved["chain"].copy()
    state.barostat_chain = saved["barostat_chain"].copy()
    state.cell_momentum = saved["cell_momentum"].copy()
    state.invalidate_forces()


@pytest.mark.parametrize("fresh_state", [False, True])
def test_checkpoint_restore_continues_identically(fresh_state):
    state = trajectory(5, 400, mtk_config("anisotropic", pressure_bar=2000.0), rattle=0.04)
    for _ in range(30):
        step_batch([state], own_forces, own_stresses)
    saved = snapshot(state)
    for _ in range(30):
        step_batch([state], own_forces, own_stresses)
    expected = snapshot(state)
    if fresh_state:  # a new process: new atoms, a new state, nothing shared with the old batch
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(REPEAT)
        atoms.calc = EMT()
        state = MDState(atoms, state.md, np.random.default_rng(0))
    restore(state, saved)
    for _ in range(30):
        step_batch([state], own_forces, own_stresses)
    for key, value in snapshot(state).items():
        np.testing.assert_allclose(value, expected[key], rtol=0, atol=1e-10, err_msg=key)


def test_config_and_contracts():
    md = MDConfig(ensemble="npt_mtk")
    assert md.cell_flexibility == "isotropic"
    with pytest.raises(pydantic.ValidationError):
        MDConfig(ensemble="npt_mtk", cell_flexibility="triclinic")
    state = trajectory(0, 300, md)
    assert state.needs_stress
    with pytest.raises(ValueError, match="stress"):
        step_batch([state], own_forces)
    molecule = trajectory(1, 300, md)
    molecule.atoms.pbc = False
    with pytest.raises(ValueError, match="periodic"):
        step_batch([molecule], own_forces, own_stresses)
    pinned = trajectory(2, 300, md)
    pinned.atoms.set_constraint(FixAtoms(indices=[0]))
    with pytest.raises(ValueError, match="FixAtoms"):
        step_batch([pinned], own_forces, own_stresses)
    # before any step the extension holds only P_ext V (barostat and chains at rest)
    assert state.thermostat_energy() == pytest.approx(md.pressure_bar * units.bar * state.atoms.get_volume())
