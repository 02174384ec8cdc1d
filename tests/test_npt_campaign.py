"""Solids end to end: IDG and active learning in NPT on a periodic cell, trained on stresses.

A rattled 8-atom copper cell labelled by EMT (energy, forces and stress), IDG and AL both with
stochastic cell rescaling at 300 K and 1 bar. The barostat is driven by the committee's virial,
so the committee must predict stresses in the AL loop and be trained on the reference's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write
from campaign_helpers import tiny_config

from aimspax_like.campaign import run_campaign
from aimspax_like.config import config_from_dict
from aimspax_like.data import DatasetStore, LabelledFrame
from aimspax_like.events import read_events

NPT = {"ensemble": "npt_crescale", "temperature_K": 300, "pressure_bar": 1.0, "taup_fs": 100.0,
       "compressibility_per_bar": 1e-5}


@pytest.fixture(scope="module")
def npt_campaign(tmp_path_factory, parsl_executor):
    tmp_path = tmp_path_factory.mktemp("npt")
    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    cell.rattle(0.03, seed=1)
    config = tiny_config(
        tmp_path,
        idg={"md": NPT, "max_set_size": 30},
        al={"md": NPT, "num_trajectories": 2, "max_md_steps": 150, "max_train_set_size": 20},
        test_set={"size": 3, "stride": 5, "temperatures_K": [300]},
    )
    write(tmp_path / "cluster.xyz", cell)  # the helper's structure file, now a periodic cell
    campaign = config_from_dict(config)
    assert campaign.reference.compute_stress is False  # switched on by the campaign, with a note
    summary = run_campaign(campaign, executor=parsl_executor)
    return tmp_path / "run", summary


def test_npt_active_learning_finishes_and_samples_cells(npt_campaign):
    run, summary = npt_campaign
    assert summary["al"]["md_steps"] > 0 and summary["al"]["labels_done"] > 0
    events = read_events(run / "logs/events.jsonl")
    assert not [e for e in events if e["event"] == "md_unstable"]  # the barostat stayed physical
    volumes = [e["volume"] for e in events if e["event"] == "uncertainty"]
    assert volumes and np.ptp(volumes) > 0  # logged at every check, and it moves
    assert (run / "report/figures/cell_volumes.png").is_file()
    store = DatasetStore.open(run / "data/dataset.h5")
    start_volume = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1)).get_volume()
    for origin in ("idg", "al"):
        frames = store.frames(origin=origin)
        volumes = np.array([f.to_atoms().get_volume() for f in frames])
        assert frames and np.ptp(volumes) > 1e-3 * start_volume  # the cell moves in both phases
        assert np.all(np.abs(volumes / start_volume - 1) < 0.2)
    for frame in store.frames():
        assert frame.stress is not None and np.all(np.isfinite(frame.stress))
        atoms = frame.to_atoms()
        atoms.calc = EMT()
        np.testing.assert_allclose(atoms.get_stress(), frame.stress, atol=1e-9)  # EMT's own stress


def test_members_train_and_validate_on_stress(npt_campaign):
    run, _ = npt_campaign
    events = read_events(run / "logs/events.jsonl")
    rounds = [e for e in events if e["event"] == "training_round"]
    assert rounds and all(math.isfinite(m["valid_stress_mae"]) for m in rounds[-1]["members"])
    converged = [e for e in events if e["event"] == "converged"]
    assert converged and math.isfinite(converged[0]["valid_stress_mae"])

    text = (run / "report/summary.md").read_text()
    assert "valid S MAE (meV/A^3)" in text and "S MAE" in text.split("test 300 K")[1].splitlines()[0]


def test_the_converged_model_predicts_stress_through_mace_calculator(npt_campaign):
    run, _ = npt_campaign
    import mace  # noqa: F401
    from mace.calculators import MACECalculator

    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    cell.calc = MACECalculator(model_paths=str(run / "models/best.model"), device="cpu", default_dtype="float64")
    stress = cell.get_stress()
    assert stress.shape == (6,) and np.all(np.isfinite(stress))


def test_the_campaign_says_it_switched_stress_labels_on(tmp_path, capsys):
    from aimspax_like.campaign import check_inputs

    cell = bulk("Cu", "fcc", a=3.61, cubic=True)
    config = config_from_dict(tiny_config(tmp_path, al={"md": NPT}))
    write(tmp_path / "cluster.xyz", cell)
    check_inputs(config)
    assert config.reference.compute_stress is True
    assert "note: reference.compute_stress switched on: al.md runs NPT" in capsys.readouterr().err


class _EMTCommittee:
    """Two identical 'members' that are EMT: forces and stresses, nothing to learn."""

    def _calc(self, atoms):
        probe = atoms.copy()
        probe.calc = EMT()
        return probe

    def committee_forces(self, structures):
        return [np.stack([self._calc(a).get_forces()] * 2) for a in structures]

    def committee_stresses(self, structures):
        return [np.stack([self._calc(a).get_stress(voigt=False)] * 2) for a in structures]

    def add(self, frame):
        pass

    def train_round(self, epochs):
        return []

    def valid_force_mae(self):
        return float("inf")


def test_an_mtk_trajectory_checkpoints_its_barostat_and_continues_identically(tmp_path):
    from aimspax_like.config import ALConfig, MDConfig
    from aimspax_like.events import EventLog
    from aimspax_like.execution import ThreadLabelExecutor
    from aimspax_like.scheduler import ALScheduler

    config = ALConfig(num_trajectories=1, check_every=5, warmup=100, max_md_steps=40, max_train_set_size=100,
                      md=MDConfig(ensemble="npt_mtk", temperature_K=300, pressure_bar=1000.0, taup_fs=200.0))
    cell = bulk("Cu", "fcc", a=3.61, cubic=True)
    cell.rattle(0.02, seed=2)

    def scheduler(folder):
        events = EventLog(folder / "events.jsonl")
        made = ALScheduler(config, _EMTCommittee(), executor, lambda *a: None, events, {"kind": "emt"},
                           folder / "labels", train_set_size=lambda: 0, seed=4)
        made.add_trajectory(cell)
        return made, events

    with ThreadLabelExecutor(max_workers=1) as executor:
        first, log1 = scheduler(tmp_path)
        for _ in range(20):
            first._step_running()
        state = first.state_dict()
        saved = state["trajectories"][0]
        assert saved["cell_momentum"] is not None and saved["barostat_chain"] is not None
        second, log2 = scheduler(tmp_path / "b")
        second.load_state_dict(state, is_stored=lambda provenance: None)
        for _ in range(10):
            first._step_running()
            second._step_running()
        a, b = first.trajectories[0].md, second.trajectories[0].md
        np.testing.assert_allclose(b.atoms.get_positions(), a.atoms.get_positions(), atol=1e-10)
        np.testing.assert_allclose(b.atoms.cell.array, a.atoms.cell.array, atol=1e-10)
        np.testing.assert_allclose(b.cell_momentum, a.cell_momentum, atol=1e-10)
        log1.close()
        log2.close()


class _StressSplitCommittee(_EMTCommittee):
    """Members agree on every force (Eq. 1 is zero) but not on the stress."""

    def committee_stresses(self, structures):
        shift = np.diag([0.004, 0.0, 0.0])  # eV/A^3 on xx: member spread 0.004 > the limit below
        return [np.stack([s[0] + shift, s[1] - shift]) for s in super().committee_stresses(structures)]


def _stress_trigger_run(folder, limit):
    """One NPT trajectory of ``_StressSplitCommittee`` under ``al.stress_uncertainty = limit``; its log."""
    from aimspax_like.config import ALConfig, MDConfig
    from aimspax_like.events import EventLog
    from aimspax_like.execution import ThreadLabelExecutor
    from aimspax_like.scheduler import ALScheduler

    md = MDConfig(ensemble="npt_crescale", temperature_K=300, compressibility_per_bar=1e-5, taup_fs=100.0)
    config = ALConfig(num_trajectories=1, check_every=2, warmup=2, max_md_steps=12, max_train_set_size=100,
                      stress_uncertainty=limit, md=md)
    stored: list[LabelledFrame] = []

    def sink(atoms, result, provenance):
        stored.append(LabelledFrame.from_atoms(atoms, result.energy, result.forces, result.stress,
                                               split="train", **provenance))
        return stored[-1]

    events = EventLog(folder / "events.jsonl")
    with ThreadLabelExecutor(max_workers=1) as executor:
        scheduler = ALScheduler(config, _StressSplitCommittee(), executor, sink, events,
                                {"kind": "emt", "compute_stress": True}, folder / "labels",
                                train_set_size=lambda: 0, seed=1)
        scheduler.add_trajectory(bulk("Cu", "fcc", a=3.61, cubic=True))
        scheduler.run()
    events.close()
    return read_events(folder / "events.jsonl")


def test_the_optional_stress_trigger_labels_frames_eq1_would_not(tmp_path):
    from aimspax_like.uncertainty import stress_uncertainty

    assert stress_uncertainty(np.stack([np.eye(3) * 0.001, -np.eye(3) * 0.001])) == pytest.approx(0.001)
    off = _stress_trigger_run(tmp_path / "off", None)
    on = _stress_trigger_run(tmp_path / "on", 0.001)
    assert not [e for e in off if e["event"] in ("label_submitted", "stress_uncertain")]  # Eq. 1 alone: nothing
    triggers = [e for e in on if e["event"] == "stress_uncertain"]
    assert triggers and all(e["spread"] == pytest.approx(0.004) for e in triggers)
    assert [e for e in on if e["event"] == "label_submitted"]


def test_idg_with_a_foundation_model_samples_npt_and_labels_stress(npt_campaign, tmp_path, parsl_executor):
    """The NPT campaign's own model stands in for MACE-MP-0: it drives NPT MD, workers label with stress."""
    run, _ = npt_campaign
    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    config = tiny_config(tmp_path, idg={"sampler": "foundation", "foundation_model": str(run / "models/best.model"),
                                        "md": NPT, "desired_acc": 10.0, "desired_acc_scale": 1.0})
    write(tmp_path / "cluster.xyz", cell)
    run_campaign(config_from_dict(config), phases=("idg",), executor=parsl_executor)
    frames = DatasetStore.open(tmp_path / "run/data/dataset.h5").frames(origin="idg")
    volumes = [f.to_atoms().get_volume() for f in frames]
    assert len(frames) >= 6 and np.ptp(volumes) > 0
    assert all(f.stress is not None and np.all(np.isfinite(f.stress)) for f in frames)
