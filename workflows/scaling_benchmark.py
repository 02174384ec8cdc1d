"""Scaling benchmark of the active-learning loop (issue 3): the shape of the paper's Fig. 3 and 4.

What it measures, and with what:

* a real, cheap reference (ASE's EMT on a 4-atom periodic Cu3Au cell) run by real Parsl worker
  processes, plus an injected sleep per label (``faults.delay_s``) that stands for the cost of a
  DFT calculation. The sleep is not a guess: it is a number of MD steps (``--label-cost-steps``,
  ``--mode-label-cost-steps``) times the measured wall time of one batched MD step of all
  trajectories (``step_batch`` with the committee's forces, exactly what the scheduler does per
  step), so "a label costs as much as N MD steps" holds on whatever machine, and under whatever
  load, the benchmark runs. Defaults: 200 steps for the serial/parallel study (the issue's
  figure); 100 for the workers study, where 200 would make the default run ~40 min instead of
  ~25 on a 2-core machine. 100 is the harder case: the loop's own overheads (training rounds, the
  steps until the next check) are then twice as large a share of a label;
* a real MACE committee (2 tiny members) trained once on EMT frames and reloaded from its files
  for every setting, so every setting starts from the same weights and data; during AL it is
  trained by real continual-learning rounds (1 epoch per round, 2 epochs per point);
* an ``ALScheduler`` run directly (not the CLI) per setting, with its own ``EventLog`` and its own
  ``DatasetStore``, on a ``ParslLabelExecutor`` of W workers that was started, waited for and
  warmed up before the clock starts (start-up is not part of any wall time below; one pool per
  W serves both policies, one after the other).

Every setting stops after the same number of new labels (``--labels``), and every number printed
is computed from the setting's event log only (``setting_metrics``), so the tables can be redone
from the logs in the output folder.

Studies (each run for both ``while_labelling`` policies where it applies):

* ``workers``: 32 trajectories, W = 1, 2, 4, 8, 16, 32 label workers, parallel mode;
* ``modes``: 8 trajectories, serial vs parallel mode (serial keeps one label in flight whatever W).

Run it from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python workflows/scaling_benchmark.py            # 25-30 min
    OMP_NUM_THREADS=1 .venv/bin/python workflows/scaling_benchmark.py --quick    # ~5 min

The run time follows the measured step time, i.e. the machine's load (see workflows/README.md).
"""

from __future__ import annotations

import os

# One OpenMP thread before torch is imported: the driver shares two cores with the workers,
# and two OpenMP pools fighting over them slow MD and training down ~10x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import itertools
import json
import math
import platform
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The metric functions below need nothing heavy; torch, MACE and Parsl are imported inside the
# functions that run the benchmark, so that a test can import this module in well under a second.

EMT_SPEC = {"kind": "emt", "compute_stress": False, "timeout_s": None, "keep_workdir": False}

# ------------------------------------------------------------------------------------------------
# metrics: pure functions of an event list (the tests check them against hand-computed numbers)
# ------------------------------------------------------------------------------------------------


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    """Length of the intersection of the intervals [a0, a1] and [b0, b1]."""
    return max(0.0, min(a1, b1) - max(a0, b0))


def _union_length(intervals: Iterable[tuple[float, float]], t0: float, t1: float) -> float:
    """Length of the union of intervals, each clipped to [t0, t1]."""
    clipped = sorted((max(a, t0), min(b, t1)) for a, b in intervals if min(b, t1) > max(a, t0))
    total, end = 0.0, -math.inf
    for a, b in clipped:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def status_seconds(events: Sequence[dict[str, Any]], status: str, t0: float, t1: float) -> float:
    """Trajectory-seconds spent in ``status`` within [t0, t1], summed over trajectories.

    Built from ``state`` events (``old`` -> ``new`` at time ``t``); every trajectory is
    ``running`` at ``al_start``. A status still held at ``t1`` counts up to ``t1``.
    """
    since: dict[int, float] = {}
    current: dict[int, str] = {}
    total = 0.0
    for event in events:
        if event["event"] != "state":
            continue
        index = event["trajectory"]
        old = current.get(index, event["old"])
        if old == status:
            total += _overlap(since.get(index, t0), event["t"], t0, t1)
        current[index] = event["new"]
        since[index] = event["t"]
    for index, held in current.items():
        if held == status:
            total += _overlap(since[index], t1, t0, t1)
    return total


