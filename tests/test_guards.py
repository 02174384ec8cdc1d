"""Guards (aimspax_like/guards.py), the energy gate (label_gate.py) and their hooks in the scheduler."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from test_scheduler import _make

from aimspax_like.config import ALConfig, GuardsConfig, MDConfig
from aimspax_like.events import read_events
from aimspax_like.guards import (
    CloseContactGuard,
    FiniteGuard,
    TemperatureGuard,
    VolumeGuard,
    build_guards,
    first_failure,
    start_bonds,
    topology_applies,
)
from aimspax_like.label_gate import EnergyGate
from aimspax_like.sampling.dynamics import maxwell_boltzmann
from aimspax_like.sampling.state import MDState


def _state(atoms: Atoms, temperature_K: float = 300.0) -> MDState:
    atoms = atoms.copy()
    atoms.set_momenta(maxwell_boltzmann(atoms, temperature_K, np.random.default_rng(0)))
    return MDState(atoms, MDConfig(temperature_K=300), np.random.default_rng(0))


def _ethanol() -> Atoms:
    return molecule("CH3CH2OH")


def test_a_calm_molecule_and_a_hot_cell_pass_every_guard():
    ethanol = _ethanol()
    assert first_failure(build_guards(ethanol, 500.0, GuardsConfig()), _state(ethanol, 500.0)) is None
    cell = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    cell.rattle(0.1, seed=1)
    assert first_failure(build_guards(cell, 700.0, GuardsConfig()), _state(cell, 700.0)) is None


def test_topology_is_found_for_molecules_and_not_for_metals():
    i, _, length = start_bonds(_ethanol())
    assert len(i) == 8  # C-C, C-O, O-H and five C-H
    assert np.all((length > 0.9) & (length < 1.6))
    assert topology_applies(_ethanol(), "auto")
    assert not topology_applies(bulk("Cu", "fcc", a=3.6, cubic=True), "auto")
    assert not topology_applies(_ethanol(), "off")


def test_bond_stretch_follows_the_start_length_not_an_absolute_distance():
    ethanol = _ethanol()
    guard = CloseContactGuard(ethanol)
    c, h = next((a, b) for a, b in zip(*start_bonds(ethanol)[:2], strict=True)
                if {ethanol.numbers[a], ethanol.numbers[b]} == {1, 6})
    stretched = ethanol.copy()
    bond = stretched.positions[h] - stretched.positions[c]
    # 1.7 x a 1.09 A C-H bond is 1.85 A: far too short for an absolute 2 A rule to see.
    stretched.positions[h] = stretched.positions[c] + 1.7 * bond
    reason = guard.check(stretched)
    assert reason is not None and "stretched" in reason
    squeezed = ethanol.copy()
    squeezed.positions[h] = squeezed.positions[c] + 0.65 * bond  # 0.71 A: above 0.6 x covalent radii
    assert "compressed" in guard.check(squeezed)
    slightly = ethanol.copy()
    slightly.positions[h] = slightly.positions[c] + 1.2 * bond  # a hot vibration: fine
    assert guard.check(slightly) is None


def test_fused_atoms_and_new_bonds_are_caught_in_units_of_covalent_radii():
    ethanol = _ethanol()
    guard = CloseContactGuard(ethanol)
    hydrogens = np.flatnonzero(ethanol.numbers == 1)
    fused = ethanol.copy()
    fused.positions[hydrogens[1]] = fused.positions[hydrogens[0]] + [0.3, 0, 0]
    assert "apart" in guard.check(fused)
    # Two hydrogens of different carbons at 0.65 A: above an absolute 0.5 A limit, still a new bond.
    touching = ethanol.copy()
    touching.positions[hydrogens[-1]] = touching.positions[hydrogens[0]] + [0.65, 0, 0]
    reason = guard.check(touching)
    assert reason is not None and ("not bonded" in reason or "stretched" in reason)


def test_metal_clusters_rearrange_freely_but_cannot_fuse():
    cluster = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5]])
    guard = CloseContactGuard(cluster, topology=topology_applies(cluster, "auto"))
    moved = cluster.copy()
    moved.positions[3] = [8.0, 0, 0]  # an atom wandering off is not a torn bond in a metal
    assert guard.check(moved) is None
    fused = cluster.copy()
    fused.positions[1] = [1.2, 0, 0]  # 0.45 x the Cu-Cu covalent sum
    assert "apart" in guard.check(fused)


def test_temperature_volume_and_finite_guards():
    water = molecule("H2O")
    hot = TemperatureGuard(300.0, len(water))
    assert hot.limit > 3 * 300.0  # widened for a 3-atom molecule
    assert "temperature" in hot(_state(water, temperature_K=30000.0))
    cell = bulk("Cu", "fcc", a=3.6, cubic=True)
    swollen = _state(cell)
    swollen.atoms.set_cell(cell.cell * 1.3, scale_atoms=True)  # 2.2 x the volume
    assert "volume" in VolumeGuard(cell)(swollen)
    broken = _state(water)
    broken.atoms.positions[0, 0] = np.nan
    assert "non-finite" in FiniteGuard()(broken)


def test_disabled_guards_keep_only_the_finite_check():
    guards = build_guards(_ethanol(), 500.0, GuardsConfig(enabled=False))
    assert [type(g).__name__ for g in guards] == ["FiniteGuard"]


def test_energy_gate_holds_only_far_high_energies():
    gate = EnergyGate(6.0)
    numbers = np.array([29] * 4)
    rng = np.random.default_rng(0)
    for e in rng.normal(-1.0, 0.01, size=20) * 4:
        gate.add(numbers, e, reference=True)
    assert gate.outlier(numbers, -1.0 * 4) is None
    assert gate.outlier(numbers, -5.0 * 4) is None  # far below: a new low-energy region, welcome
    assert "spreads above" in gate.outlier(numbers, -0.5 * 4)
    other = np.array([29, 29, 29, 79])  # another composition has no history yet: not gated
    assert gate.outlier(other, 100.0) is None


def test_accepted_labels_cannot_ratchet_the_energy_bound_up():
    gate = EnergyGate(6.0)
    numbers = np.array([29] * 4)
    for e in np.linspace(-1.01, -0.99, 10) * 4:
        gate.add(numbers, e, reference=True)
    bound = gate.bound(numbers)
    for _ in range(50):  # AL labels chosen for being unusual, each just under the bound
        gate.add(numbers, (bound - 1e-4) * 4)
    assert gate.bound(numbers) == bound
    held = (bound + 0.5 * gate.spread(numbers)) * 4
    assert gate.outlier(numbers, held)
    assert gate.confirms(numbers, held, (bound - 0.2 * gate.spread(numbers)) * 4)
    assert not gate.confirms(numbers, held, -1.0 * 4)


def test_scheduler_rewinds_a_trajectory_a_guard_flags(tmp_path):
    config = ALConfig(num_trajectories=1, check_every=1, warmup=2, max_train_set_size=50, max_md_steps=5,
                      md=MDConfig(temperature_K=300))
    scheduler, executor, events, _ = _make(tmp_path, config)
    scheduler.make_guards = lambda start, md: [lambda state: "always" if state.step % 2 else None]
    scheduler.add_trajectory(bulk("Cu", "fcc", a=3.6, cubic=True))
    with executor:
        scheduler.run()
    events.close()
    log = read_events(tmp_path / "events.jsonl")
    unstable = [e for e in log if e["event"] == "md_unstable"]
    assert unstable and all(e["reason"] == "always" for e in unstable)
    # A flagged frame is never checked: its uncertainty does not enter the threshold's window.
    flagged = {e["step"] for e in unstable}
    checked = {e["step"] for e in log if e["event"] == "uncertainty"}
    assert not flagged & checked


def test_al_builds_the_default_guards():
    from aimspax_like.al import _guards

    guards = _guards(GuardsConfig())(_ethanol(), MDConfig(temperature_K=500))
    assert [type(g).__name__ for g in guards] == [
        "FiniteGuard", "TemperatureGuard", "CloseContactGuard"]
    assert ALConfig().guards.enabled


def _run_two_cells(scheduler, executor, events, tmp_path):
    """Two rattled Cu cells through the scheduler; returns its result and the event log."""
    for seed in (1, 2):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=seed)
        scheduler.add_trajectory(atoms)
    with executor:
        result = scheduler.run()
    events.close()
    return result, read_events(tmp_path / "events.jsonl")


def test_trust_bound_rewinds_instead_of_labelling(tmp_path):
    config = ALConfig(num_trajectories=2, check_every=1, warmup=3, max_train_set_size=50, max_md_steps=40,
                      md=MDConfig(temperature_K=300))
    scheduler, executor, events, _ = _make(tmp_path, config)
    scheduler.trust_factor = 1.5
    _, log = _run_two_cells(scheduler, executor, events, tmp_path)
    beyond = [e for e in log if e["event"] == "trust_exceeded"]
    labelled = [e for e in log if e["event"] == "label_submitted"]
    assert beyond, "the committee's rare large spreads (10x) should exceed 1.5 x the threshold"
    assert all(e["delta"] <= 1.5 * e["threshold"] for e in labelled)
    # Deltas beyond the trust bound stay out of the window: the threshold never sees them.
    window = set(scheduler.threshold.state_dict()["values"])
    assert window and not window & {e["delta"] for e in beyond}


class _Outliers:
    """Every third label comes back 10 eV higher than EMT says."""

    def __init__(self, executor):
        self.executor = executor
        self.calls = 0

    def submit(self, atoms, spec, workdir, faults=None, seed=None):
        from concurrent.futures import Future

        from aimspax_like.reference.results import LabelResult

        self.calls += 1
        inner = self.executor.submit(atoms, spec, workdir, faults, seed=seed)
        shift = 10.0 if self.calls % 3 == 0 else 0.0
        future: Future = Future()

        def relay(f):
            r = f.result()
            future.set_result(LabelResult(r.energy + shift, r.forces, r.stress, r.workdir, r.wall_s))

        inner.add_done_callback(relay)
        return future


def test_energy_outliers_are_held_out_of_training_and_rewind(tmp_path):
    config = ALConfig(num_trajectories=2, check_every=1, warmup=3, max_train_set_size=9, max_md_steps=400,
                      md=MDConfig(temperature_K=300))
    scheduler, executor, events, stored = _make(tmp_path, config)
    scheduler.labeller.executor = _Outliers(executor)
    scheduler.energy_gate = EnergyGate(6.0, min_count=2)
    base = scheduler.sink

    def sink(atoms, result, provenance):
        provenance = dict(provenance)
        held, release = provenance.pop("held", False), provenance.pop("release", False)
        frame = base(atoms, result, provenance)
        frame.split = "held" if held else "train"
        if held or release:
            stored.remove(frame) if held else None
        return frame

    scheduler.sink = sink
    result, log = _run_two_cells(scheduler, executor, events, tmp_path)
    held = [e for e in log if e["event"] == "label_held"]
    assert held and result.labels_held == len(held) - len([e for e in log if e["event"] == "label_released"])
    # None of the shifted labels reached the committee, and each rewound its trajectory.
    trained = scheduler.committee.frames
    assert all(abs(f.energy - held_e["energy"]) > 1e-9 for f in trained for held_e in held)
    rewinds = [e for e in log if e["event"] == "rewind"]
    assert len(rewinds) >= len(held)


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_guard_config_rejects_meaningless_limits(factor):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        GuardsConfig(bond_stretch_factor=factor)


def test_frames_the_committee_places_far_too_high_are_not_sent_to_the_reference(tmp_path):
    from test_scheduler import SpreadCommittee

    class HighEnergies(SpreadCommittee):
        def committee_energies(self, structures):
            return np.full((self.n_members, len(structures)), 1000.0)  # far above every EMT energy

    config = ALConfig(num_trajectories=2, check_every=1, warmup=3, c_x=-0.5, max_train_set_size=50,
                      max_md_steps=30, md=MDConfig(temperature_K=300))
    scheduler, executor, events, stored = _make(tmp_path, config, committee=HighEnergies())
    gate = EnergyGate(6.0)
    for e in np.linspace(-0.01, 0.01, 10):
        gate.add(np.array([29] * 4), e, reference=True)
    scheduler.energy_gate = gate
    _, log = _run_two_cells(scheduler, executor, events, tmp_path)
    assert not stored and not [e for e in log if e["event"] == "label_submitted"]
    assert [e for e in log if e["event"] == "md_unstable" and e["reason"].startswith("predicted energy")]


def test_a_few_near_identical_initial_frames_do_not_make_thermal_motion_an_outlier():
    numbers = _ethanol().numbers
    gate = EnergyGate(6.0, temperature_K=500.0)
    for e in (-310.0, -310.0005, -310.001):  # three initial frames, almost the same energy
        gate.add(numbers, e, reference=True)
    thermal = gate.thermal_floor(len(numbers))
    assert thermal == pytest.approx(0.5 * np.sqrt(1.5 / 9) * 8.617333262e-5 * 500.0)
    hot_but_physical = -310.0 + 9 * 3 * thermal  # three floors above: an ordinary hot frame
    assert gate.outlier(numbers, hot_but_physical) is None
    # The centre is at least the lowest frame plus equipartition's 3/2 kT per atom.
    excess = 1.5 * 8.617333262e-5 * 500.0
    assert gate.outlier(numbers, -310.001 + 9 * (excess + 5 * thermal)) is None
    assert gate.outlier(numbers, -310.001 + 9 * (excess + 7 * thermal))


def test_idg_frames_that_have_not_heated_up_do_not_hold_back_equilibrium_labels():
    """Short IDG MD from a minimum ends cold: its frames lie below the AL equilibrium energies."""
    numbers = np.array([6] * 9 + [1] * 8 + [8] * 4)  # aspirin's 21 atoms
    kT = 8.617333262e-5 * 500.0
    rng = np.random.default_rng(0)
    gate = EnergyGate(6.0, temperature_K=500.0)
    for e in rng.normal(0.2 * kT, 0.1 * kT, size=20):  # IDG: barely above the minimum
        gate.add(numbers, 21 * (-5.0 + e), reference=True)
    equilibrium = rng.normal(1.5 * kT, np.sqrt(1.5 / 21) * kT, size=200)  # harmonic equilibrium at 500 K
    held = sum(gate.outlier(numbers, 21 * (-5.0 + e)) is not None for e in equilibrium)
    assert held <= 2  # the old mean-based bound held most of them
    assert gate.outlier(numbers, 21 * (-5.0 + 1.0))  # an eV per atom above: still held
