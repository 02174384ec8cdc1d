"""Where the committee's training time goes: epochs per second, batched against sequential.

Trains committees of 1, 4 and 8 members for a few epochs, once with the members one after another
(``training.batched_members: off``) and once in one batched pass (``on``), and prints a table of
committee epochs per second, milliseconds per structure (one member's training step on one
structure) and CPU seconds per epoch, measured in this one run. Two systems:

* ``ethanol``: the quickstart's molecule and model (9 atoms, 16 channels, max_L 1, float32),
  40 training frames per member: random rattles of the molecule labelled by GFN2-xTB where
  ``tblite`` is installed, else by ASE's EMT as a stand-in (labels do not change the cost);
* ``cu108``: a periodic 108-atom copper cell (3x3x3 fcc) labelled by EMT, the size of a small
  solid in the paper's studies, same model.

Every member gets its own frames (as IDG hands each member its own subset), batch size 5 as the
default training config. Nothing is asserted: the table is the result::

    .venv/bin/python scripts/bench_training.py                    # CPU, both systems
    .venv/bin/python scripts/bench_training.py --device cuda      # on a GPU machine
    .venv/bin/python scripts/bench_training.py --systems ethanol --members 1,4 --epochs 2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time
import warnings
from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT


def _label(frames: list[Atoms], calculator_factory) -> list[Atoms]:
    for atoms in frames:
        atoms.calc = calculator_factory()
        atoms.info["REF_energy"] = float(atoms.get_potential_energy())
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
    return frames


def _rattled(atoms: Atoms, n: int, stdev: float, seed: int) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        copy = atoms.copy()
        copy.positions += rng.normal(scale=stdev, size=copy.positions.shape)
        out.append(copy)
    return out


def ethanol_frames(n: int, seed: int) -> list[Atoms]:
    try:
        from tblite.ase import TBLite

        def factory():
            return TBLite(method="GFN2-xTB", verbosity=0)
    except ImportError:  # labels only set values; the training cost is the same
        factory = EMT
    return _label(_rattled(molecule("CH3CH2OH"), n, 0.08, seed), factory)


def cu108_frames(n: int, seed: int) -> list[Atoms]:
    cell = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    return _label(_rattled(cell, n, 0.08, seed), EMT)


SYSTEMS = {"ethanol": ethanol_frames, "cu108": cu108_frames}


def time_training(frames: Sequence[Sequence[Atoms]], valid: Sequence[Atoms], members: int, batched: str,
                  epochs: int, device: str, dtype: str) -> dict[str, float]:
    """Seconds (wall and CPU) of ``epochs`` epochs of a committee, after one warm-up epoch."""
    import torch

    from aimspax_like.config import ModelConfig, TrainingConfig
    from aimspax_like.models.ensemble import MACEEnsemble, atomic_energies_from_data, average_neighbors, force_scale
    from aimspax_like.models.training import EnsembleTrainer

    model = ModelConfig(ensemble_size=members, channels=16, max_L=1, r_max=5.0, radial_mlp=[32, 32],
                        dtype=dtype, device=device)
    everything = [a for member in frames for a in member]
    zs = sorted({int(z) for a in everything for z in a.numbers})
    ensemble = MACEEnsemble.build(model, list(range(members)), zs, atomic_energies_from_data(everything, zs),
                                  average_neighbors(everything, model.r_max), force_scale(everything))
    trainer = EnsembleTrainer(ensemble, TrainingConfig(batched_members=batched), reset_after=None)
    data = [(list(frames[k % len(frames)]), list(valid)) for k in range(members)]
    trainer.train_round(data, 1)  # warm-up: graphs cached, kernels chosen

    def sync() -> None:
        if ensemble.device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train_round(data, epochs)
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    structures = sum(len(d[0]) for d in data) * epochs
    return {"wall_s": wall, "cpu_s": cpu, "epochs_per_s": epochs / wall,
            "ms_per_structure": 1000 * wall / structures, "cpu_s_per_epoch": cpu / epochs}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="ethanol,cu108")
    parser.add_argument("--members", default="1,4,8")
    parser.add_argument("--frames", type=int, default=40, help="training frames per member")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU); 0 keeps torch's default")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import mace  # noqa: F401  (before e3nn, which torch.load needs under torch >= 2.6)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    member_counts = [int(m) for m in args.members.split(",")]
    rows = []
    for system in args.systems.split(","):
        make = SYSTEMS[system]
        pools = [make(args.frames, seed=k) for k in range(max(member_counts))]
        valid = make(max(4, args.frames // 8), seed=1000)
        for members in member_counts:
            results = {}
            for mode in ("off", "on"):
                if mode == "on" and members == 1:
                    continue
                results[mode] = time_training(pools[:members], valid, members, mode, args.epochs, args.device,
                                              args.dtype)
            base = results["off"]
            for mode, r in results.items():
                speedup = r["epochs_per_s"] / base["epochs_per_s"]
                rows.append([system, str(len(pools[0][0])), str(members), "batched" if mode == "on" else "sequential",
                             f"{r['epochs_per_s']:.3f}", f"{r['ms_per_structure']:.2f}", f"{r['cpu_s_per_epoch']:.2f}",
                             f"{speedup:.2f}x"])
                print("  ".join(rows[-1]), flush=True)
    header = ["system", "atoms", "members", "training", "epochs/s", "ms/structure", "cpu s/epoch", "vs sequential"]
    print()
    print(f"device {args.device}, {args.dtype}, {args.frames} frames per member, batch size 5, "
          f"{args.epochs} timed epochs, torch threads {torch.get_num_threads()}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
