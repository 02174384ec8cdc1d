"""Cold versus warm label workers: N consecutive frames of a small molecule, labelled one after
another through ``label`` with ``timeout_s`` set, as a production label worker does.

    .venv/bin/python scripts/bench_warm_labels.py [--frames 40] [--molecule water-dimer] \\
        [--xc PBE] [--basis def2-SVP] [--cp2k-frames 10]

Trajectory: the molecule (S22 water dimer, or ASE's ethanol) on an MD-like random walk: each
frame moves every atom by 0.02 A in a random direction from the frame before (seed 0), about
what a 0.5 fs MD step moves a hydrogen at 300 K.

"cold" is ``reference.warm: false`` (today's behaviour before warm workers): a fresh Python
child per label, a new PySCF calculator and the default (minao) guess. "warm" is the default:
one persistent label server per worker, the calculator kept, each SCF started from the
previous frame's density. The cold and warm labels of each frame must agree to 1e-6 eV and
1e-4 eV/A (the script exits 1 otherwise).

With ``--cp2k-frames`` > 0 and ``cp2k_shell`` on PATH, a CP2K pair on a rattled 2-atom Si
cell (the tests' tiny settings) follows: "cold" forgets the shell's density before each
label (``warm: false``), "warm" keeps it; both keep the one shell per worker. SCF steps are
read from each label's kept ``cp2k.out``. Uses OMP_NUM_THREADS (1 unless set).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule
from ase.collections import s22

from aimspax_like.config import CP2KReference, PySCFReference
from aimspax_like.reference import LabelResult, cp2k, label, warm_worker

STEP_A = 0.02
E_TOL_EV = 1e-6
F_TOL_EV_A = 1e-4
_CP2K_SCF = re.compile(r"SCF run converged in\s+(\d+)\s+steps", re.IGNORECASE)


def random_walk(start: Atoms, n: int, step: float = STEP_A, seed: int = 0) -> list[Atoms]:
    """``n`` frames; every atom moves ``step`` A in a random direction per frame."""
    rng = np.random.default_rng(seed)
    frames, atoms = [], start.copy()
    for _ in range(n):
        frames.append(atoms.copy())
        move = rng.normal(size=atoms.positions.shape)
        atoms.positions += step * move / np.linalg.norm(move, axis=1, keepdims=True)
    return frames


def start_structure(name: str) -> Atoms:
    if name == "water-dimer":
        return s22["Water_dimer"]
    if name == "ethanol":
        return molecule("CH3CH2OH")
    raise SystemExit(f"unknown molecule {name!r}")


def run_mode(spec: dict[str, Any], frames: list[Atoms], scratch: Path, mode: str,
             cycles_of: Any) -> dict[str, Any]:
    """Label every frame in order; wall per label as the caller of ``label`` sees it."""
    walls, cycles, results = [], [], []
    for k, atoms in enumerate(frames):
        workdir = scratch / f"{mode}{k}"
        t0 = time.perf_counter()
        outcome = label(atoms, spec, str(workdir))
        walls.append(time.perf_counter() - t0)
        if not isinstance(outcome, LabelResult):
            sys.exit(f"{mode} label {k} failed: {outcome}")
        cycles.append(cycles_of(outcome, workdir))
        results.append(outcome)
        shutil.rmtree(workdir, ignore_errors=True)
    return {"walls": walls, "cycles": cycles, "results": results}


def row(name: str, data: dict[str, Any]) -> tuple[str, float, float, float, float, float]:
    walls, cycles = data["walls"], data["cycles"]
    return (name, 60.0 * len(walls) / sum(walls), statistics.fmean(cycles), statistics.median(cycles),
            statistics.fmean(walls), sum(walls))


def print_pair(title: str, cold: dict[str, Any], warm: dict[str, Any]) -> bool:
    """The table for one reference, and whether warm and cold agree within the tolerances."""
    rows = [row("cold", cold), row("warm", warm)]
    ratio = ("warm/cold", *(w / c for w, c in zip(rows[1][1:], rows[0][1:], strict=True)))
    print(title)
    print(f"  {'mode':<10} {'labels/min':>10} {'mean SCF it':>11} {'median SCF it':>13} "
          f"{'mean wall s':>11} {'total s':>8}")
    for name, per_min, mean_it, median_it, mean_wall, total in rows:
        print(f"  {name:<10} {per_min:>10.1f} {mean_it:>11.2f} {median_it:>13.1f} {mean_wall:>11.3f} {total:>8.1f}")
    name, per_min, mean_it, median_it, mean_wall, total = ratio
    print(f"  {name:<10} {per_min:>10.2f} {mean_it:>11.2f} {median_it:>13.2f} {mean_wall:>11.2f} {total:>8.2f}")
    pairs = list(zip(cold["results"], warm["results"], strict=True))
    d_energy = max(abs(a.energy - b.energy) for a, b in pairs)
    d_forces = max(float(np.abs(a.forces - b.forces).max()) for a, b in pairs)
    ok = d_energy <= E_TOL_EV and d_forces <= F_TOL_EV_A
    print(f"  warm vs cold, same frames: max |dE| {d_energy:.1e} eV (tol {E_TOL_EV:g}), "
          f"max |dF| {d_forces:.1e} eV/A (tol {F_TOL_EV_A:g}): {'OK' if ok else 'FAIL'}")
    return ok


def pyscf_pair(args: argparse.Namespace, scratch: Path) -> bool:
    frames = random_walk(start_structure(args.molecule), args.frames)
    data = {}
    for mode in ("cold", "warm"):
        warm_worker.close_all_servers()  # each mode starts as a fresh worker
        warm_worker.forget_calculators()
        spec = PySCFReference(xc=args.xc, basis=args.basis, timeout_s=args.timeout, warm=mode == "warm")
        started = warm_worker.servers_started()
        data[mode] = run_mode(spec.model_dump(mode="json"), frames, scratch, mode,
                              lambda outcome, _workdir: outcome.scf_cycles)
        data[mode]["servers"] = warm_worker.servers_started() - started
    warm_worker.close_all_servers()
    title = (f"PySCF {args.xc}/{args.basis}, {args.molecule} ({len(frames[0])} atoms), {len(frames)} frames, "
             f"random walk {STEP_A} A/atom/frame, timeout_s {args.timeout:g}; label servers started: "
             f"cold {data['cold']['servers']}, warm {data['warm']['servers']}")
    return print_pair(title, data["cold"], data["warm"])


def cp2k_steps(_outcome: LabelResult, workdir: Path) -> int:
    text = (workdir / cp2k.OUTPUT_NAME).read_text(errors="replace")
    steps = [int(m) for m in _CP2K_SCF.findall(text)]
    if not steps:
        sys.exit(f"no 'SCF run converged' line in {workdir / cp2k.OUTPUT_NAME}")
    return sum(steps)


def cp2k_pair(args: argparse.Namespace, scratch: Path) -> bool:
    base = bulk("Si", "diamond", a=5.43)
    base.positions[1] += [0.06, -0.04, 0.03]
    frames = random_walk(base, args.cp2k_frames)
    data = {}
    for mode in ("cold", "warm"):
        cp2k.close_all_shells()
        spec = CP2KReference(basis_set="SZV-MOLOPT-SR-GTH", cutoff_Ry=80.0, eps_scf=1e-7, compute_stress=True,
                             timeout_s=args.timeout, keep_workdir=True, warm=mode == "warm")
        started = cp2k.shells_started()
        data[mode] = run_mode(spec.model_dump(mode="json"), frames, scratch, f"cp2k-{mode}", cp2k_steps)
        data[mode]["shells"] = cp2k.shells_started() - started
    cp2k.close_all_shells()
    title = (f"CP2K PBE/SZV-MOLOPT-SR-GTH 80 Ry, 2-atom Si cell, {len(frames)} frames, random walk {STEP_A} "
             f"A/atom/frame, stress on; shells started: cold {data['cold']['shells']}, warm {data['warm']['shells']} "
             "(cold: density forgotten before each label)")
    return print_pair(title, data["cold"], data["warm"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--molecule", default="water-dimer", choices=("water-dimer", "ethanol"))
    parser.add_argument("--xc", default="PBE")
    parser.add_argument("--basis", default="def2-SVP")
    parser.add_argument("--timeout", type=float, default=600.0, help="reference.timeout_s, as production sets it")
    parser.add_argument("--cp2k-frames", type=int, default=10, help="0: no CP2K pair")
    args = parser.parse_args()
    import pyscf

    print(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, PySCF {pyscf.__version__}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ok = pyscf_pair(args, Path(tmp))
        if args.cp2k_frames > 0:
            if shutil.which("cp2k_shell"):
                ok = cp2k_pair(args, Path(tmp)) and ok
            else:
                print("CP2K: cp2k_shell not on PATH, pair skipped")
    print(f"total {time.perf_counter() - t0:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
