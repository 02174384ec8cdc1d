"""The on-the-fly calculator inside plain ASE drivers: it labels where the committee is unsure,
stores and learns those labels, and otherwise answers with the committee mean.

A 2-member 8-channel committee on the 6-atom Cu/Au cluster of ``campaign_helpers`` and EMT as
the reference keep every test to a few seconds on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.optimize import BFGS
from campaign_helpers import tiny_cluster, tiny_config

from aimspax_like.config import config_from_dict
from aimspax_like.data import DatasetStore, LabelledFrame
from aimspax_like.events import EventLog, read_events
from aimspax_like.otf import OTF_ORIGIN, OTF_SOURCE, OnTheFlyCalculator, ReferenceLabelError


def _emt_frames(atoms: Atoms, n: int, seed: int, stress: bool = False) -> list[LabelledFrame]:
    """``n`` rattled copies of ``atoms`` labelled by EMT; every 4th one validates."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        copy = atoms.copy()
        copy.positions += rng.normal(0.0, 0.08, copy.positions.shape)
        copy.calc = EMT()
        frames.append(LabelledFrame.from_atoms(
            copy, energy=copy.get_potential_energy(), forces=copy.get_forces(),
            stress=copy.get_stress() if stress else None,
            split="valid" if k % 4 == 3 else "train", origin="idg", md_step=k))
    return frames


def _calculator(tmp_path: Path, **options) -> OnTheFlyCalculator:
    options.setdefault("scratch", tmp_path / "scratch")  # label folders stay under tmp_path
    config = config_from_dict(tiny_config(tmp_path))
    return OnTheFlyCalculator.from_frames(config, _emt_frames(tiny_cluster(), 8, seed=1), {"kind": "emt"},
                                          initial_epochs=3, **options)


@pytest.fixture
def events(tmp_path: Path):
    log = EventLog(tmp_path / "events.jsonl")
    yield log
    log.close()


def _committee_mean(calc: OnTheFlyCalculator, atoms: Atoms) -> tuple[float, np.ndarray]:
    prediction = calc.committee.ensemble.predict([atoms])
    return float(prediction.mean_energies[0]), prediction.mean_forces


def _check_step(calc: OnTheFlyCalculator, atoms: Atoms, seen: dict[str, int]) -> None:
    """The results of the call just made: EMT's exactly when labelled, the committee mean otherwise
    (training only happens on labelled calls, so the committee is still the one that answered)."""
    results = calc.results
    if results["labelled"]:
        reference = atoms.copy()
        reference.calc = EMT()
        assert results["energy"] == reference.get_potential_energy()
        np.testing.assert_array_equal(results["forces"], reference.get_forces())
        seen["labelled"] += 1
    else:
        energy, forces = _committee_mean(calc, atoms)
        assert results["energy"] == pytest.approx(energy, abs=1e-10)
        np.testing.assert_allclose(results["forces"], forces, atol=1e-10)
        seen["committee"] += 1
    assert np.isfinite(results["uncertainty_energy"]) and np.isfinite(results["uncertainty_forces"])


def _run_langevin(calc: OnTheFlyCalculator, steps: int, seed: int) -> dict[str, int]:
    """Langevin MD of the cluster at 600 K with ``calc``, every call checked by ``_check_step``."""
    atoms = tiny_cluster()
    atoms.calc = calc
    md = Langevin(atoms, 2 * units.fs, temperature_K=600, friction=0.02, fixcm=False, rng=np.random.default_rng(seed))
    seen = {"labelled": 0, "committee": 0}
    md.attach(lambda: _check_step(calc, atoms, seen))
    md.run(steps)
    return seen


