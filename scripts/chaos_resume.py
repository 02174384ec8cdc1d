"""Kill a small campaign with SIGKILL at random moments, resume it each time, check nothing is lost.

    .venv/bin/python scripts/chaos_resume.py [--kills 10] [--seed 0] [--workdir DIR]

The campaign is the tiny EMT one of the tests (6-atom Cu/Au cluster, 2-member MACE ensemble)
with a long AL budget and a delay per label, so it lasts a minute or two without kills. The
driver (``aimspax-like run CONFIG --resume``) runs in its own session; at a random moment it and
every process it started (the Parsl interchange and worker pool, which a SIGKILLed driver would
leave orphaned) are killed with SIGKILL, then it is started again. After the last kill it runs
to the end. Checks:

* the campaign completes (exit code 0, every phase done) and a further resume says it finished;
* every frame stored before each kill (read from the dataset right before the kill) is in the
  dataset afterwards, with identical positions and energy;
* no frame is stored twice (by (origin, trajectory, MD step) and by geometry);
* the counters agree with the dataset (summary totals; AL labels done == AL frames stored);
* no process of any killed driver is left running;
* the final models load in mace's MACECalculator and give finite forces.

Exit code 0 when every check holds; a summary is printed either way.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from ase import Atoms
from ase.io import write

ROOT = Path(__file__).resolve().parents[1]


def campaign_config(workdir: Path, md_steps: int, train_size: int, delay_s: float) -> Path:
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
        "converge": {"patience": 3, "max_epochs": 8},
        "test_set": {"size": 3, "stride": 5},  # 3 frames at each of two temperatures
        "cluster": {"kind": "local", "max_workers": 2},
        "output": {"directory": str(workdir / "run")},
        "seed": 3,
    }
    path = workdir / "campaign.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


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


# --------------------------------------------------------------------------- dataset checks


def dataset_frames(run: Path, tries: int = 20) -> dict[tuple, tuple[str, float]]:
    """(origin, trajectory, md_step) -> (geometry hash, energy); raises on a duplicate key.

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


def _read_frames(run: Path) -> dict[tuple, tuple[str, float]]:
    from aimspax_like.data import DatasetStore

    path = run / "data/dataset.h5"
    if not path.exists():
        return {}
    frames = {}
    for frame in DatasetStore(path).frames():
        key = (frame.origin, frame.trajectory, frame.md_step)
        if key in frames:
            raise AssertionError(f"frame stored twice: {key}")
        digest = hashlib.sha1(np.round(frame.positions, 10).tobytes()).hexdigest()
        frames[key] = (digest, frame.energy)
    return frames


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


