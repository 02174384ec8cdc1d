"""Feed the real ``aimspax-like`` CLI damaged inputs and conditions; check each against the contract.

    .venv/bin/python scripts/damaged_inputs.py [--only SUBSTRING] [--workdir DIR] [--markdown FILE]

Every case runs the CLI as a subprocess (``sys.executable -m aimspax_like.cli ...``) in its own
folder under ``--workdir`` (default: a fresh temporary folder, kept afterwards as evidence; the
stdout/stderr of every command lie in ``_logs/``). Campaigns are the tiny EMT one of the tests
(``tests/campaign_helpers.tiny_config``: 6-atom Cu/Au cluster, 2 members of 8 channels), started
from the EMT-relaxed cluster, one at a time. Categories: config, structures, run directory,
filesystem (tmpfs mounts; needs root), signals and reference failures (see ``CASES``).

The contract each row is judged by (the row's ``expect`` column):

* ``exit 2, one line, nothing written``: bad input known before the start: exit code 2, one stderr
  line ``error: <key or file>: <what>``, no file created or changed in the case folder, and the
  output directory not created;
* ``exit 2, one line``: the same found after a start (e.g. ``resume`` of a damaged run directory,
  a second driver against a run directory in use);
* ``130/143``: SIGINT/SIGTERM saves the state and exits 128 + signal within 20 s with one line
  that says to resume;
* ``3``: labels that keep failing or a full disk stop the campaign with exit code 3 and one line
  saying "resume to continue";
* ``completed, nothing lost``: exit code 0, every phase done, every frame of the dataset finite,
  no (origin, trajectory, md_step) stored twice and no frame stored before an interruption lost;
* ``completed or 3``: either of the two above (labels that are NaN never enter the dataset).

Lines starting with ``warning:`` (advice) and the status lines (``2026-11-30 12:01:05 al  ...``) are not
counted as error lines; any other extra line (a traceback, a Python warning) is. A filesystem
case that cannot mount its tmpfs is a SKIP row, which, like a FAIL, makes the exit code 1. Exit
code 0 when every row is OK. A markdown table (one row per check) is printed at the end and
written to ``--markdown``; the full run (86 checks) takes about 6-7 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]

SETUP = "exit 2, one line, nothing written"
STARTED = "exit 2, one line"
SIGNAL = "130/143"
STOPPED = "3"
DONE = "completed, nothing lost"
DONE_OR_STOPPED = "completed or 3"

SETUP_TIMEOUT_S = 180.0
CAMPAIGN_TIMEOUT_S = 300.0
SIGNAL_LIMIT_S = 20.0
SLURM_COMMANDS = {
    "sbatch", "srun", "squeue", "scancel", "salloc", "sinfo", "scontrol", "sacct", "sacctmgr", "sattach",
    "sbcast", "scrontab", "sdiag", "sh5util", "sprio", "sreport", "sshare", "sstat", "strigger", "sview",
}
PROGRESS = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")  # the CLI's status line (stderr off a terminal)
FULL_DISK_KB = 900  # tmpfs size of the full-disk case; the tiny campaign's run directory needs ~1.3 MB


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of the table: what was run, what came back, and the verdict."""

    category: str
    case: str
    command: str
    expect: str
    rc: int | None = None
    stderr: list[str] = field(default_factory=list)
    changed: int | None = None
    changed_names: list[str] = field(default_factory=list)
    out_before: bool | None = None  # whether the output directory existed before (None: not checked)
    out_after: bool | None = None
    seconds: float | None = None
    want_rc: int | None = None  # the exact code a signal row expects
    problems: list[str] = field(default_factory=list)  # recorded by the case (dataset, message, ...)
    notes: list[str] = field(default_factory=list)
    skip: str | None = None
    verdict: str = ""
    failed: list[str] = field(default_factory=list)  # problems plus what ``judge`` found

    def error_lines(self) -> list[str]:
        """Stderr lines that are neither ``warning:`` advice nor the progress line."""
        return [line for line in self.stderr if not line.startswith("warning: ") and not PROGRESS.match(line)]

    def judge(self) -> Row:
        """Set ``verdict`` from ``expect`` (plus any problems a case recorded)."""
        if self.skip:
            self.verdict = "SKIP"
            return self
        p = self.failed = list(self.problems)
        errs = self.error_lines()
        if self.rc is None:
            p.append("did not exit (killed)")
        if self.expect in (SETUP, STARTED):
            if self.rc != 2:
                p.append(f"exit {self.rc}, expected 2")
            if len(errs) != 1:
                p.append(f"{len(errs)} error lines on stderr")
            elif not errs[0].startswith("error: "):
                p.append("line does not start with 'error: '")
            if self.expect == SETUP:
                if self.changed:
                    p.append(f"{self.changed} file(s) written")
                if self.out_after and not self.out_before:
                    p.append("output directory created")
        elif self.expect == SIGNAL:
            if self.rc != self.want_rc:
                p.append(f"exit {self.rc}, expected {self.want_rc}")
            self._one_resume_line(errs, "resume")
            if self.seconds is not None and self.seconds > SIGNAL_LIMIT_S:
                p.append(f"took {self.seconds:.1f} s after the signal")
        elif self.expect == STOPPED:
            if self.rc != 3:
                p.append(f"exit {self.rc}, expected 3")
            self._one_resume_line(errs, "resume to continue")
        elif self.expect == DONE:
            if self.rc != 0:
                p.append(f"exit {self.rc}, expected 0")
        elif self.expect == DONE_OR_STOPPED:
            if self.rc not in (0, 3):
                p.append(f"exit {self.rc}, expected 0 or 3")
            elif self.rc == 3:
                self._one_resume_line(errs, "resume to continue")
        self.verdict = "FAIL" if p else "OK"
        return self

    def _one_resume_line(self, errs: list[str], words: str) -> None:
        if len(errs) != 1:
            self.failed.append(f"{len(errs)} error lines on stderr")
        elif words not in errs[0]:
            self.failed.append(f"line does not say '{words}'")


def skipped(category: str, case: str, command: str, expect: str, reason: str) -> Row:
    """A row that could not be run here (never counts as OK)."""
    return Row(category, case, command, expect, skip=reason, notes=[reason]).judge()


# --------------------------------------------------------------------------- processes and files


@dataclass
class Outcome:
    """A finished CLI command."""

    rc: int | None
    stderr: list[str]
    seconds: float
    leftovers: int


