"""Substructure against whole-frame labelling in active learning on an 864-atom hot metal.

IDEAL's claim, measured with the engine: on a large system, labelling small pieces carved around
the uncertain atoms (``al.substructures``) buys a model as good as labelling whole frames, for
a fraction of the reference cost. Campaigns run from the same start, the same IDG frames
and the same seed, on an 864-atom periodic Cu cell (6x6x6 cubic fcc cells, EMT reference,
Langevin MD at ``--temperature``):

- ``whole:N``: every frame the uncertainty sends to the reference is labelled whole;
- ``pieces:N``: it is labelled as up to ``--pieces`` substructures carved around its most
  uncertain atoms (core ``--core`` A, buffer ``--buffer`` A, in vacuum), core forces only.

Each arm stops at its number of AL labels after IDG (``--arms``; by default IDG alone, whole
frames at 1 and 10 labels, pieces at 10 and 40 labels). Labels still in flight when the training
set fills are kept, so an arm may end a few labels past its number; the table counts them all. The held-out
set is ``--test-frames`` frames of a separate EMT Langevin MD of the same cell at the same
temperature, never seen by any campaign. So that the comparison is of data, not of training
time, every arm ends with the same ``--final-epochs`` epochs of every member over its whole
training set (the converge phase, patience off); the committee's mean force is then compared
with EMT's on every atom of the held-out frames. The table gives, per arm: AL labels, atoms
labelled, EMT time, the cost a cubic-scaling DFT code would have (the sum of N^3 over the
labels, in units of one whole frame) and the held-out force MAE and RMSE::

    .venv/bin/python workflows/ideal_substructures.py                  # ~40 min on 2 cores (5 arms)
    .venv/bin/python workflows/ideal_substructures.py --arms whole:4 pieces:8 --steps 400 --out runs/ideal_quick

Finished campaigns are read, not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write

ROOT = Path(__file__).resolve().parents[1]
# name -> (labelled as pieces, AL labels after IDG)
DEFAULT_ARMS = ("whole:0", "whole:1", "whole:10", "pieces:10", "pieces:40")


def hot_cell(seed: int, repeat: int = 6) -> Atoms:
    cell = bulk("Cu", "fcc", a=3.61, cubic=True) * (repeat, repeat, repeat)
    cell.positions += np.random.default_rng(seed).normal(scale=0.05, size=cell.positions.shape)
    return cell


def held_out_frames(n: int, temperature: float, stride: int, seed: int, repeat: int = 6) -> list[Atoms]:
    """``n`` frames of EMT Langevin MD (the engine's integrator), every ``stride`` steps after two
    strides of warm-up, from a start of its own (another rattle than the campaigns')."""
    from aimspax_like.config import MDConfig
    from aimspax_like.sampling.ase_md import calculator_forces
    from aimspax_like.sampling.dynamics import maxwell_boltzmann, step_batch
    from aimspax_like.sampling.state import MDState

    atoms = hot_cell(seed + 1000, repeat)
    rng = np.random.default_rng(seed)
    atoms.set_momenta(maxwell_boltzmann(atoms, temperature, rng))
    atoms.calc = EMT()
    state = MDState(atoms, MDConfig(temperature_K=temperature, friction_per_fs=0.02, timestep_fs=2.0), rng)
    frames = []
    for k in range((n + 2) * stride):
        step_batch([state], calculator_forces, None, None)
        if k + 1 > 2 * stride and (k + 1) % stride == 0:
            frame = Atoms(atoms.numbers, atoms.positions.copy(), cell=atoms.cell.copy(), pbc=True)
            frame.calc = EMT()
            forces = frame.get_forces()
            frame.calc = None
            frame.arrays["EMT_forces"] = forces
            frames.append(frame)
    return frames


def parse_arm(text: str) -> tuple[str, bool, int]:
    """``whole:10`` or ``pieces:40``: how frames are labelled and how many AL labels; the arm's name."""
    kind, _, labels = text.partition(":")
    if kind not in ("whole", "pieces") or not labels.isdigit():
        raise argparse.ArgumentTypeError(f"an arm is whole:N or pieces:N, got {text!r}")
    return f"{kind}_{labels}", kind == "pieces", int(labels)


def arm_config(arm: str, pieces: bool, labels: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    start = out / "start.xyz"
    idg_frames = 4
    config: dict[str, Any] = {
        "system": {"structures": str(start)},
        "reference": {"kind": "emt"},
        "model": {"ensemble_size": 2, "channels": 16, "max_L": 0, "r_max": 4.5, "num_interactions": 2,
                  "correlation": 2, "radial_mlp": [16], "num_radial_basis": 8, "dtype": "float32",
                  "device": "cpu"},
        "training": {"batch_size": 2, "lr": 0.01},
        "idg": {"stride": 25, "points_per_member": idg_frames // 2, "intermediate_epochs": 4, "max_epochs": 30,
                "max_set_size": idg_frames, "md": {"temperature_K": args.temperature}},
        "al": {"num_trajectories": 2, "check_every": 5, "warmup": 4, "max_train_set_size": idg_frames + labels,
               "max_md_steps": args.steps, "intermediate_epochs": 2, "max_epochs_per_point": 4,
               "valid_ratio": 0.1, "md": {"temperature_K": args.temperature, "timestep_fs": 2.0},
               "substructures": {"enabled": pieces, "min_atoms": 100, "core_radius": args.core,
                                 "buffer": args.buffer, "box": "vacuum", "max_per_frame": args.pieces}},
        "converge": {"enabled": True, "members": "all", "patience": args.final_epochs,
                     "max_epochs": args.final_epochs},
        "test_set": {"size": 0},
        "output": {"directory": str(out / arm)},
        "seed": args.seed,
    }
    return config


def finished(run: Path) -> bool:
    phases = run / "state" / "phases.json"
    return phases.exists() and "converge" in json.loads(phases.read_text()).get("done", [])


def launch(config: Path, run: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "aimspax_like.cli", "run", str(config), "--quiet",
               "--resume" if (run / "state").exists() else "--overwrite"]
    with open(log, "a", encoding="utf-8") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def evaluate(run: Path, frames: list[Atoms]) -> dict[str, Any]:
    """Labels, atoms, reference time and N^3 cost of the AL labels; held-out force errors."""
    import torch

    from aimspax_like.data import DatasetStore
    from aimspax_like.models.ensemble import MACEEnsemble

    torch.set_num_threads(2)
    stored = DatasetStore.open(run / "data" / "dataset.h5").frames()
    al = [f for f in stored if f.origin == "al"]
    whole = len(frames[0])
    members = sorted((run / "models").glob("member_*.model"))
    ensemble = MACEEnsemble.load(members, dtype="float32")
    errors = []
    for atoms in frames:
        predicted = ensemble.predict([atoms]).mean_forces
        errors.append(predicted - atoms.arrays["EMT_forces"])
    errors = np.concatenate(errors)
    return {
        "al_labels": len(al),
        "frames_labelled": len({(f.trajectory, f.md_step) for f in al}),
        "atoms_labelled": int(sum(len(f) for f in al)),
        "core_atoms": int(sum(int(f.force_mask.sum()) if f.is_piece else len(f) for f in al)),
        "reference_s": float(sum(f.label_wall_s for f in al)),
        "cubic_cost": float(sum((len(f) / whole) ** 3 for f in al)),
        "force_mae": float(np.abs(errors).mean()),
        "force_rmse": float(np.sqrt((errors ** 2).mean())),
        "idg_frames": sum(f.origin == "idg" for f in stored),
    }


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = ("| arm | AL labels (frames) | atoms labelled | core atoms | EMT time (s) | N^3 cost (whole frames) "
            "| held-out force MAE (meV/A) | RMSE (meV/A) |")
    lines = [head, "|" + "---|" * 8]
    for arm, r in rows.items():
        lines.append(f"| {arm} | {r['al_labels']} ({r['frames_labelled']}) | {r['atoms_labelled']} | {r['core_atoms']} "
                     f"| {r['reference_s']:.2f} | {r['cubic_cost']:.2f} | {1000 * r['force_mae']:.1f} "
                     f"| {1000 * r['force_rmse']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ideal_substructures")
    parser.add_argument("--arms", nargs="+", type=parse_arm, default=[parse_arm(a) for a in DEFAULT_ARMS],
                        help="whole:N or pieces:N, N AL labels (training frames) after IDG")
    parser.add_argument("--steps", type=int, default=1200, help="MD steps per trajectory at most")
    parser.add_argument("--final-epochs", type=int, default=40, help="epochs of every member at the end, every arm")
    parser.add_argument("--temperature", type=float, default=1200.0)
    parser.add_argument("--core", type=float, default=3.0, help="core radius (A): the atom and its first shell")
    parser.add_argument("--buffer", type=float, default=6.0, help="buffer (A); see workflows/ideal_locality.py")
    parser.add_argument("--pieces", type=int, default=2, help="pieces per frame at most")
    parser.add_argument("--test-frames", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=6, help="cubic fcc cells per edge (6: 864 atoms)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "start.xyz").exists():
        write(out / "start.xyz", hot_cell(args.seed, args.repeat))
    started = time.perf_counter()
    running = []
    for arm, pieces, labels in args.arms:
        run = out / arm
        if finished(run):
            continue
        path = out / f"{arm}.yaml"
        path.write_text(yaml.safe_dump(arm_config(arm, pieces, labels, args, out), sort_keys=False))
        running.append((arm, launch(path, run, out / f"{arm}.log")))
    test_path = out / "held_out.xyz"
    if not test_path.exists():
        write(test_path, held_out_frames(args.test_frames, args.temperature, stride=100, seed=args.seed,
                                         repeat=args.repeat))
    frames = read(test_path, ":")
    for arm, process in running:
        if process.wait() != 0:
            print(f"{arm}: the campaign failed, see {out / (arm + '.log')}", file=sys.stderr)
            return 1
    rows = {arm: evaluate(out / arm, frames) for arm, _, _ in args.arms}
    text = table(rows)
    print(text)
    # Ratios against the whole-frame arm with the most labels (the one substructures should match).
    wholes = [(labels, arm) for arm, pieces, labels in args.arms if not pieces and rows[arm]["al_labels"]]
    whole = rows[max(wholes)[1]] if wholes else None
    for arm, pieces, _ in args.arms:
        if pieces and whole is not None:
            r = rows[arm]
            print(f"{arm}/whole: atoms labelled {r['atoms_labelled'] / whole['atoms_labelled']:.2f}, "
                  f"N^3 cost {r['cubic_cost'] / whole['cubic_cost']:.3f}, "
                  f"held-out force MAE {r['force_mae'] / whole['force_mae']:.2f}")
    print(f"({time.perf_counter() - started:.0f} s)")
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                  "arms": rows}, indent=2))
    (out / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