def wait_for_progress(process: subprocess.Popen, run: Path, new: int, patience: float) -> bool:
    """Wait until ``new`` more frames are stored (or ``patience`` s pass); False if the run ended.

    Killing at a random moment *after progress* spreads the kills over every phase (labelling,
    training, MD, checkpoint writes) instead of spending them all on start-up.
    """
    start = len(dataset_frames(run))
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if len(dataset_frames(run)) >= start + new:
            return True
        time.sleep(0.2)
    return process.poll() is None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs/chaos")
    parser.add_argument("--max-new", type=int, default=4, help="kill after 1..max-new newly stored frames")
    parser.add_argument("--jitter", type=float, default=3.0, help="then after 0..jitter more seconds")
    parser.add_argument("--patience", type=float, default=60.0, help="kill anyway after this many seconds")
    parser.add_argument("--md-steps", type=int, default=400)
    parser.add_argument("--train-size", type=int, default=40)
    parser.add_argument("--delay", type=float, default=0.5, help="faults.delay_s per label")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = args.workdir / "run"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    config = campaign_config(args.workdir, args.md_steps, args.train_size, args.delay)
    command = [sys.executable, "-m", "aimspax_like.cli", "run", str(config), "--resume", "--quiet"]
    log = (args.workdir / "driver.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    kills, killed_pids, sessions, problems, lost = [], set(), [], [], 0
    seen: dict[tuple, tuple[str, float]] = {}
    rc = None
    while True:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        if len(kills) >= args.kills:
            rc = process.wait()
            break
        started = time.monotonic()
        if not wait_for_progress(process, run, rng.randint(1, args.max_new), args.patience):
            rc = process.returncode
            break  # finished before the kill came
        time.sleep(rng.uniform(0.0, args.jitter))
        wait = time.monotonic() - started
        before = dataset_frames(run)
        tree = kill_tree(process)
        killed_pids |= tree
        after = dataset_frames(run)
        missing = [k for k, v in before.items() if after.get(k) != v]
        lost += len(missing)
        seen.update(before)
        marker = run / "state/phases.json"
        phases = json.loads(marker.read_text())["done"] if marker.exists() else []
        sessions.append(process.pid)
        kills.append((round(wait, 1), len(before), len(tree), "/".join(phases) or "-"))
        print(f"kill {len(kills):2d} after {wait:4.1f} s: {len(before):3d} frames stored, "
              f"phases done: {'/'.join(phases) or '-'}, killed driver + {len(tree)} processes", flush=True)
    wall = time.monotonic() - t0
    time.sleep(1.0)
    leftovers = sorted(pid for sid in sessions for pid in session_members(sid))
    final = dataset_frames(run)
    if rc != 0:
        problems.append(f"final run exited with {rc} (see {args.workdir / 'driver.log'})")
    missing = [k for k, v in seen.items() if final.get(k) != v]
    if missing or lost:
        problems.append(f"{len(missing) + lost} frames stored before a kill are missing or changed")
    phases = json.loads((run / "state/phases.json").read_text())
    if phases["done"] != ["idg", "al", "converge"] or not phases.get("test_set_done"):
        problems.append(f"phases not finished: {phases}")
    summary = json.loads((run / "report/summary.json").read_text())
    by_origin = {o: sum(k[0] == o for k in final) for o in ("idg", "al", "test")}
    if summary["labels"]["total"] != len(final) or any(summary["labels"][o] != n for o, n in by_origin.items()):
        problems.append(f"summary counts {summary['labels']} disagree with the dataset {by_origin}")
    if summary["al"]["labels_done"] != by_origin["al"]:
        problems.append(f"al labels_done {summary['al']['labels_done']} != {by_origin['al']} AL frames stored")
    geometry = [v[0] for v in final.values()]
    if len(set(geometry)) != len(geometry):
        problems.append("a geometry is stored twice")
    if leftovers:
        problems.append(f"{len(leftovers)} processes of killed drivers still alive: {leftovers[:10]}")
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if again.returncode != 0 or "already finished" not in again.stdout:
        problems.append(f"resuming the finished campaign: rc {again.returncode}, {again.stdout.strip()[:200]}")
    n_models = check_models(run)
    events = [json.loads(line) for line in (run / "logs/events.jsonl").read_text().splitlines() if line.strip()]
    resumes = [e for e in events if e["event"] == "phase_resume"]
    idg_restarts = sum(e["event"] == "phase_start" and e.get("resumed_frames", 0) > 0 for e in events)
    print("\nchaos_resume summary")
    print(f"  kills            {len(kills)} (SIGKILL of the driver and its process tree), then run to the end")
    print(f"  wall time        {wall:.0f} s")
    print(f"  frames           {len(final)} stored: idg {by_origin['idg']}, al {by_origin['al']}, "
          f"test {by_origin['test']}; {len(seen)} were checked across kills, {len(missing) + lost} lost")
    print("  duplicates       none" if len(set(geometry)) == len(geometry) else "  duplicates       FOUND")
    print(f"  counters         summary total {summary['labels']['total']}, al labels_done "
          f"{summary['al']['labels_done']}, al stop: {summary['al']['reason']}")
    print(f"  resumes          AL from its checkpoint {len(resumes)} times (in-flight labels resubmitted "
          f"{sum(e['resubmitted'] for e in resumes)}, adopted {sum(e['adopted'] for e in resumes)}); "
          f"IDG restarted from stored frames {idg_restarts} times")
    print(f"  orphans          {len(leftovers)} of {len(killed_pids)} killed child processes still alive")
    print(f"  models           {n_models} files load in MACECalculator")
    print(f"  finished resume  rc {again.returncode}: {again.stdout.strip()}")
    print("  result           " + ("OK" if not problems else "FAILED: " + "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
