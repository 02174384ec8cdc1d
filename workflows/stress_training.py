"""Stress training: does training the committee on stress labels pay off on held-out cells?

The engine trains members on stress when frames carry stress labels (``training.stress_weight``,
default 1000; mace's ``WeightedEnergyForcesStressLoss``). NPT active learning drives the cell by
the committee's virial, so the question is how much better the stress of a member gets when it is
trained on stress, and what it costs in force and energy accuracy. This study measures it on a
periodic copper cell labelled by EMT, with test sets no training run ever sees:

* training data: reference NPT MD (the engine's ``StridedSampler`` with an EMT calculator and
  ``with_stress=True``; stochastic cell rescaling, 1 bar) at 300 K, every ``stride``-th (20th) frame
  after an equilibration, split by the engine's rule (valid ratio 0.2: every 5th frame validates);
* test sets: independent NPT MD runs (other seeds) at 300 K and 600 K, plus ``strained`` cells:
  300 K test frames scaled isotropically to -2 % and +2 % volume (atoms moved with the cell) and
  relabelled, so the stress range reaches past the thermal volume fluctuations of the training
  MD;
* every frame carries ``REF_energy``, ``REF_forces`` and ``REF_stress`` (Voigt, eV/A^3), the keys
  of ``aimspax_like.models.graphs.KEYS``.

The same single MACE (quickstart-like: 16 channels, max_L 1, r_max 5, float64 on CPU) is trained
on the same frames with the same seeds once per stress weight (default 0 and 1000), with
``EnsembleTrainer.train_to_convergence`` (``--patience`` / ``--max-epochs``; validation loss as the
trainer defines it, so a weight-0 run selects its best epoch without the stress term), then its
E0s are refitted to the training energies (as the engine's convergence phase does; E0s carry no
stress). Reported per (weight, seed): stress MAE over the 9 components (``evaluate``'s
``stress_mae``) in meV/A^3 and GPa (1 eV/A^3 = 160.2 GPa) per test set, the MAE of the pressure
(-trace/3, the isotropic part) in GPa, force MAE (meV/A), energy MAE (meV/atom), epochs and
training time; a ``train-mean`` baseline line gives the stress MAE of predicting every test
frame's stress as the mean training stress. A second table gives the means over seeds and the
ratio of stress MAEs (weight 0 / weight w).

Everything is measured in one run (no cache); the table goes to stdout, ``--table`` (default
``workflows/results/stress_training.md``) and, with every number, ``--out``/results.json::

    .venv/bin/python workflows/stress_training.py            # defaults: ~7 min on 2 shared cores
    .venv/bin/python workflows/stress_training.py --quick    # ~1 min
    .venv/bin/python workflows/stress_training.py --weights 0,100,1000,10000 --seeds 0
"""

from __future__ import annotations

import os

# One OpenMP thread before torch loads (as the engine's CLI and the other studies).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import math
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from aimspax_like.config import MDConfig, ModelConfig, TrainingConfig, parse_yaml
from aimspax_like.data.splits import is_validation
from aimspax_like.sampling.ase_md import StridedSampler

# torch and MACE load inside the training functions, after main() has quietened them.

ROOT = Path(__file__).resolve().parents[1]
EV_PER_A3_IN_GPA = 160.21766  # 1 eV/A^3 in GPa
QUICKSTART_MODEL: dict[str, Any] = {
    "channels": 16, "max_L": 1, "r_max": 5.0, "radial_mlp": [32, 32], "dtype": "float64", "device": "cpu",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- cells


def _cubic1() -> Atoms:
    return bulk("Cu", "fcc", a=3.6, cubic=True)  # 4 atoms


def _prim2() -> Atoms:
    return bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))  # 8 atoms, rhombohedral


def _cubic2() -> Atoms:
    return bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))  # 32 atoms


