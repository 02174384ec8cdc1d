"""The on-the-fly calculator in a plain ASE script: a vacancy relaxation, then NPT MD, of fcc copper.

``aimspax_like.otf.OnTheFlyCalculator`` is an ASE calculator: any ASE driver can use it. This
script shows two drivers on a 32-atom periodic Cu cell (2x2x2 cubic fcc cells), with ASE's EMT
potential as the reference, so everything runs in about a minute on a laptop CPU:

1. **setup**: EMT labels a few rattled, strained copies of the cell (half of them with a
   vacancy), with stress; a committee of 3 tiny MACE members is fitted to them
   (``OnTheFlyCalculator.from_frames``). These seed frames and every later label go to
   ``<out>/otf.h5`` (a ``DatasetStore``); decisions and labels are logged to
   ``<out>/events.jsonl`` (an ``EventLog``).
2. **optimise**: ``ase.optimize.BFGS`` relaxes the atoms around a vacancy (fixed cell) to
   ``--fmax``. A minimum found on committee forces is only the committee's, so the script then
   has EMT label it (``OnTheFlyCalculator.label_now``). Where EMT's fmax there exceeds ``--fmax``,
   BFGS continues (the committee has trained on that label) and the check repeats, up to
   ``--max-checks`` times; the script says whether EMT's own forces met the criterion in the end.
   The relaxed geometry is compared with a pure-EMT BFGS run from the same start.
3. **NPT MD**: ``ase.md.nose_hoover_chain.IsotropicMTKNPT`` (Martyna-Tobias-Klein barostat, one
   force and stress evaluation per step) runs the perfect cell at ``--temperature`` and zero
   pressure. The barostat moves the cell by the stress, which on trusted steps is the committee
   mean. The mean lattice constant is compared with a pure-EMT run of the same length and the
   same initial velocities. Every 10th frame is recomputed with EMT to measure the committee's
   energy and pressure errors. (``NPTBerendsen`` works too, but it evaluates twice per step, after
   the cell rescaling and after the position update: two labelling decisions per step.)

One calculator serves both drivers and keeps learning: wherever the largest per-atom force
standard deviation of the members exceeds ``--threshold`` (eV/A), EMT labels the structure, the
label is stored, the members train on it and the driver gets EMT's numbers for that step.
Everything is printed, ending with a table of steps, calculator calls, reference calls and wall
time per phase; ``<out>/results.json`` holds every number.

Run from the repository root::

    .venv/bin/python workflows/otf_in_ase.py                      # about 1 min on 2 cores
    .venv/bin/python workflows/otf_in_ase.py --steps 1000 --temperature 900 --out runs/otf_900K
"""

from __future__ import annotations

import os

# One OpenMP thread before torch loads (as the engine's CLI and the other workflows).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.io import write
from ase.md.nose_hoover_chain import IsotropicMTKNPT
from ase.md.velocitydistribution import Stationary
from ase.optimize import BFGS

from aimspax_like.config import CampaignConfig, config_from_dict
from aimspax_like.data import DatasetStore, LabelledFrame, reference_fingerprint
from aimspax_like.events import EventLog
from aimspax_like.otf import OnTheFlyCalculator

try:  # ASE >= 3.29; MaxwellBoltzmannDistribution is deprecated there
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as _mb

    def thermalize_momenta(atoms: Atoms, temperature_K: float, *, rng: np.random.Generator) -> None:
        _mb(atoms, temperature_K=temperature_K, rng=rng)

REFERENCE: dict[str, Any] = {"kind": "emt", "compute_stress": True}  # stress labels: the cell is periodic
MODEL: dict[str, Any] = {
    "ensemble_size": 3, "channels": 8, "max_L": 1, "max_ell": 1, "r_max": 4.5, "num_interactions": 1,
    "correlation": 2, "radial_mlp": [16], "num_radial_basis": 6, "dtype": "float64", "device": "cpu",
}
# The barostat moves the cell by the committee's stress, and a committee fitted on a handful of frames
# learns the stress far better with 10x the engine's default stress weight (a mean pressure error of
# about 0.5 GPa instead of about 2.5 GPa in the default run).
TRAINING: dict[str, Any] = {"batch_size": 4, "stress_weight": 10000.0}
SAMPLE_EVERY = 10  # MD frames recomputed with EMT


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fmax_of(forces: np.ndarray) -> float:
    return float(np.sqrt((np.asarray(forces) ** 2).sum(axis=1)).max())


