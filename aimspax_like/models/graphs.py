"""Turning ``ase.Atoms`` into MACE graphs, with a per-frame cache for labelled data.

Everything goes through mace's own pipeline (``config_from_atoms`` -> ``AtomicData.from_config``
-> ``Batch.from_data_list``) so that what the ensemble trains on is exactly what
``MACECalculator`` would see. Graph construction (neighbour lists, one-hot tensors) costs more
than a forward pass of a tiny model, and continual learning revisits the same labelled frames
every round, so ``GraphBuilder`` caches one ``AtomicData`` per frame.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import mace  # noqa: F401  (first: sets the torch.load switch e3nn needs under torch >= 2.6)
import numpy as np
import torch
from ase import Atoms
from mace import data as mace_data
from mace.tools import AtomicNumberTable, torch_geometric

from aimspax_like.errors import SetupError
from aimspax_like.models.torch_utils import default_dtype

# The training-data convention of the whole engine (same names as mace's DefaultKeys).
KEYS = mace_data.KeySpecification(
    info_keys={"energy": "REF_energy", "stress": "REF_stress"},
    arrays_keys={"forces": "REF_forces"},
)
HEADS = ["Default"]

class _Entry:
    """A cached graph plus what it was built from, to notice a frame mutated in place."""

    __slots__ = ("cell", "data", "numbers", "pbc", "positions", "ref")

    def __init__(self, atoms: Atoms, data: mace_data.AtomicData, ref: weakref.ref) -> None:
        self.ref = ref
        self.data = data
        self.positions = atoms.positions.copy()
        self.numbers = atoms.numbers.copy()
        self.cell = np.array(atoms.cell)
        self.pbc = atoms.pbc.copy()

    def matches(self, atoms: Atoms) -> bool:
        return (
            self.ref() is atoms
            and np.array_equal(self.positions, atoms.positions)
            and np.array_equal(self.numbers, atoms.numbers)
            and np.array_equal(self.cell, np.array(atoms.cell))
            and np.array_equal(self.pbc, atoms.pbc)
        )


class GraphBuilder:
    """Builds (and for labelled frames caches) ``AtomicData`` for one element table and cutoff.

    The cache is keyed by object identity and holds only a weak reference to each frame, so it
    never keeps frames alive; an entry is dropped when its frame is garbage collected. Geometry
    is compared on every hit, so a frame edited in place is rebuilt rather than served stale.
    Labels are read at build time: relabelling a frame in place requires ``clear()``.
    """

    def __init__(self, z_table: AtomicNumberTable, r_max: float, dtype: torch.dtype) -> None:
        self.z_table = z_table
        self.r_max = float(r_max)
        self.dtype = dtype
        self._cache: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    def build(self, atoms: Atoms) -> mace_data.AtomicData:
        """One graph, uncached (for MD snapshots that change every step)."""
        self._check_elements(atoms)
        config = mace_data.config_from_atoms(atoms, key_specification=KEYS, head_name=HEADS[0])
        with default_dtype(self.dtype):
            return mace_data.AtomicData.from_config(
                config, z_table=self.z_table, cutoff=self.r_max, heads=HEADS
            )

    def cached(self, atoms: Atoms) -> mace_data.AtomicData:
        """The graph of a labelled frame, built once per frame object."""
        key = id(atoms)
        entry = self._cache.get(key)
        if entry is not None and entry.matches(atoms):
            return entry.data
        data = self.build(atoms)
        cache = self._cache
        ref = weakref.ref(atoms, lambda _ref, k=key: _drop(cache, k, _ref))
        cache[key] = _Entry(atoms, data, ref)
        return data

    def graphs(self, frames: Sequence[Atoms], cache: bool = True) -> list[mace_data.AtomicData]:
        get = self.cached if cache else self.build
        return [get(atoms) for atoms in frames]

    def batch(self, frames: Sequence[Atoms], device: torch.device, cache: bool = False):
        """All frames as one disjoint-union graph on ``device``."""
        data_list = self.graphs(frames, cache=cache)
        return torch_geometric.Batch.from_data_list(data_list).to(device)

    def _check_elements(self, atoms: Atoms) -> None:
        unknown = sorted(set(atoms.numbers.tolist()) - set(self.z_table.zs))
        if unknown:
            raise SetupError(
                f"atomic numbers {unknown} are not among the model's elements {list(self.z_table.zs)}"
            )


def _drop(cache: dict[int, _Entry], key: int, ref: weakref.ref) -> None:
    """Weakref callback: forget a collected frame unless its id was already reused."""
    entry = cache.get(key)
    if entry is not None and entry.ref is ref:
        del cache[key]


def loader(
    graphs: Sequence[mace_data.AtomicData],
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
) -> torch_geometric.DataLoader:
    """mace's graph DataLoader; ``generator`` makes the shuffling reproducible per member."""
    return torch_geometric.DataLoader(
        dataset=list(graphs),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=False,
        generator=generator,
    )
