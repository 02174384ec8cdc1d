"""The held-out test set: sampled by the reference (never the model under test) at several temperatures."""

from __future__ import annotations

import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.emt import EMT
from campaign_helpers import tiny_cluster, tiny_config

import aimspax_like.models.foundation as foundation
from aimspax_like.analysis.correlation import pearson_r
from aimspax_like.analysis.summary import render
from aimspax_like.campaign import run_campaign
from aimspax_like.committee import Committee
from aimspax_like.config import config_from_dict
from aimspax_like.context import RunContext, RunPaths
from aimspax_like.data import DatasetStore
from aimspax_like.errors import ConfigError
from aimspax_like.events import EventLog, read_events
from aimspax_like.models.ensemble import MACEEnsemble
from aimspax_like.testset import (
    check_test_set,
    run_test_set,
    sampler_kind,
    temperature_of,
    temperatures_of,
)

SIZE = 3  # frames per temperature in the tiny campaign


def _guarded_loader(forbidden: Path, calls: list[str]):
    """``load_foundation_calculator`` that refuses the run's own model files."""
    real = foundation.load_foundation_calculator

    def load(name_or_path, *args, **kwargs):
        calls.append(str(name_or_path))
        if Path(name_or_path).resolve().is_relative_to(forbidden.resolve()):
            raise AssertionError(f"the model under test was loaded to sample: {name_or_path}")
        return real(name_or_path, *args, **kwargs)

    return load


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, parsl_executor):
    tmp_path = tmp_path_factory.mktemp("testset")
    run = tmp_path / "run"
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(foundation, "load_foundation_calculator", _guarded_loader(run / "models", calls))
        summary = run_campaign(config_from_dict(tiny_config(tmp_path)), executor=parsl_executor)
    return run, summary, calls


def _test_frames(run: Path):
    return DatasetStore.open(run / "data/dataset.h5").frames(origin="test")


def test_test_frames_come_from_reference_md_at_every_temperature(campaign):
    run, summary, calls = campaign
    assert calls == []  # no model was loaded to sample the test set
    test = summary["test"]
    assert test["sampler"] == "reference" and test["temperatures_K"] == [400.0, 560.0]  # AL 400 K, 1.4 x 400
    frames = _test_frames(run)
    assert len(frames) == test["size"] == 2 * SIZE
    assert all(f.split == "test" for f in frames)
    by_temperature = {}
    for frame in frames:
        by_temperature.setdefault(temperature_of(frame.trajectory, test["temperatures_K"], 1), []).append(frame)
        atoms = frame.to_atoms()
        atoms.calc = EMT()  # the stored label is EMT's own answer at the stored geometry
        assert atoms.get_potential_energy() == pytest.approx(frame.energy, abs=1e-8)
        np.testing.assert_allclose(atoms.get_forces(), frame.forces, atol=1e-8)
    assert {k: len(v) for k, v in by_temperature.items()} == {400.0: SIZE, 560.0: SIZE}
    # Reference MD ran on the label workers, one segment of `stride` (5) steps per frame: every
    # frame was submitted once, from the trajectory of its temperature, at consecutive segments.
    events = read_events(run / "logs/events.jsonl")
    submitted = [e for e in events if e["event"] == "label_submitted" and e.get("phase") == "test"]
    assert sorted((e["temperature_index"], e["step"]) for e in submitted) == sorted(
        (int(f.trajectory), f.md_step) for f in frames)
    for group in by_temperature.values():
        assert sorted(f.md_step for f in group) == [5 * (k + 1) for k in range(SIZE)]
        steps = sorted(group, key=lambda f: f.md_step)
        moved = [np.abs(b.positions - a.positions).max() for a, b in itertools.pairwise(steps)]
        assert all(0 < m < 0.5 for m in moved)  # 5 fs of MD apart: moved, but not far
    end = next(e for e in events if e["event"] == "phase_end" and e["phase"] == "test")
    assert end["temperatures_K"] == [400.0, 560.0] and end["size"] == 2 * SIZE


def test_summary_reports_errors_and_uncertainty_per_temperature(campaign):
    run, summary, _ = campaign
    test = summary["test"]
    groups = test["per_temperature"]
    assert [g["temperature_K"] for g in groups] == [400.0, 560.0]
    assert test["all"]["frames"] == 2 * SIZE
    for group in [*groups, test["all"]]:
        assert group["frames"] in (SIZE, 2 * SIZE)
        assert len(group["members"]) == 2
        assert group["final"] == group["members"][test["member"]]
        for errors in group["members"]:
            assert math.isfinite(errors["force_mae"]) and math.isfinite(errors["energy_mae_per_atom"])
        r = group["uncertainty_error_r"]
        assert r is not None and -1.0 <= r <= 1.0
    text = render(summary)
    print("\n" + text)
    lines = [line for line in text.splitlines() if line.startswith("test ")]
    assert [line.split()[1] for line in lines[1:]] == ["400", "560", "all"]
    assert all("final F MAE" in line and "uncertainty-error r" in line for line in lines[1:])
    assert "test 560 K" in (run / "report/summary.md").read_text()


