"""The one HDF5 file that holds every reference-labelled frame of a campaign, with provenance.

Reference labels are the expensive product of a campaign (minutes to hours of DFT each), so the
store is written for durability first: every ``append`` opens the file, writes, closes it and
fsyncs, so a label is on disk the moment ``append`` returns and a SIGKILL straight afterwards
loses nothing. The frame counter attribute ``n_frames`` is written last and readers trust it,
not dataset lengths, so rows left behind by a write that died half-way are ignored and later
overwritten.

Layout (format_version 3; an older store reads as if it had the newer columns, empty, and is
upgraded in place by the first write: format 2 added ``source``, format 3 the substructure
columns ``piece``, ``force_mask`` and ``parent_index``): per-atom arrays (``numbers``,
``positions``, ``forces``, ``force_mask``, ``parent_index``) are
concatenated along axis 0 in resizable chunked datasets; each frame points into them with
``atom_offset``/``n_atoms``. Everything else is one row per frame; a missing stress is stored as
NaNs with ``has_stress`` false. Only one process may write at a time (the campaign); readers
such as ``status`` open without taking the HDF5 file lock so they can never block that writer.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from ase import Atoms

from aimspax_like.data.frames import ORIGINS, SOURCE_BYTES, SPLITS, LabelledFrame
from aimspax_like.errors import SetupError

FORMAT_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)

# Fixed-length ASCII, not variable-length strings: HDF5 puts each write session's vlen strings
# in a fresh 4 KiB global-heap collection, which, with one session per append, grew the file by
# ~4 KiB a frame. Width per field; a longer value is refused at append.
_STR_WIDTH = {"split": 16, "origin": 16, "reference": 64}
# name -> (dtype, trailing shape). Per-atom rows are atoms, per-frame rows are frames.
_PER_ATOM: dict[str, tuple[Any, tuple[int, ...]]] = {
    "numbers": (np.int32, ()),
    "positions": (np.float64, (3,)),
    "forces": (np.float64, (3,)),
    # A substructure's core atoms (true) and each atom's index in its parent frame; a whole
    # frame stores true and -1 (see ``LabelledFrame.piece``).
    "force_mask": (np.bool_, ()),
    "parent_index": (np.int64, ()),
}
_PER_FRAME: dict[str, tuple[Any, tuple[int, ...]]] = {
    "atom_offset": (np.int64, ()),
    "n_atoms": (np.int64, ()),
    "energy": (np.float64, ()),
    "cell": (np.float64, (3, 3)),
    "pbc": (np.bool_, (3,)),
    "stress": (np.float64, (6,)),
    "has_stress": (np.bool_, ()),
    **{name: (h5py.string_dtype("ascii", width), ()) for name, width in _STR_WIDTH.items()},
    "source": (h5py.string_dtype("utf-8", SOURCE_BYTES), ()),
    **{name: (np.int64, ()) for name in ("trajectory", "md_step", "member", "piece")},
    **{name: (np.float64, ()) for name in ("uncertainty", "label_wall_s", "created")},
}
_CHUNK_ROWS = {"atom": 2048, "frame": 512}
# Columns an older store lacks, with the value its existing rows get, per the version that added them.
_ADDED = {2: {"source": b""}, 3: {"piece": -1, "force_mask": True, "parent_index": -1}}
_ADDED_COLUMNS = frozenset(name for columns in _ADDED.values() for name in columns)
_STRING_FIELDS = tuple(_STR_WIDTH)
_SCALAR_FIELDS = ("trajectory", "md_step", "uncertainty", "member", "label_wall_s", "created", "piece")
_LOCK_WAIT_S = 10.0
# What h5py raises on a damaged, truncated or foreign file, at open or at first read.
_H5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)


def fsync_path(path: Path) -> None:
    """Push a file (or directory entry) from the page cache to the disk: power-loss safety."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ascii(value: str, name: str) -> bytes:
    if not value.isascii() or len(value) > _STR_WIDTH[name]:
        raise ValueError(f"{name} must be ASCII of at most {_STR_WIDTH[name]} characters, got {value!r}")
    return value.encode("ascii")