def emt_equilibrium_cell() -> Atoms:
    """The 32-atom Cu cell at EMT's zero-temperature lattice constant (cell relaxed with EMT)."""
    unit = bulk("Cu", "fcc", a=3.6, cubic=True)
    unit.calc = EMT()
    BFGS(FrechetCellFilter(unit), logfile=None).run(fmax=1e-4)
    cell = unit.repeat((2, 2, 2))
    cell.calc = None
    return cell


def lattice_constant(atoms: Atoms) -> float:
    """The cubic lattice constant of an fcc cell of ``len(atoms)`` atoms (4 per cubic cell), from its volume."""
    return float((atoms.get_volume() / (len(atoms) / 4)) ** (1 / 3))


def emt_label(atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray]:
    copy = atoms.copy()
    copy.calc = EMT()
    return copy.get_potential_energy(), copy.get_forces(), copy.get_stress()


def seed_frames(perfect: Atoms, n: int, rng: np.random.Generator) -> list[LabelledFrame]:
    """``n`` EMT-labelled copies of the cell, strained by -2..+3 % in length and rattled by 0.08 A;
    every second one has a vacancy. Every 4th frame validates."""
    fingerprint = reference_fingerprint(REFERENCE)
    frames = []
    for k in range(n):
        atoms = perfect.copy()
        if k % 2 == 1:
            del atoms[int(rng.integers(len(atoms)))]
        atoms.set_cell(atoms.cell * (1.0 + rng.uniform(-0.02, 0.03)), scale_atoms=True)
        atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
        energy, forces, stress = emt_label(atoms)
        frames.append(LabelledFrame.from_atoms(
            atoms, energy=energy, forces=forces, stress=stress, split="valid" if k % 4 == 3 else "train",
            origin="idg", md_step=k, reference=fingerprint, source="seed"))
    return frames


def campaign_config(out: Path, start: Atoms, seed: int) -> CampaignConfig:
    """The few settings the calculator reads (model, training, reference); the rest is required but unused."""
    structure = out / "cu32.xyz"
    write(structure, start)
    return config_from_dict({
        "system": {"structures": str(structure)},
        "reference": REFERENCE,
        "model": MODEL,
        "training": TRAINING,
        "output": {"directory": str(out / "campaign")},
        "seed": seed,
    })


@dataclass
class Phase:
    name: str
    steps: int
    calls: int
    labels: int
    wall_s: float


@dataclass
class Tally:
    """The calculator's call and label counts at one moment, to count a phase's share."""

    calc: OnTheFlyCalculator
    calls: int = field(init=False)
    labels: int = field(init=False)
    t0: float = field(init=False)

    def __post_init__(self) -> None:
        self.calls, self.labels, self.t0 = self.calc.n_calls, self.calc.n_labels, time.perf_counter()

    def phase(self, name: str, steps: int) -> Phase:
        return Phase(name, steps, self.calc.n_calls - self.calls, self.calc.n_labels - self.labels,
                     time.perf_counter() - self.t0)


# --------------------------------------------------------------------------- optimisation


def vacancy_start(perfect: Atoms, seed: int) -> Atoms:
    atoms = perfect.copy()
    del atoms[0]
    atoms.rattle(0.05, seed=seed)
    return atoms


