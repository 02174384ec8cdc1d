"""An end-to-end campaign on a tiny system: real MACE, real Parsl workers, real EMT labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from ase.calculators.emt import EMT
from ase.io import read
from campaign_helpers import tiny_cluster as _cluster
from campaign_helpers import tiny_config

from aimspax_like.campaign import run_campaign
from aimspax_like.config import config_from_dict
from aimspax_like.data import DatasetStore
from aimspax_like.events import read_events


def test_campaign_writes_the_run_directory(finished_campaign):
    run, summary = finished_campaign
    for path in ("campaign.yaml", "data/dataset.h5", "data/train.xyz", "data/valid.xyz", "data/test.xyz",
                 "models/member_0.model", "models/member_1.model", "models/best.model",
                 "logs/events.jsonl", "report/summary.md", "state/phases.json"):
        assert (run / path).is_file(), path
    resolved = yaml.safe_load((run / "campaign.yaml").read_text())
    assert resolved["al"]["window"] == 400  # defaults written out
    assert json.loads((run / "state/phases.json").read_text())["done"] == ["idg", "al", "converge"]
    assert summary["al"]["reason"] == "max_train_set_size"


def test_every_label_is_in_the_dataset_with_provenance(finished_campaign):
    run, _ = finished_campaign
    store = DatasetStore.open(run / "data/dataset.h5")
    frames = store.frames()
    events = read_events(run / "logs/events.jsonl")
    assert len(frames) == sum(e["event"] == "frame_stored" for e in events)
    al_frames = store.frames(origin="al")
    al_done = [e for e in events if e["event"] == "label_done" and e["phase"] == "al"]
    assert len(al_frames) == len(al_done) > 0
    assert store.counts()["split"]["train"] >= 18
    for frame in al_frames:
        assert frame.trajectory in (0, 1, 2) and frame.md_step > 0 and np.isfinite(frame.uncertainty)
        atoms = frame.to_atoms()
        atoms.calc = EMT()  # the stored label is EMT's answer for the stored geometry
        np.testing.assert_allclose(atoms.get_forces(), frame.forces, atol=1e-8)
    idg_members = {f.member for f in store.frames(origin="idg", split="train")}
    assert idg_members == {0, 1}  # disjoint subsets dealt to both members
    assert {f.member for f in al_frames} == {-1}  # AL points are shared by all members
    exported = read(run / "data/train.xyz", ":")
    assert len(exported) == store.counts()["split"]["train"]


def test_labels_ran_on_parsl_workers_while_others_sampled(finished_campaign):
    run, _ = finished_campaign
    events = read_events(run / "logs/events.jsonl")
    submitted = [e for e in events if e["event"] == "label_submitted" and e["phase"] == "al"]
    assert submitted and all(e["delta"] > e["threshold"] for e in submitted)
    states = [e for e in events if e["event"] == "state"]
    assert {(e["old"], e["new"]) for e in states} >= {("running", "waiting"), ("waiting", "training"),
                                                     ("training", "running")}


def test_campaign_end_carries_the_cpu_profile_and_the_summary_prints_it(finished_campaign):
    run, summary = finished_campaign
    events = read_events(run / "logs/events.jsonl")
    profile = next(e for e in events if e["event"] == "campaign_end")["profile"]
    assert {"idg", "al", "converge", "test", "other"} <= set(profile)
    assert profile["al"]["training"]["cpu_s"] > 0 and profile["al"]["md"]["cpu_s"] > 0
    assert profile["al"]["uncertainty"]["wall_s"] > 0 and profile["al"]["io"]["wall_s"] > 0
    for phase in ("idg", "al", "converge", "test"):
        buckets = profile[phase]
        driver_buckets = sum(c["wall_s"] for b, c in buckets.items() if b not in ("driver", "labelling"))
        assert driver_buckets <= buckets["driver"]["wall_s"] + 0.01  # exclusive buckets, within the phase
    # the labels' CPU, measured on the Parsl workers, in the events and in the clock
    done = [e for e in events if e["event"] == "label_done"]
    assert done and all(e["cpu_s"] >= 0 for e in done)
    assert profile["al"]["labelling"]["cpu_s"] > 0 and profile["idg"]["labelling"]["cpu_s"] > 0
    al_tries = [e for e in events if e["event"] in ("label_done", "label_failed")
                and e["phase"] in ("al", "analysis")]  # analysis labels run in the AL phase
    assert sum(e["cpu_s"] for e in al_tries) == pytest.approx(profile["al"]["labelling"]["cpu_s"], abs=0.01)
    assert summary["profile"]["al"]["training"]["cpu_s"] > 0
    text = (run / "report/summary.md").read_text()
    assert "cpu profile (s)" in text and "wall by phase (s)" in text

def test_models_load_in_mace_calculator(finished_campaign):
    from mace.calculators import MACECalculator

    run, summary = finished_campaign
    atoms = _cluster()
    atoms.calc = MACECalculator(model_paths=str(run / "models/best.model"), device="cpu", default_dtype="float64")
    assert np.isfinite(atoms.get_forces()).all()
    test = summary["test"]
    assert test["size"] == 6  # 3 frames at each of the AL temperature and 1.4 times it
    assert np.isfinite(test["all"]["final"]["force_mae"])


def test_idg_with_a_foundation_model_file_stops_at_desired_accuracy(tmp_path, finished_campaign, parsl_executor):
    """The previous campaign's model stands in for MACE-MP-0: it drives the MD, workers label."""
    run, _ = finished_campaign
    config = tiny_config(
        tmp_path,
        idg={"sampler": "foundation", "foundation_model": str(run / "models/best.model"),
             "desired_acc": 10.0, "desired_acc_scale": 1.0},
    )
    summary = run_campaign(config_from_dict(config), phases=("idg",), executor=parsl_executor)
    events = read_events(tmp_path / "run/logs/events.jsonl")
    end = next(e for e in events if e["event"] == "phase_end" and e["phase"] == "idg")
    assert end["reason"] == "desired_acc" and end["epochs"] == 3  # one round was enough
    submitted = [e for e in events if e["event"] == "label_submitted" and e.get("phase") == "idg"]
    assert len(submitted) >= 6 and summary["labels"]["idg"] == len(DatasetStore.open(tmp_path / "run/data/dataset.h5"))
    assert json.loads((tmp_path / "run/state/phases.json").read_text())["done"] == ["idg"]


