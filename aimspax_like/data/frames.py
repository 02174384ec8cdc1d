"""One reference-labelled structure and the fingerprint of the settings that labelled it.

A ``LabelledFrame`` is the unit the whole engine trades in: the reference workers produce them,
the store keeps them, the trainers read them back as ``ase.Atoms``. Its fields are normalised on
construction (dtypes, shapes, Voigt stress) so that what goes into the HDF5 store comes back
bit-for-bit, and so that a malformed label fails where it is made rather than during training.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from aimspax_like.errors import SetupError

# "held": a label stored but kept out of training (see ``label_gate``) until the data reach it.
SPLITS = ("train", "valid", "test", "held", "analysis")
# "import": a frame read from a user's labelled dataset (``import_data``), not labelled here.
ORIGINS = ("idg", "al", "test", "analysis", "import")

# Provenance written into ``atoms.info`` by ``to_atoms``; the store and extxyz share this list.
PROVENANCE_KEYS = ("split", "origin", "trajectory", "md_step", "uncertainty", "member",
                   "reference", "label_wall_s", "created", "source")

SOURCE_BYTES = 256  # the store's fixed width of ``source`` (UTF-8)

# Reference settings that change how a label is run but never its numbers.
_NON_NUMERIC_KEYS = frozenset({"timeout_s", "keep_workdir", "warm"})  # how, not what, is computed
_NON_NUMERIC_BY_KIND = {"aims": frozenset({"command"})}


def _voigt(stress: Any) -> np.ndarray:
    """Return stress as the 6-vector (xx, yy, zz, yz, xz, xy) that ASE and MACE both accept."""
    arr = np.asarray(stress, dtype=np.float64)
    if arr.shape == (6,):
        return arr.copy()
    if arr.size == 9:
        m = arr.reshape(3, 3)
        return np.array([m[0, 0], m[1, 1], m[2, 2], m[1, 2], m[0, 2], m[0, 1]], dtype=np.float64)
    raise ValueError(f"stress must have 6 (Voigt) or 9 (3x3) components, got shape {arr.shape}")


@dataclass(eq=False)
class LabelledFrame:
    """A structure with its reference energy/forces(/stress) and where it came from.

    ``member`` is the ensemble member whose training subset the frame belongs to (IDG hands
    different frames to different members); -1 means every member trains on it. ``reference``
    is ``reference_fingerprint`` of the settings that produced the label, so frames labelled
    with different settings are never silently mixed. ``source`` says where a frame came from
    when it was not labelled by this campaign's own sampling: ``<file>#<index>`` for an imported
    frame, ``<dataset.h5>#<index>`` for a frame relabelled from another run (``source_tag``).
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float
    forces: np.ndarray
    stress: np.ndarray | None
    split: str
    origin: str
    trajectory: int = -1
    md_step: int = -1
    uncertainty: float = math.nan
    member: int = -1
    reference: str = ""
    label_wall_s: float = math.nan
    created: float = field(default_factory=time.time)
    source: str = ""
    piece: int = -1
    force_mask: np.ndarray | None = None
    parent_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1).copy()
        n = len(self.numbers)
        self.positions = np.asarray(self.positions, dtype=np.float64).copy()
        self.forces = np.asarray(self.forces, dtype=np.float64).copy()
        for name, arr in (("positions", self.positions), ("forces", self.forces)):
            if arr.shape != (n, 3):
                raise ValueError(f"{name} must have shape ({n}, 3), got {arr.shape}")
        self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3).copy()
        self.pbc = np.broadcast_to(np.asarray(self.pbc, dtype=bool), (3,)).copy()
        self.stress = None if self.stress is None else _voigt(self.stress)
        self.energy = float(self.energy)
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {self.origin!r}")
        self.trajectory = int(self.trajectory)
        self.md_step = int(self.md_step)
        self.member = int(self.member)
        self.uncertainty = float(self.uncertainty)
        self.label_wall_s = float(self.label_wall_s)
        self.created = float(self.created)
        self.reference = str(self.reference)
        self.source = str(self.source)
        if len(self.source.encode("utf-8")) > SOURCE_BYTES:
            raise ValueError(f"source must fit {SOURCE_BYTES} bytes of UTF-8 (use source_tag), got {self.source!r}")
        self.piece = int(self.piece)
        self._normalise_piece(n)
        self.check_finite()

    def _normalise_piece(self, n: int) -> None:
        """A substructure (``piece >= 0``) carries its core mask and parent indices; a whole frame
        carries neither (an all-true mask is stored as none: it changes nothing)."""
        if self.force_mask is not None:
            self.force_mask = np.asarray(self.force_mask, dtype=bool).reshape(-1).copy()
        if self.parent_index is not None:
            self.parent_index = np.asarray(self.parent_index, dtype=np.int64).reshape(-1).copy()
        for name in ("force_mask", "parent_index"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {value.shape}")
        if self.piece < 0:
            if self.force_mask is not None and not self.force_mask.all():
                raise ValueError("a force_mask with masked atoms belongs to a substructure (piece >= 0)")
            self.force_mask = self.parent_index = None
            return
        if self.force_mask is None or self.parent_index is None:
            raise ValueError("a substructure (piece >= 0) needs its force_mask and parent_index")
        if not self.force_mask.any():
            raise ValueError("a substructure needs at least one core atom (force_mask all false)")
        if self.stress is not None:
            raise ValueError("a substructure carries no stress label (its buffer would spoil it)")

    @property
    def is_piece(self) -> bool:
        """A substructure: only its core atoms' forces are a label (see ``to_atoms``)."""
        return self.piece >= 0

    def check_finite(self) -> None:
        """Refuse non-finite geometry or label numbers: one NaN force poisons every member trained on it."""
        bad = [name for name, value in (("positions", self.positions), ("cell", self.cell),
                                        ("energy", self.energy), ("forces", self.forces),
                                        ("stress", self.stress)) if value is not None
               and not np.isfinite(value).all()]
        if bad:
            raise ValueError(f"non-finite {', '.join(bad)} in a labelled frame; refused")

    def __len__(self) -> int:
        return len(self.numbers)

    @classmethod
    def from_atoms(
        cls,
        atoms: Atoms,
        energy: float,
        forces: Any,
        stress: Any | None = None,
        **provenance: Any,
    ) -> LabelledFrame:
        """Build a frame from the structure a reference calculation was run on.

        The label is passed explicitly rather than read from ``atoms.calc`` so a stale
        calculator attached to the structure can never be mistaken for the reference.
        """
        return cls(
            numbers=atoms.get_atomic_numbers(),
            positions=atoms.get_positions(),
            cell=atoms.cell.array,
            pbc=atoms.get_pbc(),
            energy=energy,
            forces=forces,
            stress=stress,
            **provenance,
        )

    def to_atoms(self) -> Atoms:
        """Return ``ase.Atoms`` carrying the label twice, as calculator results and as REF_* keys.

        The calculator serves ASE code (``get_potential_energy``); the REF_* keys are what
        MACE's data loader reads with ``--energy_key REF_energy --forces_key REF_forces``.

        A substructure gets no ``REF_energy`` (its energy, kept as ``piece_energy``, includes the
        buffer's cut surface, which no model of the parent system should learn; without the key
        mace gives the frame an energy weight of 0, and E0 fits skip it) and a ``force_mask``
        array that the engine's loss applies (only core forces train) plus ``parent_index``.
        """
        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        results: dict[str, Any] = {"energy": self.energy, "forces": self.forces.copy()}
        if self.stress is not None:
            results["stress"] = self.stress.copy()
            atoms.info["REF_stress"] = self.stress.copy()
        atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.arrays["REF_forces"] = self.forces.copy()
        if self.is_piece:
            atoms.info["piece_energy"] = self.energy
            atoms.info["piece"] = self.piece
            atoms.arrays["force_mask"] = self.force_mask.copy()
            atoms.arrays["parent_index"] = self.parent_index.copy()
        else:
            atoms.info["REF_energy"] = self.energy
        for key in PROVENANCE_KEYS:
            atoms.info[key] = getattr(self, key)
        for key in ("reference", "source"):
            if not getattr(self, key):
                # An empty value would corrupt the extxyz comment line ASE writes from this info.
                del atoms.info[key]
        return atoms


def source_tag(path: Any, index: int) -> str:
    """``<path>#<index>``, the ``source`` of a frame taken from a file; a path too long for the
    store keeps its end (the file name and the folders nearest to it), after a leading '...'."""
    suffix = f"#{int(index)}"
    text = str(path)
    room = SOURCE_BYTES - len(suffix.encode()) - 3
    encoded = text.encode("utf-8")
    if len(encoded) > room + 3:
        text = "..." + encoded[-room:].decode("utf-8", errors="ignore")
    return text + suffix


def _file_sha256(path: str) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime): the fingerprint is asked for at every
    stored label, and a model file does not change between them."""
    try:
        stat = Path(path).stat()
    except OSError:  # the setup check finds a missing file before a campaign starts; this is later
        raise SetupError(f"reference.model: model file not found: {path}") from None
    return _sha256_of(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reference_fingerprint(spec: Mapping[str, Any] | Any) -> str:
    """Return a 16-hex-digit hash of the reference settings that determine the label values.

    Wall limits, scratch handling and (for FHI-aims) the launch command are dropped: a campaign
    resumed with a longer timeout or on another node count must still recognise its old labels.
    A ``mace`` reference is its model file: the file's SHA-256 stands in for its path, so two
    different files never share a fingerprint and the same file moved elsewhere keeps its own.
    Pydantic models are accepted as well as plain dicts.
    """
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump(mode="json")
    data = dict(spec)
    dropped = _NON_NUMERIC_KEYS | _NON_NUMERIC_BY_KIND.get(str(data.get("kind", "")), frozenset())
    canonical = {k: v for k, v in data.items() if k not in dropped}
    if data.get("kind") == "mace":
        canonical["model"] = "sha256:" + _file_sha256(str(data["model"]))
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
