"""Turning ``ase.Atoms`` into MACE graphs, with a per-frame cache for labelled data.

Everything goes through mace's own pipeline (``config_from_atoms`` -> ``AtomicData.from_config``
-> ``Batch.from_data_list``) so that what the ensemble trains on is exactly what
``MACECalculator`` would see. Graph construction (neighbour lists, one-hot tensors) costs more
than a forward pass of a tiny model, and continual learning revisits the same labelled frames
every round, so ``GraphBuilder`` caches one ``AtomicData`` per labelled frame.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
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


def frame_key(atoms: Atoms) -> bytes:
    """Digest of everything ``config_from_atoms`` reads: geometry, labels and their weights.

    Equal content gives an equal key, so ``LabelledFrame.to_atoms()`` may hand out a new
    ``Atoms`` object every round and still hit the cache, while a frame edited in place (moved,
    relabelled, reweighted) misses it instead of being served a stale graph.
    """
    digest = hashlib.blake2b(digest_size=16)
    for array in (atoms.numbers, atoms.positions, np.asarray(atoms.cell), atoms.pbc):
        digest.update(np.ascontiguousarray(array).tobytes())
    forces = atoms.arrays.get("REF_forces")
    digest.update(b"F" + (np.ascontiguousarray(forces, dtype=float).tobytes() if forces is not None else b"-"))
    labels = {k: v for k, v in atoms.info.items() if k in _INFO_READ or k.startswith("config_")}
    digest.update(repr(sorted((k, np.asarray(v).tolist()) for k, v in labels.items())).encode())
    return digest.digest()


_INFO_READ = frozenset({"REF_energy", "REF_stress"})


class GraphBuilder:
    """Builds (and for labelled frames caches) ``AtomicData`` for one element table and cutoff.

    The cache is keyed by frame content (``frame_key``) and bounded: beyond ``max_cached``
    graphs the least recently used one is dropped. Size it above the labelled-set size so a
    training epoch never rebuilds a graph.
    """

    def __init__(
        self, z_table: AtomicNumberTable, r_max: float, dtype: torch.dtype, max_cached: int = 20000
    ) -> None:
        self.z_table = z_table
        self.r_max = float(r_max)
        self.dtype = dtype
        self.max_cached = int(max_cached)
        self._cache: OrderedDict[bytes, mace_data.AtomicData] = OrderedDict()

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
        """The graph of a labelled frame, built once per distinct content."""
        key = frame_key(atoms)
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            return data
        data = self.build(atoms)
        self._cache[key] = data
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
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
