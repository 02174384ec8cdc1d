"""The AL state machine with real EMT labels and a committee whose disagreement the test controls.

The committee here is a stand-in for the MACE ensemble: its mean forces are EMT's (so the MD is
physical) and each member adds a fixed, member-specific perturbation scaled by ``spread``. That
lets a test decide when frames are uncertain; everything else (labels, failures, threads) is real.
"""

from __future__ import annotations

import signal
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from log_helpers import open_event_log
from state_helpers import assert_same_state

from aimspax_like.analysis.timeline import label_overlap
from aimspax_like.config import ALConfig, MDConfig
from aimspax_like.data import LabelledFrame
from aimspax_like.errors import CampaignInterrupted
from aimspax_like.events import read_events
from aimspax_like.execution import ThreadLabelExecutor
from aimspax_like.reference.results import FailureKind, LabelFailure, LabelResult
from aimspax_like.scheduler import ALScheduler, Status
from aimspax_like.state import Checkpointer, load_checkpoint

EMT_SPEC = {"kind": "emt", "compute_stress": False, "timeout_s": None, "keep_workdir": False}


class SpreadCommittee:
    """EMT forces plus member perturbations whose size is drawn per call (rarely large)."""

    def __init__(self, n_members: int = 3, seed: int = 0) -> None:
        self.n_members = n_members
        self.rng = np.random.default_rng(seed)
        self.frames: list[LabelledFrame] = []
        self.rounds = 0

    def committee_forces(self, structures):
        out = []
        for atoms in structures:
            probe = atoms.copy()
            probe.calc = EMT()
            forces = probe.get_forces()
            # Mostly confident, now and then (5 %) a frame the members disagree on.
            spread = 0.5 if self.rng.random() < 0.05 else self.rng.uniform(0.04, 0.06)
            noise = self.rng.normal(size=(self.n_members, len(atoms), 3)) * spread
            out.append(forces[None] + noise - noise.mean(axis=0, keepdims=True))
        return out

    def add(self, frame):
        self.frames.append(frame)

    def train_round(self, epochs):
        self.rounds += 1
        return []

    def valid_force_mae(self):
        return float("inf")

    def state_dict(self):
        return {"rounds": self.rounds, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rounds = state["rounds"]
        self.rng.bit_generator.state = state["rng"]


def _cluster(seed: int):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=seed)
    atoms.pbc = True
    return atoms


def _make(tmp_path, config: ALConfig, faults=None, committee=None, workers=2, executor=None, should_stop=None):
    events = open_event_log(tmp_path / "events.jsonl")
    stored: list[LabelledFrame] = []

    def sink(atoms, result, provenance):
        frame = LabelledFrame.from_atoms(atoms, result.energy, result.forces, split="train", **provenance)
        stored.append(frame)
        return frame

    executor = executor or ThreadLabelExecutor(max_workers=workers)
    scheduler = ALScheduler(
        config,
        committee or SpreadCommittee(),
        executor,
        sink,
        events,
        EMT_SPEC,
        tmp_path / "labels",
        train_set_size=lambda: len(stored),
        faults=faults,
        seed=1,
        should_stop=should_stop,
    )
    return scheduler, executor, events, stored


def _states(events_path, trajectory):
    return [
        (e["old"], e["new"])
        for e in read_events(events_path)
        if e["event"] == "state" and e["trajectory"] == trajectory
    ]


def test_running_waiting_training_running(tmp_path):
    config = ALConfig(
        num_trajectories=1,
        check_every=2,
        warmup=3,
        max_train_set_size=2,
        intermediate_epochs=1,
        max_epochs_per_point=2,
        max_md_steps=400,
        md=MDConfig(temperature_K=300),
    )
    scheduler, executor, _, stored = _make(tmp_path, config)
    scheduler.add_trajectory(_cluster(0))
    with executor:
        result = scheduler.run()
    assert result.reason == "max_train_set_size"
    assert len(stored) == 2 and result.labels_done == 2
    transitions = _states(tmp_path / "events.jsonl", 0)
    # One full cycle per point: two epochs (two rounds of one) before running again.
    assert transitions[:3] == [("running", "waiting"), ("waiting", "training"), ("training", "running")]
    assert scheduler.committee.rounds == 2  # first point: 2 rounds; the 2nd point stops the run
    # The labelled frame carries the EMT label of exactly the geometry that was sent.
    check = stored[0].to_atoms()
    check.calc = EMT()
    np.testing.assert_allclose(check.get_forces(), stored[0].forces, atol=1e-10)