def test_langevin_labels_uncertain_steps_stores_and_learns_them(tmp_path: Path, events: EventLog) -> None:
    store = DatasetStore.create(tmp_path / "otf.h5")
    # Just above the fresh committee's spread at the start geometry (measured, not hard-coded): the
    # first steps are trusted, and once the cluster moves away from the training frames the
    # reference is asked.
    (tmp_path / "probe").mkdir()
    probe = _calculator(tmp_path / "probe", threshold=1e6)
    start = tiny_cluster()
    start.calc = probe
    start.get_potential_energy()
    threshold = 1.02 * probe.results["uncertainty_forces"]
    calc = _calculator(tmp_path, store=store, measure="forces", threshold=threshold, epochs=1, valid_ratio=0.25,
                       events=events, log_every=5)
    train_before = len(calc.committee.all_train)
    seen = _run_langevin(calc, steps=30, seed=0)
    events.close()

    assert calc.n_labels > 0 and seen["labelled"] > 0 and seen["committee"] > 0, seen
    frames = store.frames()
    assert len(frames) == calc.n_labels
    assert all(f.origin == OTF_ORIGIN and f.source == OTF_SOURCE for f in frames)
    assert all(np.isfinite(f.energy) and np.isfinite(f.forces).all() for f in frames)
    assert [f.md_step for f in frames] == calc.labelled_steps
    splits = [f.split for f in frames]
    assert splits[0] == "train" and ("valid" in splits) == (len(frames) >= 4)
    n_train = splits.count("train")
    assert len(calc.committee.all_train) == train_before + n_train > train_before
    assert len(calc.committee.valid) == 2 + splits.count("valid")

    log = read_events(tmp_path / "events.jsonl")
    labels = [e for e in log if e["event"] == "otf_label"]
    assert len(labels) == calc.n_labels and all(e["label_wall_s"] > 0 for e in labels)
    steps = [e for e in log if e["event"] == "otf_step"]
    assert all(e["labelled"] or e["step"] % 5 == 0 for e in steps)
    assert {e["step"] for e in steps if e["labelled"]} == set(calc.labelled_steps)


def test_a_high_threshold_labels_nothing_and_answers_with_the_committee(tmp_path: Path) -> None:
    calc = _calculator(tmp_path, measure="energy", threshold=1e6, energy_per_atom=False)
    train_before = len(calc.committee.all_train)
    seen = _run_langevin(calc, steps=10, seed=1)
    atoms = calc.atoms
    assert calc.n_labels == 0 and seen == {"labelled": 0, "committee": calc.n_calls}
    assert len(calc.committee.all_train) == train_before
    # the energy measure: the members' energy spread, here in total eV
    energies = calc.committee.ensemble.predict([atoms]).energies[:, 0]
    assert calc.results["uncertainty_energy"] == pytest.approx(float(np.std(energies)))


def test_label_now_asks_the_reference_at_a_trusted_geometry_and_learns_it(tmp_path: Path) -> None:
    """An optimiser's minimum found on committee forces, checked once by the reference."""
    store = DatasetStore.create(tmp_path / "otf.h5")
    calc = _calculator(tmp_path, threshold=1e6, store=store)
    atoms = tiny_cluster()
    atoms.calc = calc
    trusted = atoms.get_forces().copy()
    assert calc.n_labels == 0 and not calc.results["labelled"]
    results = calc.label_now(atoms)
    reference = atoms.copy()
    reference.calc = EMT()
    assert results["labelled"] and calc.n_labels == 1
    np.testing.assert_array_equal(results["forces"], reference.get_forces())
    np.testing.assert_array_equal(atoms.get_forces(), reference.get_forces())  # the cache holds the label
    assert not np.allclose(trusted, reference.get_forces(), atol=1e-3)
    assert [f.md_step for f in store.frames(origin=OTF_ORIGIN)] == [calc.labelled_steps[0]]
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    assert not calc.results["labelled"], "label_now asks once; the next call is the trigger's again"


def test_an_optimiser_runs_unchanged(tmp_path: Path) -> None:
    calc = _calculator(tmp_path, threshold=0.05, epochs=1, valid_ratio=0.0)
    atoms = tiny_cluster()
    atoms.calc = calc
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=5)
    assert calc.n_calls >= 5
    assert np.isfinite(atoms.get_potential_energy())


def test_a_periodic_cell_gets_the_committee_stress(tmp_path: Path) -> None:
    config = config_from_dict(tiny_config(tmp_path))
    cell = bulk("Cu", cubic=True)
    assert len(cell) == 4
    calc = OnTheFlyCalculator.from_frames(config, _emt_frames(cell, 8, seed=2, stress=True), {"kind": "emt"},
                                          initial_epochs=2, threshold=1e6, scratch=tmp_path / "scratch")
    atoms = cell.copy()
    atoms.positions += 0.05
    atoms.rattle(0.05, seed=3)
    atoms.calc = calc
    stress = atoms.get_stress()
    assert stress.shape == (6,) and np.isfinite(stress).all()
    assert calc.results["labelled"] is False
    expected = calc.committee.committee_stresses([atoms])[0].mean(axis=0)
    np.testing.assert_allclose(stress[:3], np.diag(expected), atol=1e-12)
    assert calc.n_calls == 1  # forces and energy came with the stress: no second decision
    atoms.get_forces()
    assert calc.n_calls == 1


