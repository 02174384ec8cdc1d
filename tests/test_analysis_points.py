"""Ground-truth analysis points (``al.analysis_every``) in the AL scheduler, with real EMT labels.

The committee is a stand-in whose error the test knows exactly: every member returns EMT's
forces plus a fixed shift per member, so the committee mean is EMT + ``BIAS`` on every atom and
the true max-atom force error of every frame is ``|BIAS|``, while Eq. 1's uncertainty is the
members' constant spread.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from log_helpers import open_event_log

from aimspax_like.config import ALConfig, MDConfig
from aimspax_like.data import LabelledFrame
from aimspax_like.errors import CampaignInterrupted
from aimspax_like.events import read_events
from aimspax_like.execution import ThreadLabelExecutor
from aimspax_like.ground_truth import true_force_error
from aimspax_like.scheduler import ALScheduler
from aimspax_like.uncertainty import max_atomic_uncertainty

EMT_SPEC = {"kind": "emt", "compute_stress": False, "timeout_s": None, "keep_workdir": False}
SHIFTS = np.array([[0.30, 0.0, 0.0], [0.10, 0.0, 0.0], [-0.10, 0.0, 0.0]])  # eV/A, one per member
BIAS = SHIFTS.mean(axis=0)


class BiasedCommittee:
    def __init__(self) -> None:
        self.added: list[LabelledFrame] = []

    def committee_forces(self, structures):
        out = []
        for atoms in structures:
            probe = atoms.copy()
            probe.calc = EMT()
            out.append(probe.get_forces()[None] + SHIFTS[:, None, :])
        return out

    def add(self, frame):
        self.added.append(frame)

    def train_round(self, epochs):
        return []

    def valid_force_mae(self):
        return float("inf")


@pytest.fixture
def executor():
    with ThreadLabelExecutor(max_workers=2) as started:
        yield started


def _scheduler(tmp_path, config: ALConfig, executor, should_stop=None, delay_s: float = 0.0):
    events = open_event_log(tmp_path / "events.jsonl")
    stored: list[LabelledFrame] = []

    def sink(atoms, result, provenance):
        split = "analysis" if provenance["origin"] == "analysis" else "train"
        frame = LabelledFrame.from_atoms(atoms, result.energy, result.forces, split=split, **provenance)
        stored.append(frame)
        return frame

    committee = BiasedCommittee()
    scheduler = ALScheduler(
        config, committee, executor, sink, events, EMT_SPEC, tmp_path / "labels",
        train_set_size=lambda: sum(f.split == "train" for f in stored), seed=1, should_stop=should_stop,
        faults={"delay_s": delay_s} if delay_s else None,
    )
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    for k in range(2):
        start = atoms.copy()
        start.rattle(0.05, seed=k)
        scheduler.add_trajectory(start)
    return scheduler, events, stored, committee


def _config(**overrides) -> ALConfig:
    values = {"num_trajectories": 2, "check_every": 5, "warmup": 2, "max_md_steps": 30, "analysis_every": 10,
              "max_train_set_size": 1000, "md": MDConfig(temperature_K=300)}
    return ALConfig(**{**values, **overrides})


def test_true_force_error_is_the_largest_atom_error_norm():
    predicted = np.zeros((3, 3))
    reference = np.array([[0.0, 0.0, 0.0], [0.3, 0.4, 0.0], [0.1, 0.0, 0.0]])
    assert true_force_error(predicted, reference) == pytest.approx(0.5)


def test_analysis_points_are_labelled_every_k_steps_and_never_trained_on(tmp_path, executor):
    # The members agree on a constant spread: the threshold equals it and no frame exceeds it,
    # so AL labels nothing and every analysis point is a label of its own.
    scheduler, _events, stored, committee = _scheduler(tmp_path, _config(), executor)
    scheduler.run()
    log = read_events(tmp_path / "events.jsonl")
    points = [e for e in log if e["event"] == "analysis_point"]
    assert sorted((p["trajectory"], p["step"]) for p in points) == [(t, s) for t in (0, 1) for s in (10, 20, 30)]
    spread = max_atomic_uncertainty(SHIFTS[:, None, :] * np.ones((1, 4, 1)))
    for point in points:
        assert point["source"] == "analysis"
        assert point["true_error"] == pytest.approx(np.linalg.norm(BIAS), abs=1e-9)
        assert point["delta"] == pytest.approx(spread, rel=1e-9)
    assert [f.origin for f in stored] == ["analysis"] * 6 and {f.split for f in stored} == {"analysis"}
    assert committee.added == []  # never trained on
    assert sum(e["event"] == "label_submitted" and e["phase"] == "analysis" for e in log) == 6
    assert scheduler.analysis.points == 6 and not scheduler.analysis.in_flight


def test_an_al_label_at_an_analysis_step_answers_both(tmp_path, executor):
    # c_x = -0.5 puts the threshold at half the (constant) uncertainty: after the warm-up every
    # check sends its frame to the reference, and the analysis point rides on that AL label.
    config = _config(c_x=-0.5, mode="serial", max_md_steps=40)
    scheduler, _events, stored, committee = _scheduler(tmp_path, config, executor)
    scheduler.run()
    log = read_events(tmp_path / "events.jsonl")
    points = {(p["trajectory"], p["step"]): p for p in log if p["event"] == "analysis_point"}
    al_labels = {(e["trajectory"], e["step"]) for e in log if e["event"] == "label_submitted" and e["phase"] == "al"}
    own = {(e["trajectory"], e["step"]) for e in log if e["event"] == "label_submitted" and e["phase"] == "analysis"}
    riding = {key for key, p in points.items() if p["source"] == "al"}
    assert riding and riding <= al_labels
    assert not riding & own  # never labelled twice
    assert set(points) == riding | own
    assert all(p["true_error"] == pytest.approx(np.linalg.norm(BIAS), abs=1e-9) for p in points.values())
    assert len(committee.added) == len(al_labels)  # only AL labels train
    assert sum(f.origin == "analysis" for f in stored) == len(own)


def test_analysis_labels_in_flight_survive_a_checkpoint(tmp_path, executor):
    first = tmp_path / "first"
    stop = {"now": False}

    def should_stop():
        return signal.SIGTERM if stop["now"] else 0

    scheduler, _events, _, _ = _scheduler(first, _config(), executor, should_stop=should_stop, delay_s=1.0)
    scheduler.observers.append(lambda event: stop.update(now=bool(scheduler.analysis.in_flight)))
    with pytest.raises(CampaignInterrupted):
        scheduler.run()
    state = scheduler.state_dict()
    in_flight = state["analysis"]["in_flight"]
    assert in_flight and all(item["probe"]["mean_forces"].shape == (4, 3) for item in in_flight)

    second = tmp_path / "second"
    resumed, _events2, _stored2, _ = _scheduler(second, _config(), executor)
    counts = resumed.load_state_dict(state, is_stored=lambda provenance: None,
                                     stored_forces=lambda origin, trajectory, step: None)
    assert counts["analysis_resubmitted"] == len(in_flight)
    resumed.run()
    points = {(p["trajectory"], p["step"]) for p in read_events(second / "events.jsonl")
              if p["event"] == "analysis_point"}
    assert {(item["probe"]["trajectory"], item["probe"]["step"]) for item in in_flight} <= points
    assert resumed.analysis.next_id >= state["analysis"]["next_id"]


def test_stored_analysis_label_is_answered_from_the_dataset_on_resume(tmp_path, executor):
    scheduler, _, _, _ = _scheduler(tmp_path / "a", _config(), executor)
    frame = scheduler.trajectories[0].md.atoms.copy()
    mean = np.zeros((4, 3))
    state = {"next_id": 1, "attempts": {}, "points": 0, "riding": {},
             "in_flight": [{"label": 0, "frame": {"numbers": frame.numbers, "positions": frame.positions,
                                                  "cell": frame.cell.array, "pbc": frame.pbc},
                            "probe": {"trajectory": 0, "step": 10, "delta": 0.1, "threshold": 0.2,
                                      "mean_forces": mean, "train_size": 3}}]}
    reference = np.full((4, 3), 0.1)
    counts = scheduler.analysis.load_state_dict(state, lambda origin, t, s: reference if origin == "analysis" else None)
    assert counts == {"adopted": 1, "resubmitted": 0}
    point = next(e for e in read_events(tmp_path / "a" / "events.jsonl") if e["event"] == "analysis_point")
    assert point["true_error"] == pytest.approx(np.sqrt(3) * 0.1)