def test_every_saved_member_has_its_e0_refitted(campaign):
    run, summary, _ = campaign
    events = read_events(run / "logs/events.jsonl")
    refits = {e["member"]: e["converged"] for e in events if e["event"] == "e0_refit"}
    best = summary["best_member"]
    assert refits == {0: best == 0, 1: best == 1}
    # One composition: after the refit every member's mean training-energy residual is zero.
    store = DatasetStore.open(run / "data/dataset.h5")
    train = [f.to_atoms() for f in store.frames(split="train")]
    ensemble = MACEEnsemble.load([run / "models/member_0.model", run / "models/member_1.model"],
                                 device="cpu", dtype="float64")
    predicted = ensemble.predict(train).energies  # [M, S]
    reference = np.array([a.info["REF_energy"] for a in train])
    residual = (reference[None] - predicted).mean(axis=1) / len(train[0])
    np.testing.assert_allclose(residual, 0.0, atol=1e-6)  # eV/atom


def test_foundation_sampler_labels_on_the_workers(tmp_path, campaign, parsl_executor, monkeypatch):
    """The finished run's best model stands in for a foundation model; EMT labels on the workers."""
    finished, summary, _ = campaign
    stand_in = tmp_path / "foundation.model"
    shutil.copyfile(finished / "models/best.model", stand_in)
    config = config_from_dict(tiny_config(
        tmp_path, idg={"foundation_model": str(stand_in)},
        test_set={"sampler": "foundation", "size": 2, "temperatures_K": [300.0]},
    ))
    paths = RunPaths(tmp_path / "run")
    for folder in (paths.logs, paths.labels, paths.data):
        folder.mkdir(parents=True)
    store = DatasetStore.create(paths.dataset)
    old = DatasetStore.open(finished / "data/dataset.h5")
    store.extend([f for f in old.frames() if f.origin != "test"])
    calls: list[str] = []
    monkeypatch.setattr(foundation, "load_foundation_calculator", _guarded_loader(finished / "models", calls))
    events = EventLog(paths.events)
    ctx = RunContext(config, paths, store, events, parsl_executor, [tiny_cluster()])
    committee = Committee.from_files(config, sorted((finished / "models").glob("member_*.model")), store.frames())
    result = run_test_set(ctx, committee, summary["best_member"])
    events.close()
    assert calls == [str(stand_in)]
    assert result["sampler"] == "foundation" and result["size"] == 2
    submitted = [e for e in read_events(paths.events) if e["event"] == "label_submitted" and e["phase"] == "test"]
    assert len(submitted) == 2
    for frame in store.frames(origin="test"):
        atoms = frame.to_atoms()
        atoms.calc = EMT()
        assert atoms.get_potential_energy() == pytest.approx(frame.energy, abs=1e-8)


def test_default_temperatures_and_sampler(tmp_path):
    raw = tiny_config(tmp_path)
    raw.pop("test_set")
    raw["al"]["md"] = [{"temperature_K": 300}, {"temperature_K": 500}, {"temperature_K": 500}]
    config = config_from_dict(raw)
    assert config.test_set.size == 20 and config.test_set.stride == 20
    assert temperatures_of(config) == [300.0, 500.0, 700.0]
    assert sampler_kind(config) == "reference"
    raw["idg"] = {**raw["idg"], "sampler": "foundation", "foundation_model": "mace-mp-0"}
    assert sampler_kind(config_from_dict(raw)) == "foundation"
    raw["test_set"] = {"temperatures_K": [250, 900]}
    assert temperatures_of(config_from_dict(raw)) == [250.0, 900.0]
    with pytest.raises(ConfigError, match=r"test_set\.temperatures_K"):
        config_from_dict({**raw, "test_set": {"temperatures_K": [-5]}})
    no_model = tiny_config(tmp_path, test_set={"sampler": "foundation"})
    with pytest.raises(ConfigError, match=r"test_set\.sampler"):
        check_test_set(config_from_dict(no_model))


def test_pearson_is_none_where_undefined():
    # The test set's uncertainty-error r: two frames are enough (min_points=2).
    def pearson(x, y):
        return pearson_r(x, y, min_points=2)

    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.5]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1])
    assert pearson([1.0], [2.0]) is None
    assert pearson([1.0, 1.0], [2.0, 3.0]) is None
    assert pearson([1.0, float("nan")], [2.0, 3.0]) is None


def test_a_test_set_sampled_again_reuses_the_stored_frames(campaign, parsl_executor):
    """What a resume after an interrupted test set does: the seeded MD replays, nothing is stored twice."""
    from aimspax_like.config import load_config

    run, summary, _ = campaign
    config = load_config(run / "campaign.yaml")
    paths = RunPaths(run)
    store = DatasetStore.open(paths.dataset)
    before = len(store)
    events = EventLog(paths.events)
    ctx = RunContext(config, paths, store, events, parsl_executor, [tiny_cluster()])
    committee = Committee.from_files(config, paths.member_models(), store.frames())
    result = run_test_set(ctx, committee, summary["best_member"])
    events.close()
    assert len(store) == before and result["size"] == summary["test"]["size"]
    assert result["all"]["final"]["force_mae"] == pytest.approx(summary["test"]["all"]["final"]["force_mae"])
    assert not [e for e in read_events(paths.events) if e["event"] == "frame_duplicate"]
