"""``aimspax-like harvest TRAJ --model ...``: the frames of someone's own MD most worth labelling.

Why. Users run production MD with a committee outside any campaign (their own ASE script, LAMMPS
converted to extxyz, a longer run at another temperature). Where that MD went, the committee may
not know the answer; labelling every frame is wasteful, labelling a random few misses the rare
events. The committee already says where it is unsure (Eq. 1), so the frames to label are the ones
it disagrees on most, and, because consecutive MD frames are nearly copies, only one of each
stretch of neighbouring frames.

What. Every frame is scored with Eq. 1 (``uncertainty.max_atomic_uncertainty``, the same number
active learning thresholds) and, as a second opinion that catches a collective disagreement no
single atom shows, the spread of the members' energies per atom. Frames are picked greedily, most
uncertain first, skipping any frame closer than ``min_separation`` (in the file's frame index) to
one already picked. The picked geometries are written as extxyz without energies or forces: they
are questions for a reference, not answers.

This module holds the steps as functions (read, load, score, select, write) so they can be tested
without the command line; ``aimspax_like.cli`` only parses flags and prints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from aimspax_like.data.xyz import check_new_file, write_images
from aimspax_like.errors import SetupError
from aimspax_like.uncertainty import max_atomic_uncertainty

if TYPE_CHECKING:
    from aimspax_like.models.ensemble import MACEEnsemble

INFO_UNCERTAINTY = "harvest_uncertainty"
INFO_ENERGY_STD = "harvest_energy_std_per_atom"
INFO_SOURCE = "harvest_source"


@dataclass(frozen=True)
class FrameScore:
    """One frame's committee disagreement.

    ``index`` is the frame's position in the trajectory file (not in the ``--index`` slice), so it
    means the same thing whatever slice was read and can be found again in the file.
    """

    index: int
    uncertainty: float  # Eq. 1, eV/A
    energy_std_per_atom: float  # eV/atom


# --------------------------------------------------------------------------- inputs


def parse_index(text: str) -> slice:
    """``--index`` as a slice: ``':'``, ``'100:'``, ``'::5'``, ``'-50:'`` or one frame ``'7'``.

    Parsed here rather than handed to ASE so that every frame keeps its index in the file.
    """
    parts = text.split(":")
    try:
        if len(parts) == 1:
            one = int(parts[0])
            return slice(one, one + 1 if one != -1 else None)
        if len(parts) > 3:
            raise ValueError
        start, stop, step = ([int(p) if p.strip() else None for p in parts] + [None])[:3]
    except ValueError:
        raise SetupError(f"--index: {text!r} is not a frame number or a slice like '100:' or '::5'") from None
    if step == 0:
        raise SetupError("--index: the step of a slice cannot be 0")
    return slice(start, stop, step)


def read_trajectory(path: Path, index: str = ":", what: str = "trajectory",
                    missing: str | None = None) -> list[tuple[int, Atoms]]:
    """(index in the file, frame) for every frame of ``index``; one-line errors name the file.

    ``what`` names the file's content in the messages ("ASE cannot read the <what>"), ``missing``
    the file when it does not exist (default: ``what``); the ``label`` command reads frames here too.
    """
    import ase.io

    if not path.is_file():
        raise SetupError(f"{path}: {missing or what} not found" if not path.exists() else f"{path}: not a file")
    chosen = parse_index(index)
    try:
        frames = ase.io.read(path, index=":")
    except Exception as exc:  # ASE raises many types for a file it cannot parse
        raise SetupError(f"{path}: ASE cannot read the {what} ({type(exc).__name__})") from None
    frames = frames if isinstance(frames, list) else [frames]
    positions = list(range(len(frames)))[chosen]
    if not positions:
        raise SetupError(f"{path}: no frames" + (f" in --index {index}" if frames else ""))
    empty = next((i for i in positions if len(frames[i]) == 0), None)
    if empty is not None:
        raise SetupError(f"{path}: frame {empty} has no atoms")
    return [(i, frames[i]) for i in positions]


def model_files(entries: Sequence[Path]) -> list[Path]:
    """The member files of ``--model``: one run directory (its models/member_*.model, or the
    member_*.model of a folder ``MACEEnsemble.save`` wrote) or two or more model files.

    A committee of one has no disagreement, so fewer than two members is refused.
    """
    if any(p.is_dir() for p in entries):
        if len(entries) != 1:
            raise SetupError("--model: give one run directory or two or more model files, not both")
        folder = entries[0]
        inside = folder / "models" if (folder / "models").is_dir() else folder
        files = sorted(inside.glob("member_*.model"), key=lambda p: (len(p.stem), p.stem))
        if len(files) < 2:
            raise SetupError(f"{inside}: {len(files)} member_*.model file(s); a committee needs at least 2")
        return files
    for path in entries:
        if not path.is_file():
            raise SetupError(f"{path}: model file not found")
    if len(entries) < 2:
        raise SetupError(f"--model: one model file ({entries[0]}); a committee needs at least 2 members")
    return list(entries)


def load_committee(files: Sequence[Path], device: str = "cpu", dtype: str = "float64") -> MACEEnsemble:
    """The committee, or one line naming the file that is no MACE model or the files that disagree."""
    import torch

    from aimspax_like.models.ensemble import MACEEnsemble

    try:
        return MACEEnsemble.load(files, device=device, dtype=dtype)
    except ValueError as exc:
        if "disagree" in str(exc):
            names = ", ".join(str(f) for f in files)
            raise SetupError(f"--model: {names}: {exc}") from None
        failure: BaseException = exc
    except Exception as exc:  # torch.load and unpickling raise anything
        failure = exc
    for path in files:  # only on failure: find the file to name
        try:
            member = torch.load(path, map_location="cpu", weights_only=False)
            _ = (float(member.r_max), list(member.atomic_numbers))  # a MACE model has both
        except Exception as exc:
            raise SetupError(f"{path}: not a readable MACE model ({type(exc).__name__})") from None
    raise SetupError(f"--model: cannot load the committee on {device} ({type(failure).__name__}: {failure})")


def check_elements(frames: Sequence[tuple[int, Atoms]], ensemble: MACEEnsemble, path: Path) -> None:
    """Refuse a trajectory with an element the committee has no embedding for (it cannot score it)."""
    known = {int(z) for z in ensemble.z_table.zs}
    for index, atoms in frames:
        unknown = sorted({int(z) for z in atoms.numbers} - known)
        if unknown:
            names = ", ".join(chemical_symbols[z] for z in unknown)
            model = ", ".join(chemical_symbols[z] for z in sorted(known))
            raise SetupError(f"{path}: frame {index} has {names}, unknown to the model (elements {model})")


# --------------------------------------------------------------------------- scoring and selection


def scores_from_prediction(indices: Sequence[int], n_atoms: Sequence[int], prediction: Any) -> list[FrameScore]:
    """Eq. 1 and the energy spread per atom of each system of one ``EnsemblePrediction``.

    The spread is the population standard deviation of the members' energies ``[M, S]``, the
    same normalisation as Eq. 1.
    """
    energy_std = np.asarray(prediction.energies, dtype=float).std(axis=0)
    return [
        FrameScore(int(index), max_atomic_uncertainty(prediction.forces_of(s)), float(energy_std[s]) / n)
        for s, (index, n) in enumerate(zip(indices, n_atoms, strict=True))
    ]


def score_frames(ensemble: MACEEnsemble, frames: Sequence[tuple[int, Atoms]], batch: int = 32) -> list[FrameScore]:
    """Score every frame, ``batch`` frames per committee call (one batched graph each)."""
    if batch < 1:
        raise SetupError("--batch: must be at least 1")
    scores: list[FrameScore] = []
    for start in range(0, len(frames), batch):
        chunk = frames[start:start + batch]
        atoms = [a for _, a in chunk]
        prediction = ensemble.predict(atoms)
        scores += scores_from_prediction([i for i, _ in chunk], [len(a) for a in atoms], prediction)
    return scores


def _rank_key(score: FrameScore) -> tuple[float, int]:
    """Most uncertain first, earlier frame first on ties; a non-finite score (a member that blew
    up) ranks last: it says nothing about which geometry to label."""
    value = score.uncertainty if math.isfinite(score.uncertainty) else -math.inf
    return (-value, score.index)


def select(
    scores: Sequence[FrameScore], top: int | None = None, above: float | None = None, min_separation: int = 10
) -> list[FrameScore]:
    """Greedy decorrelated pick: take the most uncertain frame left, drop every frame fewer than
    ``min_separation`` frames from it, repeat; stop after ``top`` frames, or (``above``) when no
    frame above the threshold is left. Returned most uncertain first.
    """
    if (top is None) == (above is None):
        raise SetupError("--top/--above: give exactly one of them")
    if top is not None and top < 1:
        raise SetupError(f"--top: must be at least 1 (got {top})")
    if above is not None and not (math.isfinite(above) and above >= 0):
        raise SetupError(f"--above: must be a finite threshold >= 0 eV/A (got {above})")
    if min_separation < 0:
        raise SetupError(f"--min-separation: must be >= 0 (got {min_separation})")
    candidates = sorted(scores, key=_rank_key)
    if above is not None:
        candidates = [s for s in candidates if math.isfinite(s.uncertainty) and s.uncertainty > above]
    picked: list[FrameScore] = []
    for score in candidates:
        if top is not None and len(picked) >= top:
            break
        if all(abs(score.index - p.index) >= max(min_separation, 1) for p in picked):
            picked.append(score)
    return picked


def count_above(scores: Sequence[FrameScore], threshold: float) -> int:
    return sum(1 for s in scores if math.isfinite(s.uncertainty) and s.uncertainty > threshold)


# --------------------------------------------------------------------------- output


def default_output(trajectory: Path) -> Path:
    """``<stem>_harvest.xyz`` beside the trajectory."""
    return trajectory.with_name(f"{trajectory.stem}_harvest.xyz")


def harvested_atoms(atoms: Atoms, score: FrameScore, source: str) -> Atoms:
    """A bare copy of the geometry with the harvest keys.

    Built afresh so that no energy, forces, stress or REF_* key of the MD file (a calculator's
    results, the committee's own predictions) travels on and is mistaken for a reference label.
    """
    bare = Atoms(numbers=atoms.numbers, positions=atoms.get_positions(), cell=atoms.cell, pbc=atoms.pbc)
    bare.info[INFO_UNCERTAINTY] = score.uncertainty
    bare.info[INFO_ENERGY_STD] = score.energy_std_per_atom
    bare.info[INFO_SOURCE] = f"{source}#{score.index}"
    return bare


def render_table(picked: Sequence[FrameScore]) -> str:
    """rank, frame index, Eq. 1 (eV/A), energy spread (meV/atom)."""
    lines = [f"{'rank':>4}  {'frame':>7}  {'Eq.1 eV/A':>10}  {'E std meV/atom':>14}"]
    for rank, s in enumerate(picked, start=1):
        lines.append(f"{rank:>4}  {s.index:>7}  {s.uncertainty:>10.4f}  {1000 * s.energy_std_per_atom:>14.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the whole command


@dataclass
class HarvestResult:
    n_read: int
    n_above: int | None  # frames above --above (None with --top)
    picked: list[FrameScore]
    output: Path | None  # None: nothing was picked, nothing written


def harvest(
    trajectory: Path,
    models: Sequence[Path],
    top: int | None = None,
    above: float | None = None,
    output: Path | None = None,
    overwrite: bool = False,
    min_separation: int = 10,
    index: str = ":",
    device: str = "cpu",
    dtype: str = "float64",
    batch: int = 32,
) -> HarvestResult:
    """Every check that needs no model first (flags, output, trajectory), then the committee.

    Every bad input is a ``SetupError`` raised before the output file is touched.
    """
    select([], top, above, min_separation)  # flag checks only
    if batch < 1:
        raise SetupError(f"--batch: must be at least 1 (got {batch})")
    output = output if output is not None else default_output(trajectory)
    check_new_file(output, overwrite, "with --output")  # before any scoring
    frames = read_trajectory(trajectory, index)
    files = model_files(models)
    ensemble = load_committee(files, device, dtype)
    check_elements(frames, ensemble, trajectory)
    scores = score_frames(ensemble, frames, batch)
    picked = select(scores, top, above, min_separation)
    n_above = None if above is None else count_above(scores, above)
    if not picked:
        return HarvestResult(len(frames), n_above, picked, None)
    by_index = dict(frames)
    write_images(output, [harvested_atoms(by_index[s.index], s, str(trajectory)) for s in picked])
    return HarvestResult(len(frames), n_above, picked, output)
