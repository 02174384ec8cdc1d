"""Substructure labelling in a campaign (``al.substructures``): pieces labelled, stored, trained on.

A 108-atom periodic Cu cell is far too small to need it, but large enough to carve: AL frames
of at least ``min_atoms`` are labelled as pieces around their most uncertain atoms, which must
arrive in the dataset with their core masks and parent indices, train the committee, resume
from a checkpoint with pieces in flight, and export apart from the whole frames.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write
from campaign_helpers import tiny_config

from aimspax_like.campaign import run_campaign
from aimspax_like.config import config_from_dict
from aimspax_like.data import DatasetStore
from aimspax_like.events import read_events

SUBSTRUCTURES = {"enabled": True, "min_atoms": 50, "core_radius": 1.0, "buffer": 3.0, "box": "vacuum",
                 "max_per_frame": 2}


def _cu108(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    atoms.positions += np.random.default_rng(5).normal(scale=0.05, size=atoms.positions.shape)
    write(tmp_path / "cu108.xyz", atoms)
    return tmp_path / "cu108.xyz"


def _config(tmp_path, **al):
    raw = tiny_config(tmp_path, al={"num_trajectories": 2, "max_train_set_size": 14, "max_md_steps": 200,
                                    "substructures": SUBSTRUCTURES, "md": {"temperature_K": 600}, **al},
                      idg={"points_per_member": 2, "max_set_size": 12}, converge={"enabled": False},
                      test_set={"size": 0})
    raw["system"] = {"structures": str(_cu108(tmp_path))}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, parsl_executor):
    tmp_path = tmp_path_factory.mktemp("substructures")
    summary = run_campaign(_config(tmp_path), executor=parsl_executor)
    return tmp_path / "run", summary


def test_the_dataset_holds_substructures_with_their_masks(campaign):
    run, summary = campaign
    frames = DatasetStore.open(run / "data" / "dataset.h5").frames()
    pieces = [f for f in frames if f.is_piece]
    assert pieces, "no AL frame was labelled as substructures"
    assert all(f.origin == "al" for f in pieces)
    assert not [f for f in frames if f.origin == "al" and not f.is_piece], "a 108-atom AL frame labelled whole"
    for f in pieces:
        assert len(f) < 108 and 1 <= f.force_mask.sum() < len(f)
        assert f.stress is None and not f.pbc.any()
        assert np.all((f.parent_index >= 0) & (f.parent_index < 108))
        assert len(set(f.parent_index.tolist())) == len(f)
        # The piece is the parent's atoms, so the reference's forces on it are EMT's forces on it.
        atoms = f.to_atoms()
        atoms.calc = EMT()
        assert np.allclose(atoms.get_forces(), f.forces, atol=1e-8)
    keys = DatasetStore.open(run / "data" / "dataset.h5").keys()
    assert len(keys) == len(set(keys))
    # A frame's pieces are cut back to the room left: none is paid for past the budget.
    assert sum(f.split == "train" for f in frames) <= 14
    assert summary["al"]["labels_done"] == len({(f.trajectory, f.md_step) for f in pieces})


def test_events_say_what_was_carved_and_training_used_the_pieces(campaign):
    run, _ = campaign
    events = read_events(run / "logs" / "events.jsonl")
    carved = [e for e in events if e["event"] == "substructures"]
    done = [e for e in events if e["event"] == "label_done" and e.get("phase") == "al"]
    assert carved and all(len(e["pieces"]) == len(e["core"]) <= 2 for e in carved)
    assert sum(len(e["pieces"]) for e in carved) >= len(done) and all("piece" in e for e in done)
    rounds = [e for e in events if e["event"] == "training_round" and e.get("phase") == "al"]
    assert rounds and rounds[-1]["train_size"] > rounds[0]["train_size"] - 1


def test_export_keeps_substructures_apart_with_their_masks(campaign, tmp_path):
    from aimspax_like.cli import main

    run, _ = campaign
    assert main(["export", str(run), "--out", str(tmp_path / "export"), "--no-lammps", "--model", "members"]) == 0
    pieces = read(tmp_path / "export" / "substructures.xyz", ":")
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["substructures"] == len(pieces) and "substructures.xyz" in [f["path"] for f in manifest["files"]]
    stored = [f for f in DatasetStore.open(run / "data" / "dataset.h5").frames() if f.is_piece]
    assert len(pieces) == len(stored)
    assert [a.arrays["force_mask"].tolist() for a in pieces] == [f.force_mask.tolist() for f in stored]
    assert all("REF_energy" not in a.info and "piece_energy" in a.info for a in pieces)
    train = read(tmp_path / "export" / "train.xyz", ":")
    assert all(len(a) == 108 for a in train)


def test_a_campaign_stopped_between_the_pieces_of_a_frame_resumes_without_losing_or_doubling_one(
        tmp_path, parsl_executor):
    """One label worker and a delay per label: the second piece of a frame is still running when
    the first is stored, and the stop comes then."""
    import signal

    from aimspax_like.errors import CampaignInterrupted
    from aimspax_like.execution.threads import ThreadLabelExecutor
    from aimspax_like.state import AL_CHECKPOINT, load_checkpoint

    raw_config = _config(tmp_path).model_dump(mode="json")
    raw_config["faults"] = {"delay_s": 0.3}
    raw_config["al"]["num_trajectories"] = 1
    config = config_from_dict(raw_config)
    run = tmp_path / "run"

    def keys() -> list[tuple]:
        return DatasetStore(run / "data" / "dataset.h5").keys() if (run / "data" / "dataset.h5").exists() else []

    def after_the_first_piece() -> int:
        return signal.SIGTERM if any(k[0] == "al" and k[3] >= 0 for k in keys()) else 0

    with ThreadLabelExecutor(max_workers=1) as one_worker, pytest.raises(CampaignInterrupted):
        run_campaign(config, executor=one_worker, should_stop=after_the_first_piece)
    before = keys()
    state = load_checkpoint(run / "state" / AL_CHECKPOINT)["al"]
    in_flight = [label["provenance"] for label in state["in_flight"]]
    assert in_flight and all(p.get("piece", -1) >= 0 for p in in_flight)
    groups = state["piece_groups"]  # a frame whose pieces are not all back is remembered whole
    assert groups and all(len(g["parent"]["numbers"]) == 108 and g["stored"] == 1 and g["left"] >= 1
                          for g in groups)

    summary = run_campaign(config, executor=parsl_executor, resume=True)
    after = keys()
    assert after[: len(before)] == before and len(set(after)) == len(after)
    pieces = [k for k in after if k[0] == "al"]
    assert all(k[3] >= 0 for k in pieces)
    assert summary["al"]["labels_done"] == len({k[1:3] for k in pieces})
