"""Batch IDG: several molecules in one campaign, reference MD as tasks on the label workers.

The reference must never run inside the driver (on a cluster the driver is a GPU job and the
reference an MPI code for the label blocks): here the driver's own reference entry points are
replaced by functions that fail, and IDG still labels every frame, on the Parsl workers.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.io import write

from aimspax_like.analysis.summary import render
from aimspax_like.analysis.systems import formula
from aimspax_like.campaign import run_campaign
from aimspax_like.config import MDConfig, config_from_dict
from aimspax_like.data import DatasetStore
from aimspax_like.errors import CampaignInterrupted
from aimspax_like.events import read_events
from aimspax_like.reference.md_segment import SegmentRequest, SegmentResult, run_segment
from aimspax_like.reference.results import LabelFailure
from aimspax_like.reference_md import resume_starts

MOLECULES = ("H2O", "NH3", "CH4")


def batch_config(tmp_path, **idg) -> dict:
    folder = tmp_path / "molecules"
    folder.mkdir(exist_ok=True)
    for name in MOLECULES:
        write(folder / f"{name}.xyz", molecule(name))
    return {
        "system": {"structures": str(folder)},
        "reference": {"kind": "emt"},
        "model": {"ensemble_size": 2, "channels": 8, "max_L": 0, "r_max": 4.0, "num_interactions": 1,
                  "correlation": 2, "radial_mlp": [8], "num_radial_basis": 6, "device": "cpu"},
        "training": {"batch_size": 4},
        "idg": {"stride": 4, "points_per_member": 3, "intermediate_epochs": 2, "max_epochs": 8,
                "max_set_size": 24, "probe_steps": 0, "md": {"temperature_K": 300}, **idg},
        "al": {"enabled": False},
        "test_set": {"size": 0},
        "output": {"directory": str(tmp_path / "run")},
        "seed": 5,
    }


def _no_reference_in_driver(monkeypatch):
    """Every in-process way to call the reference now fails loudly (workers are other processes)."""
    import importlib

    label_module = importlib.import_module("aimspax_like.reference.label")
    segment_module = importlib.import_module("aimspax_like.reference.md_segment")

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran inside the driver")

    monkeypatch.setattr(label_module, "_run", refuse)
    monkeypatch.setattr(segment_module, "_integrate", refuse)


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, parsl_executor):
    tmp_path = tmp_path_factory.mktemp("batch_idg")
    monkeypatch = pytest.MonkeyPatch()
    _no_reference_in_driver(monkeypatch)
    try:
        config = config_from_dict(batch_config(tmp_path))
        summary = run_campaign(config, phases=("idg",), executor=parsl_executor)
    finally:
        monkeypatch.undo()
    return tmp_path / "run", summary


def test_every_molecule_is_sampled_by_its_own_trajectories_on_the_workers(batch_run):
    run, _summary = batch_run
    frames = DatasetStore(run / "data/dataset.h5").frames()
    assert len(frames) == 24  # stopped by idg.max_set_size: never a segment beyond it
    assert all(f.label_wall_s > 0 for f in frames)
    by_system = Counter(formula(f.numbers) for f in frames)
    assert set(by_system) == {"H2O", "H3N", "CH4"} and min(by_system.values()) >= 4
    # Two workers, three structures: one trajectory each (ids 0..2, the structure's own index).
    assert {f.trajectory for f in frames} == {0, 1, 2}
    for trajectory in (0, 1, 2):
        steps = sorted(f.md_step for f in frames if f.trajectory == trajectory)
        assert steps == [4 * (k + 1) for k in range(len(steps))]  # consecutive segments, none twice
    events = read_events(run / "logs/events.jsonl")
    submitted = [e for e in events if e["event"] == "label_submitted" and e["phase"] == "idg"]
    done = [e for e in events if e["event"] == "label_done" and e["phase"] == "idg"]
    assert len(submitted) == len(done) == len(frames)  # every frame one worker task, no failure
    assert all(e["wall_s"] > 0 for e in done)
    # Labels ran side by side: some segment was submitted while another was in flight.
    in_flight, most = 0, 0
    for event in events:
        if event["event"] in ("label_submitted", "label_done") and event.get("phase") == "idg":
            in_flight += 1 if event["event"] == "label_submitted" else -1
            most = max(most, in_flight)
    assert most >= 2


def test_the_summary_breaks_labels_and_errors_down_per_system(batch_run):
    run, summary = batch_run
    rows = {row["system"]: row for row in summary["systems"]}
    assert list(rows) == ["CH4", "H2O", "H3N"]  # the folder's files in name order
    for row in rows.values():
        assert row["start_structures"] == 1 and row["labels"]["idg"] >= 4
        assert row["valid"] is None or row["valid"]["force_mae"] > 0
    assert sum(row["labels"]["idg"] for row in rows.values()) == summary["labels"]["idg"]
    text = render(summary)
    assert "systems    system" in text and "H3N" in text
    assert "Per system" in (run / "report/summary.md").read_text()
    assert "Per system" in (run / "report/index.html").read_text()
    assert not [e for e in read_events(run / "logs/events.jsonl") if e["event"] == "report_failed"]
    from aimspax_like.analysis.status import status_of

    assert status_of(run)["state"] == "finished"  # asked for IDG only, and IDG is done


def test_a_resumed_batch_idg_continues_each_trajectory_from_its_newest_frame(tmp_path, parsl_executor):
    config = config_from_dict(batch_config(tmp_path, max_set_size=30, max_epochs=20))
    stored = []

    def stop_after_some_labels():  # a SIGTERM after a few labels, as a scheduler would send
        stored[:] = DatasetStore(tmp_path / "run/data/dataset.h5").frames()
        return 15 if len(stored) >= 9 else 0

    with pytest.raises(CampaignInterrupted):
        run_campaign(config, phases=("idg",), executor=parsl_executor, should_stop=stop_after_some_labels)
    before = DatasetStore(tmp_path / "run/data/dataset.h5").frames()
    assert 9 <= len(before) < 30
    run_campaign(config, phases=("idg",), executor=parsl_executor, resume=True)
    after = DatasetStore(tmp_path / "run/data/dataset.h5").frames()
    keys = [(f.trajectory, f.md_step) for f in after]
    assert len(keys) == len(set(keys))  # nothing stored twice
    assert [(f.trajectory, f.md_step) for f in after[: len(before)]] == [(f.trajectory, f.md_step) for f in before]
    for trajectory in (0, 1, 2):
        newest = max((f.md_step for f in before if f.trajectory == trajectory), default=0)
        later = [f.md_step for f in after[len(before):] if f.trajectory == trajectory]
        assert all(step > newest for step in later)


def test_resume_starts_pick_each_trajectorys_newest_stored_frame():
    structures = [molecule("H2O"), molecule("CH4")]
    stored = DatasetStoreStub.frames_of([(0, 8), (0, 4), (3, 12)], structures)
    starts = resume_starts(structures, 2, stored)
    assert [(s.trajectory, s.structure, s.md_step) for s in starts] == [(0, 0, 8), (1, 1, 0), (2, 0, 0), (3, 1, 12)]
    np.testing.assert_allclose(starts[0].atoms.positions, stored[0].positions)


class DatasetStoreStub:
    @staticmethod
    def frames_of(keys, structures):
        from aimspax_like.data import LabelledFrame

        frames = []
        for trajectory, step in keys:
            atoms = structures[trajectory % len(structures)].copy()
            atoms.positions += step * 0.001
            frames.append(LabelledFrame.from_atoms(atoms, 0.0, np.zeros((len(atoms), 3)), split="train",
                                                   origin="idg", trajectory=trajectory, md_step=step))
        return frames


def test_a_segment_integrates_on_a_worker_and_a_failure_is_data(tmp_path):
    atoms = molecule("H2O")
    request = SegmentRequest(MDConfig(temperature_K=300).model_dump(mode="json"), 5,
                             np.zeros((3, 3)), rng_seed=1)
    result = run_segment(atoms, {"kind": "emt"}, str(tmp_path / "s"), request=request)
    assert isinstance(result, SegmentResult) and not (tmp_path / "s").exists()  # scratch removed on success
    assert result.positions.shape == (3, 3) and not np.allclose(result.positions, atoms.positions)
    from ase.calculators.emt import EMT

    probe = Atoms(atoms.numbers, result.positions)
    probe.calc = EMT()
    np.testing.assert_allclose(result.label.forces, probe.get_forces(), atol=1e-10)  # the label is the end frame's
    failed = run_segment(atoms, {"kind": "emt"}, str(tmp_path / "f"), faults={"scf_failure": 1.0}, seed=3,
                         request=request)
    assert isinstance(failed, LabelFailure) and failed.kind.value == "scf_not_converged"
    timed = run_segment(atoms, {"kind": "emt", "timeout_s": 0.2}, str(tmp_path / "t"),
                        faults={"hang": 1.0, "hang_s": 30}, seed=3, request=request)
    assert isinstance(timed, LabelFailure) and timed.kind.value == "timed_out"


def test_fixed_atoms_of_a_start_structure_stay_fixed_in_reference_md_on_the_workers(tmp_path):
    from ase.build import fcc111
    from ase.constraints import FixAtoms

    from aimspax_like.reference_md import fixed_indices

    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    slab.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))  # the bottom layer
    request = SegmentRequest(MDConfig(temperature_K=600).model_dump(mode="json"), 10,
                             np.full((len(slab), 3), 0.05), rng_seed=2, fixed=fixed_indices(slab))
    assert request.fixed == [0, 1, 2, 3]
    result = run_segment(slab, {"kind": "emt"}, str(tmp_path / "slab"), request=request)
    assert isinstance(result, SegmentResult)
    np.testing.assert_array_equal(result.positions[:4], slab.positions[:4])
    assert not np.allclose(result.positions[4:], slab.positions[4:])
    np.testing.assert_array_equal(result.momenta[:4], 0.0)
