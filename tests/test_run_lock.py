"""One driver per run directory: the lock refuses a live holder and takes over a dead one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from campaign_helpers import tiny_config

from aimspax_like.errors import RunDirectoryError
from aimspax_like.run_lock import LOCK_NAME, RunLock, read_holder

HOLD = """
import sys, time
from pathlib import Path
from aimspax_like.run_lock import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """Another process holding the lock of ``tmp_path / 'run'``."""
    root = tmp_path / "run"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield root, proc
    proc.kill()
    proc.wait()
    proc.stdout.close()


def _files(root: Path) -> dict[str, tuple[int, int] | str]:
    """Size and mtime of every file; the lock by its content (the holder's heartbeat touches it)."""
    return {str(p.relative_to(root)): p.read_text() if p.name == LOCK_NAME else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_live_holder_is_named_and_refused(holder) -> None:
    root, proc = holder
    with pytest.raises(RunDirectoryError, match=rf"in use by another driver \(pid {proc.pid} on "
                                                rf"{socket.gethostname()} since \d{{4}}-"):
        RunLock(root).acquire()
    assert read_holder(root)["pid"] == proc.pid  # the refused driver changed nothing


def test_a_second_lock_in_one_process_is_refused(tmp_path: Path) -> None:
    with RunLock(tmp_path), pytest.raises(RunDirectoryError, match="this process"):
        RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released and removed
    RunLock(tmp_path).acquire().release()


def test_a_killed_holder_does_not_block(holder) -> None:
    root, proc = holder
    proc.kill()
    proc.wait()
    assert (root / LOCK_NAME).exists()  # SIGKILL left the file behind
    lock = RunLock(root).acquire()
    assert lock.took_over["pid"] == proc.pid
    lock.release()


def _foreign_lock(root: Path, age_s: float) -> None:
    root.mkdir(exist_ok=True)
    (root / LOCK_NAME).write_text(json.dumps({"pid": 12345, "host": "node-that-died", "started": time.time() - 999}))
    stamp = time.time() - age_s
    os.utime(root / LOCK_NAME, (stamp, stamp))


def test_another_node_is_refused_while_alive_and_taken_over_when_silent(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _foreign_lock(root, age_s=5)
    with pytest.raises(RunDirectoryError, match=r"pid 12345 on node-that-died .*last sign of life 5 s ago"):
        RunLock(root, stale_after_s=60).acquire()
    _foreign_lock(root, age_s=61)
    lock = RunLock(root, stale_after_s=60).acquire()
    assert lock.took_over["host"] == "node-that-died"
    lock.release()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path: Path) -> None:
    lock = RunLock(tmp_path, heartbeat_s=0.05).acquire()
    stamp = time.time() - 100
    os.utime(tmp_path / LOCK_NAME, (stamp, stamp))
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 5
    lock.release()


def test_a_second_driver_exits_2_with_one_line_and_writes_nothing(holder) -> None:
    """``run --resume`` and ``resume`` against a directory a live driver holds."""
    root, proc = holder
    config = tiny_config(root.parent)
    config["output"]["directory"] = str(root)
    (root.parent / "c.yaml").write_text(yaml.safe_dump(config))
    (root / "campaign.yaml").write_text(yaml.safe_dump(config))  # as a started run would have it
    before = _files(root)
    cli = [sys.executable, "-m", "aimspax_like.cli"]
    for args in (["run", str(root.parent / "c.yaml"), "--resume"], ["resume", str(root)],
                 ["run", str(root.parent / "c.yaml"), "--overwrite"]):
        done = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {proc.pid}" in lines[0], done.stderr
        assert _files(root) == before