def session_members(sid: int) -> set[int]:
    """Live processes of session ``sid`` (the driver is started as a session leader)."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.add(int(entry.name))
    return members


def end_session(sid: int, grace_s: float = 3.0) -> int:
    """SIGKILL what is left of a session this script started; returns how many were left after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    left = session_members(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = session_members(sid)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file (size, mtime) and folder under ``root``; folders only by existence."""
    state: dict[str, tuple[int, int]] = {}
    if not root.exists():
        return state
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            state[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = (-1, 0)
        for name in filenames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                info = os.lstat(path)
                state[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns)
    return state


def changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Files or folders created (+), removed (-) or changed (~)."""
    return sorted([f"+{k}" for k in set(after) - set(before)] + [f"-{k}" for k in set(before) - set(after)]
                  + [f"~{k}" for k in set(before) & set(after) if before[k] != after[k]])


def read_events(run: Path) -> list[dict[str, Any]]:
    """Complete lines of ``logs/events.jsonl`` (none if it is missing)."""
    try:
        text = (run / "logs" / "events.jsonl").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events


def al_frame_stored(event: dict[str, Any]) -> bool:
    """An AL label has entered the dataset."""
    return event.get("event") == "frame_stored" and event.get("origin") == "al"


def phase_started(phase: str) -> Callable[[dict[str, Any]], bool]:
    """Predicate: the phase has started."""
    return lambda e: e.get("event") == "phase_start" and e.get("phase") == phase


def current_phase(run: Path) -> str:
    """The last phase started according to the event log."""
    phase = "-"
    for event in read_events(run):
        if event.get("event") in ("phase_start", "phase_resume"):
            phase = str(event.get("phase"))
        elif event.get("event") == "phase_end" and event.get("phase") == phase:
            phase = f"after {phase}"
    return phase


def dataset_check(run: Path, before: set[tuple[str, int, int]] | None = None) -> tuple[set[tuple[str, int, int]],
                                                                                   list[str]]:
    """Keys of the stored frames and what is wrong: duplicates, non-finite numbers, frames lost since ``before``."""
    path = run / "data" / "dataset.h5"
    if not path.is_file():
        return set(), ["no data/dataset.h5"]
    try:
        from aimspax_like.data import DatasetStore

        frames = DatasetStore(path).frames()
    except Exception as exc:  # a frame with NaN is refused on reading, as on writing
        return set(), [f"dataset unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:90]})"]
    keys: set[tuple[str, int, int]] = set()
    duplicates = nonfinite = 0
    for frame in frames:
        key = (frame.origin, frame.trajectory, frame.md_step)
        if frame.md_step >= 0:
            duplicates += key in keys
            keys.add(key)
        arrays = [frame.positions, frame.cell, frame.forces, np.asarray(frame.energy)]
        if frame.stress is not None:
            arrays.append(frame.stress)
        nonfinite += not all(np.isfinite(a).all() for a in arrays)
    problems = []
    if duplicates:
        problems.append(f"{duplicates} frame(s) stored twice")
    if nonfinite:
        problems.append(f"{nonfinite} frame(s) with non-finite numbers")
    if before:
        lost = before - keys
        if lost:
            problems.append(f"{len(lost)} frame(s) lost since the interruption")
    return keys, problems


def phases_done(run: Path) -> list[str]:
    """``state/phases.json`` 'done' (empty when missing or unreadable)."""
    try:
        return list(json.loads((run / "state" / "phases.json").read_text())["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def shorten(text: str, workdir: Path, width: int = 110) -> str:
    """One table cell: workdir paths dropped, pipes escaped, cut to ``width``."""
    text = text.replace(str(workdir) + "/", "").replace(str(workdir), "<workdir>")
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


# --------------------------------------------------------------------------- the runner


class Runner:
    """Runs the CLI in case folders and keeps what cases share (the relaxed cluster, a fixture run)."""

    def __init__(self, workdir: Path) -> None:
        """Case folders go under ``workdir``, command logs under ``workdir/_logs``."""
        self.workdir = workdir
        self.logs = workdir / "_logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._cluster: Any = None
        self._fixture: tuple[Path, set[tuple[str, int, int]]] | None = None
        self._fixture_error: str | None = None
        self._count = 0
        self.mounts: list[Path] = []

    # ------------------------------------------------------------------ configs

    def cluster(self) -> Any:
        """The tests' Cu4Au2 cluster relaxed with EMT (a start far from a minimum only adds a warning)."""
        if self._cluster is None:
            from ase.calculators.emt import EMT
            from ase.optimize import BFGS

            sys.path.insert(0, str(ROOT / "tests"))
            from campaign_helpers import tiny_cluster

            atoms = tiny_cluster()
            atoms.calc = EMT()
            BFGS(atoms, logfile=None).run(fmax=0.05, steps=300)
            atoms.calc = None
            self._cluster = atoms
        return self._cluster.copy()

    def config(self, case: Path, **overrides: dict[str, Any]) -> dict[str, Any]:
        """``tiny_config`` in ``case`` (output ``case/run``) from the relaxed cluster, 2 local workers."""
        from ase.io import write

        sys.path.insert(0, str(ROOT / "tests"))
        from campaign_helpers import tiny_config

        overrides.setdefault("cluster", {"kind": "local", "max_workers": 2})
        config = tiny_config(case, **overrides)
        write(case / "cluster.xyz", self.cluster())
        return config

    @staticmethod
    def write(case: Path, config: dict[str, Any], name: str = "campaign.yaml") -> Path:
        """Write ``config`` as YAML into the case folder."""
        path = case / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # ------------------------------------------------------------------ processes

    def env(self, extra_path: Path | None = None, path: str | None = None) -> dict[str, str]:
        """The CLI's environment: one thread, no bytecode files, the repository (and ``extra_path``) importable."""
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        python_path = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
        env["PYTHONPATH"] = os.pathsep.join(python_path + [p for p in [os.environ.get("PYTHONPATH")] if p])
        if path is not None:
            env["PATH"] = path
        return env

    def start(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        """Start ``aimspax-like ARGS`` as a session leader; returns it and its stderr file."""
        self._count += 1
        stem = self.logs / f"{self._count:03d}_{cwd.name}"
        out, err = stem.with_suffix(".out"), stem.with_suffix(".err")
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen([sys.executable, "-m", "aimspax_like.cli", *args], cwd=cwd,
                                    env=env or self.env(), stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        return proc, err

    @staticmethod
    def finish(proc: subprocess.Popen, err: Path, timeout: float, t0: float | None = None) -> Outcome:
        """Wait for a started command (SIGKILL of its session after ``timeout``)."""
        t0 = time.monotonic() if t0 is None else t0
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        seconds = time.monotonic() - t0
        leftovers = end_session(proc.pid)
        lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
        return Outcome(rc, lines, seconds, leftovers)

    def run(self, args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = SETUP_TIMEOUT_S) -> Outcome:
        """Run a command to its end."""
        proc, err = self.start(args, cwd, env)
        return self.finish(proc, err, timeout)

    @staticmethod
    def wait_for(run: Path, predicate: Callable[[dict[str, Any]], bool], proc: subprocess.Popen,
                 timeout: float = 240.0) -> dict[str, Any] | None:
        """The first event matching ``predicate`` (None if the driver ended or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in read_events(run):
                if predicate(event):
                    return event
            if proc.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    # ------------------------------------------------------------------ rows from outcomes

    def setup_row(self, category: str, case: str, case_dir: Path, args: list[str], expect: str = SETUP,
                  env: dict[str, str] | None = None, out: Path | None = None) -> Row:
        """Run one short command and judge it (files counted over the whole case folder)."""
        out = case_dir / "run" if out is None else out
        before, out_before = snapshot(case_dir), out.exists()
        outcome = self.run(args, case_dir, env)
        changed = changes(before, snapshot(case_dir))
        row = Row(category, case, " ".join(["aimspax-like", *args]), expect, outcome.rc, outcome.stderr,
                  len(changed), changed, out_before, out.exists(), outcome.seconds)
        if outcome.leftovers:
            row.notes.append(f"{outcome.leftovers} process(es) left behind")
        return row.judge()

    def campaign_row(self, category: str, case: str, case_dir: Path, args: list[str], expect: str,
                     run: Path, before: set[tuple[str, int, int]] | None = None,
                     env: dict[str, str] | None = None) -> Row:
        """Run a campaign to its end; judge the exit and the dataset."""
        outcome = self.run(args, case_dir, env, timeout=CAMPAIGN_TIMEOUT_S)
        return self.judge_campaign(Row(category, case, " ".join(["aimspax-like", *args]), expect), outcome, run,
                                   before)

    @staticmethod
    def judge_campaign(row: Row, outcome: Outcome, run: Path, before: set[tuple[str, int, int]] | None) -> Row:
        """Fill ``row`` from a finished campaign command, check its dataset and phases, judge it."""
        row.rc, row.stderr, row.seconds = outcome.rc, outcome.stderr, outcome.seconds
        if outcome.leftovers:
            row.notes.append(f"{outcome.leftovers} process(es) left behind")
        if row.expect in (DONE, DONE_OR_STOPPED, STOPPED) and (run / "data" / "dataset.h5").exists():
            keys, problems = dataset_check(run, before)
            row.problems.extend(problems)
            row.notes.append(f"{len(keys)} frames")
        if row.expect == DONE and outcome.rc == 0 and "converge" not in phases_done(run):
            row.problems.append("converge not in state/phases.json")
        if row.expect in (STOPPED, DONE_OR_STOPPED) and outcome.rc == 3 and not (
                (run / "campaign.yaml").is_file() and (run / "data" / "dataset.h5").is_file()):
            row.problems.append("no resumable run directory left (campaign.yaml, data/dataset.h5)")
        return row.judge()

    # ------------------------------------------------------------------ fixture: an interrupted campaign

    def interrupted_run(self) -> tuple[Path, set[tuple[str, int, int]]]:
        """A run directory SIGKILLed during AL (made once): its path and the keys it had stored."""
        if self._fixture is not None:
            return self._fixture
        if self._fixture_error is not None:
            raise RuntimeError(self._fixture_error)
        case = self.workdir / "_fixture_interrupted"
        case.mkdir(parents=True, exist_ok=True)
        config = self.config(case, faults={"delay_s": 0.5}, al={"max_md_steps": 3000, "max_train_set_size": 24})
        self.write(case, config)
        proc, err = self.start(["run", "campaign.yaml", "--quiet"], case)
        event = self.wait_for(case / "run", al_frame_stored, proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        outcome = self.finish(proc, err, 30)
        if event is None:
            self._fixture_error = f"fixture campaign never stored an AL frame (exit {outcome.rc}: " \
                                  f"{(outcome.stderr or [''])[-1][:120]})"
            raise RuntimeError(self._fixture_error)
        keys, _ = dataset_check(case / "run")
        self._fixture = (case / "run", keys)
        return self._fixture

    def copy_interrupted(self, case: Path) -> tuple[Path, set[tuple[str, int, int]]]:
        """A private copy of the interrupted run directory at ``case/run``."""
        source, keys = self.interrupted_run()
        shutil.copytree(source, case / "run", symlinks=True)
        return case / "run", keys

    # ------------------------------------------------------------------ mounts

    def mount_tmpfs(self, where: Path, options: str) -> str | None:
        """Mount a tmpfs (None on success, else why not)."""
        where.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            return "not root: cannot mount a tmpfs"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return f"mount refused: {done.stderr.strip()[:100]}"
        self.mounts.append(where)
        return None

    def unmount(self, where: Path) -> None:
        """Unmount a tmpfs this runner mounted (lazily if busy)."""
        if where in self.mounts:
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)
            self.mounts.remove(where)

    def unmount_all(self) -> None:
        """Unmount everything still mounted (always called at the end)."""
        for where in list(self.mounts):
            self.unmount(where)

    def no_sbatch_path(self) -> str:
        """A PATH with every program of this PATH but the SLURM client commands."""
        folder = self.workdir / "_path_without_slurm"
        if not folder.exists():
            folder.mkdir()
            for directory in os.environ.get("PATH", "").split(os.pathsep):
                if not directory or not os.path.isdir(directory):
                    continue
                for entry in os.scandir(directory):
                    target = folder / entry.name
                    if entry.name in SLURM_COMMANDS or target.exists() or target.is_symlink():
                        continue
                    with contextlib.suppress(OSError):
                        target.symlink_to(entry.path)
        assert shutil.which("sbatch", path=str(folder)) is None
        return str(folder)


# --------------------------------------------------------------------------- config cases


def set_key(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set ``a.b.c`` in a nested dict (sections created as needed)."""
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return config


def raw_value(config: dict[str, Any], dotted: str, raw: str) -> str:
    """The config's YAML with ``dotted`` set to the literal YAML text ``raw``."""
    marker = "@@RAW@@"
    text = yaml.safe_dump(set_key(config, dotted, marker), sort_keys=False)
    return text.replace(f"'{marker}'", raw).replace(marker, raw)


ConfigDamage = Callable[[Runner, Path], "str | bytes | Path"]


def _text(build: Callable[[dict[str, Any]], str]) -> ConfigDamage:
    """A damage that edits the config's YAML text (the file is written to ``campaign.yaml``)."""
    return lambda runner, case: build(runner.config(case))


def _dict(dotted: str, value: Any) -> ConfigDamage:
    return _text(lambda c: yaml.safe_dump(set_key(c, dotted, value), sort_keys=False))


def _raw(dotted: str, raw: str) -> ConfigDamage:
    return _text(lambda c: raw_value(c, dotted, raw))


def _nested_duplicate(config: dict[str, Any]) -> str:
    text = yaml.safe_dump(config, sort_keys=False)
    return text.replace("\nal:\n", "\nal:\n  num_trajectories: 5\n", 1)


def _misspelled_section(config: dict[str, Any]) -> str:
    config["referense"] = config.pop("reference")
    return yaml.safe_dump(config, sort_keys=False)


def _gzip(runner: Runner, case: Path) -> bytes:
    return gzip.compress(yaml.safe_dump(runner.config(case)).encode())


def _undecodable(runner: Runner, case: Path) -> bytes:
    text = yaml.safe_dump(runner.config(case), sort_keys=False).encode()
    return text.replace(b"seed: 3", b"seed: 3\n# caf\xe9 \xff\xfe\n", 1)


def _directory(runner: Runner, case: Path) -> Path:
    runner.config(case)
    (case / "campaign.yaml").mkdir()
    return case / "campaign.yaml"


def _missing(runner: Runner, case: Path) -> Path:
    runner.config(case)
    return case / "campaign.yaml"


def _module_file(case: Path, name: str, source: str) -> None:
    (case / f"{name}.py").write_text(source)


def _import_ref(path: str, module: tuple[str, str] | None = None) -> ConfigDamage:
    def build(runner: Runner, case: Path) -> str:
        config = runner.config(case)
        if module is not None:
            _module_file(case, *module)
        config["reference"] = {"kind": "import", "path": path}
        return yaml.safe_dump(config, sort_keys=False)

    return build


def _pyscf_spin(runner: Runner, case: Path) -> str:
    from ase.build import molecule
    from ase.io import write

    config = runner.config(case)
    write(case / "water.xyz", molecule("H2O"))
    config["system"]["structures"] = str(case / "water.xyz")
    config["reference"] = {"kind": "pyscf", "xc": "HF", "basis": "sto-3g", "spin": 1}
    return yaml.safe_dump(config, sort_keys=False)


def _npt_cluster(config: dict[str, Any]) -> str:
    config["al"]["md"] = {"ensemble": "npt_crescale", "temperature_K": 400}
    return yaml.safe_dump(config, sort_keys=False)


BOOM_CALC = '''"""An ASE calculator whose constructor fails (a license server that is down)."""
from ase.calculators.emt import EMT


class Boom(EMT):
    def __init__(self, **kwargs):
        raise RuntimeError("license server unreachable")
'''

RAISING_CALC = '''"""An ASE calculator that raises on every call."""
from ase.calculators.emt import EMT


class Raising(EMT):
    def calculate(self, *args, **kwargs):
        raise RuntimeError("segmentation fault in the reference code (simulated)")
'''

NAN_CALC = '''"""EMT with NaN energies always (NaNEMT) or NaN forces on every third call (SometimesNaN)."""


import numpy as np
from ase.calculators.emt import EMT


class NaNEMT(EMT):
    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.results["energy"] = float("nan")
        self.results["free_energy"] = float("nan")


class SometimesNaN(EMT):
    calls = 0

    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        SometimesNaN.calls += 1
        if SometimesNaN.calls % 3 == 0:
            self.results["forces"] = np.full_like(self.results["forces"], np.nan)
'''

CONFIG_CASES: list[tuple[str, ConfigDamage]] = [
    ("duplicate key at top level (seed twice)", _text(lambda c: yaml.safe_dump(c, sort_keys=False) + "seed: 4\n")),
    ("duplicate nested key (al.num_trajectories twice)", _text(_nested_duplicate)),
    ("a second reference: section", _text(lambda c: yaml.safe_dump(c, sort_keys=False)
                                          + "reference:\n  kind: lj\n")),
    ("temperature_K: 1e400", _raw("al.md.temperature_K", "1e400")),
    ("temperature_K: .nan", _raw("al.md.temperature_K", ".nan")),
    ("temperature_K: .inf", _raw("al.md.temperature_K", ".inf")),
    ("true for an integer (al.num_trajectories)", _raw("al.num_trajectories", "true")),
    ('"5" for a number (al.num_trajectories)', _raw("al.num_trajectories", '"5"')),
    ("unknown key (al.foo)", _dict("al.foo", 1)),
    ("misspelled section (referense)", _text(_misspelled_section)),
    ("list for a number (al.window: [400])", _dict("al.window", [400])),
    ("negative budget (al.max_train_set_size: -5)", _dict("al.max_train_set_size", -5)),
    ("zero temperature (idg.md.temperature_K: 0)", _dict("idg.md.temperature_K", 0)),
    ("valid_ratio 1.5", _dict("al.valid_ratio", 1.5)),
    ("fractional integer (seed: 3.7)", _dict("seed", 3.7)),
    ("ensemble_size: 0", _dict("model.ensemble_size", 0)),
    ("string for a section (reference: emt)", _dict("reference", "emt")),
    ("probability out of range (faults.crash: 2)", _dict("faults", {"crash": 2})),
    ("al.md list of the wrong length", _dict("al.md", [{"temperature_K": 400}])),
    ("missing required key (system: {})", _dict("system", {})),
    ("binary file (random bytes)", lambda runner, case: (runner.config(case), os.urandom(4096))[1]),
    ("gzip-compressed YAML", _gzip),
    ("PNG header", lambda runner, case: (runner.config(case), b"\x89PNG\r\n\x1a\n" + os.urandom(256))[1]),
    ("directory given as config", _directory),
    ("empty file", lambda runner, case: (runner.config(case), "")[1]),
    ("YAML list at top level", _text(lambda c: yaml.safe_dump([c]))),
    ("invalid YAML syntax", _text(lambda c: yaml.safe_dump(c, sort_keys=False) + "al: [unclosed\n  x: {\n")),
    ("undecodable UTF-8", _undecodable),
    ("missing config file", _missing),
    ("import of a non-calculator (json:dumps)", _import_ref("json:dumps")),
    ("import of a module attribute (os:path)", _import_ref("os:path")),
    ("import of a missing module", _import_ref("no_such_module_xyz:Calc")),
    ("import calculator whose constructor raises", _import_ref("boom_calc:Boom", ("boom_calc", BOOM_CALC))),
    ("PySCF water with spin 1", _pyscf_spin),
    ("NPT (npt_crescale) on a non-periodic cluster", _text(_npt_cluster)),
    ("model.device cuda without a GPU", _dict("model.device", "cuda")),
]


def config_case(damage: ConfigDamage, name: str) -> Callable[[Runner, Path], list[Row]]:
    """Write the damaged config (or use the path it returns), run ``run CONFIG``, expect a clean refusal."""

    def case(runner: Runner, case_dir: Path) -> list[Row]:
        made = damage(runner, case_dir)
        config = case_dir / "campaign.yaml"
        if isinstance(made, bytes):
            config.write_bytes(made)
        elif isinstance(made, str):
            config.write_text(made)
        else:
            config = made
        return [runner.setup_row("config", name, case_dir, ["run", os.path.relpath(config, case_dir)],
                                 env=runner.env(extra_path=case_dir))]

    return case


def slurm_without_sbatch(runner: Runner, case_dir: Path) -> list[Row]:
    """``cluster.kind: slurm`` with a PATH that has no sbatch: a setup error before the start."""
    config = runner.config(case_dir, cluster={"kind": "slurm"})
    runner.write(case_dir, config)
    env = runner.env(path=runner.no_sbatch_path())
    row = runner.setup_row("config", "cluster.kind slurm without sbatch on PATH", case_dir,
                           ["run", "campaign.yaml"], env=env)
    row.command += " (PATH without sbatch)"
    return [row]


# --------------------------------------------------------------------------- structure cases

XYZ_HEADER = 'Properties=species:S:1:pos:R:3 pbc="F F F"'


def _xyz(lines: list[str], comment: str = XYZ_HEADER, count: int | None = None) -> str:
    return f"{len(lines) if count is None else count}\n{comment}\n" + "\n".join(lines) + "\n"


def _cluster_lines(runner: Runner, replace: dict[int, str] | None = None) -> list[str]:
    atoms = runner.cluster()
    lines = [f"{s} {x:.6f} {y:.6f} {z:.6f}" for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions,
                                                                    strict=True)]
    for index, line in (replace or {}).items():
        lines[index] = line
    return lines


def _periodic(comment_cell: str) -> Callable[[Runner], str]:
    def build(runner: Runner) -> str:
        return _xyz(_cluster_lines(runner), f'Lattice="{comment_cell}" Properties=species:S:1:pos:R:3 pbc="T T T"')

    return build


STRUCTURE_CASES: list[tuple[str, str, Callable[[Runner], str | bytes | None]]] = [
    ("NaN coordinate", "bad.xyz", lambda r: _xyz(_cluster_lines(r, {1: "Cu nan 0.0 0.0"}))),
    ("infinite coordinate", "bad.xyz", lambda r: _xyz(_cluster_lines(r, {1: "Cu inf 0.0 0.0"}))),
    ("two atoms 0.1 A apart", "bad.xyz", lambda r: _xyz(_cluster_lines(r, {1: "Cu 0.1 0.0 0.0", 0: "Cu 0 0 0"}))),
    ("empty xyz file", "bad.xyz", lambda r: ""),
    ("file ASE cannot read", "bad.xyz", lambda r: "this is not a structure file\nat all\n"),
    ("binary file with .xyz name", "bad.xyz", lambda r: os.urandom(2048)),
    ("atom count larger than the atoms listed", "bad.xyz", lambda r: _xyz(_cluster_lines(r), count=9)),
    ("folder with no files", "empty_folder", lambda r: None),
    ("element EMT cannot label (U)", "bad.xyz", lambda r: _xyz(_cluster_lines(r, {5: "U 1.3 1.3 2.0"}))),
    ("periodic cell of zero volume", "bad.xyz", _periodic("8 0 0 0 8 0 0 0 0")),
    ("periodic cell with NaN", "bad.xyz", _periodic("8 0 0 0 nan 0 0 0 8")),
    ("missing structure file", "absent.xyz", lambda r: None),
]


def structure_case(name: str, file_name: str, content: Callable[[Runner], str | bytes | None]
                   ) -> Callable[[Runner, Path], list[Row]]:
    """Point system.structures at a damaged file and expect a clean refusal."""

    def case(runner: Runner, case_dir: Path) -> list[Row]:
        config = runner.config(case_dir)
        target = case_dir / file_name
        data = content(runner)
        if file_name == "empty_folder":
            target.mkdir()
        elif isinstance(data, bytes):
            target.write_bytes(data)
        elif isinstance(data, str):
            target.write_text(data)
        config["system"]["structures"] = file_name
        runner.write(case_dir, config)
        return [runner.setup_row("structures", name, case_dir, ["run", "campaign.yaml"])]

    return case


# --------------------------------------------------------------------------- run directory cases


def output_is_file(runner: Runner, case_dir: Path) -> list[Row]:
    """The output path is a regular file."""
    config = runner.config(case_dir)
    runner.write(case_dir, config)
    (case_dir / "run").write_text("a file where the run directory should be\n")
    return [runner.setup_row("run directory", "output path is a file", case_dir, ["run", "campaign.yaml"])]


def output_exists(runner: Runner, case_dir: Path) -> list[Row]:
    """The output directory exists (with someone's file) and no --overwrite is given."""
    config = runner.config(case_dir)
    runner.write(case_dir, config)
    (case_dir / "run").mkdir()
    (case_dir / "run" / "notes.txt").write_text("someone's notes\n")
    return [runner.setup_row("run directory", "output exists without --overwrite", case_dir,
                             ["run", "campaign.yaml"])]


def resume_not_run_dir(runner: Runner, case_dir: Path) -> list[Row]:
    """``resume`` of an ordinary folder."""
    (case_dir / "run").mkdir()
    (case_dir / "run" / "notes.txt").write_text("not a run directory\n")
    return [runner.setup_row("run directory", "resume of a folder that is not a run directory", case_dir,
                             ["resume", "run"])]


def al_without_idg(runner: Runner, case_dir: Path) -> list[Row]:
    """``al CONFIG`` before any idg (no run directory)."""
    runner.write(case_dir, runner.config(case_dir))
    return [runner.setup_row("run directory", "al phase without a finished idg (no run directory)", case_dir,
                             ["al", "campaign.yaml"])]


def damaged_resume(name: str, damage: Callable[[Path], None], expect: str = STARTED,
                   key: str | None = None) -> Callable[[Runner, Path], list[Row]]:
    """Copy the interrupted run directory, damage it, ``resume`` it."""

    def case(runner: Runner, case_dir: Path) -> list[Row]:
        try:
            run, keys = runner.copy_interrupted(case_dir)
        except RuntimeError as exc:
            return [Row("run directory", name, "aimspax-like resume run", expect, problems=[str(exc)]).judge()]
        damage(run)
        if expect == DONE:
            return [runner.campaign_row("run directory", name, case_dir, ["resume", "run", "--quiet"], DONE, run,
                                        keys)]
        row = runner.setup_row("run directory", name, case_dir, ["resume", "run"], expect=expect, out=run)
        if key and row.rc == 2 and row.error_lines() and key not in row.error_lines()[0]:
            row.problems.append(f"message does not name {key}")
            row.judge()
        return [row]

    return case


def _edit_campaign(key: str, value: Any) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        config = yaml.safe_load((run / "campaign.yaml").read_text())
        set_key(config, key, value)
        (run / "campaign.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    return edit


def _truncate(path: str) -> Callable[[Path], None]:
    def cut(run: Path) -> None:
        target = run / path
        size = target.stat().st_size
        with open(target, "r+b") as handle:
            handle.truncate(size // 2)

    return cut


def _garbage(path: str) -> Callable[[Path], None]:
    return lambda run: (run / path).write_bytes(os.urandom(4096))


def _remove(path: str) -> Callable[[Path], None]:
    return lambda run: (run / path).unlink()


def run_resume_other_config(runner: Runner, case_dir: Path) -> list[Row]:
    """``run CONFIG --resume`` with model.channels 16 against a run made with 8."""
    name = "run --resume with a different config (model.channels 16)"
    try:
        run, _ = runner.copy_interrupted(case_dir)
    except RuntimeError as exc:
        return [Row("run directory", name, "aimspax-like run campaign.yaml --resume", STARTED,
                    problems=[str(exc)]).judge()]
    config = yaml.safe_load((run / "campaign.yaml").read_text())
    config["model"]["channels"] = 16
    config["output"]["directory"] = str(run)
    runner.write(case_dir, config)
    row = runner.setup_row("run directory", name, case_dir, ["run", "campaign.yaml", "--resume"], expect=STARTED,
                           out=run)
    if row.rc == 2 and row.error_lines() and "model.channels" not in row.error_lines()[0]:
        row.problems.append("message does not name model.channels")
        row.judge()
    return [row]


def long_al_config(runner: Runner, case_dir: Path) -> Path:
    """The tiny campaign with a 0.5 s delay per AL label and a larger AL budget (AL lasts ~30 s)."""
    config = runner.config(case_dir, faults={"delay_s": 0.5}, al={"max_md_steps": 3000, "max_train_set_size": 24})
    return runner.write(case_dir, config)


def second_driver(runner: Runner, case_dir: Path) -> list[Row]:
    """A second driver (resume; run --overwrite) while a first is in AL; then the first must complete."""
    long_al_config(runner, case_dir)
    run = case_dir / "run"
    first, err = runner.start(["run", "campaign.yaml", "--quiet"], case_dir)
    t0 = time.monotonic()
    rows = []
    event = runner.wait_for(run, phase_started("al"), first)
    for name, args in (("second driver (resume) while the first runs AL", ["resume", "run"]),
                       ("second driver (run --overwrite) while the first runs AL",
                        ["run", "campaign.yaml", "--overwrite"])):
        row = Row("run directory", name, " ".join(["aimspax-like", *args]), STARTED)
        if event is None or first.poll() is not None:
            row.problems.append("the first driver never reached AL (or ended first)")
            rows.append(row.judge())
            continue
        outcome = runner.run(args, case_dir)
        row.rc, row.stderr, row.seconds = outcome.rc, outcome.stderr, outcome.seconds
        if str(first.pid) not in " ".join(outcome.stderr):
            row.problems.append(f"does not name the holder pid {first.pid}")
        if first.poll() is not None:
            row.notes.append(f"first driver had ended meanwhile (exit {first.returncode})")
        rows.append(row.judge())
    outcome = runner.finish(first, err, CAMPAIGN_TIMEOUT_S, t0)
    rows.append(runner.judge_campaign(Row("run directory", "first driver completes despite the second ones",
                                          "aimspax-like run campaign.yaml", DONE), outcome, run, None))
    outcome = runner.run(["resume", "run"], case_dir)
    rows.append(runner.judge_campaign(Row("run directory", "resume of a finished campaign", "aimspax-like resume run",
                                          DONE), outcome, run, None))
    return rows


def dataset_deleted_while_running(runner: Runner, case_dir: Path) -> list[Row]:
    """Delete data/dataset.h5 while the driver is in AL: exit 2, one line, and the file not recreated."""
    long_al_config(runner, case_dir)
    run = case_dir / "run"
    row = Row("run directory", "dataset.h5 deleted while the campaign runs AL", "aimspax-like run campaign.yaml",
              STARTED)
    proc, err = runner.start(["run", "campaign.yaml", "--quiet"], case_dir)
    event = runner.wait_for(run, al_frame_stored, proc)
    if event is None:
        row.problems.append("the driver never stored an AL frame")
    else:
        (run / "data" / "dataset.h5").unlink()
    t0 = time.monotonic()
    outcome = runner.finish(proc, err, 180)
    row.rc, row.stderr = outcome.rc, outcome.stderr
    row.notes.append(f"exited {time.monotonic() - t0:.1f} s after the deletion")
    if (run / "data" / "dataset.h5").exists():
        row.problems.append("data/dataset.h5 was recreated")
    return [row.judge()]


# --------------------------------------------------------------------------- filesystem cases


def read_only_parent(runner: Runner, case_dir: Path) -> list[Row]:
    """The output directory's parent is a read-only tmpfs (chmod does not stop root)."""
    config = runner.config(case_dir)
    parent = case_dir / "ro"
    config["output"]["directory"] = str(parent / "run")
    runner.write(case_dir, config)
    name, args = "read-only output parent (ro tmpfs)", ["run", "campaign.yaml"]
    why = runner.mount_tmpfs(parent, "size=1m,ro")
    if why:
        return [skipped("filesystem", name, "aimspax-like " + " ".join(args), SETUP, why)]
    try:
        return [runner.setup_row("filesystem", name, case_dir, args, out=parent / "run")]
    finally:
        runner.unmount(parent)


def full_disk(runner: Runner, case_dir: Path) -> list[Row]:
    """Output on a small tmpfs: exit 3 (or 2 before the start); then more space and a resume completes."""
    config = runner.config(case_dir, faults={"delay_s": 0.2})
    disk = case_dir / "disk"
    run = disk / "run"
    config["output"]["directory"] = str(run)
    runner.write(case_dir, config)
    name = f"full filesystem mid-run ({FULL_DISK_KB} KB tmpfs)"
    why = runner.mount_tmpfs(disk, f"size={FULL_DISK_KB}k")
    if why:
        return [skipped("filesystem", name, "aimspax-like run campaign.yaml", STOPPED, why),
                skipped("filesystem", "resume after space was freed", "aimspax-like resume disk/run", DONE, why)]
    try:
        outcome = runner.run(["run", "campaign.yaml", "--quiet"], case_dir, timeout=CAMPAIGN_TIMEOUT_S)
        row = Row("filesystem", name, "aimspax-like run campaign.yaml", STOPPED)
        row.notes.append(f"phase at the stop: {current_phase(run)}")
        if outcome.rc == 2:  # filled before the start: a setup error is right too
            row.expect = STARTED
            row.notes.append("filled before the start (exit 2 accepted)")
        keys, _ = dataset_check(run)
        rows = [runner.judge_campaign(row, outcome, run, None)]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], capture_output=True)
        if (run / "campaign.yaml").exists():  # a started run: with space again, it must complete
            rows.append(runner.campaign_row("filesystem", "resume after space was freed", case_dir,
                                            ["resume", "disk/run", "--quiet"], DONE, run, keys))
        else:
            rows.append(skipped("filesystem", "resume after space was freed", "aimspax-like resume disk/run", DONE,
                                f"the full-disk run exited {outcome.rc} before the start"))
        return rows
    finally:
        runner.unmount(disk)


# --------------------------------------------------------------------------- signal cases


def signal_case(name: str, signum: int, config: Callable[[Runner, Path], Path],
                trigger: Callable[[dict[str, Any]], bool], delay_s: float = 0.0,
                group: bool = False) -> Callable[[Runner, Path], list[Row]]:
    """Send ``signum`` once ``trigger`` matches an event (+ ``delay_s``); then resume to the end."""

    def case(runner: Runner, case_dir: Path) -> list[Row]:
        config(runner, case_dir)
        run = case_dir / "run"
        how = "os.killpg" if group else "os.kill"
        row = Row("signals", name, f"aimspax-like run campaign.yaml; {how} {signal.Signals(signum).name}", SIGNAL,
                  want_rc=128 + signum)
        proc, err = runner.start(["run", "campaign.yaml", "--quiet"], case_dir)
        event = runner.wait_for(run, trigger, proc)
        if event is None:
            outcome = runner.finish(proc, err, CAMPAIGN_TIMEOUT_S)
            row.rc, row.stderr = outcome.rc, outcome.stderr
            row.problems.append("the trigger event never came")
            return [row.judge()]
        time.sleep(delay_s)
        row.notes.append(f"phase at the signal: {current_phase(run)}")
        if any(e.get("event") == "executor_started" for e in read_events(run)):
            row.notes.append("executor had started")
        t0 = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            (os.killpg if group else os.kill)(proc.pid, signum)
        outcome = runner.finish(proc, err, 60, t0)
        row.rc, row.stderr, row.seconds = outcome.rc, outcome.stderr, outcome.seconds
        if outcome.leftovers:
            row.notes.append(f"{outcome.leftovers} process(es) left behind")
        rows = [row.judge()]
        keys, problems = dataset_check(run) if (run / "data" / "dataset.h5").exists() else (set(), [])
        args = ["resume", "run", "--quiet"] if (run / "campaign.yaml").exists() else \
            ["run", "campaign.yaml", "--resume", "--quiet"]
        resumed = runner.campaign_row("signals", f"resume after {name}", case_dir, args, DONE, run, keys)
        resumed.problems.extend(f"before the resume: {p}" for p in problems)
        rows.append(resumed.judge())
        return rows

    return case


def long_idg_config(runner: Runner, case_dir: Path) -> Path:
    """IDG of ~15 rounds."""
    return runner.write(case_dir, runner.config(case_dir, idg={"max_epochs": 45, "max_set_size": 120}))


def long_converge_config(runner: Runner, case_dir: Path) -> Path:
    """Convergence of up to 400 epochs with patience 50."""
    return runner.write(case_dir, runner.config(case_dir, converge={"patience": 50, "max_epochs": 400}))


# --------------------------------------------------------------------------- reference failure cases


def reference_case(name: str, expect: str, faults: dict[str, Any] | None = None,
                   reference: dict[str, Any] | None = None, module: tuple[str, str] | None = None,
                   al: dict[str, Any] | None = None) -> Callable[[Runner, Path], list[Row]]:
    """A whole campaign with a failing reference."""

    def case(runner: Runner, case_dir: Path) -> list[Row]:
        overrides: dict[str, dict[str, Any]] = {"al": al} if al else {}
        if faults:
            overrides["faults"] = faults
        config = runner.config(case_dir, **overrides)
        if reference:
            config["reference"] = reference
        if module:
            _module_file(case_dir, *module)
        runner.write(case_dir, config)
        row = runner.campaign_row("reference failures", name, case_dir, ["run", "campaign.yaml", "--quiet"], expect,
                                  case_dir / "run", env=runner.env(extra_path=case_dir))
        row.notes.append(f"phase at the end: {current_phase(case_dir / 'run')}")
        return [row]

    return case


# --------------------------------------------------------------------------- the case list


@dataclass
class Case:
    """A named check that returns one or more rows."""

    category: str
    name: str
    run: Callable[[Runner, Path], list[Row]]


def _cases() -> list[Case]:
    cases = [Case("config", name, config_case(damage, name)) for name, damage in CONFIG_CASES]
    cases.append(Case("config", "cluster.kind slurm without sbatch on PATH", slurm_without_sbatch))
    cases += [Case("structures", name, structure_case(name, file_name, content))
              for name, file_name, content in STRUCTURE_CASES]
    cases += [
        Case("run directory", "output path is a file", output_is_file),
        Case("run directory", "output exists without --overwrite", output_exists),
        Case("run directory", "resume of a folder that is not a run directory", resume_not_run_dir),
        Case("run directory", "al phase without a finished idg", al_without_idg),
        Case("run directory", "resume after data/dataset.h5 was deleted",
             damaged_resume("resume after data/dataset.h5 was deleted", _remove("data/dataset.h5"))),
        Case("run directory", "resume with a truncated dataset.h5",
             damaged_resume("resume with a truncated dataset.h5", _truncate("data/dataset.h5"))),
        Case("run directory", "resume with a garbage state/al_checkpoint.pt",
             damaged_resume("resume with a garbage state/al_checkpoint.pt", _garbage("state/al_checkpoint.pt"))),
        Case("run directory", "resume with a garbage state/phases.json",
             damaged_resume("resume with a garbage state/phases.json", _garbage("state/phases.json"))),
        Case("run directory", "resume with a truncated state/al_checkpoint.pt",
             damaged_resume("resume with a truncated state/al_checkpoint.pt", _truncate("state/al_checkpoint.pt"))),
        Case("run directory", "resume after campaign.yaml edited: model.channels 8 -> 16",
             damaged_resume("resume after campaign.yaml edited: model.channels 8 -> 16",
                            _edit_campaign("model.channels", 16), key="model.channels")),
        Case("run directory", "resume after campaign.yaml edited: al.max_md_steps 3000 -> 600 (safe)",
             damaged_resume("resume after campaign.yaml edited: al.max_md_steps 3000 -> 600 (safe)",
                            _edit_campaign("al.max_md_steps", 600), expect=DONE)),
        Case("run directory", "resume after the events log was deleted",
             damaged_resume("resume after logs/events.jsonl was deleted", _remove("logs/events.jsonl"), expect=DONE)),
        Case("run directory", "run --resume with a different config", run_resume_other_config),
        Case("run directory", "second driver against a run directory in use", second_driver),
        Case("run directory", "dataset.h5 deleted while the campaign runs", dataset_deleted_while_running),
        Case("filesystem", "read-only output parent", read_only_parent),
        Case("filesystem", "full filesystem mid-run", full_disk),
        Case("signals", "SIGINT during IDG", signal_case("SIGINT during IDG", signal.SIGINT, long_idg_config,
                                                         phase_started("idg"), delay_s=1.0)),
        Case("signals", "SIGTERM during AL", signal_case("SIGTERM during AL", signal.SIGTERM, long_al_config,
                                                         al_frame_stored)),
        Case("signals", "SIGTERM to the process group during AL",
             signal_case("SIGTERM to the process group during AL", signal.SIGTERM, long_al_config, al_frame_stored,
                         group=True)),
        Case("signals", "SIGINT while the executor starts",
             signal_case("SIGINT while the executor starts", signal.SIGINT, long_al_config,
                         lambda e: e.get("event") == "campaign_start")),
        Case("signals", "SIGTERM during convergence training",
             signal_case("SIGTERM during convergence training", signal.SIGTERM, long_converge_config,
                         phase_started("converge"), delay_s=0.5)),
        Case("reference failures", "reference crashes on every call (faults.crash 1.0)",
             reference_case("reference crashes on every call (faults.crash 1.0)", STOPPED, faults={"crash": 1.0})),
        Case("reference failures", "SCF never converges (faults.scf_failure 1.0)",
             reference_case("SCF never converges (faults.scf_failure 1.0)", STOPPED, faults={"scf_failure": 1.0})),
        Case("reference failures", "every label times out (faults.hang 1.0, timeout_s 2)",
             reference_case("every label times out (faults.hang 1.0, timeout_s 2)", STOPPED,
                            faults={"hang": 1.0, "hang_s": 30}, reference={"kind": "emt", "timeout_s": 2},
                            al={"max_md_steps": 60})),
        Case("reference failures", "import calculator that raises on every call",
             reference_case("import calculator that raises on every call", STOPPED,
                            reference={"kind": "import", "path": "raising_calc:Raising"},
                            module=("raising_calc", RAISING_CALC))),
        Case("reference failures", "import calculator with NaN energies",
             reference_case("import calculator with NaN energies", DONE_OR_STOPPED,
                            reference={"kind": "import", "path": "nan_calc:NaNEMT"}, module=("nan_calc", NAN_CALC))),
        Case("reference failures", "import calculator with NaN forces on every third call",
             reference_case("import calculator with NaN forces on every third call", DONE_OR_STOPPED,
                            reference={"kind": "import", "path": "nan_calc:SometimesNaN"},
                            module=("nan_calc", NAN_CALC))),
    ]
    return cases


CASES = _cases()


# --------------------------------------------------------------------------- table and main


def table(rows: list[Row], workdir: Path) -> str:
    """The markdown table, one row per check."""
    head = ("| # | verdict | category | case | command | expect | exit | s | stderr lines | stderr (first line) "
            "| files written / output dir | notes |")
    lines = [head, "|" + "---|" * 12]
    for number, row in enumerate(rows, 1):
        errs = row.error_lines()
        first = errs[0] if errs else (row.stderr[0] if row.stderr else "")
        if len(errs) > 1:  # a traceback or a flood: its last line says what happened
            first = f"{errs[0][:40]} … last: {errs[-1]}"
        other = len(row.stderr) - len(errs)
        count = f"{len(row.stderr)}" + (f" ({other} warning/progress)" if other else "")
        if row.changed is None:
            files = "-"
        else:
            out = "-" if row.out_after is None else (
                ("exists" + (" (before too)" if row.out_before else "")) if row.out_after else "absent")
            names = ", ".join(row.changed_names[:3]) + (", …" if len(row.changed_names) > 3 else "")
            files = f"{row.changed}" + (f" ({names})" if names else "") + f"; out: {out}"
        notes = "; ".join(row.failed + row.notes)
        cells = [str(number), f"**{row.verdict}**" if row.verdict != "OK" else "OK", row.category, row.case,
                 row.command, row.expect, "-" if row.rc is None else str(row.rc),
                 "-" if row.seconds is None else f"{row.seconds:.1f}", count if row.stderr or row.rc is not None
                 else "-", first, files, notes]
        lines.append("| " + " | ".join(shorten(c, workdir, 150 if k == 9 else 110) for k, c in enumerate(cells))
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the selected cases, print the table; 0 when every row is OK."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the cases whose 'category/name' contains this (case-insensitive)")
    parser.add_argument("--workdir", type=Path, help="folder for the case folders (default: a fresh temp folder)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="damaged_inputs_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    selected = [c for c in CASES if not args.only or args.only.lower() in f"{c.category}/{c.name}".lower()]
    if not selected:
        print(f"no case matches {args.only!r}", file=sys.stderr)
        return 1
    runner = Runner(workdir)
    rows: list[Row] = []
    start = time.monotonic()
    try:
        for number, case in enumerate(selected, 1):
            slug = "".join(ch if ch.isalnum() else "_" for ch in case.name.lower())[:50].strip("_")
            case_dir = workdir / f"{number:02d}_{slug}"
            case_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            try:
                new = case.run(runner, case_dir)
            except Exception as exc:  # a bug of this script or a broken import: one FAIL row, go on
                new = [Row(case.category, case.name, "-", "-", problems=[f"case crashed: {type(exc).__name__}: {exc}"]
                           ).judge()]
            for row in new:
                print(f"[{number}/{len(selected)}] {row.verdict:4} {row.category}: {row.case} "
                      f"(exit {row.rc}, {time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
            rows.extend(new)
    finally:
        runner.unmount_all()
    text = table(rows, workdir)
    counts = {v: sum(r.verdict == v for r in rows) for v in ("OK", "FAIL", "SKIP")}
    summary = (f"\n{len(rows)} checks: {counts['OK']} OK, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP "
               f"in {time.monotonic() - start:.0f} s; case folders and logs in {workdir}")
    print(text + "\n" + summary)
    if args.markdown:
        args.markdown.write_text(text + "\n" + summary + "\n")
    return 0 if counts["OK"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
