"""Compare the batched ``npt_mtk`` integrator with ASE's own MTK NPT on EMT copper.

    .venv/bin/python scripts/check_mtk.py [--steps 5000] [--atoms-repeat 2] [--flex both]

Both integrators run the same MTK equations from the same start (fcc Cu, rattled, Maxwell-
Boltzmann momenta without centre-of-mass motion) at the same temperature, pressure, timestep
and time constants; ``isotropic`` is compared with ``IsotropicMTKNPT``, ``anisotropic`` with
``MTKNPT``. Printed per run: the drift of the conserved extended energy (linear fit, meV per
atom per ps) and its standard deviation, mean and spread of the volume, mean temperature, mean
barostat kinetic energy over kT, steps and wall time. Means carry a block-average standard
error (10 blocks after dropping the first 20 % as equilibration).

Conventions that differ on purpose (so some numbers are not expected to agree):

* degrees of freedom: ours counts 3N - 3 (the centre of mass stays at rest, as everywhere in
  ``aimspax_like.sampling``), ASE 3N. ASE's thermostat therefore holds the kinetic energy at
  3N kT / 2 spread over 3N - 3 moving degrees of freedom; its temperature on the 3N - 3 count
  (the column ``<T>``) sits 3N / (3N - 3) above the target, while ``<T> own`` uses each
  integrator's own count and must match the target for both.
* barostat degrees of freedom: ours 1 (isotropic) or 6 (anisotropic: a symmetric momentum, no
  rotation); ASE's chain targets 1 and 9. ``<Kcell>/kT`` is expected at half of ours.

With ASE's conventions patched in (see ``tests/test_sampling_mtk.py``) both follow the same
trajectory to round-off, so any difference here comes from those conventions or noise.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT

from aimspax_like.config import MDConfig
from aimspax_like.sampling.dynamics import MDState, degrees_of_freedom, maxwell_boltzmann, step_batch


@dataclass
class Run:
    name: str
    n_atoms: int
    n_dof_own: int
    dt_fs: float
    conserved: np.ndarray
    volume: np.ndarray
    kinetic: np.ndarray
    cell_kinetic: np.ndarray
    wall_s: float


def start(repeat: int, seed: int, temperature_K: float) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((repeat, repeat, repeat))
    atoms.rattle(0.02, seed=seed)
    atoms.calc = EMT()
    atoms.set_momenta(maxwell_boltzmann(atoms, temperature_K, np.random.default_rng(seed)))
    return atoms


def own_forces(structures: list[Atoms]) -> list[np.ndarray]:
    return [a.get_forces()[None] for a in structures]


def own_stresses(structures: list[Atoms]) -> list[np.ndarray]:
    return [a.get_stress(voigt=False)[None] for a in structures]


def run_ours(md: MDConfig, atoms: Atoms, steps: int) -> Run:
    state = MDState(atoms, md, np.random.default_rng(0))
    w = (degrees_of_freedom(atoms) + 3) * units.kB * md.temperature_K * (md.taup_fs * units.fs) ** 2 / 3
    rows = []
    t0 = time.perf_counter()
    for _ in range(steps):
        step_batch([state], own_forces, own_stresses, max_atoms_per_call=None)
        rows.append((state.conserved_energy(), atoms.get_volume(), atoms.get_kinetic_energy(),
                     float((state.cell_momentum**2).sum()) / (2 * w)))
    wall = time.perf_counter() - t0
    c, v, k, kc = np.array(rows).T
    return Run("ours", len(atoms), degrees_of_freedom(atoms), md.timestep_fs, c, v, k, kc, wall)


def run_ase(md: MDConfig, atoms: Atoms, steps: int) -> Run:
    kind = IsotropicMTKNPT if md.cell_flexibility == "isotropic" else MTKNPT
    dyn = kind(atoms, timestep=md.timestep_fs * units.fs, temperature_K=md.temperature_K,
               pressure_au=md.pressure_bar * units.bar, tdamp=md.taut_fs * units.fs, pdamp=md.taup_fs * units.fs)

    def cell_kinetic() -> float:
        if kind is IsotropicMTKNPT:
            return dyn._p_eps**2 / (2 * dyn._barostat.W)
        return dyn._get_cell_kinetic_energy()

    rows = []
    t0 = time.perf_counter()
    for _ in range(steps):
        dyn.run(1)
        rows.append((dyn.get_conserved_energy(), atoms.get_volume(), atoms.get_kinetic_energy(), cell_kinetic()))
    wall = time.perf_counter() - t0
    c, v, k, kc = np.array(rows).T
    return Run(f"ASE {kind.__name__}", len(atoms), 3 * len(atoms), md.timestep_fs, c, v, k, kc, wall)


def mean_and_error(values: np.ndarray, blocks: int = 10) -> tuple[float, float]:
    means = np.array([b.mean() for b in np.array_split(values, blocks)])
    return float(values.mean()), float(means.std(ddof=1) / np.sqrt(blocks))


def report(run: Run, temperature_K: float) -> str:
    n = len(run.volume)
    keep = slice(n // 5, None)
    time_ps = np.arange(n) * run.dt_fs / 1000.0
    slope = np.polyfit(time_ps, run.conserved, 1)[0] / run.n_atoms * 1000  # meV / atom / ps
    spread = run.conserved.std() / run.n_atoms * 1000
    v, v_err = mean_and_error(run.volume[keep])
    kB = units.kB
    t, t_err = mean_and_error(2 * run.kinetic[keep] / ((3 * run.n_atoms - 3) * kB))
    t_own = float((2 * run.kinetic[keep] / (run.n_dof_own * kB)).mean())
    kc = float(run.cell_kinetic[keep].mean() / (kB * temperature_K))
    return (f"| {run.name:<22} | {slope:+9.4f} | {spread:8.4f} | {v:8.2f} ± {v_err:4.2f} | "
            f"{run.volume[keep].std():6.2f} | {t:6.1f} ± {t_err:3.1f} | {t_own:6.1f} | {kc:5.2f} | "
            f"{n:6d} | {run.wall_s:6.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--atoms-repeat", type=int, default=2, help="cubic fcc cells per axis (4 atoms each)")
    parser.add_argument("--flex", choices=["isotropic", "anisotropic", "both"], default="both")
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--pressure-bar", type=float, default=1.0)
    parser.add_argument("--timestep-fs", type=float, default=2.0)
    parser.add_argument("--taut-fs", type=float, default=100.0)
    parser.add_argument("--taup-fs", type=float, default=500.0)
    args = parser.parse_args()
    flexes = ["isotropic", "anisotropic"] if args.flex == "both" else [args.flex]
    print(f"EMT Cu, {4 * args.atoms_repeat**3} atoms, {args.temperature} K, {args.pressure_bar} bar, "
          f"dt {args.timestep_fs} fs, taut {args.taut_fs} fs, taup {args.taup_fs} fs")
    print("| run                    | drift meV/atom/ps | std meV/atom | <V> A^3 | std V | <T> K (3N-3) | "
          "<T> own | <Kcell>/kT | steps | wall s |")
    for flex in flexes:
        md = MDConfig(ensemble="npt_mtk", temperature_K=args.temperature, timestep_fs=args.timestep_fs,
                      taut_fs=args.taut_fs, taup_fs=args.taup_fs, pressure_bar=args.pressure_bar,
                      cell_flexibility=flex)
        print(f"| {flex}")
        for runner in (run_ours, run_ase):
            run = runner(md, start(args.atoms_repeat, 0, args.temperature), args.steps)
            print(report(run, args.temperature), flush=True)


if __name__ == "__main__":
    main()