def label_intervals(events: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """When each finished label ran on its worker: ``[t - wall_s, t]`` of its done/failed event.

    ``wall_s`` is what the label measured on the worker itself (``label`` times its own run,
    injected delay included), so the interval excludes queueing and transport; it ends when the
    driver took the result, which may be a little after the worker finished (the loop takes
    results between MD steps and training rounds).
    """
    return [
        (e["t"] - float(e.get("wall_s") or 0.0), e["t"])
        for e in events
        if e["event"] in ("label_done", "label_failed")
    ]


def setting_metrics(
    events: Sequence[dict[str, Any]], workers: int, target_labels: int | None = None
) -> dict[str, Any]:
    """The numbers of one setting, from its event log only.

    * ``wall_s``: from ``al_start`` to the ``label_done`` of the ``target_labels``-th label, i.e.
      the time to produce a fixed amount of work. At the stop the engine still waits for labels
      in flight (they cost reference time and are kept); that drain is in ``wall_to_stop_s``
      (``al_start`` -> ``al_stop``) and its labels in ``labels_done``, but not in ``wall_s``:
      with W labels in flight the drain would otherwise charge up to one extra label time to the
      runs with many workers for work that the 1-worker run never did.
    * ``utilisation``: worker-busy seconds inside [al_start, end of ``wall_s``] over
      ``workers * wall_s``; a label's busy interval is its own measured ``wall_s``.
    * ``traj_wait_s``: trajectory-seconds without sampling because of a label, inside the same
      window. Parallel mode: time in status ``waiting`` (from ``state`` events); under
      ``while_labelling: continue`` no trajectory ever waits, so it is 0 by construction. Serial
      mode: the whole loop blocks while its one label runs, so every trajectory waits for it
      (``trajectories`` x the time a label was in flight), although only the labelled one is
      marked ``waiting``. ``wait_fraction`` divides by ``trajectories * wall_s``.
    * ``train_status_s``: trajectory-seconds in status ``training`` (the paper's scheme: a
      trajectory resumes after its point's epochs), same window.
    """
    start = next(e for e in events if e["event"] == "al_start")
    stop = next((e for e in reversed(events) if e["event"] == "al_stop"), events[-1])
    t0 = float(start["t"])
    done = sorted((e for e in events if e["event"] == "label_done"), key=lambda e: e["t"])
    failed = [e for e in events if e["event"] == "label_failed"]
    target = target_labels if target_labels is not None else len(done)
    reached = 0 < target <= len(done)
    t_end = float(done[target - 1]["t"]) if reached else float(stop["t"])
    wall = t_end - t0
    mode = start.get("mode", "parallel")
    trajectories = int(start.get("trajectories", 1))

    busy = sum(_overlap(a, b, t0, t_end) for a, b in label_intervals(events))
    if mode == "serial":
        submitted = {e["label"]: e["t"] for e in events if e["event"] == "label_submitted"}
        flights = [(submitted[e["label"]], e["t"]) for e in [*done, *failed] if e["label"] in submitted]
        traj_wait = trajectories * _union_length(flights, t0, t_end)
    else:
        traj_wait = status_seconds(events, "waiting", t0, t_end)
    return {
        "mode": mode,
        "trajectories": trajectories,
        "workers": workers,
        "target_labels": target,
        "target_reached": reached,
        "wall_s": wall,
        "wall_to_stop_s": float(stop["t"]) - t0,
        "labels_done": len(done),
        "labels_failed": len(failed),
        "label_s_mean": statistics.fmean([float(e["wall_s"]) for e in done]) if done else math.nan,
        "utilisation": busy / (workers * wall) if wall > 0 else math.nan,
        "traj_wait_s": traj_wait,
        "wait_fraction": traj_wait / (trajectories * wall) if wall > 0 else math.nan,
        "train_status_s": status_seconds(events, "training", t0, t_end),
        "training_rounds": sum(e["event"] == "training_round" and e["t"] <= t_end for e in events),
        "max_in_flight": max((e.get("in_flight", 0) for e in events if e["event"] == "label_submitted"), default=0),
        "md_steps": stop.get("md_steps"),
        "stop_reason": stop.get("reason"),
    }


def add_scaling(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    """Speedup and parallel efficiency of each row against ``baseline`` (same work, in place).

    ``speedup = wall(baseline) / wall(row)``; ``efficiency = speedup / (W / W_baseline)``: with a
    fixed number of labels, 1.0 means W workers finished W times faster than the 1-worker run.
    """
    for row in rows:
        row["speedup"] = baseline["wall_s"] / row["wall_s"] if row["wall_s"] > 0 else math.nan
        row["efficiency"] = row["speedup"] * baseline["workers"] / row["workers"]


# ------------------------------------------------------------------------------------------------
# the benchmark system: structure, initial data, committee (built once)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One scheduler run."""

    study: str  # "workers" or "modes"
    mode: str  # "serial" | "parallel"
    policy: str  # while_labelling: "wait" (paper) | "continue"
    workers: int
    trajectories: int
    labels: int  # new labels that end the run (fixed work)

    @property
    def name(self) -> str:
        return f"{self.study}_T{self.trajectories:02d}_{self.mode}_{self.policy}_W{self.workers:02d}"


def start_structure():
    """4-atom periodic Cu3Au (the L1_2 cubic cell): cheap for MACE and EMT, cannot evaporate.

    Small on purpose: the label delay is tied to the MD step time, and the step cost on a CPU is
    mostly per-structure graph building, so a small cell keeps the whole benchmark within its
    time budget while the ratio "label = N MD steps" stays what was asked for.
    """
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.75, cubic=True)
    atoms.numbers[0] = 79
    return atoms


def initial_frames(n_frames: int, n_members: int, seed: int) -> list:
    """EMT-labelled frames from a short ASE Langevin run at 600 K, every 10th step.

    Every 6th frame is a validation frame (shared); the others are dealt to the members in turn,
    so each member trains on a disjoint subset (as IDG does) and the committee disagrees.
    """
    import numpy as np
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from aimspax_like.data import LabelledFrame

    atoms = start_structure()
    atoms.rattle(0.05, seed=seed)
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(seed))
    dyn = Langevin(atoms, 2 * units.fs, temperature_K=600, friction=0.02, rng=np.random.default_rng(seed + 1))
    frames, n_train = [], 0
    for i in range(n_frames):
        dyn.run(10)
        valid = i % 6 == 5
        member = -1 if valid else n_train % n_members
        n_train += not valid
        frames.append(LabelledFrame.from_atoms(
            atoms, atoms.get_potential_energy(), atoms.get_forces(),
            split="valid" if valid else "train", origin="idg", member=member, md_step=10 * (i + 1),
        ))
    return frames