def test_failed_label_returns_trajectory_to_checkpoint(tmp_path):
    config = ALConfig(
        num_trajectories=1,
        check_every=1,
        warmup=2,
        max_train_set_size=5,
        max_md_steps=30,
        md=MDConfig(temperature_K=300),
    )
    scheduler, executor, _, stored = _make(tmp_path, config, faults={"scf_failure": 1.0})
    start = _cluster(1)
    trajectory = scheduler.add_trajectory(start)
    with executor:
        result = scheduler.run()
    assert result.reason == "max_md_steps"
    assert result.labels_done == 0 and result.labels_failed >= 1 and not stored
    log = read_events(tmp_path / "events.jsonl")
    failed = [e for e in log if e["event"] == "label_failed"]
    assert failed and all(e["kind"] == "scf_not_converged" for e in failed)
    rewinds = [e for e in log if e["event"] == "rewind"]
    assert len(rewinds) == len(failed)
    # The checkpoint geometry is still the start structure (no label ever succeeded) ...
    np.testing.assert_allclose(trajectory.checkpoint.get_positions(), start.get_positions())
    # ... and after each failure the trajectory went back to it: the step of the failure's
    # rewind is followed by the checkpoint positions (verified by a fresh rewind here).
    trajectory.md.atoms.positions += 0.3
    scheduler._rewind(trajectory)
    np.testing.assert_allclose(trajectory.md.atoms.get_positions(), start.get_positions())
    assert trajectory.status == Status.RUNNING


def test_checkpoint_is_last_successful_label(tmp_path):
    config = ALConfig(
        num_trajectories=1,
        check_every=1,
        warmup=2,
        max_train_set_size=1,
        max_md_steps=200,
        md=MDConfig(temperature_K=300),
    )
    scheduler, executor, _, stored = _make(tmp_path, config)
    trajectory = scheduler.add_trajectory(_cluster(2))
    with executor:
        scheduler.run()
    np.testing.assert_allclose(trajectory.checkpoint.get_positions(), stored[0].positions)


def _steps_during_labels(events_path):
    """MD steps taken by other trajectories while each label was in flight."""
    log = read_events(events_path)
    in_flight: dict[int, int] = {}
    overlaps = []
    for e in log:
        if e["event"] == "label_submitted":
            in_flight[e["label"]] = 0
        elif e["event"] == "uncertainty":
            for label in in_flight:
                in_flight[label] += 1
        elif e["event"] in ("label_done", "label_failed"):
            overlaps.append(in_flight.pop(e["label"]))
    return overlaps


@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_parallel_mode_keeps_other_trajectories_running(tmp_path, mode):
    config = ALConfig(
        num_trajectories=3,
        mode=mode,
        check_every=1,
        warmup=3,
        c_x=1.0,
        max_train_set_size=4,
        max_md_steps=400,
        md=MDConfig(temperature_K=300),
    )
    scheduler, executor, _, _ = _make(tmp_path, config, faults={"delay_s": 0.4})
    for seed in range(3):
        scheduler.add_trajectory(_cluster(seed))
    with executor:
        scheduler.run()
    overlaps = _steps_during_labels(tmp_path / "events.jsonl")
    assert overlaps
    # The scheduler's own count: MD steps of other trajectories between submission and return.
    returned = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] in ("label_done", "label_failed")]
    others = [e["others_md_steps"] for e in returned]
    summary = label_overlap(read_events(tmp_path / "events.jsonl"))
    assert summary["md_steps_by_others_during_labels"] == sum(others)
    if mode == "serial":
        assert max(overlaps) == 0 and max(others) == 0 and summary["labels_overlapping_sampling"] == 0
    else:
        assert max(overlaps) > 5 and max(others) > 5


def test_per_trajectory_temperatures_are_used(tmp_path):
    config = ALConfig(
        num_trajectories=2, max_md_steps=1, md=[MDConfig(temperature_K=100), MDConfig(temperature_K=900)]
    )
    scheduler, _, _, _ = _make(tmp_path, config)
    cold, hot = (scheduler.add_trajectory(_cluster(s)) for s in (0, 1))
    assert cold.md.md.temperature_K == 100 and hot.md.md.temperature_K == 900
    assert hot.md.temperature() > 3 * cold.md.temperature()


class LearningCommittee(SpreadCommittee):
    """Reports a validation error that falls below 0.05 eV/A after its second training round."""

    def valid_force_mae(self):
        return 1.0 if self.rounds < 2 else 0.04