@pytest.mark.parametrize(("idg", "reason"), [
    ({"max_set_size": 8, "max_epochs": 100}, "max_set_size"),
    ({"max_set_size": 100, "max_epochs": 6}, "max_epochs"),
])
def test_idg_stop_criteria(tmp_path, parsl_executor, idg, reason):
    run_campaign(config_from_dict(tiny_config(tmp_path, idg=idg)), phases=("idg",), executor=parsl_executor)
    events = read_events(tmp_path / "run/logs/events.jsonl")
    end = next(e for e in events if e["event"] == "phase_end" and e["phase"] == "idg")
    assert end["reason"] == reason
    store = DatasetStore.open(tmp_path / "run/data/dataset.h5")
    if reason == "max_set_size":
        assert len(store) == 8
    else:
        assert end["epochs"] == 6 and len(store) < 100


def test_analysis_points_are_stored_apart_and_match_their_events(finished_campaign):
    run, summary = finished_campaign
    store = DatasetStore.open(run / "data/dataset.h5")
    analysis = store.frames(origin="analysis")
    assert analysis and {f.split for f in analysis} == {"analysis"}
    assert all(f.md_step % 4 == 0 for f in analysis)
    points = [e for e in read_events(run / "logs/events.jsonl") if e["event"] == "analysis_point"]
    own = {(p["trajectory"], p["step"]) for p in points if p["source"] == "analysis"}
    assert own == {(f.trajectory, f.md_step) for f in analysis}
    assert all(p["true_error"] > 0 and p["delta"] > 0 for p in points)
    assert summary["al"]["analysis_points"] == len(points)
    assert len(read(run / "data/analysis.xyz", ":")) == len(analysis)
    assert store.counts()["split"]["train"] == summary["splits"]["train"]  # analysis frames never train
    deltas = [p["delta"] for p in points]
    errors = [p["true_error"] for p in points]
    assert summary["analysis"]["points"] == len(points)
    assert summary["analysis"]["pearson_r"] == pytest.approx(np.corrcoef(deltas, errors)[0, 1])
    assert f"analysis   {len(points)} ground-truth points" in (run / "report/summary.md").read_text()
