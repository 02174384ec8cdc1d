"""Kill a small campaign with SIGKILL at random and at aimed moments, resume it each time, check nothing is lost.

    .venv/bin/python scripts/chaos_resume.py [--kills 10] [--seed 0] [--workdir DIR]
        [--targets random,al,converge,test] [--second-driver resume,run]

The campaign is the tiny EMT one of the tests (6-atom Cu/Au cluster, 2-member MACE ensemble)
with a long AL budget and a delay per label, so it lasts a minute or two without kills. The
driver (``aimspax-like run CONFIG --resume``) runs in its own session; at a chosen moment it and
every process it started (the Parsl interchange and worker pool, which a SIGKILLed driver would
leave orphaned) are killed with SIGKILL, then it is started again. After the last kill it runs
to the end.

Which moments. ``--targets`` names the kinds of kill: ``random`` (after 1..max-new newly stored
frames plus 0..jitter s: IDG or AL, wherever the campaign is), ``al`` (after the ``phase_start``
or ``phase_resume`` of al in ``logs/events.jsonl`` and 1..max-new AL frames), ``converge`` (after
the ``phase_start`` of converge and before its ``phase_end``) and ``test`` (during the test set,
after a ``label_submitted`` event with phase "test"). Each aimed name is one kill (repeat it for
more); the rest of ``--kills`` are random kills, which come first. (``al`` is there because the
random kills rarely reach AL: a resumed IDG runs its full epoch budget again, so every restart
stores new IDG frames, and the next random kill comes after those.)
The schedule is thus fixed by the options; ``--seed`` fixes the timing. A random kill still due
when the campaign has left AL is dropped. The phase each kill hit is read from ``events.jsonl``
at the moment of the kill and printed.

By default the test set is sampled by MD driven by the campaign's own member 0
(``test_set.sampler: foundation`` with ``idg.foundation_model`` = ``RUN/models/member_0.model``,
which the convergence phase writes before the test set starts), so its frames are labelled on
the workers and emit ``label_submitted`` events; ``--test-sampler reference`` keeps the
reference-driven test MD (no label events: a test kill then comes after ``phase_start`` test).

A second driver. While a driver is in AL (``--second-driver``, by default once ``aimspax-like
resume RUN`` and once ``aimspax-like run CONFIG --resume``), the holder's whole session is frozen
with SIGSTOP (so the run directory holds still and can be compared), a second driver is started
against the same run; it must exit with code 2 within ``--second-limit`` s, with exactly one
stderr line naming the holder's pid ("in use by another driver (pid N on HOST since ...)"), and
leave the run directory as it was (dataset frames and keys, ``events.jsonl`` size, every file's
size and mtime). Then the holder is continued with SIGCONT.

Checks:

* the campaign completes (exit code 0, every phase done) and a further resume says it finished;
* every frame stored before each kill (read from the dataset right before the kill) is in the
  dataset once the next driver has started and at the end, with identical positions and energy;
* no frame is stored twice (by (origin, trajectory, MD step) and by geometry), the test set
  (split "test") included, which has exactly ``size`` frames per temperature;
* the counters agree with the dataset (summary label and split totals; AL labels done == AL
  frames stored);
* the converge phase ended exactly once (and the test set once); every (re)start of converge
  trained the same member(s), and the best member it names is the summary's;
* every aimed target was hit by at least one kill;
* each killed driver left its ``driver.lock`` behind and the next driver took it over (was not
  blocked); every second driver was refused as above;
* no process of any killed driver is left running;
* the final models load in mace's MACECalculator and give finite forces.

Exit code 0 when every check holds (PASS); a summary is printed either way.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml
from ase import Atoms
from ase.io import write

ROOT = Path(__file__).resolve().parents[1]
LOCK_NAME = "driver.lock"  # aimspax_like.run_lock.LOCK_NAME
TARGETS = ("random", "al", "converge", "test")
ORDER = {name: k for k, name in enumerate(TARGETS)}
SECOND_KINDS = ("resume", "run")
IN_USE = re.compile(r"in use by another driver \(pid (\d+) on (\S+) since ([^)]*)\)")
AFTER_AL = ("al ended", "converge", "converge ended", "test", "test ended", "shut-down")


def campaign_config(workdir: Path, md_steps: int, train_size: int, delay_s: float,
                    test_sampler: str = "foundation") -> Path:
    cluster = Atoms("Cu4Au2", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5], [2.5, 2.5, 0],
                                         [1.3, 1.3, 2.0]])
    write(workdir / "cluster.xyz", cluster)
    config = {
        "system": {"structures": str(workdir / "cluster.xyz")},
        "reference": {"kind": "emt"},
        "faults": {"delay_s": delay_s},
        "model": {"ensemble_size": 2, "channels": 8, "max_L": 0, "r_max": 4.5, "num_interactions": 1,
                  "correlation": 2, "radial_mlp": [8], "num_radial_basis": 6, "dtype": "float64", "device": "cpu"},
        "training": {"batch_size": 4},
        "idg": {"stride": 5, "points_per_member": 3, "intermediate_epochs": 3, "max_epochs": 6,
                "max_set_size": 40, "md": {"temperature_K": 400}},
        "al": {"num_trajectories": 3, "check_every": 2, "warmup": 4, "max_train_set_size": train_size,
               "max_md_steps": md_steps, "intermediate_epochs": 1, "max_epochs_per_point": 2,
               "valid_ratio": 0.25, "md": {"temperature_K": 400}},
        # Long enough (a few seconds) for a kill aimed at it to land inside.
        "converge": {"patience": 6, "max_epochs": 30},
        "test_set": {"size": 3, "stride": 5},  # 3 frames at each of two temperatures
        "cluster": {"kind": "local", "max_workers": 2},
        "output": {"directory": str(workdir / "run")},
        "seed": 3,
    }
    if test_sampler == "foundation":
        # The test MD is driven by the campaign's own member 0 (written by converge, before the
        # test set starts; IDG samples with the reference, so nothing reads it earlier) and the
        # frames are labelled on the workers: label_submitted events with phase "test".
        config["idg"]["foundation_model"] = str(workdir / "run/models/member_0.model")
        config["test_set"]["sampler"] = "foundation"
    path = workdir / "campaign.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def kill_schedule(kills: int, targets: list[str]) -> list[str]:
    """The target of each kill, in order: random ones first, then the aimed ones in phase order.

    Each aimed name in ``targets`` is one kill; with ``random`` among them the remaining kills are
    random (``kills`` below the number of aimed names drops the last of those), without it the
    aimed names are repeated until ``kills`` is reached.
    """
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(unknown)}; use {', '.join(TARGETS)}")
    aimed = sorted((t for t in targets if t != "random"), key=ORDER.get)
    if "random" in targets or not aimed:
        aimed = aimed[:kills]
        return ["random"] * (kills - len(aimed)) + aimed
    return sorted((aimed[k % len(aimed)] for k in range(kills)), key=ORDER.get)


# --------------------------------------------------------------------------- events


class EventTail:
    """Follows ``logs/events.jsonl`` as it grows (whole lines only) and tracks where the campaign is.

    ``phase`` is the phase of the last ``phase_start``/``phase_resume`` ("idg", "al", "converge",
    "test"), "<phase> ended" after its ``phase_end``, "start-up" after a driver's
    ``campaign_start`` and before its first phase, "shut-down" after ``campaign_end``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.events: list[dict[str, Any]] = []
        self.torn = 0  # lines that are no JSON (cut by a kill; an event glued to such a remnant is kept)
        self.phase = "-"
        self.test_labels = 0  # label_submitted events of the current test phase
        self.starts = 0  # campaign_start events: one per driver that got going
        self.stored = 0  # frame_stored events

    def poll(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        new = []
        for line in data[: end + 1].splitlines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                # A line cut by a kill, with the next driver's first event glued to it: keep that.
                self.torn += 1
                start = line.rfind(b'{"t": ')
                try:
                    event = json.loads(line[start:]) if start > 0 else None
                except ValueError:
                    event = None
                if not isinstance(event, dict):
                    continue
            new.append(event)
            self.track(event)
        self.events.extend(new)
        return new

    def track(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name == "campaign_start":
            self.phase, self.test_labels = "start-up", 0
            self.starts += 1
        elif name in ("phase_start", "phase_resume"):
            self.phase = str(event.get("phase"))
            if self.phase == "test":
                self.test_labels = 0
        elif name == "phase_end":
            self.phase = f"{event.get('phase')} ended"
        elif name == "label_submitted" and event.get("phase") == "test":
            self.test_labels += 1
        elif name == "frame_stored":
            self.stored += 1
        elif name == "campaign_end":
            self.phase = "shut-down"

    def where(self) -> str:
        if self.phase == "test":
            return "test (labelling)" if self.test_labels else "test (sampling)"
        return self.phase


def read_events(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Every whole event of a log and the number of lines that are no JSON."""
    tail = EventTail(path)
    tail.poll()
    return tail.events, tail.torn


def hits(target: str, where: str, test_labels: bool = True) -> bool:
    """Whether a kill at ``where`` (``EventTail.where``) hit ``target``.

    A test kill must come after a test label was submitted where the test set is labelled on
    the workers (``test_labels``), anywhere in the test phase otherwise.
    """
    if target in ("al", "converge"):
        return where == target
    if target == "test":
        return where == "test (labelling)" if test_labels else where.startswith("test (")
    return True


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_members(sid: int) -> set[int]:
    """Every live process of a session.

    Parsl's LocalProvider starts the worker pool through ``bash -c '... &'``, so the pool is
    re-parented to init at once and is no descendant of the driver; it keeps the driver's session,
    though. The driver is started as a session leader, so its session is exactly what it started.
    """
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[3]) == sid and fields[0] != "Z":
                members.add(int(entry.name))
    return members


def kill_tree(process: subprocess.Popen) -> set[int]:
    """SIGKILL the driver and every process of its session (they would be orphaned otherwise).

    Observed without this: the orphaned worker pools (and their workers) were still running
    minutes after their driver and interchange died, and each restart added one more.
    """
    sid = process.pid
    before = session_members(sid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)  # the driver and the interchange
    process.wait()
    members = before | session_members(sid)
    for pid in members - {sid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return members - {sid}


def signal_session(sid: int, signum: int) -> set[int]:
    members = session_members(sid)
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return members


def read_holder(run: Path) -> dict[str, Any] | None:
    try:
        text = (run / LOCK_NAME).read_text()
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


# --------------------------------------------------------------------------- dataset checks


class Frame(NamedTuple):
    digest: str  # positions, rounded
    energy: float
    split: str  # may change legitimately (a held label is released): not part of "unchanged"


@dataclass
class Frames:
    """The dataset read by key (origin, trajectory, md_step); ``twice``: keys met more than once."""

    by_key: dict[tuple, Frame] = field(default_factory=dict)
    twice: list[tuple] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.by_key) + len(self.twice)

    def missing(self, earlier: dict[tuple, Frame]) -> list[tuple]:
        """Keys of ``earlier`` that are gone or whose geometry or energy changed."""
        now = self.by_key
        return [k for k, v in earlier.items() if k not in now or now[k][:2] != v[:2]]


def dataset_frames(run: Path, tries: int = 20) -> Frames:
    """The dataset as ``Frames``.

    Read without the HDF5 lock while the driver may be writing: a read that meets a write
    half-way fails and is simply tried again.
    """
    from aimspax_like.errors import SetupError

    for _ in range(tries - 1):
        try:
            return _read_frames(run)
        except (SetupError, OSError):
            time.sleep(0.1)
    return _read_frames(run)


def _read_frames(run: Path) -> Frames:
    from aimspax_like.data import DatasetStore

    path = run / "data/dataset.h5"
    result = Frames()
    if not path.exists():
        return result
    for frame in DatasetStore(path).frames():
        key = (frame.origin, frame.trajectory, frame.md_step)
        digest = hashlib.sha1(np.round(frame.positions, 10).tobytes()).hexdigest()
        if key in result.by_key:
            result.twice.append(key)
        else:
            result.by_key[key] = Frame(digest, frame.energy, frame.split)
    return result


def files_of(run: Path) -> dict[str, tuple[int, int]]:
    """Every file of the run directory: relative path -> (size, mtime in ns)."""
    files = {}
    for path in sorted(run.rglob("*")):
        with contextlib.suppress(OSError):
            if path.is_file():
                stat = path.stat()
                files[str(path.relative_to(run))] = (stat.st_size, stat.st_mtime_ns)
    return files


def check_models(run: Path) -> int:
    from mace.calculators import MACECalculator

    models = sorted((run / "models").glob("*.model"))
    for model in models:
        calc = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64")
        atoms = Atoms("Cu4Au2", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5], [2.5, 2.5, 0],
                                           [1.3, 1.3, 2.0]])
        atoms.calc = calc
        assert np.isfinite(atoms.get_forces()).all(), model
    return len(models)


# --------------------------------------------------------------------------- the chaos run


@dataclass
class Kill:
    number: int
    target: str
    hit: str
    at_s: float
    before: int
    after: int | None = None
    lost: int = 0
    children: int = 0
    holder: dict[str, Any] | None = None  # driver.lock right after the kill
    pid: int = 0


@dataclass
class Takeover:
    kill: int
    left_behind: bool  # the killed driver's lock file was there
    taken: bool  # the next driver wrote its own pid into it
    blocked: bool  # the next driver stopped with "in use by another driver"
    seconds: float


@dataclass
class Attempt:
    kind: str
    command: str
    holder: int
    rc: int | None
    seconds: float
    stderr: list[str]
    named_pid: int | None
    changes: list[str]
    problems: list[str]

    @property
    def refused(self) -> bool:
        return not self.problems


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.run = args.workdir / "run"
        self.config = campaign_config(args.workdir, args.md_steps, args.train_size, args.delay, args.test_sampler)
        self.command = [sys.executable, "-m", "aimspax_like.cli", "run", str(self.config), "--resume", "--quiet"]
        script = Path(sys.executable).parent / "aimspax-like"
        self.cli = [str(script)] if script.exists() else [sys.executable, "-m", "aimspax_like.cli"]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log_path = args.workdir / "driver.log"
        self.log = self.log_path.open("w")
        self.tail = EventTail(self.run / "logs/events.jsonl")
        self.t0 = time.monotonic()
        self.kills: list[Kill] = []
        self.takeovers: list[Takeover] = []
        self.attempts: list[Attempt] = []
        self.second_todo = list(args.second_driver)
        self.last_attempt: tuple[float, int] | None = None  # (when, frame_stored events then)
        self.dropped: list[str] = []  # scheduled kills that were not made, and why
        self.sessions: list[int] = []
        self.killed_pids: set[int] = set()
        self.seen: dict[tuple, Frame] = {}
        self.lost = 0
        self.twice_seen: set[tuple] = set()
        self.before_last: list[tuple] = []  # the keys stored right before the last kill

    def hits(self, target: str, where: str) -> bool:
        return hits(target, where, test_labels=self.args.test_sampler == "foundation")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> subprocess.Popen:
        self.log.flush()
        return subprocess.Popen(self.command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)

    # ------------------------------------------------------------------ one campaign, killed

    def campaign(self) -> int | None:
        schedule = kill_schedule(self.args.kills, self.args.targets)
        k = 0
        while True:
            log_start = self.log_path.stat().st_size
            self.tail.poll()
            self.tail.phase = "launch"  # no longer where the killed driver was
            starts = self.tail.starts
            process = self.start()
            self.after_restart(process, log_start, starts)
            while True:
                if k >= len(schedule):
                    return self.run_to_end(process)
                target = schedule[k]
                outcome = self.wait_for(process, target)
                if outcome == "ended":
                    self.dropped += [f"{t}: the campaign ended first" for t in schedule[k:]]
                    return process.returncode
                if outcome == "left AL":
                    self.dropped.append("random: the campaign had left AL")
                    k += 1
                    continue
                if outcome == "passed":
                    self.dropped.append(f"{target}: the phase was over before the kill came")
                    k += 1
                    continue
                self.kill(process, target)
                k += 1
                break

    def after_restart(self, process: subprocess.Popen, log_start: int, starts: int) -> None:
        """After a kill: the stale lock must be taken over, and no frame stored before the kill lost."""
        if not self.kills:
            return
        last = self.kills[-1]
        t = time.monotonic()
        taken = blocked = False
        while process.poll() is None and time.monotonic() - t < self.args.patience:
            holder = read_holder(self.run)
            if holder is not None and holder.get("pid") == process.pid:
                taken = True
                break
            time.sleep(0.1)
        if process.poll() is not None:
            with contextlib.suppress(OSError), self.log_path.open() as f:
                f.seek(log_start)
                blocked = process.returncode == 2 and "in use by another driver" in f.read()
        self.takeovers.append(Takeover(last.number, last.holder is not None and last.holder.get("pid") == last.pid,
                                       taken, blocked, round(time.monotonic() - t, 1)))
        # The resumed driver has repaired what it repairs once it emitted campaign_start.
        while process.poll() is None and self.tail.starts == starts and time.monotonic() - t < self.args.patience:
            self.tail.poll()
            time.sleep(0.1)
        after = dataset_frames(self.run)
        last.after = len(after)
        missing = after.missing({key: self.seen[key] for key in self.before_last})
        last.lost = len(missing)
        self.lost += len(missing)
        self.twice_seen.update(after.twice)

    def wait_for(self, process: subprocess.Popen, target: str) -> str:
        """Wait for the moment of a kill of ``target``: "kill", "ended", "left AL" or "passed"."""
        if target == "random":
            return self.wait_random(process)
        deadline = time.monotonic() + self.args.aim_timeout
        while time.monotonic() < deadline:
            self.tail.poll()
            if process.poll() is not None:
                return "ended"
            where = self.tail.where()
            if self.tail.phase == "al":
                self.second_driver(process)
            if self.hits(target, where):
                break
            if target == "al" and self.left_al():
                return "passed"
            if target == "converge" and where.startswith(("test", "converge ended")):
                return "passed"
            if target == "test" and where in ("test ended", "shut-down"):
                return "passed"
            time.sleep(0.05)
        else:
            return "kill"  # kill anyway: the campaign seems stuck
        if target == "al":  # not at its start: after 1..max-new AL frames (labelling, training, MD)
            start, new = self.tail.stored, self.rng.randint(1, self.args.max_new)
            deadline = time.monotonic() + self.args.patience
            while (time.monotonic() < deadline and process.poll() is None and self.tail.phase == "al"
                   and self.tail.stored < start + new):
                self.second_driver(process)
                time.sleep(0.1)
                self.tail.poll()
        # Somewhere in the phase: up to aim-jitter s later, sooner if the phase ends first.
        deadline = time.monotonic() + self.rng.uniform(0.0, self.args.aim_jitter)
        while time.monotonic() < deadline and process.poll() is None:
            self.tail.poll()
            if not self.hits(target, self.tail.where()):
                break
            time.sleep(0.02)
        return "kill" if process.poll() is None else "ended"

    def wait_random(self, process: subprocess.Popen) -> str:
        """Wait until 1..max-new more frames are stored (or patience s pass), then 0..jitter s.

        Killing at a random moment *after progress* spreads the kills over every phase (labelling,
        training, MD, checkpoint writes) instead of spending them all on start-up.
        """
        new = self.rng.randint(1, self.args.max_new)
        jitter = self.rng.uniform(0.0, self.args.jitter)
        self.tail.poll()
        start = self.tail.stored
        deadline = time.monotonic() + self.args.patience
        while time.monotonic() < deadline:
            self.tail.poll()
            if process.poll() is not None:
                return "ended"
            if self.left_al():
                return "left AL"
            if self.tail.stored >= start + new:
                break
            time.sleep(0.2)
        if self.tail.phase == "al":
            self.second_driver(process)
        time.sleep(jitter)
        return "ended" if process.poll() is not None else "kill"

    def left_al(self) -> bool:
        if self.tail.phase in AFTER_AL:
            return True
        if self.tail.phase in ("launch", "start-up"):
            marker = self.run / "state/phases.json"
            with contextlib.suppress(OSError, ValueError):
                return "al" in json.loads(marker.read_text())["done"]
        return False

    def kill(self, process: subprocess.Popen, target: str) -> None:
        before = dataset_frames(self.run)
        self.tail.poll()
        where = self.tail.where()  # the phase hit, read at the last moment
        at = self.elapsed()
        tree = kill_tree(process)
        self.tail.poll()
        self.killed_pids |= tree
        self.sessions.append(process.pid)
        self.seen.update(before.by_key)
        self.before_last = list(before.by_key)
        self.twice_seen.update(before.twice)
        kill = Kill(len(self.kills) + 1, target, where, round(at, 1), len(before), children=len(tree),
                    holder=read_holder(self.run), pid=process.pid)
        self.kills.append(kill)
        lock = "lock left" if kill.holder and kill.holder.get("pid") == process.pid else "no lock left"
        print(f"kill {kill.number:2d} ({target:8s}) at {at:5.1f} s in {where:17s}: {len(before):3d} frames stored, "
              f"killed driver + {len(tree)} processes, {lock}", flush=True)

    def run_to_end(self, process: subprocess.Popen) -> int:
        while process.poll() is None:
            self.tail.poll()
            if self.tail.phase == "al":
                self.second_driver(process)
            time.sleep(0.3)
        return process.returncode

    # ------------------------------------------------------------------ a second driver

    def second_driver(self, process: subprocess.Popen) -> None:
        """Start a second driver against the run while ``process`` holds it (frozen).

        Called while ``process`` is in AL; the attempts are spread: each comes 3 s and two stored
        frames after the one before.
        """
        if not self.second_todo or (self.last_attempt is not None and (
                time.monotonic() - self.last_attempt[0] < 3.0 or self.tail.stored < self.last_attempt[1] + 2)):
            return
        kind = self.second_todo.pop(0)
        if kind == "resume":
            command = [*self.cli, "resume", str(self.run)]
        else:
            command = [*self.cli, "run", str(self.config), "--resume"]
        problems: list[str] = []
        members = signal_session(process.pid, signal.SIGSTOP)
        try:
            before = self.snapshot(process)
            t = time.monotonic()
            second = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=self.env, start_new_session=True)
            try:
                out, err = second.communicate(timeout=self.args.second_limit)
            except subprocess.TimeoutExpired:
                kill_tree(second)
                out, err = second.communicate()
                problems.append(f"still running after {self.args.second_limit:.0f} s (killed)")
            seconds = time.monotonic() - t
            after = self.snapshot(process)
        finally:
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        lines = [line for line in err.splitlines() if line.strip()]
        match = IN_USE.search(err)
        named = int(match.group(1)) if match else None
        if second.returncode != 2:
            problems.append(f"exit code {second.returncode}, not 2")
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines, not 1")
        if named != process.pid:
            problems.append(f"stderr names pid {named}, not the holder {process.pid}" if named else
                            "stderr does not say 'in use by another driver (pid N on HOST since ...)'")
        changes = []
        if list(before[0].by_key) != list(after[0].by_key) or len(before[0]) != len(after[0]):
            changes.append(f"dataset {len(before[0])} -> {len(after[0])} frames")
        if before[1] != after[1]:
            changes.append(f"events.jsonl {before[1]} -> {after[1]} bytes")
        files = sorted(p for p in before[2].keys() | after[2].keys() if before[2].get(p) != after[2].get(p))
        if files:
            changes.append(f"{len(files)} files changed: {', '.join(files[:5])}")
        if changes:
            problems.append("changed the run directory: " + "; ".join(changes))
        name = " ".join(Path(c).name if c == command[0] else c for c in command)
        attempt = Attempt(kind, name, process.pid, second.returncode, round(seconds, 1), lines, named, changes,
                          problems)
        self.attempts.append(attempt)
        self.last_attempt = (time.monotonic(), self.tail.stored)
        print(f"second driver '{kind}' against pid {process.pid}: rc {second.returncode} in {seconds:.1f} s, "
              + ("refused as it should be" if attempt.refused else "; ".join(problems)), flush=True)
        for line in lines[:3]:
            print(f"    stderr: {line[:300]}", flush=True)
        if out.strip():
            print(f"    stdout: {out.strip()[:300]}", flush=True)

    def snapshot(self, process: subprocess.Popen) -> tuple[Frames, int, dict[str, tuple[int, int]]]:
        """The frozen run directory: dataset, events.jsonl size, files. A holder frozen mid-write of
        the dataset makes reads fail: it is let on for a moment and frozen again."""
        for _ in range(10):
            try:
                frames = dataset_frames(self.run, tries=3)
                break
            except Exception:  # any half-written HDF5 state
                signal_session(process.pid, signal.SIGCONT)
                time.sleep(0.3)
                signal_session(process.pid, signal.SIGSTOP)
        else:
            frames = dataset_frames(self.run)
        events = self.run / "logs/events.jsonl"
        size = events.stat().st_size if events.exists() else 0
        return frames, size, files_of(self.run)


# --------------------------------------------------------------------------- final checks


def final_checks(chaos: Chaos, rc: int | None) -> tuple[list[str], dict[str, Any]]:
    args, run = chaos.args, chaos.run
    problems: list[str] = []
    facts: dict[str, Any] = {}
    time.sleep(1.0)
    leftovers = sorted(pid for sid in chaos.sessions for pid in session_members(sid))
    facts["leftovers"] = leftovers
    final = dataset_frames(run)
    facts["final"] = final
    if rc != 0:
        problems.append(f"final run exited with {rc} (see {chaos.log_path})")
    missing = final.missing(chaos.seen)
    facts["lost"] = len(set(missing)) + chaos.lost
    if missing or chaos.lost:
        problems.append(f"{len(missing)} frames stored before a kill are missing or changed at the end, "
                        f"{chaos.lost} right after the resumes")
    twice = set(final.twice) | chaos.twice_seen
    geometry = [v.digest for v in final.by_key.values()]
    geometry_twice = len(geometry) - len(set(geometry))
    facts["twice"] = len(twice) + geometry_twice
    if twice:
        problems.append(f"{len(twice)} keys stored twice: {sorted(twice)[:5]}")
    if geometry_twice:
        problems.append(f"{geometry_twice} geometries stored twice")
    marker = run / "state/phases.json"
    phases = json.loads(marker.read_text()) if marker.exists() else {"done": []}
    if phases["done"] != ["idg", "al", "converge"] or not phases.get("test_set_done"):
        problems.append(f"phases not finished: {phases}")
    keys = list(final.by_key)
    by_origin = {o: sum(k[0] == o for k in keys) for o in ("idg", "al", "test")}
    by_split: dict[str, int] = {}
    for frame in final.by_key.values():
        by_split[frame.split] = by_split.get(frame.split, 0) + 1
    facts["by_origin"], facts["by_split"] = by_origin, by_split
    summary_path = run / "report/summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    facts["summary"] = summary
    if summary is None:
        problems.append("no report/summary.json")
    else:
        labels = summary["labels"]
        if labels["total"] != len(final) or any(labels.get(o, 0) != n for o, n in by_origin.items()):
            problems.append(f"summary label counts {labels} disagree with the dataset {by_origin} "
                            f"(total {len(final)})")
        splits = {s: n for s, n in summary.get("splits", {}).items() if n}
        if splits != by_split:
            problems.append(f"summary splits {summary.get('splits')} disagree with the dataset {by_split}")
        # A label the energy gate held is stored but not "done" (nor when it is released later).
        done, held = summary["al"]["labels_done"], summary["al"].get("labels_held", 0)
        if done + held != by_origin["al"]:
            problems.append(f"al labels_done {done} + labels_held {held} != {by_origin['al']} AL frames stored")
    # The test set: size frames per temperature, none stored twice.
    config = yaml.safe_load(chaos.config.read_text())
    events, torn = read_events(run / "logs/events.jsonl")
    facts["events"], facts["torn"] = events, torn
    test_ends = [e for e in events if e["event"] == "phase_end" and e.get("phase") == "test"]
    temperatures = len(test_ends[-1]["temperatures_K"]) if test_ends else 2
    expected = config["test_set"]["size"] * temperatures
    test_keys = [k for k, v in final.by_key.items() if v.split == "test" or k[0] == "test"]
    test_twice = [k for k in twice if k[0] == "test"]
    test_geometry = [final.by_key[k].digest for k in test_keys]
    facts["test"] = (len(test_keys), expected, len(test_twice) + len(test_geometry) - len(set(test_geometry)))
    if len(test_keys) != expected or facts["test"][2]:
        problems.append(f"test set: {len(test_keys)} frames (expected {expected}), {facts['test'][2]} stored twice")
    # Converge ended once; each (re)start trained the same member(s), the summary names its best.
    converge_starts = [e for e in events if e["event"] == "phase_start" and e.get("phase") == "converge"]
    converge_ends = [e for e in events if e["event"] == "phase_end" and e.get("phase") == "converge"]
    members = [tuple(e.get("members", ())) for e in converge_starts]
    best = [e.get("best_member") for e in converge_ends]
    facts["converge"] = (len(converge_starts), len(converge_ends), members, best)
    if len(converge_ends) != 1:
        problems.append(f"converge phase ended {len(converge_ends)} times, not once")
    if len(set(members)) > 1:
        problems.append(f"converge restarts trained different members: {members}")
    if summary is not None and best and summary.get("best_member") != best[-1]:
        problems.append(f"summary best_member {summary.get('best_member')} != converge's {best[-1]}")
    if len(test_ends) != 1:
        problems.append(f"test set phase ended {len(test_ends)} times, not once")
    # Aimed kills: each aimed target hit at least once.
    for target in sorted({k.target for k in chaos.kills} - {"random"}, key=ORDER.get):
        if not any(k.target == target and chaos.hits(target, k.hit) for k in chaos.kills):
            problems.append(f"no kill hit {target} (aimed kills landed in "
                            f"{', '.join(k.hit for k in chaos.kills if k.target == target)})")
    for target in sorted(set(args.targets) - {"random"} - {k.target for k in chaos.kills}, key=ORDER.get):
        if target in kill_schedule(args.kills, args.targets):
            problems.append(f"no kill aimed at {target} was made")
    # Locks: each kill left one, each next driver took it over, no second driver got in.
    left = [t for t in chaos.takeovers if not t.left_behind]
    if left:
        problems.append(f"{len(left)} killed drivers left no {LOCK_NAME} naming them (kills "
                        f"{', '.join(str(t.kill) for t in left)}): is the lock wired in?")
    blocked = [t for t in chaos.takeovers if t.blocked or not t.taken]
    if blocked:
        problems.append(f"{len(blocked)} resumes after a kill did not take the stale lock over (kills "
                        f"{', '.join(str(t.kill) for t in blocked)}"
                        f"{'; blocked: in use by another driver' if any(t.blocked for t in blocked) else ''})")
    for attempt in chaos.attempts:
        if not attempt.refused:
            problems.append(f"second driver '{attempt.kind}': {'; '.join(attempt.problems)}")
    if chaos.second_todo:
        problems.append(f"second driver(s) {', '.join(chaos.second_todo)} not tried: no driver was seen in AL")
    if leftovers:
        problems.append(f"{len(leftovers)} processes of killed drivers still alive: {leftovers[:10]}")
    if torn:
        facts["torn_note"] = f"{torn} lines of events.jsonl are no JSON (cut by a kill)"
    # A further resume of the finished campaign does nothing.
    count = len(events)
    again = subprocess.run(chaos.command, cwd=ROOT, capture_output=True, text=True, env=chaos.env)
    facts["again"] = again
    later, _ = read_events(run / "logs/events.jsonl")
    phase_events = [e for e in later[count:] if e["event"] in ("phase_start", "phase_resume", "frame_stored")]
    if again.returncode != 0 or "already finished" not in again.stdout:
        problems.append(f"resuming the finished campaign: rc {again.returncode}, {again.stdout.strip()[:200]}")
    if phase_events:
        problems.append(f"resuming the finished campaign ran again: {[e['event'] for e in phase_events][:5]}")
    facts["lock_after"] = read_holder(run) if (run / LOCK_NAME).exists() else None
    try:
        facts["models"] = check_models(run)
    except Exception as exc:  # reported, not raised
        facts["models"] = 0
        problems.append(f"models do not load: {str(exc)[:200]}")
    return problems, facts


def report(chaos: Chaos, rc: int | None, wall: float, problems: list[str], facts: dict[str, Any]) -> None:
    kills, events = chaos.kills, facts["events"]
    print("\nchaos_resume summary")
    print(f"  {'kill':>4}  {'target':8}  {'phase hit':17}  {'at (s)':>6}  {'frames before':>13}  "
          f"{'after resume':>12}  {'lost':>4}")
    for k in kills:
        miss = "" if chaos.hits(k.target, k.hit) else "  (missed)"
        print(f"  {k.number:4d}  {k.target:8}  {k.hit:17}  {k.at_s:6.1f}  {k.before:13d}  "
              f"{'-' if k.after is None else k.after:>12}  {k.lost:4d}{miss}")
    for note in chaos.dropped:
        print(f"  (not made: {note})")
    by_target = {t: sum(k.target == t for k in kills) for t in TARGETS}
    final, by_origin = facts["final"], facts["by_origin"]
    print(f"  kills              {len(kills)} ({', '.join(f'{n} {t}' for t, n in by_target.items() if n)}); "
          f"SIGKILL of the driver and its process tree, then run to the end")
    print(f"  frames lost        {facts['lost']}")
    print(f"  frames twice       {facts['twice']}")
    refused = sum(a.refused for a in chaos.attempts)
    asked = len(chaos.attempts) + len(chaos.second_todo)
    print(f"  second driver      refused {refused} / {asked}"
          + "".join(f"; {a.command}: rc {a.rc} in {a.seconds} s" + ("" if a.refused else f" ({'; '.join(a.problems)})")
                    for a in chaos.attempts))
    taken = sum(t.taken and t.left_behind for t in chaos.takeovers)
    print(f"  stale locks        taken over {taken} / {len(chaos.takeovers)} restarts after a kill "
          f"(lock left by the killed driver {sum(t.left_behind for t in chaos.takeovers)}, "
          f"blocked {sum(t.blocked for t in chaos.takeovers)}; lock taken "
          f"{max((t.seconds for t in chaos.takeovers), default=0):.1f} s after the start at most)")
    print(f"  final exit code    {rc}")
    print(f"  wall time          {wall:.0f} s")
    print(f"  frames             {len(final)} stored: idg {by_origin['idg']}, al {by_origin['al']}, "
          f"test {by_origin['test']}; splits {facts['by_split']}; {len(chaos.seen)} checked across kills")
    summary = facts["summary"] or {}
    if summary:
        print(f"  counters           summary labels {summary['labels']}, splits {summary.get('splits')}, "
              f"al labels_done {summary['al']['labels_done']}, al stop: {summary['al']['reason']}")
    starts, ends, members, best = facts["converge"]
    print(f"  converge           started {starts} times (members {sorted(set(members))}), ended {ends} "
          f"(best member {best}); summary best_member {summary.get('best_member')}")
    n_test, expected, test_twice = facts["test"]
    print(f"  test set           {n_test} frames of {expected} expected, {test_twice} stored twice")
    resumes = [e for e in events if e["event"] == "phase_resume"]
    idg_restarts = sum(e["event"] == "phase_start" and e.get("resumed_frames", 0) > 0 for e in events)
    print(f"  resumes            AL from its checkpoint {len(resumes)} times (in-flight labels resubmitted "
          f"{sum(e.get('resubmitted', 0) for e in resumes)}, adopted {sum(e.get('adopted', 0) for e in resumes)}); "
          f"IDG restarted from stored frames {idg_restarts} times")
    print(f"  orphans            {len(facts['leftovers'])} of {len(chaos.killed_pids)} killed child processes "
          f"still alive")
    print(f"  models             {facts['models']} files load in MACECalculator")
    again = facts["again"]
    print(f"  finished resume    rc {again.returncode}: {again.stdout.strip()[:200]}")
    if facts.get("torn_note"):
        print(f"  note               {facts['torn_note']}")
    if facts["lock_after"] is not None:
        print(f"  note               {LOCK_NAME} still there after the end: {facts['lock_after']}")
    print("  result             " + ("PASS" if not problems else "FAIL"))
    for problem in problems:
        print(f"    - {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs/chaos")
    parser.add_argument("--max-new", type=int, default=4, help="random kill after 1..max-new newly stored frames")
    parser.add_argument("--jitter", type=float, default=3.0, help="then after 0..jitter more seconds")
    parser.add_argument("--patience", type=float, default=60.0, help="kill anyway after this many seconds")
    parser.add_argument("--md-steps", type=int, default=400)
    parser.add_argument("--train-size", type=int, default=40)
    parser.add_argument("--delay", type=float, default=0.5, help="faults.delay_s per label")
    parser.add_argument("--targets", type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                        default=["random", "al", "converge", "test"],
                        help="kinds of kill: random, al, converge, test; each aimed name is one kill, "
                             "the rest of --kills are random (default random,al,converge,test)")
    parser.add_argument("--aim-jitter", type=float, default=0.5,
                        help="an aimed kill comes 0..aim-jitter s after its phase is seen (sooner if it ends)")
    parser.add_argument("--aim-timeout", type=float, default=1800.0,
                        help="an aimed kill waits at most this long for its phase")
    parser.add_argument("--second-driver", type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                        default=list(SECOND_KINDS),
                        help="second drivers to start while a driver is in AL: resume (aimspax-like resume RUN), "
                             "run (aimspax-like run CONFIG --resume); '' for none (default resume,run)")
    parser.add_argument("--second-limit", type=float, default=20.0,
                        help="a second driver must exit within this many seconds")
    parser.add_argument("--test-sampler", choices=("foundation", "reference"), default="foundation",
                        help="what drives the test MD (foundation: member 0, labels on the workers)")
    args = parser.parse_args(argv)
    try:
        kill_schedule(args.kills, args.targets)
    except ValueError as exc:
        parser.error(str(exc))
    unknown = sorted(set(args.second_driver) - set(SECOND_KINDS))
    if unknown:
        parser.error(f"unknown --second-driver kind(s) {', '.join(unknown)}; use {', '.join(SECOND_KINDS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = args.workdir / "run"
    if run.exists():
        shutil.rmtree(run)
    chaos = Chaos(args)
    print(f"kill schedule: {', '.join(kill_schedule(args.kills, args.targets)) or 'none'}; "
          f"second drivers: {', '.join(args.second_driver) or 'none'}", flush=True)
    try:
        rc = chaos.campaign()
    finally:
        chaos.log.close()
    wall = chaos.elapsed()
    problems, facts = final_checks(chaos, rc)
    report(chaos, rc, wall, problems, facts)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
