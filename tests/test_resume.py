"""Stop a tiny campaign in the middle of active learning, resume it, check nothing is lost or doubled;
stop one in the middle of convergence, resume it, check it converges the member AL found best."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from campaign_helpers import tiny_config
from state_helpers import assert_same_state

from aimspax_like.campaign import run_campaign
from aimspax_like.cli import main
from aimspax_like.committee import Committee, committee_state_file
from aimspax_like.config import config_from_dict
from aimspax_like.context import RunPaths
from aimspax_like.data import DatasetStore
from aimspax_like.errors import CampaignInterrupted
from aimspax_like.events import read_events
from aimspax_like.state import AL_CHECKPOINT, load_checkpoint, save_checkpoint


def _keys(run: Path) -> list[tuple]:
    return DatasetStore(run / "data/dataset.h5").keys()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, parsl_executor):
    """A campaign stopped by a (simulated) SIGTERM once 3 AL frames are stored."""
    tmp_path = tmp_path_factory.mktemp("resume")
    raw = tiny_config(tmp_path, test_set={"size": 0})
    config = config_from_dict(raw)
    run = tmp_path / "run"

    def sigterm_after_three_al_labels() -> int:
        keys = _keys(run) if (run / "data/dataset.h5").exists() else []
        return signal.SIGTERM if sum(k[0] == "al" for k in keys) >= 3 else 0

    with pytest.raises(CampaignInterrupted) as stopped:
        run_campaign(config, executor=parsl_executor, should_stop=sigterm_after_three_al_labels)
    (tmp_path / "campaign.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path, run, stopped.value, _keys(run)


def test_interrupt_leaves_a_checkpoint(interrupted):
    _, run, stopped, keys = interrupted
    assert stopped.signum == signal.SIGTERM
    assert json.loads((run / "state/phases.json").read_text())["done"] == ["idg"]
    state = load_checkpoint(run / "state" / AL_CHECKPOINT)
    assert state["phase"] == "al" and state["event"] == "interrupted"
    al = state["al"]
    assert len(al["trajectories"]) == 3 and al["committee"]["trainer"]["members"]
    assert sum(t["labels_done"] for t in al["trajectories"]) == sum(k[0] == "al" for k in keys)
    assert al["next_label"] >= 3 and al["threshold"]["n_seen"] > 0


def test_changed_config_is_refused_naming_the_key(interrupted, capsys):
    tmp_path, run, _, keys = interrupted
    raw = yaml.safe_load((tmp_path / "campaign.yaml").read_text())
    raw["al"]["window"] = 50
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    assert main(["run", str(changed), "--resume", "--quiet"]) == 2
    assert "al.window" in capsys.readouterr().err
    assert _keys(run) == keys  # nothing touched


def test_resume_finishes_without_losing_or_doubling_frames(interrupted, parsl_executor):
    tmp_path, run, _, before = interrupted
    raw = yaml.safe_load((tmp_path / "campaign.yaml").read_text())
    raw["al"]["max_md_steps"] = 400  # a budget may grow on resume
    summary = run_campaign(config_from_dict(raw), executor=parsl_executor, resume=True)
    after = _keys(run)
    assert after[: len(before)] == before and len(set(after)) == len(after)
    assert summary["al"]["reason"] == "max_train_set_size"
    assert summary["al"]["labels_done"] == sum(k[0] == "al" for k in after)
    assert json.loads((run / "state/phases.json").read_text())["done"] == ["idg", "al", "converge"]
    events = read_events(run / "logs/events.jsonl")
    assert [e["event"] for e in events].count("phase_resume") == 1
    assert sum(e["event"] == "frame_stored" for e in events) == len(after)
    again = run_campaign(config_from_dict(raw), executor=parsl_executor, resume=True)
    assert again == {"already_finished": True, "directory": str(run)}


@pytest.fixture(scope="module")
def stopped_in_convergence(tmp_path_factory, parsl_executor):
    """A campaign stopped (as by SIGTERM) in convergence: the stop is seen when epoch 2 reports.

    Serial AL keeps the campaign deterministic; with the tiny config's seed member 1, not member 0,
    ends AL best, so a resume that lost the validation history (and so falls back to member 0)
    converges the wrong member.
    """
    tmp_path = tmp_path_factory.mktemp("converge_resume")
    config = config_from_dict(tiny_config(tmp_path, test_set={"size": 0}, al={"mode": "serial"}))
    converging: list[dict] = []

    def note(status: dict) -> None:
        if status.get("phase") == "converge":
            converging.append(status)

    with pytest.raises(CampaignInterrupted):
        run_campaign(config, executor=parsl_executor, on_progress=note,
                     should_stop=lambda: signal.SIGTERM if converging else 0)
    assert len(converging) == 1  # stopped in the middle of convergence, not before or after it
    return config, tmp_path / "run"


def _converge_starts(run: Path) -> list[list[int]]:
    events = read_events(run / "logs/events.jsonl")
    return [e["members"] for e in events if e["event"] == "phase_start" and e["phase"] == "converge"]


def test_saved_members_come_back_with_the_state_al_left_them_in(stopped_in_convergence):
    """An uninterrupted convergence starts from the committee as AL left it (the AL checkpoint's
    last write); the committee rebuilt from the member files must be that committee: the same
    validation history (hence best member), optimisers, EMAs and generators."""
    config, run = stopped_in_convergence
    al_end = load_checkpoint(run / "state" / AL_CHECKPOINT)
    assert al_end["event"] == "stopped"
    chosen = _converge_starts(run)[0]  # best_member() of the in-memory committee at the end of AL
    frames = DatasetStore(run / "data/dataset.h5").frames()
    committee = Committee.from_files(config, RunPaths(run).member_models(), frames)
    assert all(m is not None for m in committee.trainer.last_metrics)  # the validation history is back
    assert [committee.best_member()] == chosen
    assert_same_state(committee.trainer.state_dict(), al_end["al"]["committee"]["trainer"], "trainer")
    assert committee.valid_force_mae() == pytest.approx(
        sum(m["valid_force_mae"] for m in al_end["al"]["committee"]["last_metrics"]) / committee.n_members)


def test_a_state_file_saved_with_other_weights_is_ignored(stopped_in_convergence, tmp_path):
    """A kill between writing the members and state/committee.pt leaves a state file of older
    weights: loading it would silently swap the members' weights, so the trainer starts fresh."""
    config, run = stopped_in_convergence
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("labels", "logs"))
    state = load_checkpoint(copy / "state/committee.pt")
    model = state["committee"]["trainer"]["members"][1]["model"]
    name = next(k for k, v in model.items() if v.is_floating_point() and v.numel())
    model[name] = model[name] + 1.0
    save_checkpoint(copy / "state/committee.pt", {"committee": state["committee"]})
    committee = Committee.from_files(config, RunPaths(copy).member_models(), [])
    assert committee.trainer.last_metrics == [None, None] and committee.last_metrics == []