def test_al_stops_at_desired_accuracy(tmp_path):
    config = ALConfig(num_trajectories=2, check_every=1, warmup=2, c_x=-0.5, desired_acc=0.05,
                      max_train_set_size=100, max_md_steps=2000, max_epochs_per_point=1,
                      md=MDConfig(temperature_K=300))
    scheduler, executor, _, stored = _make(tmp_path, config, committee=LearningCommittee())
    for seed in range(2):
        scheduler.add_trajectory(_cluster(seed))
    with executor:
        result = scheduler.run()
    assert result.reason == "desired_acc"
    assert scheduler.committee.rounds == 2 and len(stored) >= 2


def test_continue_policy_samples_on_while_own_labels_run(tmp_path):
    config = ALConfig(num_trajectories=1, check_every=1, warmup=3, c_x=1.0, max_train_set_size=4,
                      max_md_steps=3000, while_labelling="continue", labels_per_trajectory=2,
                      intermediate_epochs=1, max_epochs_per_point=2, md=MDConfig(temperature_K=300))
    scheduler, executor, _, stored = _make(tmp_path, config, faults={"delay_s": 0.3})
    scheduler.add_trajectory(_cluster(5))
    with executor:
        result = scheduler.run()
    log = read_events(tmp_path / "events.jsonl")
    assert not [e for e in log if e["event"] == "state" and e["new"] in ("waiting", "training")]
    # The only trajectory kept checking its own frames while its labels were in flight ...
    own_checks, open_labels = 0, set()
    for e in log:
        if e["event"] == "label_submitted":
            open_labels.add(e["label"])
        elif e["event"] in ("label_done", "label_failed"):
            open_labels.discard(e["label"])
        elif e["event"] == "uncertainty" and open_labels:
            own_checks += 1
    assert own_checks > 10
    # ... sometimes with two of them at once, and every returned point was paid two epochs.
    assert max(e["in_flight"] for e in log if e["event"] == "label_submitted") == 2
    assert result.labels_done == len(stored) >= 4
    # Epochs trained (one per round) plus epochs still owed at the stop: two per returned point.
    assert scheduler.committee.rounds + scheduler.training_debt == 2 * len(stored)


def test_several_labels_per_trajectory_need_continue():
    with pytest.raises(ValueError, match="while_labelling"):
        ALConfig(labels_per_trajectory=2)


def test_no_label_is_submitted_past_the_training_set_cap(tmp_path):
    """Six trajectories, uncertain every check, slow labels: without a stop-aware submission up
    to six labels would be in flight when the cap of 3 is reached, each a wasted reference call."""
    config = ALConfig(num_trajectories=6, check_every=1, warmup=1, c_x=0.0, max_train_set_size=3,
                      max_md_steps=400, md=MDConfig(temperature_K=300))
    committee = SpreadCommittee()
    scheduler, executor, events, stored = _make(tmp_path, config, faults={"delay_s": 0.3}, committee=committee,
                                                workers=6)
    for seed in range(6):
        scheduler.add_trajectory(_cluster(seed))
    with executor:
        result = scheduler.run()
    events.close()
    log = read_events(tmp_path / "events.jsonl")
    submitted = [e for e in log if e["event"] == "label_submitted"]
    assert result.reason == "max_train_set_size"
    assert len(stored) == len(submitted) == 3
    assert max(e["in_flight"] for e in submitted) == 3  # parallel up to the cap, not beyond
    assert any(e["event"] == "label_withheld" for e in log)


