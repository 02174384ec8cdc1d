"""Bounded active-learning rounds: new points plus a replay sample, a full pass every K rounds."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from ase import Atoms
from campaign_helpers import tiny_cluster, tiny_config

from aimspax_like.config import RoundsConfig, config_from_dict
from aimspax_like.data import DatasetStore
from aimspax_like.training_rounds import RoundPlanner, member_force_errors


def frames(n: int, start: int = 0) -> list[Atoms]:
    out = []
    for k in range(start, start + n):
        atoms = tiny_cluster()
        atoms.positions[0, 0] += 0.001 * k  # distinct content, hence distinct keys
        atoms.info["REF_energy"] = -1.0
        atoms.arrays["REF_forces"] = np.full((len(atoms), 3), 0.01 * k)
        out.append(atoms)
    return out


def replay(size: int = 4, every: int = 3, weighting: str = "uniform") -> RoundsConfig:
    return RoundsConfig(mode="replay", replay_size=size, full_every=every, replay_weighting=weighting)


def test_a_round_trains_the_new_points_and_a_replay_sample_of_the_rest() -> None:
    old = frames(20)
    planner = RoundPlanner(replay(size=4, every=3), epochs_per_point=2, seed=0)
    planner.know([old])
    member = [[*old, *frames(2, start=100)]]
    plan = planner.plan(member)
    assert not plan.full and plan.sizes() == [6]
    chosen = plan.indices[0]
    assert {20, 21} <= set(chosen) and len(set(chosen)) == 6 and all(0 <= i < 22 for i in chosen)
    planner.trained(member, plan, epochs=1)
    second = planner.plan(member)  # one epoch of two: the points are still new
    assert {20, 21} <= set(second.indices[0]) and second.sizes() == [6]
    planner.trained(member, second, epochs=1)
    assert planner.plan(member).full  # the third round is a full pass
    planner.trained(member, planner.plan(member), epochs=1)
    fourth = planner.plan(member)
    assert not fourth.full and fourth.sizes() == [4]  # both points had their two epochs: replay only
    assert not planner.is_new(member[0][21])


def test_the_replay_sample_is_drawn_afresh_and_reproducibly() -> None:
    old = frames(30)
    plans = []
    for _ in range(2):
        planner = RoundPlanner(replay(size=5, every=100), epochs_per_point=1, seed=7)
        planner.know([old])
        rounds = []
        for _ in range(4):
            plan = planner.plan([old])
            rounds.append(plan.indices[0])
            planner.trained([old], plan, epochs=1)
        plans.append(rounds)
    assert plans[0] == plans[1]  # same seed, same rounds
    assert len({tuple(r) for r in plans[0]}) == 4  # a new sample every round
    other = RoundPlanner(replay(size=5, every=100), epochs_per_point=1, seed=8)
    other.know([old])
    assert other.plan([old]).indices[0] != plans[0][0]


def test_members_replay_their_own_frames() -> None:
    a, b, shared = frames(10), frames(10, start=50), frames(1, start=200)
    planner = RoundPlanner(replay(size=3, every=100), epochs_per_point=1, seed=0)
    planner.know([a, b])
    member_train = [[*a, *shared], [*b, *shared]]
    plan = planner.plan(member_train)
    assert plan.sizes() == [4, 4]
    assert 10 in plan.indices[0] and 10 in plan.indices[1]
    assert plan.indices[0] != plan.indices[1]  # each member draws its own sample


def test_a_planner_that_resumes_plans_the_same_next_round() -> None:
    old, new = frames(25), frames(1, start=300)
    planner = RoundPlanner(replay(size=6, every=4), epochs_per_point=2, seed=3)
    planner.know([old])
    member = [[*old, *new]]
    planner.trained(member, planner.plan(member), epochs=1)  # the point has one epoch of two
    state = planner.state_dict()
    resumed = RoundPlanner(replay(size=6, every=4), epochs_per_point=2, seed=3)
    resumed.load_state_dict(state)
    assert resumed.plan(member) == planner.plan(member)
    # A list rebuilt in another order (a resume reads the dataset in storage order): same frames.
    shuffled = [[member[0][i] for i in np.random.default_rng(0).permutation(26)]]
    picked = {id(shuffled[0][i]) for i in resumed.plan(shuffled).indices[0]}
    assert {id(a) for a in new} <= picked


def test_error_weighting_replays_the_frames_the_member_gets_wrong() -> None:
    old = frames(40)
    planner = RoundPlanner(replay(size=4, every=1000, weighting="error"), epochs_per_point=1, seed=0)
    planner.know([old])
    errors = [0.01] * 40
    errors[13] = errors[27] = 5.0  # two frames the member gets badly wrong
    planner.record_errors(0, old, errors)
    hits = np.zeros(40)
    for _ in range(200):
        plan = planner.plan([old])
        hits[plan.indices[0]] += 1
        planner.trained([old], plan, epochs=1)
    # Half of every probability is uniform: each hard frame is drawn with p >= 0.5, an easy one ~0.05.
    assert hits[13] > 100 and hits[27] > 100
    assert np.delete(hits, [13, 27]).max() < 40
    uniform = RoundPlanner(replay(size=4, every=1000), epochs_per_point=1, seed=0)
    uniform.know([old])
    uniform.record_errors(0, old, errors)  # ignored without error weighting
    counts = np.zeros(40)
    for _ in range(200):
        plan = uniform.plan([old])
        counts[plan.indices[0]] += 1
        uniform.trained([old], plan, epochs=1)
    assert counts[13] < 50 and counts[27] < 50


def test_member_force_errors_are_per_frame_rmse() -> None:
    sample = frames(3)
    offsets = [0.0, 0.1, 0.3]

    def predict(part):
        return np.concatenate([a.arrays["REF_forces"] + offsets[sample.index(a)] for a in part])

    errors = member_force_errors(predict, sample, chunk=2)
    assert errors == pytest.approx(offsets)


def test_the_committee_trains_bounded_rounds_and_measures_errors_on_full_passes(tmp_path) -> None:
    from aimspax_like.committee import Committee
    from aimspax_like.data import LabelledFrame

    config = config_from_dict(tiny_config(tmp_path))
    atoms = tiny_cluster()
    rng = np.random.default_rng(0)

    def labelled(k: int, split: str, origin: str, member: int = -1) -> LabelledFrame:
        moved = atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape)
        return LabelledFrame(numbers=atoms.numbers, positions=moved, cell=np.zeros((3, 3)), pbc=np.zeros(3, bool),
                             energy=-1.0 - 0.01 * k, forces=rng.normal(scale=0.1, size=(6, 3)), stress=None,
                             split=split, origin=origin, md_step=k, member=member)

    idg = [labelled(k, "valid" if k % 5 == 0 else "train", "idg", member=k % 2) for k in range(26)]
    committee = Committee.from_data(config, idg, sorted(set(atoms.numbers)))
    sizes = [len(t) for t in committee.member_train]
    committee.bound_rounds(replay(size=3, every=2, weighting="error"), epochs_per_point=1, seed=0)
    committee.add(labelled(100, "train", "al"))
    committee.train_round(1)
    assert committee.last_round == {"full_pass": False, "round_frames": [4, 4]}
    assert [m.epoch for m in committee.last_metrics] == [1, 1]
    assert not committee.planner.errors
    committee.train_round(1)
    assert committee.last_round == {"full_pass": True, "round_frames": [s + 1 for s in sizes]}
    assert [len(e) for e in committee.planner.errors] == [s + 1 for s in sizes]
    assert all(np.isfinite(list(e.values())).all() for e in committee.planner.errors)
    state = committee.state_dict()
    again = Committee.from_data(config, [*idg, labelled(100, "train", "al")], sorted(set(atoms.numbers)))
    again.bound_rounds(replay(size=3, every=2, weighting="error"), epochs_per_point=1, seed=0)
    again.load_state_dict(state)
    assert again.planner.state_dict() == committee.planner.state_dict()


def test_a_campaign_with_bounded_rounds_trains_new_points_plus_replay(finished_campaign) -> None:
    """The shared tiny campaign runs AL with replay 3 and a full pass every third round."""
    from aimspax_like.events import read_events

    run_dir, _ = finished_campaign
    events = read_events(run_dir / "logs/events.jsonl")
    rounds = [e for e in events if e["event"] == "training_round" and e["phase"] == "al"]
    assert len(rounds) >= 3
    assert [r["full_pass"] for r in rounds] == [(i + 1) % 3 == 0 for i in range(len(rounds))]
    for r in rounds:
        assert len(r["round_frames"]) == 2 and all(n >= 1 for n in r["round_frames"])
        if not r["full_pass"]:
            # new points (at most the trajectories' labels of two epochs) plus three replayed frames
            assert all(n <= 3 + 2 * 3 for n in r["round_frames"])
    # A full pass trains each member on all its frames: its IDG subset plus every AL training frame
    # stored before the round.
    idg = Counter(f.member for f in DatasetStore.open(run_dir / "data/dataset.h5").frames()
                  if f.origin == "idg" and f.split == "train")
    for r in rounds:
        if r["full_pass"]:
            al_train = r["train_size"] - sum(idg.values())
            assert r["round_frames"] == [idg[k] + al_train for k in range(2)], (r, idg)
    assert any(r["full_pass"] for r in rounds)


def test_a_resumed_campaign_may_switch_its_rounds(tmp_path) -> None:
    """A profile showing the AL phase going to training is a reason to switch to replay mid-run:
    the rounds change how later rounds train, never what was computed, so a resume accepts it."""
    import yaml

    from aimspax_like.committee import Committee
    from aimspax_like.data import LabelledFrame
    from aimspax_like.state import unsafe_changes

    full = config_from_dict(tiny_config(tmp_path))
    replayed = config_from_dict(tiny_config(tmp_path, al={"rounds": {"mode": "replay", "replay_size": 2}}))
    dump = [yaml.safe_dump(c.model_dump(mode="json")) for c in (full, replayed)]
    assert unsafe_changes(*dump) == []
    # A committee state saved under full rounds has no planner memory: the frames it held count
    # as trained, and only frames added afterwards are new.
    atoms = tiny_cluster()
    frames = [LabelledFrame.from_atoms(atoms, energy=-1.0 - 0.01 * k, forces=[[0.01 * k, 0, 0]] * 6,
                                       split="valid" if k % 4 == 0 else "train", origin="idg", md_step=k)
              for k in range(9)]
    saved = Committee.from_data(full, frames, sorted(set(atoms.numbers))).state_dict()
    assert "rounds" not in saved
    committee = Committee.from_data(replayed, frames, sorted(set(atoms.numbers)))
    committee.bound_rounds(replayed.al.rounds, epochs_per_point=1, seed=0)
    committee.load_state_dict(saved)
    assert not any(committee.planner.is_new(a) for a in committee.member_train[0])
    assert committee.planner.plan(committee.member_train).sizes() == [2, 2]
