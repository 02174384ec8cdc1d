"""One signal stops a campaign within seconds, with its state saved, wherever it arrives.

Ctrl-C in a terminal and SLURM's SIGTERM go to the whole process group: the Parsl interchange
must not die with the driver's signal (the driver's shutdown would wait for it forever).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from campaign_helpers import tiny_config

from aimspax_like.errors import CampaignInterrupted
from aimspax_like.signals import StopFlag, stop_requested


def _phase_started(run: Path, phase: str) -> bool:
    events = run / "logs/events.jsonl"
    if not events.exists():
        return False
    for line in events.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being written
        if event.get("phase") == phase and event["event"] in ("phase_start", "phase_resume"):
            return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize(("when", "signum"), [("executor start", signal.SIGINT), ("al", signal.SIGTERM),
                                              ("converge", signal.SIGINT)])
def test_one_signal_to_the_process_group_stops_within_seconds(tmp_path: Path, when: str, signum: int) -> None:
    raw = tiny_config(tmp_path, test_set={"size": 0}, al={"max_md_steps": 3000, "max_train_set_size": 30},
                      converge={"patience": 200, "max_epochs": 1000}, faults={"delay_s": 0.3})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "aimspax_like.cli", "run", str(tmp_path / "c.yaml"), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    if when == "executor start":
        time.sleep(1.5)  # imports done, Parsl starting
    else:
        while not _phase_started(tmp_path / "run", when) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
    assert process.poll() is None, "the campaign ended before the signal"
    sent = time.monotonic()
    os.killpg(process.pid, signum)  # the whole group, as a terminal or SLURM does
    _, err = process.communicate(timeout=120)
    seconds = time.monotonic() - sent
    assert process.returncode == 128 + signum, err[-2000:]
    assert seconds < 20, f"{seconds:.1f} s to stop"
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and "resume to continue" in lines[0], err[-2000:]
    done = subprocess.run([sys.executable, "-m", "aimspax_like.cli", "resume", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_training_stops_between_batches_once_a_signal_arrived(tmp_path: Path) -> None:
    """A training round of a large model takes minutes: it looks at the stop flag every batch."""
    from campaign_helpers import tiny_cluster

    from aimspax_like.committee import Committee
    from aimspax_like.config import config_from_dict
    from aimspax_like.data import LabelledFrame

    config = config_from_dict(tiny_config(tmp_path))
    atoms = tiny_cluster()
    frames = [LabelledFrame.from_atoms(atoms, energy=-1.0 - 0.01 * k, forces=[[0.01 * k, 0, 0]] * 6,
                                       split="train" if k % 4 else "valid", origin="idg", md_step=k)
              for k in range(8)]
    committee = Committee.from_data(config, frames, sorted(set(atoms.numbers)))
    flag = StopFlag().install()
    try:
        committee.train_round(1)  # no signal: trains
        flag.signum = signal.SIGTERM  # as the handler records it
        assert stop_requested() == signal.SIGTERM
        with pytest.raises(CampaignInterrupted):
            committee.train_round(1)
    finally:
        flag.uninstall()
    assert stop_requested() == 0
