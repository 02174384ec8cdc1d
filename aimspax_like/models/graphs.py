"""Turning ``ase.Atoms`` into MACE graphs: cached ones for labelled data, lean ones for MD.

Labelled frames go through mace's own pipeline (``config_from_atoms`` ->
``AtomicData.from_config`` -> ``Batch.from_data_list``), so that what the ensemble trains on is
exactly what ``MACECalculator`` would see. Continual learning revisits the same labelled frames
every round, so ``GraphBuilder`` caches one ``AtomicData`` per labelled frame.

MD snapshots change every step and are never reused, and there the pipeline's per-frame
objects and generic collation cost about three times the neighbour search itself (measured:
~110 ms of Python for 64 structures of 99 atoms, against ~25 ms in matscipy). On a GPU, where
the members' calls on such a batch take a few hundred ms, that would be the engine's largest
overhead. ``md_batch`` therefore builds the dict a member's forward reads directly: mace's own
``get_neighborhood`` per frame (same edges, same order), then one concatenation per field.
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
from mace.data.neighborhood import get_neighborhood
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
        self._one_hot: OrderedDict[bytes, np.ndarray] = OrderedDict()  # per distinct atomic-number sequence

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

    def md_batch(self, frames: Sequence[Atoms], device: torch.device) -> dict[str, torch.Tensor]:
        """All frames as one disjoint-union graph, in the form a member's ``forward`` reads.

        Equal, key by key, to ``batch(frames, device).to_dict()`` for the keys MACE's forward
        uses (node_attrs, positions, edge_index, shifts, unit_shifts, cell, batch, ptr, head);
        labels and loss weights, which MD frames do not have, are left out.
        """
        positions, edges, shifts, unit_shifts, cells, one_hots = [], [], [], [], [], []
        offset = 0
        for atoms in frames:
            xyz = np.asarray(atoms.positions, dtype=float)
            edge_index, shift, unit_shift, cell = get_neighborhood(
                positions=xyz, cutoff=self.r_max, pbc=tuple(bool(p) for p in atoms.pbc),
                cell=np.array(atoms.cell, dtype=float),
            )
            positions.append(xyz)
            edges.append(edge_index + offset)
            shifts.append(shift)
            unit_shifts.append(unit_shift)
            cells.append(cell)
            one_hots.append(self._node_attrs(atoms))
            offset += len(atoms)
        sizes = [len(atoms) for atoms in frames]

        def real(arrays: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.concatenate(arrays)).to(device=device, dtype=self.dtype)

        def index(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)

        return {
            "positions": real(positions),
            "node_attrs": real(one_hots),
            "edge_index": index(np.concatenate(edges, axis=1)),
            "shifts": real(shifts),
            "unit_shifts": real(unit_shifts),
            "cell": real(cells),
            "batch": index(np.repeat(np.arange(len(frames)), sizes)),
            "ptr": index(np.concatenate([[0], np.cumsum(sizes)])),
            "head": index(np.zeros(len(frames))),
        }

    def _node_attrs(self, atoms: Atoms) -> np.ndarray:
        """One-hot element rows of a frame; MD keeps its atoms, so each sequence is built once."""
        key = atoms.numbers.tobytes()
        one_hot = self._one_hot.get(key)
        if one_hot is None:
            self._check_elements(atoms)
            index = {z: k for k, z in enumerate(self.z_table.zs)}
            one_hot = np.zeros((len(atoms), len(self.z_table)))
            one_hot[np.arange(len(atoms)), [index[int(z)] for z in atoms.numbers]] = 1.0
            self._one_hot[key] = one_hot
            while len(self._one_hot) > 1024:
                self._one_hot.popitem(last=False)
        return one_hot

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
