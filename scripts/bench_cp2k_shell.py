"""Label time with one persistent CP2K shell per worker versus a fresh CP2K process per label.

    .venv/bin/python scripts/bench_cp2k_shell.py [--labels 10] [--cutoff 80] [--basis SZV-MOLOPT-SR-GTH]

Both modes label the same rattled 2-atom diamond-Si cells through ``label`` (energy, forces and
stress, Gamma point). "fresh" ends every shell before each label, so each label starts CP2K,
reads the input and builds its first density from scratch, which is what a file-based wrapper
does. The last lines compare the two modes' numbers for the same geometries: the persistent
shell starts each SCF from the previous density, which must not change the converged result.
Needs CP2K (``apt-get install cp2k``); uses OMP_NUM_THREADS (1 unless set).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from ase.build import bulk

from aimspax_like.reference import LabelResult, check_reference_setup, cp2k, label


def frames(n: int, seed: int = 0) -> list:
    base = bulk("Si", "diamond", a=5.43)
    out = []
    for k in range(n):
        atoms = base.copy()
        atoms.rattle(0.05, seed=seed + k)
        out.append(atoms)
    return out


def run(mode: str, spec: dict, geometries: list, scratch: Path) -> tuple[list[float], list[LabelResult]]:
    times, results = [], []
    for k, atoms in enumerate(geometries):
        if mode == "fresh":
            cp2k.close_all_shells()
        t0 = time.perf_counter()
        outcome = label(atoms, spec, str(scratch / f"{mode}{k}"))
        times.append(time.perf_counter() - t0)
        if not isinstance(outcome, LabelResult):
            sys.exit(f"{mode} label {k} failed: {outcome}")
        results.append(outcome)
    cp2k.close_all_shells()
    return times, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=10)
    parser.add_argument("--cutoff", type=float, default=80.0, help="cutoff_Ry")
    parser.add_argument("--basis", default="SZV-MOLOPT-SR-GTH")
    parser.add_argument("--command", default="cp2k_shell")
    args = parser.parse_args()
    spec = {
        "kind": "cp2k", "command": args.command, "basis_set": args.basis, "cutoff_Ry": args.cutoff,
        "eps_scf": 1e-7, "compute_stress": True,
    }
    check_reference_setup(spec, {14})
    geometries = frames(args.labels)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        rows = {}
        results = {}
        for mode in ("persistent", "fresh"):
            started = cp2k.shells_started()
            times, results[mode] = run(mode, spec, geometries, scratch)
            rows[mode] = (times, cp2k.shells_started() - started)
    print(f"CP2K labels: 2-atom Si, {args.basis}, {args.cutoff:g} Ry, Gamma, stress on, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {args.labels} labels per mode, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'mode':<11} {'shells':>6} {'first s':>8} {'median s':>9} {'mean s':>7} {'total s':>8}")
    for mode, (times, shells) in rows.items():
        later = times[1:] or times
        print(f"{mode:<11} {shells:>6d} {times[0]:>8.2f} {statistics.median(later):>9.2f} "
              f"{statistics.fmean(times):>7.2f} {sum(times):>8.2f}")
    speedup = sum(rows["fresh"][0]) / sum(rows["persistent"][0])
    print(f"persistent shell: {speedup:.2f}x less label time in total")
    pairs = list(zip(results["persistent"], results["fresh"], strict=True))
    d_energy = max(abs(a.energy - b.energy) for a, b in pairs)
    d_forces = max(float(np.abs(a.forces - b.forces).max()) for a, b in pairs)
    d_stress = max(float(np.abs(a.stress - b.stress).max()) for a, b in pairs)
    print(f"persistent vs fresh, same geometries: max |dE| {d_energy:.2e} eV, max |dF| {d_forces:.2e} eV/A, "
          f"max |dstress| {d_stress:.2e} eV/A^3")


if __name__ == "__main__":
    main()
