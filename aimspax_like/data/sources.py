"""Labelled frames from wherever a user keeps them: a run directory, a dataset store, an extended
XYZ file or an ASE database.

``aimspax-like train`` fits a model to any of these, so they all come back as one list of
``LabelledFrame``: the store's frames as stored (split, origin, reference fingerprint and all),
a foreign file's frames with the provenance the file carries and the rest filled in (split
``train`` where the file says none, origin ``import``, ``source`` = ``<file>#<index>``).

Labels in foreign files are looked up under the keys the user names (``REF_energy``,
``REF_forces``, ``REF_stress`` by default, mace's defaults too) and, failing that, among the
results ASE's readers attach as a calculator (``energy``/``forces``/``stress``), the way
``import_extxyz`` does. Every problem is a ``SetupError`` naming the file (and the frame), raised
before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.data.frames import ORIGINS, PROVENANCE_KEYS, SPLITS, LabelledFrame, source_tag
from aimspax_like.data.store import DatasetStore
from aimspax_like.data.xyz import _label
from aimspax_like.errors import SetupError

XYZ_SUFFIXES = (".xyz", ".extxyz")
STORE_SUFFIXES = (".h5", ".hdf5")
DB_SUFFIXES = (".db",)
# Frames that exist in a store but must never be trained on: labels kept back by the label gate,
# and ground-truth analysis points (they measure the uncertainty; training on them biases it).
NEVER_TRAINED = ("held", "analysis")


@dataclass(frozen=True)
class LabelKeys:
    """Where a foreign file keeps its labels (mace's keys by default)."""

    energy: str = "REF_energy"
    forces: str = "REF_forces"
    stress: str = "REF_stress"


@dataclass
class LabelledSource:
    """Frames read from one source, and what kind of source it was."""

    path: Path
    kind: str  # "run", "dataset", "extxyz", "ase-db"
    frames: list[LabelledFrame]

    def split(self, name: str) -> list[LabelledFrame]:
        return [f for f in self.frames if f.split == name]

    def counts(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}


def read_source(path: Path, keys: LabelKeys = LabelKeys(), default_split: str = "train") -> LabelledSource:
    """Read every labelled frame of a run directory, ``dataset.h5``, extxyz file or ASE database.

    ``default_split`` is the split of foreign frames whose file names none (``test`` for a file
    given as a test set).
    """
    path = Path(path)
    if not path.exists():
        raise SetupError(f"{path}: file not found")
    if path.is_dir():
        if not (path / "campaign.yaml").is_file():
            raise SetupError(f"{path}: not a run directory (no campaign.yaml); give a run directory, "
                             "a dataset .h5, an extxyz file or an ASE .db")
        store = path / "data" / "dataset.h5"
        return LabelledSource(path, "run", DatasetStore.open(store).frames())
    suffix = path.suffix.lower()
    if suffix in STORE_SUFFIXES:
        return LabelledSource(path, "dataset", DatasetStore.open(path).frames())
    if suffix in XYZ_SUFFIXES:
        return LabelledSource(path, "extxyz", _read_extxyz(path, keys, default_split))
    if suffix in DB_SUFFIXES:
        return LabelledSource(path, "ase-db", _read_db(path, keys, default_split))
    raise SetupError(f"{path}: unknown file type {suffix or '(no extension)'!r}; expected a run directory, "
                     f"a dataset ({'/'.join(STORE_SUFFIXES)}), extended XYZ ({'/'.join(XYZ_SUFFIXES)}) "
                     "or an ASE database (.db)")


def with_validation(frames: Sequence[LabelledFrame], fraction: float, seed: int) -> tuple[list[LabelledFrame], int]:
    """Move a seeded random ``fraction`` of the train frames to ``valid`` when there is no valid frame.

    Returns the frames (new objects where moved) and how many were moved. A set that has
    validation frames already keeps its split; a single train frame stays a train frame (the
    trainer then validates on it).
    """
    frames = list(frames)
    train = [i for i, f in enumerate(frames) if f.split == "train"]
    if any(f.split == "valid" for f in frames) or len(train) < 2:
        return frames, 0
    n_valid = min(len(train) - 1, max(1, round(fraction * len(train))))
    chosen = np.random.default_rng(seed).choice(train, size=n_valid, replace=False)
    for i in sorted(int(c) for c in chosen):
        frames[i] = dataclasses.replace(frames[i], split="valid")
    return frames, n_valid


# --------------------------------------------------------------------------- foreign files


def _read_extxyz(path: Path, keys: LabelKeys, default_split: str) -> list[LabelledFrame]:
    import ase.io

    try:
        images = ase.io.read(path, ":", format="extxyz")
    except (OSError, ValueError, KeyError, IndexError, StopIteration) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise SetupError(f"{path}: not a readable extended XYZ file ({type(exc).__name__}: {detail})") from None
    images = [images] if isinstance(images, Atoms) else list(images)
    return [_frame(atoms, path, i, keys, default_split) for i, atoms in enumerate(images)]


def _read_db(path: Path, keys: LabelKeys, default_split: str) -> list[LabelledFrame]:
    """Rows of an ASE database; labels in the row's key-value pairs or data, else its calculator."""
    import ase.db

    try:
        rows = list(ase.db.connect(path, type="db").select())
    except Exception as exc:  # sqlite3, JSON and ASE's own errors: any means "not a readable database"
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise SetupError(f"{path}: not a readable ASE database ({type(exc).__name__}: {detail})") from None
    frames = []
    for i, row in enumerate(rows):
        atoms = row.toatoms()
        pairs = dict(row.key_value_pairs)
        data = dict(row.data) if row.get("data") else {}
        for key in (keys.energy, keys.stress, *PROVENANCE_KEYS):
            value = pairs.get(key, data.get(key))
            if value is not None:
                atoms.info[key] = value
        if keys.forces in data:
            atoms.arrays[keys.forces] = np.asarray(data[keys.forces], dtype=float)
        frames.append(_frame(atoms, path, i, keys, default_split))
    return frames


def _frame(atoms: Atoms, path: Path, index: int, keys: LabelKeys, default_split: str) -> LabelledFrame:
    """One foreign structure as a frame; its own provenance kept where it names a known value."""
    energy = _label(atoms, keys.energy, "energy", per_atom=False)
    forces = _label(atoms, keys.forces, "forces", per_atom=True)
    if energy is None or forces is None:
        missing = keys.energy if energy is None else keys.forces
        flag = "--energy-key" if energy is None else "--forces-key"
        raise SetupError(f"{path}: frame {index} has no {missing!r} (nor a calculator result); name the key "
                         f"with {flag}")
    stress = _label(atoms, keys.stress, "stress", per_atom=False)
    meta: dict[str, Any] = {k: atoms.info[k] for k in PROVENANCE_KEYS if k in atoms.info}
    meta.setdefault("split", default_split)
    if meta.get("origin") not in ORIGINS:
        meta["origin"] = "import"
    meta.setdefault("source", source_tag(path, index))
    try:
        return LabelledFrame.from_atoms(atoms, energy=float(np.asarray(energy)), forces=forces, stress=stress, **meta)
    except (TypeError, ValueError) as exc:
        raise SetupError(f"{path}: frame {index} is not a valid labelled frame ({exc})") from None
