"""Extended-XYZ export (the files MACE trains on) and import (user-supplied labelled data).

Export writes the label only as ``REF_energy``/``REF_forces``/``REF_stress``: ASE's extxyz writer
would also dump an attached calculator's results as plain ``energy``/``forces``, giving two
copies of the label that can disagree and, with MACE's default keys, be read instead of ours.
Columns are written with ``repr`` precision instead of ASE's ``%16.8f`` so that a frame exported
and read back (by ``ase.io.read`` or ``mace_run_train``) is bit-identical to the stored one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from ase.io.extxyz import key_val_dict_to_str, key_val_str_to_dict

from aimspax_like.data.frames import PROVENANCE_KEYS, LabelledFrame
from aimspax_like.errors import SetupError


def _frame_text(frame: LabelledFrame) -> str:
    # A substructure's energy is no label (its cut surface is in it): written as piece_energy,
    # with the core mask and parent indices as columns (see LabelledFrame.to_atoms).
    info: dict[str, Any] = {"piece_energy": frame.energy, "piece": frame.piece} if frame.is_piece else {
        "REF_energy": frame.energy}
    if frame.stress is not None:
        info["REF_stress"] = frame.stress
    for key in PROVENANCE_KEYS:
        value = getattr(frame, key)
        if isinstance(value, str):
            if not value:  # an empty value would swallow the next key when read back
                continue
            if key_val_str_to_dict(key_val_dict_to_str({key: value})).get(key) != value:
                # ASE's reader turns number-like text into numbers ("0123e5" -> 12300000.0);
                # the _JSON form is the one way to make it hand back the exact string.
                value = "_JSON " + json.dumps(value)
        info[key] = value
    info["pbc"] = frame.pbc
    columns = "species:S:1:pos:R:3:REF_forces:R:3" + (":force_mask:L:1:parent_index:I:1" if frame.is_piece else "")
    header = f"Properties={columns} " + key_val_dict_to_str(info)
    if frame.cell.any():
        # extxyz stores the cell's rows one after another, which is ASE's ``cell.T`` in F order.
        header = 'Lattice="' + " ".join(repr(float(x)) for x in frame.cell.reshape(9)) + '" ' + header
    lines = [str(len(frame)), header]
    for k, (z, pos, force) in enumerate(zip(frame.numbers, frame.positions, frame.forces, strict=True)):
        row = [chemical_symbols[z], *(repr(float(x)) for x in (*pos, *force))]
        if frame.is_piece:
            row += ["T" if frame.force_mask[k] else "F", str(int(frame.parent_index[k]))]
        lines.append(" ".join(row))
    return "\n".join(lines) + "\n"


def shareable(fd: int) -> None:
    """Give a ``mkstemp`` file the mode a plain ``open`` would (0666 less the umask) before it is
    renamed into place: mkstemp's private 0600 would survive the rename, and colleagues sharing
    a project folder could not read the exports, harvests and reports."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def export_extxyz(frames: Iterable[LabelledFrame], path: str | os.PathLike[str]) -> Path:
    """Write frames atomically (temp file + ``os.replace``) so a reader never sees half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        shareable(fd)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for frame in frames:
                fh.write(_frame_text(frame))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def check_new_file(path: Path, overwrite: bool, hint: str) -> None:
    """Refuse an output path before any work is done, so a long run never ends in a refusal:
    a folder (``hint`` says how to name the file), an existing file without ``overwrite``, a
    missing or read-only folder. Raises ``SetupError`` naming the path."""
    if path.is_dir():
        raise SetupError(f"{path}: is a folder; give the file to write {hint}")
    if path.exists() and not overwrite:
        raise SetupError(f"{path}: file exists; pass --overwrite to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SetupError(f"{path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise SetupError(f"{path}: folder {parent} is not writable")


def write_images(path: Path, images: Iterable[Atoms]) -> Path:
    """ASE images as extxyz through a temporary file renamed into place: no reader ever sees
    half a file, and a crash leaves the old file or none."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    shareable(fd)  # ase.io.write reopens the path: the mode stays
    os.close(fd)
    try:
        ase.io.write(tmp, list(images), format="extxyz")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _label(atoms: Atoms, key: str, calc_key: str, per_atom: bool) -> Any | None:
    """Find a label under ``key`` (info or arrays) or, failing that, among calculator results.

    ASE moves ``energy``/``forces``/``stress`` into a SinglePointCalculator when it reads them,
    so files labelled the plain ASE way are found through the calculator.
    """
    store = atoms.arrays if per_atom else atoms.info
    if key in store:
        return store[key]
    results = atoms.calc.results if atoms.calc is not None else {}
    for name in (key, calc_key):
        if name in results:
            return results[name]
    return None


def import_extxyz(
    path: str | os.PathLike[str],
    energy_key: str = "REF_energy",
    forces_key: str = "REF_forces",
    stress_key: str = "REF_stress",
    **provenance: Any,
) -> list[LabelledFrame]:
    """Read labelled frames; keyword provenance (e.g. ``split="train"``) overrides the file's.

    Provenance missing from both the file and the keywords takes the ``LabelledFrame``
    defaults, except ``split`` and ``origin``, which have none: a file that lacks them needs
    them passed here. Unreadable files and frames without energy or forces raise SetupError.
    """
    source = Path(path)
    try:
        images = ase.io.read(source, ":", format="extxyz")
    except (OSError, ValueError, KeyError, IndexError, StopIteration) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise SetupError(f"{source}: not a readable extended XYZ file "
                         f"({type(exc).__name__}: {detail})") from None
    if isinstance(images, Atoms):
        images = [images]
    frames = []
    for i, atoms in enumerate(images):
        energy = _label(atoms, energy_key, "energy", per_atom=False)
        forces = _label(atoms, forces_key, "forces", per_atom=True)
        if energy is None or forces is None:
            missing = energy_key if energy is None else forces_key
            raise SetupError(f"{source}: frame {i} has no {missing!r} (nor a calculator result)")
        meta = {k: atoms.info[k] for k in PROVENANCE_KEYS if k in atoms.info}
        meta.update(provenance)
        for key in ("split", "origin"):
            if key not in meta:
                raise SetupError(f"{source}: frame {i} has no {key!r}; pass {key}=... to import it")
        stress = _label(atoms, stress_key, "stress", per_atom=False)
        try:
            frames.append(LabelledFrame.from_atoms(
                atoms, energy=float(np.asarray(energy)), forces=forces, stress=stress, **meta))
        except (TypeError, ValueError) as exc:
            raise SetupError(f"{source}: frame {i} is not a valid labelled frame ({exc})") from None
    return frames