CELLS = {"cubic1": _cubic1, "prim2": _prim2, "cubic2": _cubic2}


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    cell: str = "prim2"
    train_frames: int = 24  # training frames; validation frames come on top (engine split)
    valid_ratio: float = 0.2
    stride: int = 20
    equilibration_steps: int = 400
    test_size: int = 30  # frames per test temperature
    test_temperatures: list[float] = field(default_factory=lambda: [300.0, 600.0])
    train_temperature: float = 300.0
    strained_frames: int = 10  # 300 K test frames strained to each volume factor
    volume_factors: list[float] = field(default_factory=lambda: [0.98, 1.02])
    weights: list[float] = field(default_factory=lambda: [0.0, 1000.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    patience: int = 15
    max_epochs: int = 100  # measured: 60 epochs never stopped a default run (best epoch = last)
    pressure_bar: float = 1.0
    taup_fs: float = 500.0
    compressibility_per_bar: float = 2e-6  # Cu: ~7e-7; only sets how fast the volume relaxes
    model: dict[str, Any] = field(default_factory=lambda: dict(QUICKSTART_MODEL))
    training: dict[str, Any] = field(default_factory=dict)  # TrainingConfig besides stress_weight

    def md(self, temperature: float) -> MDConfig:
        return MDConfig(ensemble="npt_crescale", temperature_K=temperature, pressure_bar=self.pressure_bar,
                        taup_fs=self.taup_fs, compressibility_per_bar=self.compressibility_per_bar)


# --------------------------------------------------------------------------- data


def labelled(atoms: Atoms, energy: float, forces: np.ndarray, stress: np.ndarray, **info: Any) -> Atoms:
    """A copy of ``atoms`` with the engine's label keys (stress in Voigt order, eV/A^3)."""
    frame = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    frame.info = {"REF_energy": float(energy), "REF_stress": np.asarray(stress, dtype=float).copy(), **info}
    frame.arrays["REF_forces"] = np.asarray(forces, dtype=float).copy()
    return frame


def reference_npt(atoms: Atoms, settings: Settings, temperature: float, n_frames: int, seed: int) -> list[Atoms]:
    """Every ``stride``-th frame of EMT NPT MD after ``equilibration_steps`` (rounded up to strides)."""
    sampler = StridedSampler([atoms], EMT, settings.md(temperature), settings.stride, seed=seed, with_stress=True)
    skip = math.ceil(settings.equilibration_steps / settings.stride)
    frames = []
    for i in range(skip + n_frames):
        sampled = sampler.next_frame()
        if i >= skip:
            frames.append(labelled(sampled.atoms, sampled.energy, sampled.forces, sampled.stress,
                                   md_step=sampled.md_step, temperature_K=temperature))
    return frames


def strained(frames: Sequence[Atoms], factors: Sequence[float]) -> list[Atoms]:
    """Each frame scaled isotropically to each volume factor (atoms follow the cell), relabelled."""
    out = []
    for factor in factors:
        for frame in frames:
            atoms = frame.copy()
            atoms.set_cell(atoms.cell * factor ** (1 / 3), scale_atoms=True)
            atoms.calc = EMT()
            out.append(labelled(atoms, atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(),
                                volume_factor=factor))
    return out


@dataclass
class Data:
    train: list[Atoms]
    valid: list[Atoms]
    tests: dict[str, list[Atoms]]  # name -> frames
    seconds: float


def make_data(settings: Settings) -> Data:
    """Training frames (300 K, seed 100) and held-out test sets (seeds 9000 + T, strained cells)."""
    start = time.perf_counter()
    atoms = CELLS[settings.cell]()
    n_frames, n_train = 0, 0
    while n_train < settings.train_frames:
        n_train += not is_validation(n_frames, settings.valid_ratio)
        n_frames += 1
    frames = reference_npt(atoms, settings, settings.train_temperature, n_frames, seed=100)
    train = [a for k, a in enumerate(frames) if not is_validation(k, settings.valid_ratio)]
    valid = [a for k, a in enumerate(frames) if is_validation(k, settings.valid_ratio)]
    tests: dict[str, list[Atoms]] = {}
    for temperature in settings.test_temperatures:
        tests[f"{temperature:g} K"] = reference_npt(atoms, settings, temperature, settings.test_size,
                                                    seed=9000 + int(temperature))
    if settings.strained_frames and settings.volume_factors:
        base = tests.get(f"{settings.train_temperature:g} K") or next(iter(tests.values()))
        tests["strained"] = strained(base[: settings.strained_frames], settings.volume_factors)
    return Data(train, valid, tests, time.perf_counter() - start)


def stress_stats(frames: Sequence[Atoms]) -> dict[str, float]:
    """Spread of the labels in GPa: pressure range and mean |stress component| around the mean."""
    voigt = np.array([a.info["REF_stress"] for a in frames]) * EV_PER_A3_IN_GPA
    pressure = -voigt[:, :3].mean(axis=1)
    volume = np.array([a.get_volume() / len(a) for a in frames])
    return {"p_min_GPa": float(pressure.min()), "p_max_GPa": float(pressure.max()),
            "v_min_A3": float(volume.min()), "v_max_A3": float(volume.max()), "n": len(frames)}


def _full(voigt: np.ndarray) -> np.ndarray:
    """[n, 6] Voigt (xx, yy, zz, yz, xz, xy) -> [n, 3, 3]."""
    xx, yy, zz, yz, xz, xy = voigt.T
    return np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2)


def baseline(train: Sequence[Atoms], tests: dict[str, list[Atoms]]) -> dict[str, Any]:
    """Stress and pressure MAE of predicting the mean training stress for every test frame."""
    mean = _full(np.array([a.info["REF_stress"] for a in train])).mean(axis=0)
    out: dict[str, Any] = {"stress_mae": {}, "pressure_mae_GPa": {}}
    for name, frames in tests.items():
        ref = _full(np.array([a.info["REF_stress"] for a in frames]))
        out["stress_mae"][name] = 1000 * float(np.abs(ref - mean).mean())
        out["pressure_mae_GPa"][name] = EV_PER_A3_IN_GPA * float(np.abs(np.trace(ref - mean, axis1=1, axis2=2)).mean()
                                                                 / 3)
    return out


# --------------------------------------------------------------------------- training


def predicted_stress(ensemble: Any, member: int, frames: Sequence[Atoms], batch_size: int = 20) -> np.ndarray:
    """[n, 3, 3] stress (eV/A^3) of one member with its live (EMA) weights."""
    from aimspax_like.models.graphs import loader

    model = ensemble.members[member]
    out = []
    for batch in loader(ensemble.graphs.graphs(frames), batch_size):
        batch = batch.to(ensemble.device)
        result = model(batch.to_dict(), training=False, compute_force=True, compute_stress=True)
        out.append(result["stress"].detach().cpu().numpy().astype(np.float64))
    return np.concatenate(out)


def warm_up(data: Data, settings: Settings) -> None:
    """One throwaway epoch with stress on two frames: the first run's time then holds no set-up cost."""
    from aimspax_like.models.ensemble import MACEEnsemble, atomic_energies_from_data, average_neighbors
    from aimspax_like.models.training import EnsembleTrainer

    model_cfg = ModelConfig(**{**settings.model, "ensemble_size": 1, "seeds": None})
    frames = data.train[:2]
    numbers = sorted({int(z) for a in frames for z in a.numbers})
    ensemble = MACEEnsemble.build(model_cfg, [0], atomic_numbers=numbers, atomic_energies=atomic_energies_from_data(
        frames, numbers), avg_num_neighbors=average_neighbors(frames, model_cfg.r_max))
    trainer = EnsembleTrainer(ensemble, TrainingConfig(stress_weight=1.0), reset_after=None)
    trainer.train_round([(frames[:1], frames[1:])], epochs=1)


def train_and_test(data: Data, settings: Settings, weight: float, seed: int) -> dict[str, Any]:
    """A fresh single MACE trained with stress weight ``weight``, E0s refitted, errors on every test set."""
    from aimspax_like.models.calibration import refit_atomic_energies
    from aimspax_like.models.ensemble import MACEEnsemble, atomic_energies_from_data, average_neighbors, force_scale
    from aimspax_like.models.training import EnsembleTrainer

    model_cfg = ModelConfig(**{**settings.model, "ensemble_size": 1, "seeds": None})
    frames = data.train + data.valid
    numbers = sorted({int(z) for a in frames for z in a.numbers})
    ensemble = MACEEnsemble.build(
        model_cfg, [seed], atomic_numbers=numbers, atomic_energies=atomic_energies_from_data(frames, numbers),
        avg_num_neighbors=average_neighbors(frames, model_cfg.r_max), scale=force_scale(frames),
    )
    trainer = EnsembleTrainer(ensemble, TrainingConfig(**{**settings.training, "stress_weight": weight}),
                              reset_after=None)
    history: list[tuple[int, float]] = []

    def record(metrics: Any) -> None:
        history.append((metrics.epoch, metrics.valid_loss))

    start = time.perf_counter()
    best = trainer.train_to_convergence(0, data.train, data.valid, patience=settings.patience,
                                        max_epochs=settings.max_epochs, on_epoch=record)
    train_s = time.perf_counter() - start
    refit_atomic_energies(ensemble, 0, data.train)
    best_epoch = min(history, key=lambda h: h[1])[0] if history else 0
    result: dict[str, Any] = {"weight": weight, "seed": seed, "epochs": best.epoch, "best_epoch": best_epoch,
                              "train_s": round(train_s, 1), "valid_force_mae": 1000 * best.valid_force_mae,
                              "valid_stress_mae": 1000 * best.valid_stress_mae,
                              "stress_mae": {}, "stress_mae_direct": {}, "pressure_mae_GPa": {}, "force_mae": {},
                              "energy_mae": {}}
    for name, frames in data.tests.items():
        errors = trainer.evaluate(0, frames)
        ref = _full(np.array([a.info["REF_stress"] for a in frames]))
        diff = predicted_stress(ensemble, 0, frames) - ref
        result["stress_mae"][name] = 1000 * errors["stress_mae"]
        result["pressure_mae_GPa"][name] = EV_PER_A3_IN_GPA * float(np.abs(np.trace(diff, axis1=1, axis2=2)).mean()
                                                                    / 3)
        result["stress_mae_direct"][name] = 1000 * float(np.abs(diff).mean())  # pins evaluate's units
        result["force_mae"][name] = 1000 * errors["force_mae"]
        result["energy_mae"][name] = 1000 * errors["energy_mae_per_atom"]
    return result


# --------------------------------------------------------------------------- tables


def _gpa(mev_per_a3: float) -> float:
    return mev_per_a3 / 1000 * EV_PER_A3_IN_GPA


def _stress_cell(mev: float) -> str:
    return f"{mev:.2f} ({_gpa(mev):.3f})"


def _weight(w: float) -> str:
    return f"{w:g}"


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def table_runs(runs: Sequence[dict[str, Any]], base: dict[str, Any], tests: Sequence[str]) -> list[list[str]]:
    header = ["stress_weight", "seed",
              *(f"S MAE {t} meV/A^3 (GPa)" for t in tests), *(f"P MAE {t} GPa" for t in tests),
              *(f"F MAE {t} meV/A" for t in tests), *(f"E MAE {t} meV/atom" for t in tests),
              "epochs (best)", "train s"]
    rows = [header]
    for r in runs:
        rows.append([_weight(r["weight"]), str(r["seed"]),
                     *(_stress_cell(r["stress_mae"][t]) for t in tests),
                     *(f"{r['pressure_mae_GPa'][t]:.3f}" for t in tests),
                     *(f"{r['force_mae'][t]:.1f}" for t in tests),
                     *(f"{r['energy_mae'][t]:.2f}" for t in tests),
                     f"{r['epochs']} ({r['best_epoch']})", f"{r['train_s']:.0f}"])
    rows.append(["train-mean", "-", *(_stress_cell(base["stress_mae"][t]) for t in tests),
                 *(f"{base['pressure_mae_GPa'][t]:.3f}" for t in tests),
                 *(["-"] * (2 * len(tests))), "-", "-"])
    return rows


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def table_summary(runs: Sequence[dict[str, Any]], tests: Sequence[str]) -> list[list[str]]:
    """Means over seeds per weight; stress-MAE ratio weight 0 / weight w (same seeds)."""
    weights = sorted({r["weight"] for r in runs})
    header = ["stress_weight", "seeds", *(f"S MAE {t} meV/A^3 (GPa)" for t in tests),
              *(f"ratio S MAE w=0 / w {t}" for t in tests), *(f"F MAE {t} meV/A" for t in tests),
              *(f"E MAE {t} meV/atom" for t in tests), "train s"]
    rows = [header]
    zero = [r for r in runs if r["weight"] == 0]
    for w in weights:
        found = [r for r in runs if r["weight"] == w]
        seeds = sorted(r["seed"] for r in found)
        ratios = []
        for t in tests:
            pairs = [(z["stress_mae"][t], r["stress_mae"][t]) for r in found for z in zero if z["seed"] == r["seed"]]
            ratios.append(f"{_mean([a / b for a, b in pairs]):.1f}" if pairs and w != 0 else "-")
        rows.append([_weight(w), ",".join(map(str, seeds)),
                     *(_stress_cell(_mean([r["stress_mae"][t] for r in found])) for t in tests), *ratios,
                     *(f"{_mean([r['force_mae'][t] for r in found]):.1f}" for t in tests),
                     *(f"{_mean([r['energy_mae'][t] for r in found]):.2f}" for t in tests),
                     f"{_mean([r['train_s'] for r in found]):.0f}"])
    return rows


def render(results: dict[str, Any]) -> str:
    meta, settings = results["meta"], results["meta"]["settings"]
    tests = list(results["data"]["tests"])
    runs = results["runs"]
    data = results["data"]
    model = ", ".join(f"{k} {v}" for k, v in settings["model"].items())
    lines = ["# Stress training: held-out stress, force and energy errors vs training.stress_weight", "",
             f"command: `{meta['command']}`", "",
             f"cell: {settings['cell']} ({data['n_atoms']} Cu atoms, EMT), NPT (stochastic cell rescaling, "
             f"{settings['pressure_bar']:g} bar, taup {settings['taup_fs']:g} fs, compressibility "
             f"{settings['compressibility_per_bar']:g}/bar); training: {data['n_train']} + {data['n_valid']} valid "
             f"frames of {settings['train_temperature']:g} K MD, every {settings['stride']}th step after "
             f"{settings['equilibration_steps']} steps; tests: {settings['test_size']} frames per temperature "
             f"(independent seeds), strained = {settings['strained_frames']} 300 K test frames at volume x "
             f"{settings['volume_factors']}.",
             f"model: {model}; patience {settings['patience']}, max_epochs {settings['max_epochs']}, E0s refitted "
             f"after training; training {settings['training'] or 'engine defaults'} besides stress_weight.",
             f"wall: {meta['wall_s']:.0f} s in all (data {data['seconds']:.0f} s); load average after the run "
             f"{meta['load']}: the machine is shared, read timings next to it.", "",
             "label ranges (pressure P = -trace(stress)/3 in GPa, volume in A^3/atom):", ""]
    for name, stats in data["stats"].items():
        lines.append(f"- {name}: {stats['n']} frames, P {stats['p_min_GPa']:.2f} .. {stats['p_max_GPa']:.2f}, "
                     f"V {stats['v_min_A3']:.3f} .. {stats['v_max_A3']:.3f}")
    lines += ["", "## Every run", "", markdown(table_runs(runs, results["baseline"], tests)), "",
              "S MAE: mean |error| over the 9 stress components (the trainer's `stress_mae`), meV/A^3 with GPa in "
              "brackets (1 eV/A^3 = 160.2 GPa); P MAE: mean |error| of the pressure; E MAE after the E0 refit; "
              "epochs (best): epochs trained (the best epoch by validation loss, which is kept); train-mean: "
              "predicting the mean training stress for every frame.", "",
              "## Means over seeds", "", markdown(table_summary(runs, tests))]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _numbers(text: str, kind: type = int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=list(CELLS), help="cubic1: 4 atoms, prim2: 8 (default), cubic2: 32")
    parser.add_argument("--weights", help="stress weights, comma list (default 0,1000)")
    parser.add_argument("--seeds", help="model seeds (default 0,1; quick 0)")
    parser.add_argument("--train-frames", type=int, help="training frames (default 24; quick 8)")
    parser.add_argument("--test-size", type=int, help="frames per test temperature (default 30; quick 8)")
    parser.add_argument("--strained-frames", type=int, help="300 K test frames per volume factor (default 10)")
    parser.add_argument("--patience", type=int, help="epochs without improvement (default 15)")
    parser.add_argument("--max-epochs", type=int, help="default 100; quick 15")
    parser.add_argument("--equilibration-steps", type=int, help="MD steps dropped before sampling (default 400)")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="a ModelConfig setting (repeatable), e.g. channels=8")
    parser.add_argument("--training", action="append", default=[], metavar="KEY=VALUE",
                        help="a TrainingConfig setting besides stress_weight (repeatable), e.g. lr=0.005")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 8 training frames, 8 test frames, 4 strained, seed 0, max 15 epochs")
    parser.add_argument("--out", type=Path, help="folder for results.json (default runs/stress_training[_quick])")
    parser.add_argument("--table", type=Path,
                        help="markdown output (default workflows/results/stress_training.md; quick: in --out)")
    return parser