def test_member_files_outside_a_run_directory_get_no_state_file(tmp_path):
    (tmp_path / "models").mkdir()
    assert committee_state_file(tmp_path / "models") is None  # no campaign.yaml: no run directory
    (tmp_path / "campaign.yaml").write_text("{}")
    assert committee_state_file(tmp_path / "models") == tmp_path / "state/committee.pt"
    assert committee_state_file(tmp_path / "elsewhere") is None


def test_resumed_convergence_trains_the_member_al_found_best(stopped_in_convergence, parsl_executor):
    config, run = stopped_in_convergence
    summary = run_campaign(config, executor=parsl_executor, resume=True)
    before, after = _converge_starts(run)
    assert after == before and summary["best_member"] == before[0]
    events = read_events(run / "logs/events.jsonl")
    assert not [e for e in events if e["event"] == "warning" and e.get("key") == "converge.members"]
    assert json.loads((run / "state/phases.json").read_text())["done"] == ["idg", "al", "converge"]


def test_resume_of_a_missing_run_directory_is_an_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "aimspax_like.cli", "resume", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "not a run directory" in result.stderr


def test_damaged_checkpoint_is_refused_before_anything_starts(tmp_path, capsys):
    raw = tiny_config(tmp_path)
    config = config_from_dict(raw)
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    (run / "campaign.yaml").write_text(config.resolved_yaml())
    DatasetStore.create(run / "data/dataset.h5")
    (run / "state" / AL_CHECKPOINT).write_bytes(b"PK\x03\x04 truncated")
    assert main(["resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "al_checkpoint.pt: unreadable checkpoint" in err
    assert not (run / "parsl").exists()  # no worker was started


@pytest.mark.slow
def test_sigterm_saves_and_exits_143_then_resume_finishes(tmp_path):
    import time

    raw = tiny_config(tmp_path, test_set={"size": 0}, al={"max_md_steps": 2000, "max_train_set_size": 30})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "aimspax_like.cli", "run", str(tmp_path / "c.yaml"), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "run/state" / AL_CHECKPOINT
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert "SIGTERM" in err and "resume" in err
    # Between steps the scheduler saves an 'interrupted' checkpoint. A signal in the middle of a
    # training round stops inside the epoch instead, and the checkpoint stays the last consistent
    # one (after the previous round or label: half-trained weights are never saved).
    assert load_checkpoint(checkpoint)["event"] in ("interrupted", "training", "label", "submitted")
    done = subprocess.run([sys.executable, "-m", "aimspax_like.cli", "resume", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped by max_train_set_size" in done.stdout
