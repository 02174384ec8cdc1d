"""Start structures: read from files or folders (one-line errors naming the path), relaxed on request."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import read, write

from aimspax_like.errors import ConfigError


def atoms_to_arrays(atoms: Atoms) -> dict[str, Any]:
    """The geometry of ``atoms`` as plain arrays (checkpoints hold no calculator and no ASE pickle)."""
    return {"numbers": atoms.numbers.copy(), "positions": atoms.get_positions(), "cell": atoms.cell.array.copy(),
            "pbc": atoms.pbc.copy()}


def atoms_from_arrays(data: dict[str, Any]) -> Atoms:
    return Atoms(numbers=data["numbers"], positions=data["positions"], cell=data["cell"], pbc=data["pbc"])


def read_structures(paths: list[Path], index: str = ":") -> list[Atoms]:
    """Every frame of every file (folders: every file inside, sorted by name)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not inside:
                raise ConfigError("system.structures", f"folder has no structure files: {path}")
            files.extend(inside)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError("system.structures", f"file not found: {path}")
    structures: list[Atoms] = []
    for file in files:
        try:
            frames = read(file, index=index)
        except Exception as exc:  # ASE raises many types for unreadable files
            raise ConfigError("system.structures", f"ASE cannot read {file} ({type(exc).__name__})") from None
        frames = frames if isinstance(frames, list) else [frames]
        if not frames or any(len(a) == 0 for a in frames):
            raise ConfigError("system.structures", f"no atoms in {file}")
        for number, atoms in enumerate(frames):
            atoms.calc = None
            problem = structure_problem(atoms)
            if problem:
                where = f"{file}" + (f" (frame {number})" if len(frames) > 1 else "")
                raise ConfigError("system.structures", f"{where}: {problem}")
        structures.extend(frames)
    return structures


# Atoms closer than this fraction of their covalent-radius sum are overlapping, not bonded
# (H-H at 0.31 A, C-C at 0.38 A): MD from there explodes, and every label would be wasted.
MIN_DISTANCE_FACTOR = 0.5


def structure_problem(atoms: Atoms) -> str | None:
    """Why a start structure cannot be simulated (non-finite numbers, no cell, overlaps), or None."""
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    if not np.isfinite(atoms.positions).all():
        return "non-finite coordinates"
    if not np.isfinite(atoms.cell.array).all():
        return "non-finite cell"
    if atoms.pbc.any() and abs(atoms.cell.volume if atoms.pbc.all() else 1.0) < 1e-6:
        return "periodic but without a cell (or a flat one)"
    if atoms.pbc.any() and any(np.linalg.norm(atoms.cell[k]) < 1e-6 for k in range(3) if atoms.pbc[k]):
        return "periodic along an axis whose cell vector is zero"
    radii = covalent_radii[atoms.numbers]
    cutoff = MIN_DISTANCE_FACTOR * 2 * float(radii.max())
    i, j, d = neighbor_list("ijd", atoms, cutoff)
    close = d < MIN_DISTANCE_FACTOR * (radii[i] + radii[j])
    if close.any():
        k = int(np.argmin(np.where(close, d, np.inf)))
        return (f"atoms {min(i[k], j[k])} and {max(i[k], j[k])} are {d[k]:.2f} A apart, overlapping "
                f"(less than {MIN_DISTANCE_FACTOR} x their covalent radii)")
    return None


def relaxed_start_structures(ctx: Any) -> list[Atoms]:
    """``system.relax``: the start structures relaxed by the reference, computed once per run.

    The relaxed structures are written to ``state/start_structures.xyz`` (atomically) and read
    back on a resume, so a resumed campaign neither relaxes again nor starts from other
    geometries. The relaxation runs in the driver, as reference-driven IDG MD does.
    """
    from ase.optimize import BFGS

    from aimspax_like.reference.calculators import make_calculator
    from aimspax_like.state import write_atomic

    saved = ctx.paths.state / "start_structures.xyz"
    if saved.is_file():
        return read_structures([saved])
    system = ctx.config.system
    relaxed = []
    for index, start in enumerate(ctx.structures):
        atoms = start.copy()
        try:
            atoms.calc = make_calculator(ctx.reference_spec, ctx.paths.labels / f"relax_{index}")
            energy0 = float(atoms.get_potential_energy())
            optimizer = BFGS(atoms, logfile=None)
            converged = bool(optimizer.run(fmax=system.relax_fmax, steps=system.relax_steps))
            energy = float(atoms.get_potential_energy())
            fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
        except Exception as exc:  # the reference's own failure, of any type: one line, state kept
            from aimspax_like.errors import CampaignStopped
            from aimspax_like.reference.results import classify_exception

            message = classify_exception(exc)[1]
            ctx.events.emit("relax_failed", structure=index, error=message)
            raise CampaignStopped(f"system.relax: the reference failed relaxing start structure {index} "
                                  f"({message}); fix the reference, then resume to continue") from None
        if not np.isfinite([energy0, energy, fmax]).all():
            from aimspax_like.errors import CampaignStopped

            raise CampaignStopped(f"system.relax: the reference returned non-finite numbers relaxing start "
                                  f"structure {index}; fix the reference, then resume to continue")
        ctx.events.emit("relaxed", structure=index, energy_drop=energy0 - energy, steps=optimizer.nsteps,
                        fmax=fmax, converged=converged)
        if not converged:
            ctx.warn(f"start structure {index} did not relax to fmax {system.relax_fmax} eV/A in "
                     f"{system.relax_steps} steps (fmax {fmax:.3f} eV/A); continuing from there",
                     key="system.relax_steps")
        atoms.calc = None
        relaxed.append(atoms)
    buffer = io.StringIO()
    write(buffer, relaxed, format="extxyz")
    write_atomic(saved, buffer.getvalue().encode())
    return relaxed
