"""``al.train_set_counts``: what ``al.max_train_set_size`` counts (shared set, or aims-PAX's per member).

aims-PAX counts a member's own IDG training frames plus the shared AL ones; this project's
``shared`` rule counts the whole shared training set, IDG frames of every member included. The
same budget number therefore stops AL at very different points, which is what these tests pin.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from campaign_helpers import tiny_config

from aimspax_like.al import _budget
from aimspax_like.campaign import run_campaign
from aimspax_like.config import ALConfig, config_from_dict
from aimspax_like.data import DatasetStore, LabelledFrame
from aimspax_like.events import read_events
from aimspax_like.state import SAFE_TO_CHANGE


def _frame(split: str, member: int, origin: str = "idg") -> LabelledFrame:
    return LabelledFrame(numbers=[29], positions=np.zeros((1, 3)), cell=np.zeros((3, 3)), pbc=False,
                         energy=0.0, forces=np.zeros((1, 3)), stress=None, split=split, origin=origin,
                         member=member)


def _ctx(rule: str, frames: list[LabelledFrame]) -> SimpleNamespace:
    counts = {"train": sum(f.split == "train" for f in frames)}
    return SimpleNamespace(config=SimpleNamespace(al=ALConfig(train_set_counts=rule)),
                           train_size=lambda: counts["train"], counts=counts)


def test_per_member_counts_the_largest_members_own_frames_plus_the_shared_ones():
    # Member 0 holds 3 IDG training frames, member 1 holds 2; one shared AL training frame;
    # validation frames never count.
    frames = [_frame("train", 0), _frame("train", 0), _frame("train", 0), _frame("train", 1),
              _frame("train", 1), _frame("valid", -1), _frame("train", -1, "al")]
    shared, words = _budget(_ctx("shared", frames), frames)
    assert shared() == 6 and words == "the shared training set"
    ctx = _ctx("per_member", frames)
    per_member, words = _budget(ctx, frames)
    assert per_member() == 3 + 1 and words == "the largest member's training set"
    ctx.counts["train"] += 2  # two more shared AL training frames: every member's count grows by 2
    assert per_member() == 6


def test_train_set_counts_is_a_budget_a_resume_may_change():
    assert "al.train_set_counts" in SAFE_TO_CHANGE
    assert ALConfig().train_set_counts == "shared"
    with pytest.raises(ValueError, match="train_set_counts"):
        ALConfig(train_set_counts="per-member")


def test_a_campaign_counted_per_member_stops_where_aims_pax_would(tmp_path, parsl_executor):
    """IDG gives each of 2 members 6 own training frames (12 in all); a budget of 18 per member
    leaves 12 shared AL training frames, where the shared rule would leave only 6."""
    raw = tiny_config(tmp_path, al={"train_set_counts": "per_member"}, converge={"enabled": False},
                      test_set={"size": 0})
    summary = run_campaign(config_from_dict(raw), executor=parsl_executor)
    assert summary["al"]["reason"] == "max_train_set_size"
    frames = DatasetStore.open(tmp_path / "run" / "data" / "dataset.h5").frames()
    own = [sum(f.member == k and f.split == "train" for f in frames) for k in (0, 1)]
    al_train = sum(f.origin == "al" and f.split == "train" for f in frames)
    assert own == [6, 6]
    assert max(own) + al_train == 18  # the largest member's training set is exactly the budget
    withheld = [e for e in read_events(tmp_path / "run" / "logs" / "events.jsonl") if e["event"] == "label_withheld"]
    assert all(e["budget_size"] == e["train_size"] - 6 for e in withheld)


def test_the_warning_names_the_count_it_used(tmp_path, parsl_executor):
    """A per-member budget already spent by IDG: AL labels nothing, and the warning says which count."""
    raw = tiny_config(tmp_path, al={"train_set_counts": "per_member", "max_train_set_size": 5},
                      converge={"enabled": False}, test_set={"size": 0})
    summary = run_campaign(config_from_dict(raw), executor=parsl_executor)
    assert summary["al"]["labels_done"] == 0
    warnings = [e for e in read_events(tmp_path / "run" / "logs" / "events.jsonl")
                if e["event"] == "warning" and e["key"] == "al.max_train_set_size"]
    assert len(warnings) == 1
    assert "the largest member's training set already holds 6 frames" in warnings[0]["message"]
    assert "al.train_set_counts: per_member" in warnings[0]["message"]