def test_a_labelled_periodic_step_returns_the_reference_stress(tmp_path: Path) -> None:
    config = config_from_dict(tiny_config(tmp_path))
    cell = bulk("Cu", cubic=True)
    calc = OnTheFlyCalculator.from_frames(config, _emt_frames(cell, 6, seed=2, stress=True), {"kind": "emt"},
                                          initial_epochs=1, min_train=100, epochs=1,
                                          scratch=tmp_path / "scratch")  # min_train: always label
    atoms = cell.copy()
    atoms.rattle(0.05, seed=4)
    atoms.calc = calc
    stress = atoms.get_stress()
    reference = atoms.copy()
    reference.calc = EMT()
    assert calc.results["labelled"] is True
    np.testing.assert_array_equal(stress, reference.get_stress())


def test_moving_average_labels_nothing_during_warm_up_then_labels_above_the_mean(
        tmp_path: Path, events: EventLog) -> None:
    warmup = 5
    calc = _calculator(tmp_path, threshold="moving_average", warmup=warmup, c_x=0.0, window=50, epochs=1,
                       events=events, log_every=1)
    atoms = tiny_cluster()
    atoms.calc = calc
    md = Langevin(atoms, 2 * units.fs, temperature_K=800, friction=0.02, fixcm=False, rng=np.random.default_rng(2))
    md.run(30)
    events.close()
    steps = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "otf_step"]
    assert len(steps) == calc.n_calls
    warm = steps[:warmup]
    assert all(e["threshold"] == "inf" and not e["labelled"] for e in warm)  # Eq. 2: infinite until warm
    assert calc.n_labels > 0
    for e in steps[warmup:]:
        threshold = float(e["threshold"])
        assert np.isfinite(threshold)
        assert e["labelled"] == (e["uncertainty_forces"] > threshold)
    # only trusted (unlabelled) uncertainties enter the window
    assert calc.moving is not None and calc.moving.n_seen == calc.n_calls - calc.n_labels


def test_calibrate_scales_the_uncertainty_by_the_error_ratio_measured_at_labels(
        tmp_path: Path, events: EventLog) -> None:
    """With ``calibrate`` the trigger compares uncertainty x (median true error / uncertainty of
    the latest labels, at least 1); each label's ratio is its logged error over its uncertainty."""
    calc = _calculator(tmp_path, threshold=0.15, calibrate=True, epochs=1, events=events, log_every=1)
    atoms = tiny_cluster()
    atoms.calc = calc
    md = Langevin(atoms, 2 * units.fs, temperature_K=800, friction=0.02, fixcm=False, rng=np.random.default_rng(4))
    md.run(40)
    events.close()
    log = read_events(tmp_path / "events.jsonl")
    labels = [e for e in log if e["event"] == "otf_label"]
    assert len(labels) >= 4 and len(calc.ratios) == len(labels)
    for label, ratio in zip(labels, calc.ratios, strict=True):
        assert ratio == pytest.approx(label["error_forces"] / np.sqrt(3) / label["uncertainty"])
    assert calc.calibration == pytest.approx(max(1.0, float(np.median(calc.ratios[-25:]))))
    factors = []
    for e in (e for e in log if e["event"] == "otf_step"):
        factors.append(e["calibration"])
        assert e["labelled"] == (e["uncertainty_forces"] * e["calibration"] > 0.15)
    assert factors[0] == 1.0 and max(factors) > 1.0, "this committee is overconfident: the factor must act"
    with pytest.raises(ValueError, match="fixed threshold"):
        OnTheFlyCalculator(calc.committee, {"kind": "emt"}, threshold="moving_average", calibrate=True)


def test_a_failed_reference_raises_and_stores_nothing(tmp_path: Path) -> None:
    store = DatasetStore.create(tmp_path / "otf.h5")
    calc = _calculator(tmp_path, store=store, min_train=100)
    calc.reference_spec = {"kind": "no-such-code"}
    atoms = tiny_cluster()
    atoms.calc = calc
    with pytest.raises(ReferenceLabelError, match="call 0"):
        atoms.get_forces()
    assert len(store) == 0 and calc.n_labels == 0


