"""Stop a tiny campaign in the middle of active learning, resume it, check nothing is lost or doubled."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from campaign_helpers import tiny_config

from aimspax_like.campaign import run_campaign
from aimspax_like.cli import main
from aimspax_like.config import config_from_dict
from aimspax_like.data import DatasetStore
from aimspax_like.events import read_events
from aimspax_like.state import AL_CHECKPOINT, CampaignInterrupted, load_checkpoint


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
    assert len(al["trajectories"]) == 3 and al["trainer"]["members"]
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
    assert load_checkpoint(checkpoint)["event"] == "interrupted"
    done = subprocess.run([sys.executable, "-m", "aimspax_like.cli", "resume", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stopped by max_train_set_size" in done.stdout