def _key_values(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: '{item}' is not KEY=VALUE")
        out[key.strip()] = parse_yaml(value)
    return out


def settings_from_args(args: argparse.Namespace) -> Settings:
    quick = args.quick
    defaults = Settings()
    return Settings(
        cell=args.cell or defaults.cell,
        train_frames=args.train_frames or (8 if quick else defaults.train_frames),
        test_size=args.test_size or (8 if quick else defaults.test_size),
        strained_frames=args.strained_frames if args.strained_frames is not None else (4 if quick else 10),
        weights=_numbers(args.weights, float) if args.weights else defaults.weights,
        seeds=_numbers(args.seeds) if args.seeds else ([0] if quick else defaults.seeds),
        patience=args.patience or defaults.patience,
        max_epochs=args.max_epochs or (15 if quick else defaults.max_epochs),
        equilibration_steps=(args.equilibration_steps if args.equilibration_steps is not None
                             else (200 if quick else defaults.equilibration_steps)),
        model={**QUICKSTART_MODEL, **_key_values(args.model)},
        training=_key_values(args.training),
    )


def _quiet() -> None:
    """No torch.load nag (mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, torch then warns at every load)."""
    warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")


def run_study(settings: Settings, command: str) -> dict[str, Any]:
    start = time.perf_counter()
    log(f"{command}\ncell {settings.cell}, weights {settings.weights}, seeds {settings.seeds}")
    data = make_data(settings)
    stats = {"train": stress_stats(data.train), **{t: stress_stats(f) for t, f in data.tests.items()}}
    log(f"data in {data.seconds:.1f} s: {len(data.train)} train + {len(data.valid)} valid frames, tests "
        + ", ".join(f"{t} {len(f)}" for t, f in data.tests.items()))
    warm_up(data, settings)
    runs = []
    for seed in settings.seeds:
        for weight in settings.weights:
            run = train_and_test(data, settings, weight, seed)
            runs.append(run)
            log(f"stress_weight {weight:g} seed {seed}: {run['epochs']} epochs (best {run['best_epoch']}) in "
                f"{run['train_s']:.0f} s; test S MAE (meV/A^3) "
                + ", ".join(f"{t} {v:.2f}" for t, v in run["stress_mae"].items())
                + "; F MAE (meV/A) " + ", ".join(f"{t} {v:.1f}" for t, v in run["force_mae"].items()))
    wall = time.perf_counter() - start
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return {
        "meta": {"command": command, "settings": asdict(settings), "wall_s": round(wall, 1), "load": load},
        "data": {"n_atoms": len(data.train[0]), "n_train": len(data.train), "n_valid": len(data.valid),
                 "tests": {t: len(f) for t, f in data.tests.items()}, "seconds": round(data.seconds, 1),
                 "stats": stats},
        "baseline": baseline(data.train, data.tests),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet()
    settings = settings_from_args(args)
    out = args.out or ROOT / ("runs/stress_training" + ("_quick" if args.quick else ""))
    table = args.table or (out / "stress_training.md" if args.quick else ROOT / "workflows/results/stress_training.md")
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    results = run_study(settings, command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    text = render(results)
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(text + "\n")
    print(text)
    log(f"wrote {table} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