def optimise(calc: OnTheFlyCalculator, start: Atoms, fmax: float, max_steps: int,
             max_checks: int = 5) -> tuple[Phase, dict[str, Any]]:
    """BFGS on the calculator to ``fmax``, then one reference call at the minimum it found
    (``label_now``); where the reference's forces there exceed ``fmax``, BFGS continues on the
    committee (which has now learned that geometry) and the check repeats, ``max_checks`` times
    at most. ``converged``: the reference's own fmax at the final geometry meets ``fmax``."""
    counter = Tally(calc)
    atoms = start.copy()
    atoms.calc = calc
    opt = BFGS(atoms, logfile=None)
    checks: list[dict[str, Any]] = []
    converged = False
    while len(checks) < max_checks:
        # BFGS's step counter runs on across the checks: max_steps bounds them all together
        driver_converged = opt.run(fmax=fmax, steps=max_steps - opt.nsteps)
        if not driver_converged:
            break  # out of steps before even the committee was satisfied
        driver = {"energy": float(calc.results["energy"]), "fmax": fmax_of(calc.results["forces"]),
                  "labelled": bool(calc.results["labelled"])}  # what BFGS saw at its last call
        answer = calc.label_now(atoms)  # the reference, whatever the uncertainty; BFGS sees it next
        check = {"step": opt.nsteps, "driver_energy": driver["energy"], "driver_fmax": driver["fmax"],
                 "driver_labelled": driver["labelled"], "reference_energy": float(answer["energy"]),
                 "reference_fmax": fmax_of(answer["forces"])}
        checks.append(check)
        if check["reference_fmax"] <= fmax:
            converged = True
            break
        if opt.nsteps >= max_steps:
            break
    phase = counter.phase("optimise", opt.nsteps)

    reference = start.copy()
    reference.calc = EMT()
    emt_opt = BFGS(reference, logfile=None)
    emt_converged = emt_opt.run(fmax=fmax, steps=max_steps)
    energy, forces, _ = emt_label(atoms)
    result = {
        "converged": converged, "steps": opt.nsteps, "calls": phase.calls, "labels": phase.labels,
        "checks": checks, "max_checks": max_checks,
        "emt_energy_at_final": energy, "emt_fmax_at_final": fmax_of(forces),
        "emt_energy_at_start": emt_label(start)[0], "emt_fmax_at_start": fmax_of(emt_label(start)[1]),
        "emt_converged": bool(emt_converged), "emt_steps": emt_opt.nsteps,
        "emt_energy": reference.get_potential_energy(), "emt_fmax": fmax_of(reference.get_forces()),
        "max_position_difference": float(np.linalg.norm(atoms.positions - reference.positions, axis=1).max()),
        "positions": atoms.positions.copy(),
    }
    return phase, result


# --------------------------------------------------------------------------- NPT MD


def npt_run(atoms: Atoms, steps: int, temperature_K: float, seed: int, observe=None) -> dict[str, np.ndarray]:
    """Isotropic MTK NPT at zero pressure; volume and temperature after every step."""
    thermalize_momenta(atoms, temperature_K, rng=np.random.default_rng(seed))
    Stationary(atoms)
    md = IsotropicMTKNPT(atoms, timestep=2 * units.fs, temperature_K=temperature_K, pressure_au=0.0,
                         tdamp=50 * units.fs, pdamp=250 * units.fs)
    volumes, temperatures = [], []

    def record() -> None:
        volumes.append(atoms.get_volume())
        temperatures.append(atoms.get_temperature())
        if observe is not None:
            observe(md.nsteps)

    md.attach(record, interval=1)
    md.run(steps)
    return {"volume": np.array(volumes[1:]), "temperature": np.array(temperatures[1:])}  # [0]: the start


