"""MD stability monitors (sampling/monitors.py) and their hook in the AL scheduler."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import molecule
from test_scheduler import _make

from aimspax_like.config import ALConfig, MDConfig
from aimspax_like.events import read_events
from aimspax_like.sampling.monitors import (
    BondStretchMonitor,
    FiniteMonitor,
    MinDistanceMonitor,
    TemperatureMonitor,
    default_monitors,
    first_instability,
)
from aimspax_like.sampling.state import MDState


def _state(atoms: Atoms, temperature_K: float = 300.0) -> MDState:
    from aimspax_like.sampling.dynamics import maxwell_boltzmann

    atoms = atoms.copy()
    atoms.set_momenta(maxwell_boltzmann(atoms, temperature_K, np.random.default_rng(0)))
    return MDState(atoms, MDConfig(temperature_K=300), np.random.default_rng(0))


def test_a_calm_molecule_passes_every_monitor():
    water = molecule("H2O")
    assert first_instability(default_monitors(water, 300.0), _state(water)) is None


def test_each_monitor_names_what_went_wrong():
    water = molecule("H2O")
    torn = water.copy()
    torn.positions[1] += [4.0, 0, 0]  # an O-H bond about 3 A longer than at the start
    assert "bond 0-1 stretched" in BondStretchMonitor(water)(_state(torn))
    fused = water.copy()
    fused.positions[2] = fused.positions[0] + [0.2, 0, 0]
    assert "apart" in MinDistanceMonitor()(_state(fused))
    assert "temperature" in TemperatureMonitor(300.0)(_state(water, temperature_K=30000.0))
    broken = _state(water)
    broken.atoms.positions[0, 0] = np.nan
    assert "non-finite" in FiniteMonitor()(broken)


def test_scheduler_rewinds_a_trajectory_a_monitor_flags(tmp_path):
    config = ALConfig(num_trajectories=1, check_every=1, warmup=2, max_train_set_size=50, max_md_steps=5,
                      md=MDConfig(temperature_K=300))
    scheduler, executor, events, _ = _make(tmp_path, config)
    scheduler.make_monitors = lambda start, md: [lambda state: "always" if state.step % 2 else None]
    from ase.build import bulk

    scheduler.add_trajectory(bulk("Cu", "fcc", a=3.6, cubic=True))
    with executor:
        scheduler.run()
    events.close()
    unstable = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "md_unstable"]
    assert unstable and all(e["reason"] == "always" for e in unstable)


def test_al_config_switches_the_default_monitors_on():
    from aimspax_like.al import _monitors

    monitors = _monitors(molecule("H2O"), MDConfig(temperature_K=500))
    assert [type(m).__name__ for m in monitors] == [
        "FiniteMonitor", "MinDistanceMonitor", "BondStretchMonitor", "TemperatureMonitor"]
    assert ALConfig(stability_monitors=True).stability_monitors and not ALConfig().stability_monitors
