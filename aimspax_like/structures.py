"""Start structures: read from files or folders (one-line errors naming the path), relaxed on request."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import read, write

from aimspax_like.errors import ConfigError


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
        for atoms in frames:
            atoms.calc = None
        structures.extend(frames)
    return structures


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
        atoms.calc = make_calculator(ctx.reference_spec, ctx.paths.labels / f"relax_{index}")
        energy0 = float(atoms.get_potential_energy())
        optimizer = BFGS(atoms, logfile=None)
        converged = bool(optimizer.run(fmax=system.relax_fmax, steps=system.relax_steps))
        energy = float(atoms.get_potential_energy())
        fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
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