def campaign_config(out: Path, members: int, seed: int):
    """The ``CampaignConfig`` the committee needs (model, training, al.max_epochs_per_point)."""
    from ase.io import write

    from aimspax_like.config import config_from_dict

    write(out / "start.xyz", start_structure())
    return config_from_dict({
        "system": {"structures": str(out / "start.xyz")},
        "reference": {"kind": "emt"},
        "model": {"ensemble_size": members, "channels": 8, "max_L": 0, "r_max": 4.5, "num_interactions": 1,
                  "correlation": 2, "radial_mlp": [8], "num_radial_basis": 6, "dtype": "float64",
                  "device": "cpu"},
        "training": {"batch_size": 5},
        "al": {"intermediate_epochs": 1, "max_epochs_per_point": 2},
        "seed": seed,
    })


@dataclass
class Shared:
    """What every setting starts from."""

    config: Any  # CampaignConfig
    frames: list  # LabelledFrame, the initial train + valid data
    model_paths: list[Path]

    @property
    def n_train(self) -> int:
        return sum(f.split == "train" for f in self.frames)

    def committee(self):
        """A fresh copy of the initial committee (new trainer state, same weights and data)."""
        from aimspax_like.committee import Committee

        return Committee.from_files(self.config, self.model_paths, self.frames)