def test_bad_options_are_refused(tmp_path: Path) -> None:
    calc = _calculator(tmp_path)
    for options in ({"measure": "stress"}, {"threshold": "median"}, {"threshold": -1.0}, {"valid_ratio": 1.0}):
        with pytest.raises(ValueError):
            OnTheFlyCalculator(calc.committee, {"kind": "emt"}, **options)


def test_from_files_continues_saved_members_with_the_store_frames(tmp_path: Path) -> None:
    calc = _calculator(tmp_path)
    paths = calc.committee.save(tmp_path / "models")
    store = DatasetStore.create(tmp_path / "data.h5")
    store.extend(_emt_frames(tiny_cluster(), 4, seed=5))
    config = config_from_dict(tiny_config(tmp_path))
    resumed = OnTheFlyCalculator.from_files(paths, config, {"kind": "emt"}, tmp_path / "data.h5", threshold=1e6)
    assert len(resumed.committee.all_train) == 3 and len(resumed.committee.valid) == 1
    atoms = tiny_cluster()
    np.testing.assert_allclose(resumed.committee.ensemble.predict([atoms]).energies,
                               calc.committee.ensemble.predict([atoms]).energies, atol=1e-10)
    atoms.calc = resumed
    assert atoms.get_forces().shape == (6, 3) and resumed.results["labelled"] is False


def test_a_large_frame_is_labelled_as_substructures_trained_on_their_cores_and_reused_on_resume(tmp_path, events):
    """With a planner the calculator labels pieces of a 108-atom cell, stores them with their
    masks, answers with the retrained committee, and a resumed calculator takes the stored
    pieces of a call instead of labelling them again."""
    from aimspax_like.config import SubstructureConfig
    from aimspax_like.piece_planner import PiecePlanner

    cell = bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    settings = SubstructureConfig(enabled=True, min_atoms=50, core_radius=1.0, buffer=3.0, box="vacuum",
                                  max_per_frame=2)
    config = config_from_dict(tiny_config(tmp_path))
    store = DatasetStore.create(tmp_path / "dataset.h5")

    def calculator() -> OnTheFlyCalculator:
        return OnTheFlyCalculator.from_frames(
            config, _emt_frames(cell, 4, seed=2), {"kind": "emt"}, store=store, initial_epochs=2, threshold=1e-6,
            events=events, scratch=tmp_path / "scratch", compute_stress=False,
            planner=PiecePlanner(settings, receptive_field=4.5))

    calc = calculator()
    atoms = cell.copy()
    atoms.positions += np.random.default_rng(4).normal(0.0, 0.1, atoms.positions.shape)
    atoms.calc = calc
    forces = atoms.get_forces()
    assert calc.results["labelled"] and forces.shape == (108, 3)
    after = calc.committee.ensemble.predict([atoms]).mean_forces
    assert np.allclose(forces, after)  # the answer is the retrained committee's
    pieces = store.frames()
    assert len(pieces) == 2 and all(f.is_piece and f.origin == OTF_ORIGIN for f in pieces)
    assert [f.piece for f in pieces] == [0, 1] and all(1 <= f.force_mask.sum() < len(f) < 108 for f in pieces)
    for f in pieces:
        emt = f.to_atoms()
        emt.calc = EMT()
        assert np.allclose(emt.get_forces(), f.forces)
    labels = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "otf_label"]
    assert [e["piece"] for e in labels] == [0, 1] and all("error_energy" not in e for e in labels)

    resumed = calculator()
    again = atoms.copy()
    again.calc = resumed
    again.get_forces()
    assert len(store) == 2, "a piece stored before the restart was labelled again"
    reused = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "otf_label"][2:]
    assert [e["reused"] for e in reused] == [True, True]
    # The same call at another geometry (a replay that went elsewhere): the stored pieces do not answer it.
    elsewhere = atoms.copy()
    elsewhere.positions[pieces[0].parent_index[0]] += [0.05, 0.0, 0.0]  # an atom of the first piece
    elsewhere.calc = calculator()
    elsewhere.get_forces()
    fresh = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "otf_label"][4:]
    assert fresh and not any(e["reused"] for e in fresh) and len(store) == 2 + len(fresh)
