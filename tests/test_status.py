"""The campaign status: the tracker behind the live display and ``aimspax-like status``."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from campaign_helpers import tiny_config
from rich.console import Console

from aimspax_like.analysis.status import StatusTracker, status_of
from aimspax_like.analysis.status_render import render, render_line
from aimspax_like.cli import main
from aimspax_like.data import DatasetStore
from aimspax_like.events import EventLog, read_events
from aimspax_like.live import LiveStatus

BUDGETS = {"idg": {"max_set_size": 40, "max_epochs": 6}, "converge": {"max_epochs": 8},
           "al": {"num_trajectories": 3, "max_md_steps": 100, "max_train_set_size": 20,
                  "md": {"temperature_K": 400}},
           "test_set": {"size": 3}}
TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def _strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def _text(renderable, width: int = 110) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def _al_events(t0: float = 1000.0) -> list[dict]:
    """A campaign in active learning: IDG done, three trajectories, labels in flight, workers."""
    events = [
        {"t": t0, "event": "campaign_start", "phases": ["idg", "al", "converge"], "directory": "/x", "resume": False},
        {"t": t0 + 1, "event": "executor_started", "kind": "parsl", "n_workers": 4},
        {"t": t0 + 2, "event": "block_requested", "block": "0", "active_blocks": 1},
        {"t": t0 + 3, "event": "block_running", "block": "0", "active_blocks": 1},
        {"t": t0 + 3, "event": "workers", "connected": 4, "blocks": {"0": 4}},
        {"t": t0 + 4, "event": "phase_start", "phase": "idg", "sampler": "reference"},
    ]
    events += [{"t": t0 + 5, "event": "frame_stored", "split": "train" if k % 5 else "valid", "origin": "idg"}
               for k in range(10)]
    events += [
        {"t": t0 + 6, "event": "training_round", "phase": "idg", "total_epochs": 6, "train_size": 8,
         "members": [{"valid_force_mae": 0.30}, {"valid_force_mae": 0.25}]},
        {"t": t0 + 7, "event": "phase_end", "phase": "idg", "reason": "max_epochs", "md_steps": 200},
        {"t": t0 + 8, "event": "phase_start", "phase": "al", "trajectories": 3, "mode": "parallel"},
        {"t": t0 + 9, "event": "uncertainty", "trajectory": 0, "step": 10, "delta": 0.2, "threshold": "inf"},
        {"t": t0 + 9, "event": "uncertainty", "trajectory": 1, "step": 10, "delta": 0.2, "threshold": "inf"},
        {"t": t0 + 9, "event": "uncertainty", "trajectory": 2, "step": 10, "delta": 0.2, "threshold": "inf"},
        {"t": t0 + 20, "event": "uncertainty", "trajectory": 0, "step": 40, "delta": 0.5, "threshold": 0.31},
        {"t": t0 + 20, "event": "label_submitted", "phase": "al", "label": 0, "trajectory": 0, "step": 40,
         "delta": 0.5, "threshold": 0.31, "in_flight": 1},
        {"t": t0 + 20, "event": "state", "trajectory": 0, "old": "running", "new": "waiting", "step": 40},
        {"t": t0 + 21, "event": "uncertainty", "trajectory": 1, "step": 42, "delta": 0.6, "threshold": 0.32},
        {"t": t0 + 21, "event": "label_submitted", "phase": "al", "label": 1, "trajectory": 1, "step": 42,
         "delta": 0.6, "threshold": 0.32, "in_flight": 2},
        {"t": t0 + 21, "event": "state", "trajectory": 1, "old": "running", "new": "waiting", "step": 42},
        {"t": t0 + 25, "event": "label_failed", "phase": "al", "kind": "crashed", "retry": True},
        {"t": t0 + 30, "event": "frame_stored", "split": "train", "origin": "al", "trajectory": 1},
        {"t": t0 + 30, "event": "label_done", "phase": "al", "label": 1, "trajectory": 1, "split": "train"},
        {"t": t0 + 30, "event": "state", "trajectory": 1, "old": "waiting", "new": "training", "step": 42},
        {"t": t0 + 31, "event": "training_round", "phase": "al", "train_size": 9,
         "members": [{"valid_force_mae": 0.21}, {"valid_force_mae": 0.19}]},
        {"t": t0 + 32, "event": "uncertainty", "trajectory": 2, "step": 50, "delta": 0.1, "threshold": 0.3},
    ]
    return events


def test_tracker_keeps_the_picture_of_a_running_campaign():
    tracker = StatusTracker(BUDGETS)
    tracker.feed_all(_al_events())
    snap = tracker.snapshot(now=1040.0)
    json.dumps(snap, allow_nan=False)
    assert snap["state"] == "running" and snap["phase"] == "al" and snap["phases_done"] == ["idg"]
    assert snap["phase_elapsed_s"] == 32.0 and snap["elapsed_s"] == 40.0
    assert [(t["step"], t["state"]) for t in snap["trajectories"]] == [(40, "waiting"), (42, "training"),
                                                                       (50, "running")]
    assert snap["threshold"] == 0.3
    assert snap["labels"]["idg"] == {"done": 10, "in_flight": 0, "failed": 0, "retried": 0}
    assert snap["labels"]["al"] == {"done": 1, "in_flight": 1, "failed": 0, "retried": 1}
    assert {k: v for k, v in snap["data"].items() if v} == {"train": 9, "valid": 2}
    assert snap["valid_force_mae"]["value"] == pytest.approx(0.19)
    assert snap["workers"]["connected"] == 4 and snap["workers"]["active_blocks"] == 1
    assert snap["md_steps"]["al"] == 132
    # AL budget: 132 of 300 MD steps, 1 of 12 new training frames; the larger share counts.
    assert snap["progress"]["fraction"] == pytest.approx(132 / 300, abs=1e-4)
    assert snap["progress"]["left"] == {"md_steps": 168, "train_frames": 11}
    assert snap["progress"]["eta_s"] == pytest.approx(32 * (1 - 0.44) / 0.44, rel=1e-3)
    picture = _text(render(snap))
    for text in ("steps 132/300", "train 9/20", "0.300 eV/A", "11 done (idg 10, al 1), 1 in flight",
                 "190.0 meV/A", "4 parsl workers, 1 active blocks", "waiting", "training", "phase ETA"):
        assert text in picture, (text, picture)
    line = render_line(snap)
    assert line.startswith("al  steps 132/300, train 9/20") and "labels 11 done 1 in flight 0 failed" in line


def test_the_threshold_in_warm_up_is_strict_json_and_no_basis_means_unknown():
    events = _al_events()
    tracker = StatusTracker(BUDGETS)
    tracker.feed_all(events[:-15])  # AL has just started: no MD step yet, no basis for a remaining time
    snap = tracker.snapshot(now=1008.5)
    assert snap["phase"] == "al" and snap["progress"]["eta_s"] is None
    assert "ETA unknown" in render_line(snap) and "unknown" in _text(render(snap))
    tracker.feed_all(events[-15:-12])  # the first checks: threshold still infinite (warm-up)
    snap = tracker.snapshot(now=1009.5)
    assert snap["threshold"] == "inf" and snap["progress"]["eta_s"] > 0
    assert _strict_loads(json.dumps(snap, allow_nan=False)) == snap
    assert "inf (warm-up)" in _text(render(snap))
    assert StatusTracker().snapshot()["state"] == "not started"
    bare = StatusTracker()  # no config: no budgets, no fraction
    bare.feed_all(_al_events())
    assert bare.snapshot()["progress"]["fraction"] is None and "steps 132" in render_line(bare.snapshot())


def test_many_trajectories_collapse_to_one_summary_line():
    tracker = StatusTracker(BUDGETS)
    tracker.feed({"t": 1.0, "event": "campaign_start", "directory": "/x"})
    tracker.feed({"t": 1.0, "event": "phase_start", "phase": "al"})
    for k in range(40):
        tracker.feed({"t": 2.0, "event": "uncertainty", "trajectory": k, "step": 10 + k, "threshold": 0.2})
    for k in range(5):
        tracker.feed({"t": 3.0, "event": "state", "trajectory": k, "old": "running", "new": "waiting", "step": 10 + k})
    picture = _text(render(tracker.snapshot()))
    assert "40: 35 running, 5 waiting; steps 10..49" in picture
    assert "MD step" not in picture  # no 40-row table
    assert len(picture.splitlines()) < 20


def test_finished_campaign_status_matches_dataset_and_summary(finished_campaign):
    run, summary = finished_campaign
    status = status_of(run)
    json.dumps(status, allow_nan=False)
    assert status["state"] == "finished" and status["finished"] and not status["driver"]["alive"]
    assert status["phase"] is None and status["phases_done"] == ["idg", "al", "converge"]
    counts = DatasetStore.open(run / "data/dataset.h5").counts()
    assert status["data"] == counts["split"] == summary["splits"]
    for origin in ("idg", "al", "test"):
        assert status["labels"][origin]["done"] == counts["origin"][origin] == summary["labels"][origin]
    assert status["labels"]["total"]["done"] == summary["labels"]["total"]
    assert status["labels"]["total"]["in_flight"] == 0
    assert status["labels"]["total"]["failed"] == sum(summary["labels"]["failed"].values())
    converged = [e["valid_force_mae"] for e in read_events(run / "logs/events.jsonl") if e["event"] == "converged"]
    assert status["valid_force_mae"]["value"] == pytest.approx(min(converged))
    assert status["md_steps"]["al"] == summary["al"]["md_steps"]
    assert status["phase_reasons"]["al"] == summary["al"]["reason"]
    # The log goes on after the summary is built (the report, campaign_end): a few seconds more
    # on a loaded machine, never less.
    wall = summary["wall_s"]["total"]
    assert wall - 1.0 <= status["elapsed_s"] <= wall + max(5.0, 0.5 * wall)
    picture = _text(render(status))
    assert "finished" in picture and f"train {counts['split']['train']}" in picture and "ETA" not in picture


def test_status_json_is_strict_and_a_torn_last_line_is_skipped(finished_campaign, tmp_path, capsys):
    run, summary = finished_campaign
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("campaign.yaml", "logs", "state", "report"):
        (shutil.copytree if (run / name).is_dir() else shutil.copy)(run / name, copy / name)
    with (copy / "logs/events.jsonl").open("a") as log:  # a driver killed mid-write
        log.write('{"t": 1e12, "event": "frame_stored", "split": "tr')
    assert main(["status", str(copy), "--json"]) == 0
    status = _strict_loads(capsys.readouterr().out)
    assert status["data"] == summary["splits"] and status["state"] == "finished"
    assert main(["status", str(copy)]) == 0
    assert "finished" in capsys.readouterr().out
    assert main(["status", str(copy), "--line"]) == 0
    assert capsys.readouterr().out.startswith("finished")


def test_status_of_a_folder_that_is_not_a_run_directory_is_one_error_line(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a run directory" in err and len(err.strip().splitlines()) == 1
    assert main(["status", str(tmp_path / "missing"), "--json"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_event_log_listeners_see_every_record_and_cannot_break_it(tmp_path):
    seen = []

    def broken(record):
        raise RuntimeError("display crashed")

    log = EventLog(tmp_path / "events.jsonl", listeners=[broken, seen.append])
    first = log.emit("phase_start", phase="al", threshold=float("inf"))
    late = []
    log.add_listener(late.append)
    log.emit("phase_end", phase="al")
    log.remove_listener(late.append)
    log.emit("campaign_end")
    log.close()
    assert [r["event"] for r in seen] == ["phase_start", "phase_end", "campaign_end"]
    assert seen[0] is first and first["threshold"] == "inf"
    assert [r["event"] for r in late] == ["phase_end"]
    assert [r["event"] for r in read_events(tmp_path / "events.jsonl")] == ["phase_start", "phase_end", "campaign_end"]


def test_live_status_off_a_terminal_writes_timestamped_lines():
    stream = io.StringIO()
    live = LiveStatus(stream=stream, config=BUDGETS, interval_s=0.05)
    assert not live.tty
    events = _al_events(t0=time.time())
    for record in events[:6]:
        live.on_event(record)
    assert stream.getvalue().count("\n") == 1  # the phase change is written at once
    for record in events[6:]:
        live.on_event(record)
    live({"phase": "al", "steps": 150})  # on_progress: the exact step count
    time.sleep(0.3)
    live.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 4 and all(TIMESTAMPED.match(line) for line in lines)
    assert lines[0][20:].startswith("idg  frames 0/40, epochs 0/6")
    assert any(line[20:].startswith("al  steps 0/300, train 8/20") for line in lines)  # AL starts
    assert lines[-1][20:].startswith("al  steps 150/300")
    written = len(lines)
    time.sleep(0.15)
    assert len(stream.getvalue().splitlines()) == written  # closed: no more lines


def test_live_status_on_a_terminal_leaves_the_last_picture():
    stream = io.StringIO()
    live = LiveStatus(stream=stream, config=BUDGETS, tty=True)
    for record in _al_events(t0=time.time()):
        live.on_event(record)
    live.close()
    text = stream.getvalue()
    assert "steps 132/300" in text and "MD step" in text and "waiting" in text


def test_live_status_of_a_resumed_campaign_counts_the_earlier_runs(tmp_path):
    earlier = _al_events(t0=time.time() - 100)
    (tmp_path / "logs").mkdir()
    resumed = {"t": time.time(), "event": "campaign_start", "directory": str(tmp_path), "resume": True}
    with (tmp_path / "logs/events.jsonl").open("w") as log:
        for record in [*earlier, resumed]:
            log.write(json.dumps(record) + "\n")
    live = LiveStatus(stream=io.StringIO(), config=BUDGETS, tty=False, interval_s=60)
    live.on_event(resumed)
    live.on_event({"t": time.time(), "event": "phase_resume", "phase": "al", "resubmitted": 1})
    snap = live.snapshot()
    live.close()
    assert snap["segments"] == 2 and snap["phase"] == "al"
    assert 30 < snap["driver_s"] < 40 and snap["elapsed_s"] >= 100  # the pause between the runs is no driver time
    assert {k: v for k, v in snap["data"].items() if v} == {"train": 9, "valid": 2}
    assert snap["labels"]["al"]["done"] == 1 and snap["labels"]["al"]["in_flight"] == 1  # the resubmitted one


def test_status_of_a_running_campaign_from_another_process(tmp_path):
    """A driver in its own process (about 10 s: it is stopped by SIGTERM once AL has begun)."""
    raw = tiny_config(tmp_path, test_set={"size": 0}, al={"max_md_steps": 5000, "max_train_set_size": 40})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "aimspax_like.cli", "run", str(tmp_path / "c.yaml")]
    with (tmp_path / "stderr.log").open("w") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline, status = time.monotonic() + 300, None
        while time.monotonic() < deadline and process.poll() is None:
            if (run / "campaign.yaml").is_file():
                status = status_of(run)
                if status["phase"] == "al" and status["driver"]["alive"] and status["md_steps"]["al"] > 0:
                    break
            time.sleep(0.5)
        assert status is not None and status["phase"] == "al", status
        assert status["state"] == "running" and status["driver"]["pid"] == process.pid
        assert status["labels"]["idg"]["done"] > 0 and status["data"]["train"] > 0
        assert status["progress"]["fraction"] is not None and "steps" in status["progress"]["detail"]
        assert main(["status", str(run), "--json"]) == 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    assert process.returncode == 143
    stopped = status_of(run)
    assert stopped["state"] == "stopped" and not stopped["driver"]["alive"]
    assert "stopped by SIGTERM" in (stopped["interrupted"] or "")
    log_lines = (tmp_path / "stderr.log").read_text().splitlines()
    assert any(TIMESTAMPED.match(line) and line[20:].startswith("al  ") for line in log_lines), log_lines[-20:]


def test_convergence_progress_counts_epochs_from_the_start_of_convergence():
    tracker = StatusTracker(BUDGETS)
    tracker.feed_all(_al_events()[:-15])
    tracker.feed_all([{"t": 1100.0, "event": "phase_end", "phase": "al", "reason": "max_md_steps"},
                      {"t": 1100.0, "event": "phase_start", "phase": "converge", "members": [0]}])
    for epoch in (31, 32, 33):  # the member trained 30 epochs before convergence
        tracker.progress({"phase": "converge", "member": 0, "epoch": epoch, "valid_mae": 0.05})
    snap = tracker.snapshot(now=1110.0)
    assert snap["progress"]["detail"] == "members 0/1 converged, epoch 3/8 (at most)"
    assert snap["progress"]["fraction"] == pytest.approx(3 / 8, abs=1e-4)
    assert "member 0 epoch 3: valid 50.0 meV/A" in _text(render(snap))
    tracker.feed({"t": 1120.0, "event": "converged", "member": 0, "epoch": 40, "valid_force_mae": 0.04})
    tracker.feed({"t": 1121.0, "event": "phase_end", "phase": "converge", "best_member": 0})
    snap = tracker.snapshot(now=1121.0)
    assert snap["valid_force_mae"] == {"value": 0.04, "phase": "converge", "train_size": 8}
    assert snap["phases_done"] == ["idg", "al", "converge"]


def test_a_per_member_budget_counts_the_largest_members_own_frames_plus_the_shared_ones():
    """al.train_set_counts: per_member (aims-PAX's rule): 8 own IDG frames + 5 shared AL frames = 13/40."""
    config = {"model": {"ensemble_size": 4}, "al": {"max_train_set_size": 40, "train_set_counts": "per_member",
                                                    "max_md_steps": 10000, "num_trajectories": 2}}
    events = [{"t": 1000.0, "event": "campaign_start", "phases": ["idg", "al"], "directory": "run"},
              {"t": 1001.0, "event": "phase_start", "phase": "idg"}]
    events += [{"t": 1002.0, "event": "frame_stored", "split": "train", "origin": "idg", "member": k % 4}
               for k in range(32)]
    events += [{"t": 1003.0, "event": "phase_end", "phase": "idg"},
               {"t": 1004.0, "event": "phase_start", "phase": "al", "trajectories": 2}]
    events += [{"t": 1005.0, "event": "frame_stored", "split": "train", "origin": "al", "member": -1}
               for _ in range(5)]
    tracker = StatusTracker(config)
    tracker.feed_all(events)
    snap = tracker.snapshot(now=1006.0)
    assert "train 13/40 per member" in snap["progress"]["detail"]
    assert snap["progress"]["left"]["train_frames"] == 27
    assert snap["progress"]["fraction"] == pytest.approx(5 / 32, abs=1e-4)  # 8 at AL start, 40 at the end


def test_a_stop_that_no_phase_logged_is_named_from_the_campaign_interrupted_event():
    tracker = StatusTracker(BUDGETS)
    tracker.feed_all([{"t": 1.0, "event": "campaign_start", "phases": ["idg", "al", "converge"]},
                      {"t": 2.0, "event": "phase_start", "phase": "converge", "members": [0]},
                      {"t": 3.0, "event": "campaign_interrupted", "signal": 15, "phase": "converge"},
                      {"t": 3.1, "event": "campaign_end", "wall_s": 2.1, "seconds": {}}])
    assert tracker.snapshot(now=4.0, alive=False)["interrupted"] == "converge stopped by SIGTERM"
    tracker.feed_all([{"t": 5.0, "event": "campaign_start", "phases": ["al"]},
                      {"t": 6.0, "event": "al_interrupted", "signal": 2, "in_flight": 0},
                      {"t": 6.1, "event": "campaign_interrupted", "signal": 2, "phase": "al"}])
    assert tracker.snapshot(now=7.0, alive=False)["interrupted"] == "al stopped by SIGINT"  # the phase's own word