def build_shared(out: Path, members: int, n_frames: int, epochs: int, seed: int) -> tuple[Shared, dict]:
    from aimspax_like.committee import Committee

    config = campaign_config(out, members, seed)
    frames = initial_frames(n_frames, members, seed)
    t = time.perf_counter()
    committee = Committee.from_data(config, frames, sorted({int(z) for z in frames[0].numbers}))
    metrics = committee.train_round(epochs)
    train_s = time.perf_counter() - t
    paths = committee.save(out / "initial_committee")
    info = {
        "frames": len(frames), "train": sum(f.split == "train" for f in frames), "members": members,
        "initial_epochs": epochs, "initial_training_s": train_s,
        "valid_force_mae": [m.valid_force_mae for m in metrics],
    }
    return Shared(config, frames, paths), info


def start_structures(shared: Shared, n: int) -> list:
    """Trajectory k starts from initial frame k (cyclically): diverse starts, all in-distribution."""
    starts = []
    for k in range(n):
        atoms = shared.frames[k % len(shared.frames)].to_atoms()
        atoms.calc = None
        starts.append(atoms)
    return starts


def measure_step(shared: Shared, trajectories: int, steps: int, seed: int) -> float:
    """Median wall time of one batched MD step of ``trajectories`` structures (the scheduler's step)."""
    import numpy as np

    from aimspax_like.config import MDConfig
    from aimspax_like.sampling.dynamics import MDState, maxwell_boltzmann, step_batch

    committee = shared.committee()
    md = MDConfig()
    states = []
    for k, atoms in enumerate(start_structures(shared, trajectories)):
        rng = np.random.default_rng([seed, k])
        atoms.set_momenta(maxwell_boltzmann(atoms, md.temperature_K, rng))
        states.append(MDState(atoms, md, rng))
    for _ in range(3):  # first calls pay for lazy initialisation
        step_batch(states, committee.committee_forces)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step_batch(states, committee.committee_forces)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_training_round(shared: Shared) -> float:
    """Wall time of one 1-epoch round on the initial data (the cheapest AL training round)."""
    committee = shared.committee()
    committee.train_round(1)  # graph cache and optimiser set-up
    t = time.perf_counter()
    committee.train_round(1)
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------------
# one setting
# ------------------------------------------------------------------------------------------------


def al_config(setting: Setting, shared: Shared, args: argparse.Namespace):
    """The AL settings of one run.

    The threshold is set for frequent labels, so that the label workers, not the uncertainty,
    decide how many labels are in flight: ``c_x`` = -0.5 (a frame is uncertain above half the
    moving average), a check every 2 steps and a warm-up of one check of all trajectories (the
    first labels go out at the second check; a freed worker waits at most 2 steps, plus the
    training round, for its next label).
    ``max_labels_in_flight`` = W (``--in-flight workers``): the scheduler never queues labels
    that no worker can start (their frames would be stale and the stop would have to drain
    them); ``--in-flight engine`` keeps the engine's default (one per trajectory).
    """
    from aimspax_like.config import ALConfig, MDConfig

    per_trajectory = math.ceil(setting.workers / setting.trajectories) if setting.policy == "continue" else 1
    return ALConfig(
        mode=setting.mode,
        num_trajectories=setting.trajectories,
        check_every=args.check_every,
        warmup=setting.trajectories,
        c_x=args.c_x,
        intermediate_epochs=1,
        max_epochs_per_point=args.epochs_per_point,
        max_train_set_size=shared.n_train + setting.labels,
        max_md_steps=10**7,
        max_labels_in_flight=setting.workers if args.in_flight == "workers" else None,
        while_labelling=setting.policy,
        labels_per_trajectory=per_trajectory,
        md=MDConfig(),
    )


def start_pool(workers: int, folder: Path, args: argparse.Namespace):
    """A started, ready and warmed-up ``ParslLabelExecutor`` of ``workers`` workers, and its start time.

    One pool serves the consecutive settings with the same W (the two policies): the pool is
    idle between them (every run drains its labels before it returns), so the second run meets
    the same warm workers as the first and the benchmark pays each start once. Starting 32
    workers on 2 busy cores takes about a minute.
    """
    from aimspax_like.config import LocalCluster
    from aimspax_like.execution import ParslLabelExecutor

    t = time.perf_counter()
    executor = ParslLabelExecutor(LocalCluster(max_workers=workers, cores_per_worker=args.cores_per_worker), folder)
    executor.start()
    try:
        if not executor.wait_ready(timeout=300):
            raise RuntimeError(f"no Parsl worker ready within 300 s ({folder})")
        warm_up(executor, workers, folder)
    except BaseException:
        executor.shutdown()
        raise
    return executor, time.perf_counter() - t