def npt(calc: OnTheFlyCalculator, perfect: Atoms, steps: int, temperature_K: float,
        seed: int) -> tuple[Phase, dict[str, Any]]:
    counter = Tally(calc)
    atoms = perfect.copy()
    atoms.calc = calc
    samples: list[tuple[Atoms, float, np.ndarray, bool]] = []  # (frame, energy and stress the driver got, labelled)

    def observe(step: int) -> None:
        if step > 0 and step % SAMPLE_EVERY == 0:
            samples.append((atoms.copy(), float(calc.results["energy"]), calc.results["stress"].copy(),
                            bool(calc.results["labelled"])))

    otf = npt_run(atoms, steps, temperature_K, seed, observe)
    phase = counter.phase("NPT MD", steps)

    reference = perfect.copy()
    reference.calc = EMT()
    emt = npt_run(reference, steps, temperature_K, seed)

    # errors of the committee where it answered alone: energy per atom (eV), pressure (eV/A^3)
    trusted = [(frame, energy, stress) for frame, energy, stress, labelled in samples if not labelled]
    errors, pressure_errors = [], []
    for frame, energy, stress in trusted:
        emt_energy, _, emt_stress = emt_label(frame)
        errors.append((energy - emt_energy) / len(frame))
        pressure_errors.append(-stress[:3].mean() + emt_stress[:3].mean())
    errors, pressure_errors = np.array(errors), np.array(pressure_errors)
    half = steps // 2  # averages over the second half: the first is the cell's response to heating
    n_cells = len(perfect) / 4

    def mean_a(volume: np.ndarray) -> float:
        return float(np.mean((volume[half:] / n_cells) ** (1 / 3)))

    result = {
        "steps": steps, "calls": phase.calls, "labels": phase.labels,
        # the calculator counts its calls from its first one; call k of this run is MD step k (0: the start)
        "labelled_steps": [s - counter.calls for s in calc.labelled_steps if s >= counter.calls],
        "a_start": lattice_constant(perfect),
        "a_mean": mean_a(otf["volume"]), "emt_a_mean": mean_a(emt["volume"]),
        "volume_min": float(otf["volume"].min()), "volume_max": float(otf["volume"].max()),
        "volume_start": float(perfect.get_volume()),
        "t_mean": float(otf["temperature"][half:].mean()), "emt_t_mean": float(emt["temperature"][half:].mean()),
        "n_samples": len(samples), "n_trusted_samples": len(trusted),
        # committee - EMT per atom: the mean (an offset common to all frames) and the spread about it,
        # which is what relative energies (and so forces and MD) feel
        "energy_offset_mev": float(errors.mean() * 1000) if len(errors) else float("nan"),
        "energy_spread_mev": float(errors.std() * 1000) if len(errors) else float("nan"),
        "pressure_mae_gpa": float(np.abs(pressure_errors).mean() / units.GPa) if len(errors) else float("nan"),
        "pressure_bias_gpa": float(pressure_errors.mean() / units.GPa) if len(errors) else float("nan"),
    }
    return phase, result


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="NPT MD steps of 2 fs (default 500)")
    parser.add_argument("--out", type=Path, default=Path("runs/otf_in_ase"),
                        help="folder for otf.h5, events.jsonl and label scratch (default runs/otf_in_ase); "
                        "a previous run's files there are replaced")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="label when the largest per-atom force std of the members exceeds this (eV/A)")
    parser.add_argument("--temperature", type=float, default=800.0, help="NPT temperature in K (default 800)")
    parser.add_argument("--fmax", type=float, default=0.05, help="optimiser convergence in eV/A (default 0.05)")
    parser.add_argument("--max-opt-steps", type=int, default=200, help="BFGS steps in all, checks included")
    parser.add_argument("--max-checks", type=int, default=10,
                        help="reference checks of the optimiser's minimum before giving up (default 10)")
    parser.add_argument("--seed-frames", type=int, default=8, help="EMT frames the committee starts from")
    parser.add_argument("--initial-epochs", type=int, default=100, help="epochs of the first fit to the seed frames")
    parser.add_argument("--epochs", type=int, default=2, help="epochs the members train after each label")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _table(phases: Sequence[Phase]) -> str:
    lines = [f"{'phase':<10} {'steps':>6} {'calls':>6} {'reference calls':>16} {'wall s':>7}"]
    lines += [f"{p.name:<10} {p.steps:>6} {p.calls:>6} {p.labels:>16} {p.wall_s:>7.1f}" for p in phases]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(None if argv is None else list(argv))
    warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for previous in ("otf.h5", "events.jsonl", "results.json"):  # this script's own files from an earlier run
        (out / previous).unlink(missing_ok=True)
    shutil.rmtree(out / "otf_scratch", ignore_errors=True)

    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    perfect = emt_equilibrium_cell()
    log(f"Cu, {len(perfect)} atoms, EMT lattice constant {lattice_constant(perfect):.4f} A")

    # ---- setup: seed labels and a fresh committee
    t0 = time.perf_counter()
    frames = seed_frames(perfect, args.seed_frames, rng)
    store = DatasetStore.create(out / "otf.h5")
    store.extend(frames)
    events = EventLog(out / "events.jsonl")
    config = campaign_config(out, perfect, args.seed)
    calc = OnTheFlyCalculator.from_frames(config, frames, store=store, initial_epochs=args.initial_epochs,
                                          measure="forces", threshold=args.threshold, epochs=args.epochs,
                                          valid_ratio=0.2, events=events, log_every=10)
    phases = [Phase("setup", 0, 0, len(frames), time.perf_counter() - t0)]
    log(f"setup: {len(frames)} EMT seed frames, committee of {MODEL['ensemble_size']} fitted "
        f"in {phases[0].wall_s:.1f} s")

    try:
        # ---- geometry optimisation
        phase, opt = optimise(calc, vacancy_start(perfect, args.seed), args.fmax, args.max_opt_steps,
                              args.max_checks)
        phases.append(phase)
        for k, check in enumerate(opt["checks"], 1):
            verdict = "meets" if check["reference_fmax"] <= args.fmax else "exceeds"
            log(f"  check {k} after {check['step']} BFGS steps: fmax {check['driver_fmax']:.3f} eV/A as BFGS saw it, "
                f"EMT's {check['reference_fmax']:.3f} eV/A ({verdict} {args.fmax:g}); energy "
                f"{check['driver_energy']:.4f} eV as BFGS saw it, EMT's {check['reference_energy']:.4f} eV")
        if opt["converged"]:
            status = f"converged by EMT's own forces after {len(opt['checks'])} check(s)"
        elif opt["checks"]:
            status = f"NOT converged by EMT's own forces after {len(opt['checks'])} check(s)"
        else:
            status = f"NOT converged: BFGS used its {args.max_opt_steps} steps before the first check"
        log(f"optimise: {status}; {opt['steps']} BFGS steps, {opt['calls']} calculator calls, "
            f"{opt['labels']} reference calls in all (EMT alone: {opt['emt_steps']} steps); "
            f"EMT fmax at the start {opt['emt_fmax_at_start']:.3f} eV/A")
        log(f"  at the final geometry EMT gives {opt['emt_energy_at_final']:.4f} eV, fmax "
            f"{opt['emt_fmax_at_final']:.3f} eV/A; EMT-only optimisation: {opt['emt_energy']:.4f} eV, fmax "
            f"{opt['emt_fmax']:.3f} eV/A; energy difference "
            f"{1000 * (opt['emt_energy_at_final'] - opt['emt_energy']):+.1f} meV, "
            f"max position difference {opt['max_position_difference']:.3f} A")

        # ---- NPT MD
        phase, md = npt(calc, perfect, args.steps, args.temperature, args.seed)
        phases.append(phase)
        log(f"NPT MD: {md['steps']} steps at {args.temperature:g} K, {md['calls']} calculator calls, "
            f"{md['labels']} reference calls, at steps {md['labelled_steps']}")
        log(f"  lattice constant {md['a_start']:.4f} A at the start; mean over the second half "
            f"{md['a_mean']:.4f} A (EMT-only run: {md['emt_a_mean']:.4f} A); volume "
            f"{md['volume_min']:.1f}..{md['volume_max']:.1f} A^3 (start {md['volume_start']:.1f})")
        log(f"  temperature over the second half {md['t_mean']:.0f} K (EMT-only run: {md['emt_t_mean']:.0f} K)")
        log(f"  committee vs EMT on {md['n_trusted_samples']} committee-answered frames of {md['n_samples']} "
            f"(every {SAMPLE_EVERY}th step): energy offset {md['energy_offset_mev']:+.1f} meV/atom, spread about it "
            f"{md['energy_spread_mev']:.1f} meV/atom; pressure error mean |dP| {md['pressure_mae_gpa']:.2f} GPa, "
            f"bias {md['pressure_bias_gpa']:+.2f} GPa")
    finally:
        events.close()

    opt.pop("positions")
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "a0": lattice_constant(perfect), "seed_frames": len(frames), "labels": calc.n_labels,
               "calls": calc.n_calls, "optimise": opt, "npt": md, "phases": [asdict(p) for p in phases],
               "wall_s": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log(f"{out / 'otf.h5'}: {len(store)} frames ({len(frames)} seed + {calc.n_labels} on-the-fly labels); "
        f"events in {out / 'events.jsonl'}, numbers in {out / 'results.json'}; total {results['wall_s']:.0f} s")
    print(_table(phases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