class DatasetStore:
    """Append-only, crash-safe store of ``LabelledFrame``s in one HDF5 file.

    ``DatasetStore(path)`` only binds the path, for readers: a store whose file does not exist
    reads as empty. ``create`` and ``open`` are the writer's entry points (refuse an existing
    file, respectively a missing or damaged one), and a store they return never creates its file
    again: only the creating writer initialises a store, so a ``dataset.h5`` deleted while a
    campaign runs stops the campaign (``SetupError``) instead of being silently recreated
    empty, which would drop every label paid for so far from the dataset and its exports.

    Every frame is checked before it is written: non-finite positions, cell, energy, forces or
    stress are refused (``ValueError``); nothing that could poison training enters the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._must_exist = False  # set by create/open: a vanished file is an error, not empty

    def __repr__(self) -> str:
        return f"DatasetStore({str(self.path)!r})"

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> DatasetStore:
        """Create an empty store; refuse to touch an existing file (it may hold paid-for labels)."""
        store = cls(path)
        if store.path.exists():
            raise SetupError(f"{store.path}: refusing to create a dataset store, the file exists")
        store._initialise()
        store._must_exist = True
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> DatasetStore:
        """Open an existing store after checking it is complete and readable."""
        store = cls(path)
        if not store.path.is_file():
            raise SetupError(f"{store.path}: dataset store not found")
        with store._reader() as h5:
            n = int(h5.attrs["n_frames"])
            if n:
                store._read(h5, np.array([n - 1]))  # the newest frame must be fully readable
        store._must_exist = True
        return store

    def _exists(self) -> bool:
        """Whether the file is there; for a writer's store a vanished file is an error."""
        if self.path.exists():
            return True
        if self._must_exist:
            raise SetupError(f"{self.path}: the dataset store disappeared while the campaign ran; its labels "
                             "are gone from this run directory (restore the file, then resume)")
        return False

    def _initialise(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with h5py.File(self.path, "w-") as h5:
                for kind, table in (("atom", _PER_ATOM), ("frame", _PER_FRAME)):
                    for name, (dtype, shape) in table.items():
                        h5.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape),
                                          dtype=dtype, chunks=(_CHUNK_ROWS[kind], *shape))
                h5.attrs["format_version"] = FORMAT_VERSION
                h5.attrs["n_frames"] = 0
        except OSError as exc:  # e.g. the file appeared in between, or no permission
            raise SetupError(f"{self.path}: cannot create dataset store ({exc})") from None
        fsync_path(self.path)
        fsync_path(self.path.parent)

    def _check(self, h5: h5py.File) -> None:
        """Refuse anything but a complete format-1 store (callers turn h5py errors into SetupError)."""
        version = h5.attrs.get("format_version")
        if version is None or "n_frames" not in h5.attrs:
            raise SetupError(f"{self.path}: HDF5 file is not a dataset store (no format_version)")
        if int(version) not in _READABLE_VERSIONS:
            raise SetupError(f"{self.path}: dataset store format_version {version}, "
                             f"this engine reads {', '.join(map(str, _READABLE_VERSIONS))}")
        missing = [name for name in (*_PER_ATOM, *_PER_FRAME) if name not in h5 and name not in _ADDED_COLUMNS]
        if missing:
            raise SetupError(f"{self.path}: damaged dataset store, missing {', '.join(missing)}")
        n = int(h5.attrs["n_frames"])
        if n < 0 or any(h5[name].shape[0] < n for name in _PER_FRAME if name in h5):
            raise SetupError(f"{self.path}: damaged dataset store, n_frames={n} exceeds its data")

    @contextlib.contextmanager
    def _reader(self) -> Iterator[h5py.File]:
        """Open read-only without the HDF5 lock; any HDF5 failure becomes a one-line SetupError."""
        if self._must_exist:
            self._exists()
        try:
            h5 = h5py.File(self.path, "r", locking=False)
        except _H5_ERRORS as exc:
            raise self._unreadable(exc) from None
        try:
            self._check(h5)
            yield h5
        except _H5_ERRORS as exc:
            raise self._unreadable(exc) from None
        finally:
            h5.close()

    def _unreadable(self, exc: BaseException) -> SetupError:
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        return SetupError(f"{self.path}: not a readable dataset store ({detail})")

    @contextlib.contextmanager
    def _writer(self) -> Iterator[h5py.File]:
        """Open for writing, close, then fsync before returning (the file must exist: see class doc)."""
        if not self._exists():
            raise SetupError(f"{self.path}: dataset store not found (only DatasetStore.create makes one)")
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                h5 = h5py.File(self.path, "r+")
                break
            except OSError as exc:
                if "lock" in str(exc).lower() and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise self._unreadable(exc) from None
        try:
            try:
                self._check(h5)
                if int(h5.attrs["format_version"]) < FORMAT_VERSION:
                    self._upgrade(h5)
            except _H5_ERRORS as exc:
                raise self._unreadable(exc) from None
            yield h5
        finally:
            h5.close()
        fsync_path(self.path)

    @staticmethod
    def _upgrade(h5: h5py.File) -> None:
        """Add the columns of every later format, filled for the frames already stored (empty
        source; whole frames: piece -1, every force a label, no parent).

        Written before the version attribute, so a write that dies half-way leaves an old-format
        store that upgrades again next time.
        """
        n = int(h5.attrs["n_frames"])
        n_atoms = int(h5["atom_offset"][n - 1] + h5["n_atoms"][n - 1]) if n else 0
        version = int(h5.attrs["format_version"])
        for added_in, columns in _ADDED.items():
            if version >= added_in:
                continue
            for name, fill in columns.items():
                if name in h5:
                    del h5[name]
                kind, rows = ("atom", n_atoms) if name in _PER_ATOM else ("frame", n)
                dtype, shape = (_PER_ATOM if kind == "atom" else _PER_FRAME)[name]
                h5.create_dataset(name, shape=(rows, *shape), maxshape=(None, *shape), dtype=dtype,
                                  chunks=(_CHUNK_ROWS[kind], *shape), fillvalue=fill)
        h5.flush()
        h5.attrs["format_version"] = FORMAT_VERSION

    def append(self, frame: LabelledFrame) -> int:
        """Store one frame durably and return its index."""
        return self.extend([frame])[0]

    def extend(self, frames: Iterable[LabelledFrame]) -> list[int]:
        """Store frames in one write (one open/close/fsync) and return their indices."""
        batch = list(frames)
        if not batch:
            return []
        for frame in batch:
            frame.check_finite()
        # Build every column before touching the file, so a bad value cannot leave a half write.
        sizes = np.array([len(f) for f in batch], dtype=np.int64)
        per_atom = {
            "numbers": np.concatenate([f.numbers for f in batch]).astype(np.int32),
            "positions": np.concatenate([f.positions for f in batch]).reshape(-1, 3),
            "forces": np.concatenate([f.forces for f in batch]).reshape(-1, 3),
            "force_mask": np.concatenate([np.ones(len(f), bool) if f.force_mask is None else f.force_mask
                                          for f in batch]),
            "parent_index": np.concatenate([np.full(len(f), -1, np.int64) if f.parent_index is None
                                            else f.parent_index for f in batch]),
        }
        per_frame: dict[str, Any] = {
            "n_atoms": sizes,
            "energy": np.array([f.energy for f in batch]),
            "cell": np.stack([f.cell for f in batch]),
            "pbc": np.stack([f.pbc for f in batch]),
            "stress": np.stack([np.full(6, np.nan) if f.stress is None else f.stress for f in batch]),
            "has_stress": np.array([f.stress is not None for f in batch]),
        }
        for name in _STRING_FIELDS:
            per_frame[name] = np.array([_ascii(getattr(f, name), name) for f in batch],
                                       dtype=f"S{_STR_WIDTH[name]}")
        per_frame["source"] = np.array([f.source.encode("utf-8") for f in batch], dtype=_PER_FRAME["source"][0])
        for name in _SCALAR_FIELDS:
            per_frame[name] = np.array([getattr(f, name) for f in batch], dtype=_PER_FRAME[name][0])
        with self._writer() as h5:
            n = int(h5.attrs["n_frames"])
            start = int(h5["atom_offset"][n - 1] + h5["n_atoms"][n - 1]) if n else 0
            per_frame["atom_offset"] = start + np.concatenate([[0], np.cumsum(sizes)[:-1]])
            # Rows beyond n_frames (a write killed earlier) are simply overwritten.
            self._put(h5, per_atom, start)
            self._put(h5, per_frame, n)
            h5.flush()
            h5.attrs["n_frames"] = n + len(batch)  # the commit point: written last
        return list(range(n, n + len(batch)))

    def set_split(self, index: int, split: str) -> None:
        """Move one stored frame to another split, durably (a held label released to training)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        with self._writer() as h5:
            if not 0 <= index < int(h5.attrs["n_frames"]):
                raise IndexError(f"frame {index} not in the store")
            h5["split"][index] = _ascii(split, "split")
            h5.flush()

    def index_of(self, origin: str, trajectory: int, md_step: int, piece: int = -1) -> int:
        """The index of the frame with this (origin, trajectory, md_step, piece) identity."""
        for k, key in enumerate(self.keys()):
            if key == (origin, int(trajectory), int(md_step), int(piece)):
                return k
        raise KeyError(f"no frame ({origin}, {trajectory}, {md_step}, piece {piece}) in the store")

    @staticmethod
    def _put(h5: h5py.File, columns: dict[str, Any], row: int) -> None:
        for name, values in columns.items():
            ds = h5[name]
            end = row + len(values)
            if ds.shape[0] < end:
                ds.resize(end, axis=0)
            ds[row:end] = values

    def __len__(self) -> int:
        if not self._exists():
            return 0
        with self._reader() as h5:
            return int(h5.attrs["n_frames"])

    def _select(self, h5: h5py.File, split: str | None, origin: str | None,
                member: int | None) -> np.ndarray:
        n = int(h5.attrs["n_frames"])
        keep = np.ones(n, dtype=bool)
        if split is not None:
            keep &= h5["split"].asstr()[:n] == split
        if origin is not None:
            keep &= h5["origin"].asstr()[:n] == origin
        if member is not None:
            members = h5["member"][:n]
            keep &= (members == member) | (members == -1)
        return np.flatnonzero(keep)

    def _read(self, h5: h5py.File, index: np.ndarray) -> list[LabelledFrame]:
        """Materialise the frames at the given (sorted) indices."""
        if len(index) == 0:
            return []
        lo, hi = int(index[0]), int(index[-1]) + 1
        col = {name: h5[name][lo:hi] for name in _PER_FRAME if name not in (*_STRING_FIELDS, "source") and name in h5}
        for name in _STRING_FIELDS:
            col[name] = h5[name].asstr()[lo:hi]
        col["source"] = (h5["source"].asstr()[lo:hi] if "source" in h5
                         else np.full(hi - lo, "", dtype=object))  # a format-1 store
        a_lo = int(col["atom_offset"][index[0] - lo])
        a_hi = int(col["atom_offset"][index[-1] - lo] + col["n_atoms"][index[-1] - lo])
        atoms_cols = {name: h5[name][a_lo:a_hi] for name in _PER_ATOM if name in h5}
        if "piece" not in h5:  # an older store: whole frames only
            col["piece"] = np.full(hi - lo, -1, dtype=np.int64)
        out = []
        for i in index - lo:
            s = slice(int(col["atom_offset"][i]) - a_lo,
                      int(col["atom_offset"][i] + col["n_atoms"][i]) - a_lo)
            out.append(LabelledFrame(
                numbers=atoms_cols["numbers"][s],
                positions=atoms_cols["positions"][s],
                cell=col["cell"][i],
                pbc=col["pbc"][i],
                energy=float(col["energy"][i]),
                forces=atoms_cols["forces"][s],
                stress=col["stress"][i] if col["has_stress"][i] else None,
                **{name: col[name][i] for name in (*_STRING_FIELDS, *_SCALAR_FIELDS, "source")},
                **({"force_mask": atoms_cols["force_mask"][s], "parent_index": atoms_cols["parent_index"][s]}
                   if col["piece"][i] >= 0 else {}),
            ))
        return out

    def frames(self, split: str | None = None, origin: str | None = None,
               member: int | None = None) -> list[LabelledFrame]:
        """Frames in insertion order; ``member=m`` keeps m's own frames plus shared ones (-1)."""
        if not self._exists():
            return []
        with self._reader() as h5:
            return self._read(h5, self._select(h5, split, origin, member))

    def frame(self, index: int) -> LabelledFrame:
        """The one frame stored at ``index`` (reads that row only)."""
        with self._reader() as h5:
            if not 0 <= index < int(h5.attrs["n_frames"]):
                raise IndexError(f"frame {index} not in the store")
            return self._read(h5, np.array([index]))[0]

    def atoms(self, split: str | None = None, origin: str | None = None,
              member: int | None = None) -> list[Atoms]:
        """Same selection as ``frames``, as ``ase.Atoms`` with REF_* keys (see ``to_atoms``)."""
        return [f.to_atoms() for f in self.frames(split=split, origin=origin, member=member)]

    def keys(self) -> list[tuple[str, int, int, int]]:
        """(origin, trajectory, md_step, piece) of every frame: a label's identity within a campaign.

        A resumed campaign asks this before storing a label again. ``piece`` tells the
        substructures carved from one frame apart (-1: the whole frame; older stores have only those).
        """
        if not self._exists():
            return []
        with self._reader() as h5:
            n = int(h5.attrs["n_frames"])
            origins = h5["origin"].asstr()[:n]
            pieces = h5["piece"][:n] if "piece" in h5 else np.full(n, -1)
            return list(zip(origins, (int(t) for t in h5["trajectory"][:n]),
                            (int(s) for s in h5["md_step"][:n]), (int(p) for p in pieces), strict=True))

    def counts(self) -> dict[str, Any]:
        """``{"total": n, "split": {name: n}, "origin": {name: n}}``, every known name present."""
        splits: list[str] = []
        origins: list[str] = []
        if self._exists():
            with self._reader() as h5:
                n = int(h5.attrs["n_frames"])
                splits = list(h5["split"].asstr()[:n])
                origins = list(h5["origin"].asstr()[:n])
        return {
            "total": len(splits),
            "split": {name: splits.count(name) for name in SPLITS},
            "origin": {name: origins.count(name) for name in ORIGINS},
        }
