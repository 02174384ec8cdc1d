"""IDEAL's locality check on a bulk metal: how large must a carved piece be for its centre's force?

A substructure label is only as good as the force it gives the atoms it was carved for. This
script takes a hot bulk fcc cell (``--element``, default Pt, ``--repeat`` cubic cells, EMT as
the reference), runs a short Langevin MD at ``--temperature`` so the forces are those of a real
frame, then carves a sphere of growing radius around each of ``--centres`` random atoms, in
vacuum, and compares the EMT force on the centre atom in the piece with its force in the whole
periodic cell. It prints one row per radius: atoms in the piece, mean and largest error norm
of the centre's force (eV/A), and the largest centre force for scale. IDEAL reports 9.5e-2,
6.9e-3, 5.3e-4 and 2.3e-5 eV/A at 5, 6, 7 and 8 A for its reference::

    .venv/bin/python workflows/ideal_locality.py                   # ~20 s on one core
    .venv/bin/python workflows/ideal_locality.py --element Cu --repeat 6 --temperature 1200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from aimspax_like.substructures import force_locality, min_width

ROOT = Path(__file__).resolve().parents[1]
IDEAL = {5.0: 9.5e-2, 6.0: 6.9e-3, 7.0: 5.3e-4, 8.0: 2.3e-5}


def hot_frame(element: str, repeat: int, temperature: float, steps: int, seed: int) -> Atoms:
    """A frame of EMT Langevin MD of the bulk cell (the engine's integrator, fixed seed)."""
    from aimspax_like.config import MDConfig
    from aimspax_like.sampling.ase_md import calculator_forces
    from aimspax_like.sampling.dynamics import maxwell_boltzmann, step_batch
    from aimspax_like.sampling.state import MDState

    atoms = bulk(element, "fcc", cubic=True).repeat((repeat, repeat, repeat))
    rng = np.random.default_rng(seed)
    atoms.set_momenta(maxwell_boltzmann(atoms, temperature, rng))
    atoms.calc = EMT()
    state = MDState(atoms, MDConfig(temperature_K=temperature, friction_per_fs=0.02), rng)
    for _ in range(steps):
        step_batch([state], calculator_forces, None, None)
    frame = Atoms(atoms.numbers, atoms.positions.copy(), cell=atoms.cell.copy(), pbc=True)
    frame.wrap()
    return frame


def table(rows: list[dict[str, float]]) -> str:
    lines = ["| radius (A) | atoms in piece | centre force error, mean (eV/A) | max (eV/A) | IDEAL (eV/A) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ideal = IDEAL.get(r["radius"])
        lines.append(f"| {r['radius']:.1f} | {r['atoms']:.0f} | {r['error_mean']:.2e} | {r['error_max']:.2e} | "
                     f"{'-' if ideal is None else f'{ideal:.1e}'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--element", default="Pt", help="an fcc metal EMT knows (default: Pt)")
    parser.add_argument("--repeat", type=int, default=5, help="cubic cells per side (default: 5, 500 atoms)")
    parser.add_argument("--temperature", type=float, default=1000.0, help="MD temperature in K (default: 1000)")
    parser.add_argument("--steps", type=int, default=200, help="MD steps before the frame is taken (default: 200)")
    parser.add_argument("--centres", type=int, default=8, help="random centre atoms averaged over (default: 8)")
    parser.add_argument("--radii", type=float, nargs="+", default=[4, 5, 6, 7, 8, 9, 10])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ideal_locality")
    args = parser.parse_args(argv)
    started = time.monotonic()
    frame = hot_frame(args.element, args.repeat, args.temperature, args.steps, args.seed)
    half_width = 0.5 * min_width(frame)
    radii = [r for r in args.radii if r < half_width]
    if len(radii) < len(args.radii):
        print(f"note: radii of {half_width:.1f} A and more do not fit the cell's minimum image; left out",
              file=sys.stderr)
    centres = sorted(np.random.default_rng(args.seed + 1).choice(len(frame), size=args.centres, replace=False))
    rows = force_locality(frame, [int(c) for c in centres], radii, EMT)
    text = (f"{args.element} fcc, {len(frame)} atoms, EMT, a frame after {args.steps} Langevin steps at "
            f"{args.temperature:.0f} K; pieces carved in vacuum around {args.centres} centre atoms; largest "
            f"centre force in the whole cell {rows[0]['force_scale']:.2f} eV/A; {time.monotonic() - started:.0f} s\n\n"
            f"{table(rows)}\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