def warm_up(executor, workers: int, folder: Path) -> None:
    """One short label per worker at once, so no worker pays its imports inside the clock.

    Each label sleeps 0.5 s, so while they run every worker is busy with one of them and the
    interchange hands each to a different worker.
    """
    from ase import Atoms

    dimer = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
    futures = [
        executor.submit(dimer, EMT_SPEC, str(folder / "warm_up" / f"w{i}"), faults={"delay_s": 0.5})
        for i in range(workers)
    ]
    for future in futures:
        future.result(timeout=300)
    shutil.rmtree(folder / "warm_up", ignore_errors=True)


def run_setting(
    setting: Setting, shared: Shared, delay_s: float, out: Path, args: argparse.Namespace, executor, start_s: float
) -> Path:
    """Run one setting on a ready pool of ``setting.workers`` workers; return its event log."""
    from aimspax_like.data import DatasetStore, LabelledFrame, reference_fingerprint
    from aimspax_like.events import EventLog
    from aimspax_like.scheduler import ALScheduler

    if executor.n_workers != setting.workers:
        raise ValueError(f"{setting.name} needs {setting.workers} workers, the pool has {executor.n_workers}")
    folder = out / setting.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = al_config(setting, shared, args)
    committee = shared.committee()
    starts = start_structures(shared, setting.trajectories)
    committee.committee_forces(starts)  # lazy initialisation outside the measured time
    store = DatasetStore.create(folder / "dataset.h5")
    fingerprint = reference_fingerprint(EMT_SPEC)
    new_labels = 0

    def sink(atoms, result, provenance):
        """Every AL label goes to training (shared by all members), durably stored first.

        No AL label goes to validation, so the stop after ``labels`` new training frames is
        after exactly ``labels`` labels in every setting (validation: the initial frames).
        """
        nonlocal new_labels
        frame = LabelledFrame.from_atoms(
            atoms, result.energy, result.forces, result.stress, split="train",
            reference=fingerprint, label_wall_s=result.wall_s, **provenance,
        )
        store.append(frame)
        new_labels += 1
        return frame

    events = EventLog(folder / "events.jsonl")
    try:
        events.emit("executor_ready", workers=setting.workers, start_s=start_s, delay_s=delay_s)
        scheduler = ALScheduler(
            config, committee, executor, sink, events, EMT_SPEC, folder / "labels",
            train_set_size=lambda: shared.n_train + new_labels,
            faults={"delay_s": delay_s}, seed=args.seed,
        )
        for atoms in starts:
            scheduler.add_trajectory(atoms)
        scheduler.run()
    finally:
        events.close()
    return folder / "events.jsonl"


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, int]]) -> str:
    """Plain fixed-width table: (header, key, digits) per column."""
    cells = [[header for header, _, _ in columns]]
    cells += [[_fmt(row.get(key), digits) for _, key, digits in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


WORKER_COLUMNS = [
    ("policy", "policy", 0), ("W", "workers", 0), ("labels", "target_labels", 0),
    ("done", "labels_done", 0), ("wall_s", "wall_s", 1), ("to_stop_s", "wall_to_stop_s", 1),
    ("speedup", "speedup", 2), ("efficiency", "efficiency", 2), ("util", "utilisation", 2),
    ("traj_wait_s", "traj_wait_s", 1), ("wait_frac", "wait_fraction", 2),
    ("train_st_s", "train_status_s", 1), ("rounds", "training_rounds", 0), ("md_steps", "md_steps", 0),
    ("load", "load", 1),
]
MODE_COLUMNS = [
    ("mode", "mode", 0), ("policy", "policy", 0), ("W", "workers", 0), ("labels", "target_labels", 0),
    ("done", "labels_done", 0), ("wall_s", "wall_s", 1), ("to_stop_s", "wall_to_stop_s", 1),
    ("vs_serial", "speedup", 2), ("util", "utilisation", 2), ("traj_wait_s", "traj_wait_s", 1),
    ("wait_frac", "wait_fraction", 2), ("rounds", "training_rounds", 0), ("md_steps", "md_steps", 0),
    ("load", "load", 1),
]


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/scaling_benchmark"), help="output folder (replaced)")
    p.add_argument("--labels", type=int, help="new labels per run, workers study (default 32; quick 16)")
    p.add_argument("--label-cost-steps", type=float,
                   help="workers study: label delay = this many batched MD steps (default 100; quick 30)")
    p.add_argument("--workers", type=_ints,
                   help="worker counts of the workers study (default 1,2,4,8,16,32; quick 1,16)")
    p.add_argument("--trajectories", type=int, default=32, help="trajectories of the workers study")
    p.add_argument("--mode-labels", type=int, help="new labels per run, modes study (default 16; quick 8)")
    p.add_argument("--mode-label-cost-steps", type=float,
                   help="modes study: label delay in batched MD steps (default 200; quick 30)")
    p.add_argument("--mode-trajectories", type=int, default=8, help="trajectories of the serial/parallel study")
    p.add_argument("--mode-workers", type=_ints,
                   help="workers of the parallel runs of the modes study (default 8); serial runs with 1")
    p.add_argument("--policies", default="wait,continue", help="while_labelling policies (wait = the paper)")
    p.add_argument("--studies", default="workers,modes", help="which studies to run")
    p.add_argument("--c-x", type=float, default=-0.5, help="threshold factor c_x (Eq. 2)")
    p.add_argument("--check-every", type=int, default=2, help="MD steps between uncertainty checks")
    p.add_argument("--epochs-per-point", type=int, default=2, help="max_epochs_per_point")
    p.add_argument("--in-flight", choices=("workers", "engine"), default="workers",
                   help="max_labels_in_flight = W, or the engine default (one per trajectory)")
    p.add_argument("--members", type=int, default=2)
    p.add_argument("--initial-frames", type=int, default=24)
    p.add_argument("--initial-epochs", type=int, default=60)
    p.add_argument("--cores-per-worker", type=float, default=0.05,
                   help="Parsl cores_per_worker; the local pool runs min(W, cores / this) workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer workers, labels and a cheaper label: ~5 min")
    args = p.parse_args(argv)
    defaults = {"labels": (32, 16), "label_cost_steps": (100.0, 30.0), "workers": ([1, 2, 4, 8, 16, 32], [1, 16]),
                "mode_labels": (16, 8), "mode_label_cost_steps": (200.0, 30.0), "mode_workers": ([8], [8])}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    args.studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    if 1 not in args.workers and "workers" in args.studies:
        p.error("--workers must include 1 (the baseline of speedup and efficiency)")
    needed = max(args.workers + args.mode_workers)
    cores = os.cpu_count() or 1
    if cores / args.cores_per_worker < needed:
        p.error(f"cores ({cores}) / --cores-per-worker gives fewer than {needed} workers")
    return args


def plan(args: argparse.Namespace) -> list[Setting]:
    """All settings, those sharing a worker count next to each other (they share one pool)."""
    settings = []
    if "workers" in args.studies:
        for w in args.workers:
            for policy in args.policies:
                settings.append(Setting("workers", "parallel", policy, w, args.trajectories, args.labels))
    if "modes" in args.studies:
        t, n = args.mode_trajectories, args.mode_labels
        settings.append(Setting("modes", "serial", "wait", 1, t, n))  # one label in flight at most
        for w in args.mode_workers:
            for policy in args.policies:
                settings.append(Setting("modes", "parallel", policy, w, t, n))
    return settings


def _load() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")  # e3nn / mace / torch chatter on every model load
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.time()
    print(f"scaling benchmark -> {out}   load at start: {_load()}", flush=True)

    shared, info = build_shared(out, args.members, args.initial_frames, args.initial_epochs, args.seed)
    print(f"initial committee: {info['members']} MACE members, {info['train']} train / "
          f"{info['frames'] - info['train']} valid EMT frames, {info['initial_epochs']} epochs in "
          f"{info['initial_training_s']:.1f} s; valid F MAE {[round(x, 3) for x in info['valid_force_mae']]} eV/A",
          flush=True)
    settings = plan(args)
    studies = {"workers": (args.trajectories, args.label_cost_steps),
               "modes": (args.mode_trajectories, args.mode_label_cost_steps)}
    studies = {k: v for k, v in studies.items() if k in args.studies}
    step_s = {t: measure_step(shared, t, 30, args.seed) for t in sorted({t for t, _ in studies.values()})}
    delay_s = {study: cost * step_s[t] for study, (t, cost) in studies.items()}
    round_s = measure_training_round(shared)
    for study, (t, cost) in studies.items():
        print(f"{study} study: MD step of {t} trajectories (batched committee call, median of 30) "
              f"{1000 * step_s[t]:.1f} ms -> label delay = {cost:g} x {1000 * step_s[t]:.1f} ms "
              f"= {delay_s[study]:.2f} s", flush=True)
    print(f"one 1-epoch training round on the initial data: {1000 * round_s:.0f} ms", flush=True)
    # Per pool: ~8 s plus ~1.5 s per worker to start on 2 busy cores; per run: ~3 s of set-up.
    pools = {(s.study, s.workers) for s in settings}
    estimate = sum(8 + 1.5 * w for _, w in pools) + sum(
        3 + s.labels * delay_s[s.study] * 1.12 / (1 if s.mode == "serial" else s.workers) for s in settings
    )
    print(f"{len(settings)} settings; rough estimate {estimate / 60:.0f} min", flush=True)

    from aimspax_like.events import read_events

    rows: list[dict[str, Any]] = []
    for (study, workers), group in itertools.groupby(settings, key=lambda s: (s.study, s.workers)):
        executor, start_s = start_pool(workers, out / f"pool_{study}_W{workers:02d}", args)
        print(f" {study} study: pool of {workers} workers ready in {start_s:.1f} s", flush=True)
        try:
            for setting in group:
                load_before = os.getloadavg()[0]
                log = run_setting(setting, shared, delay_s[setting.study], out, args, executor, start_s)
                row = {**asdict(setting), "name": setting.name, "delay_s": delay_s[setting.study],
                       **setting_metrics(read_events(log), setting.workers, setting.labels),
                       "load_1m": [load_before, os.getloadavg()[0]], "load": os.getloadavg()[0]}
                rows.append(row)
                print(f"  {setting.name}: wall {row['wall_s']:.1f} s (to stop {row['wall_to_stop_s']:.1f} s), "
                      f"{row['labels_done']} labels, utilisation {row['utilisation']:.2f}, "
                      f"1-min load {row['load_1m'][0]:.2f} -> {row['load_1m'][1]:.2f}", flush=True)
        finally:
            executor.shutdown()

    text = [f"load at end: {_load()}; total {(time.time() - started) / 60:.1f} min"]
    for policy in args.policies:
        study = [r for r in rows if r["study"] == "workers" and r["policy"] == policy]
        if not study:
            continue
        add_scaling(study, next(r for r in study if r["workers"] == 1))
        text += ["", f"workers study: {args.trajectories} trajectories, parallel mode, while_labelling={policy}, "
                 f"{args.labels} labels, label = {args.label_cost_steps:g} MD steps = {delay_s['workers']:.2f} s",
                 table(study, WORKER_COLUMNS)]
    modes = [r for r in rows if r["study"] == "modes"]
    if modes:
        serial = next(r for r in modes if r["mode"] == "serial")
        for row in modes:
            row["speedup"] = serial["wall_s"] / row["wall_s"]
        text += ["", f"modes study: {args.mode_trajectories} trajectories, {args.mode_labels} labels, label = "
                 f"{args.mode_label_cost_steps:g} MD steps = {delay_s['modes']:.2f} s; vs_serial = "
                 "wall(serial) / wall", table(modes, MODE_COLUMNS)]
    report = "\n".join(text)
    print("\n" + report, flush=True)
    (out / "tables.txt").write_text(report + "\n")
    summary = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "initial": info, "step_s": step_s, "delay_s": delay_s, "training_round_s": round_s,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"\nwrote {out / 'tables.txt'} and {out / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
