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
    geometries. Each relaxation is a task on the label workers (``reference.md_segment``), all
    of them at once; the reference never runs in the driver.
    """
    from concurrent.futures import wait
    from dataclasses import replace

    from aimspax_like.config import MDConfig
    from aimspax_like.errors import CampaignStopped
    from aimspax_like.labelling import outcome_of
    from aimspax_like.reference.md_segment import SegmentRequest
    from aimspax_like.reference.results import LabelFailure
    from aimspax_like.reference_md import fixed_indices
    from aimspax_like.state import write_atomic

    saved = ctx.paths.state / "start_structures.xyz"
    if saved.is_file():
        return read_structures([saved])
    system = ctx.config.system
    md = MDConfig().model_dump(mode="json")
    futures = [
        ctx.labeller.submit_segment(
            "relax", index, start, SegmentRequest(md, system.relax_steps, np.zeros((len(start), 3)),
                                                  relax_fmax=system.relax_fmax, fixed=fixed_indices(start)),
            structure=index)
        for index, start in enumerate(ctx.structures)
    ]
    relaxed = []
    for index, (start, future) in enumerate(zip(ctx.structures, futures, strict=True)):
        while not future.done():
            wait([future], timeout=0.5)
            if ctx.should_stop():
                from aimspax_like.errors import CampaignInterrupted

                raise CampaignInterrupted(int(ctx.should_stop()))
        outcome = outcome_of(future)
        if isinstance(outcome, LabelFailure):
            ctx.events.emit("relax_failed", structure=index, error=outcome.message)
            raise CampaignStopped(f"system.relax: the reference failed relaxing start structure {index} "
                                  f"({outcome.message}); fix the reference, then resume to continue")
        ctx.labeller.record_success(replace(outcome.label, wall_s=outcome.wall_s, cpu_s=outcome.cpu_s))
        fmax = float(np.linalg.norm(outcome.label.forces, axis=1).max())
        info = outcome.info
        ctx.events.emit("relaxed", structure=index, energy_drop=info["energy_start"] - outcome.label.energy,
                        steps=info["steps"], fmax=fmax, converged=info["converged"])
        if not info["converged"]:
            ctx.warn(f"start structure {index} did not relax to fmax {system.relax_fmax} eV/A in "
                     f"{system.relax_steps} steps (fmax {fmax:.3f} eV/A); continuing from there",
                     key="system.relax_steps")
        atoms = start.copy()
        atoms.set_positions(outcome.positions)
        atoms.set_cell(outcome.cell)
        atoms.calc = None
        relaxed.append(atoms)
    buffer = io.StringIO()
    write(buffer, relaxed, format="extxyz")
    write_atomic(saved, buffer.getvalue().encode())
    return relaxed