class ScriptedExecutor:
    """Answers labels at once, in the calling thread: the first crashes (and is retried), every
    third stays in flight for good, the others get their EMT label. No threads, no timing.
    With ``answer=False`` it only records what was submitted."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.submitted: list[tuple[str, np.ndarray]] = []  # (workdir, positions)

    def submit(self, atoms, spec, workdir, faults=None, seed=None):
        n = len(self.submitted)
        self.submitted.append((workdir, atoms.get_positions()))
        future: Future = Future()
        if not self.answer:
            return future
        if n == 0:
            future.set_result(LabelFailure(FailureKind.CRASHED, "scripted crash", workdir, 0.0))
        elif n % 3 != 2:
            probe = atoms.copy()
            probe.calc = EMT()
            future.set_result(LabelResult(probe.get_potential_energy(), probe.get_forces(), None, None, 0.0))
        return future


def _interrupted_scheduler(tmp_path, config):
    """A scheduler stopped (as by SIGTERM) after 40 loop iterations, and its checkpoint file."""
    calls = iter(range(10**6))

    def sigterm_after_40_iterations() -> int:
        return signal.SIGTERM if next(calls) >= 40 else 0

    scheduler, _, _, stored = _make(tmp_path / "first", config, executor=ScriptedExecutor(),
                                    should_stop=sigterm_after_40_iterations)
    for seed in range(3):
        scheduler.add_trajectory(_cluster(seed))
    path = tmp_path / "state/al_checkpoint.pt"
    scheduler.observers.append(Checkpointer(path, scheduler))
    with pytest.raises(CampaignInterrupted):
        scheduler.run()
    return scheduler, stored, path


def _fresh_scheduler(tmp_path, config):
    scheduler, executor, _, _ = _make(tmp_path / "second", config, executor=ScriptedExecutor(answer=False),
                                      committee=SpreadCommittee(seed=99))
    for seed in range(3):
        scheduler.add_trajectory(_cluster(seed))
    return scheduler, executor


ROUND_TRIP = {"num_trajectories": 3, "check_every": 1, "warmup": 1, "c_x": 0.0, "max_train_set_size": 100,
              "max_md_steps": 1000, "while_labelling": "continue", "labels_per_trajectory": 2,
              "intermediate_epochs": 1, "max_epochs_per_point": 2}


def test_checkpoint_round_trip_restores_the_scheduler(tmp_path):
    """state_dict -> checkpoint file -> load_state_dict into a fresh scheduler gives the same state:
    trajectories, threshold window, counters, retries, committee and the labels in flight."""
    config = ALConfig(**ROUND_TRIP, md=MDConfig(temperature_K=300))
    original, stored, path = _interrupted_scheduler(tmp_path, config)
    state = load_checkpoint(path)
    assert state["event"] == "interrupted"
    saved = state["al"]
    in_flight = [label["label"] for label in saved["in_flight"]]
    assert in_flight and stored and saved["attempts"] == {0: 1}  # the crashed first label was retried
    assert saved["training_rounds"] > 0 and saved["threshold"]["n_seen"] > 0

    restored, executor = _fresh_scheduler(tmp_path, config)
    counts = restored.load_state_dict(saved, lambda provenance: None)
    assert counts == {"adopted": 0, "resubmitted": len(in_flight)}
    assert_same_state(saved, restored.state_dict())  # the whole payload, committee included
    for before, after in zip(original.trajectories, restored.trajectories, strict=True):
        assert (after.md.step, after.status, after.labels_done) == (before.md.step, before.status, before.labels_done)
        np.testing.assert_array_equal(after.md.atoms.get_positions(), before.md.atoms.get_positions())
        np.testing.assert_array_equal(after.md.atoms.get_momenta(), before.md.atoms.get_momenta())
        np.testing.assert_array_equal(after.checkpoint.get_positions(), before.checkpoint.get_positions())
        assert after.md.rng.normal() == before.md.rng.normal()  # the thermostat noise continues exactly
        assert after.labels_in_flight == before.labels_in_flight
    assert restored.threshold.value == original.threshold.value
    assert (restored.training_rounds, restored.training_debt) == (original.training_rounds, original.training_debt)
    assert restored.committee.rounds == original.committee.rounds
    assert restored.committee.rng.random() == original.committee.rng.random()
    # Every label in flight went to the reference again, with its own frame and folder.
    assert sorted(restored._in_flight) == sorted(original._in_flight) == in_flight
    assert [Path(w).name for w, _ in executor.submitted] == [f"al_{k:06d}" for k in in_flight]
    for (_, positions), label in zip(executor.submitted, saved["in_flight"], strict=True):
        np.testing.assert_array_equal(positions, label["frame"]["positions"])
    # The next label continues the numbering instead of reusing an id.
    assert restored._next_label == original._next_label


def test_labels_stored_before_the_kill_are_adopted_not_resubmitted(tmp_path):
    config = ALConfig(**ROUND_TRIP, md=MDConfig(temperature_K=300))
    _, _, path = _interrupted_scheduler(tmp_path, config)
    saved = load_checkpoint(path)["al"]
    first = saved["in_flight"][0]
    restored, executor = _fresh_scheduler(tmp_path, config)
    counts = restored.load_state_dict(saved, lambda p: "train" if p == first["provenance"] else None)
    assert counts == {"adopted": 1, "resubmitted": len(saved["in_flight"]) - 1}
    assert first["label"] not in restored._in_flight and len(executor.submitted) == counts["resubmitted"]
    trajectory = restored.trajectories[first["trajectory"]]
    before = saved["trajectories"][first["trajectory"]]
    assert trajectory.labels_done == before["labels_done"] + 1
    np.testing.assert_array_equal(trajectory.checkpoint.get_positions(), first["frame"]["positions"])
    assert restored.training_debt == saved["training_debt"] + config.max_epochs_per_point  # 'continue' pays it
