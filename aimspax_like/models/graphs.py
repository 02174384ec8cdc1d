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
from collections.abc import Iterator, Sequence
from typing import Literal

import mace  # noqa: F401  (first: sets the torch.load switch e3nn needs under torch >= 2.6)
import numpy as np
import torch
from ase import Atoms
from mace import data as mace_data
from mace.data.neighborhood import get_neighborhood
from mace.tools import AtomicNumberTable, torch_geometric

from aimspax_like.errors import SetupError
from aimspax_like.models.neighbours import MAX_ATOMS, image_ranges, neighbour_lists
from aimspax_like.models.torch_utils import default_dtype

# The training-data convention of the whole engine (same names as mace's DefaultKeys).
KEYS = mace_data.KeySpecification(
    info_keys={"energy": "REF_energy", "stress": "REF_stress"},
    arrays_keys={"forces": "REF_forces"},
)
HEADS = ["Default"]
# Per-atom array of a substructure (``LabelledFrame.to_atoms``): true where the force is a label.
FORCE_MASK = "force_mask"


def mace_cell(positions: np.ndarray, cell: np.ndarray, pbc: Sequence[bool], cutoff: float) -> np.ndarray:
    """The cell mace's ``get_neighborhood`` returns (and its graphs carry): a zero cell becomes
    the identity, and each non-periodic axis a vector far beyond every atom."""
    cell = np.identity(3) if not cell.any() else cell.copy()
    reach = (np.max(np.abs(positions)) + 1) * 5 * cutoff
    for a in range(3):
        if not pbc[a]:
            cell[a] = reach * np.identity(3)[a]
    return cell


def cell_offsets(positions: np.ndarray, cell: np.ndarray, pbc: Sequence[bool]) -> np.ndarray:
    """Whole cells each atom lies away from the home cell, per periodic axis (0 elsewhere)."""
    fractional = np.linalg.solve(cell.T, positions.T).T
    return np.floor(fractional) * np.asarray(pbc, dtype=float)


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
    mask = atoms.arrays.get(FORCE_MASK)
    digest.update(b"M" + (np.ascontiguousarray(mask, dtype=bool).tobytes() if mask is not None else b"-"))
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
        """One graph, uncached (for MD snapshots that change every step).

        Every graph carries a node-level ``force_mask`` (1 where the force is a label, 0 for a
        substructure's buffer atoms; all ones for a whole frame): graphs batch together only when
        all of them have the same keys, and the engine's losses (``models.losses``) read it.
        """
        self._check_elements(atoms)
        config = mace_data.config_from_atoms(atoms, key_specification=KEYS, head_name=HEADS[0])
        with default_dtype(self.dtype):
            data = mace_data.AtomicData.from_config(
                config, z_table=self.z_table, cutoff=self.r_max, heads=HEADS
            )
        mask = atoms.arrays.get(FORCE_MASK)
        data.force_mask = (torch.ones(len(atoms), dtype=self.dtype) if mask is None
                           else torch.as_tensor(np.asarray(mask, dtype=bool), dtype=self.dtype))
        return data

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

    def md_batch(
        self, frames: Sequence[Atoms], device: torch.device, neighbours: Literal["host", "device"] | None = None
    ) -> dict[str, torch.Tensor]:
        """All frames as one disjoint-union graph, in the form a member's ``forward`` reads.

        ``neighbours``: where the neighbour search runs; by default on the device when that is
        a GPU (``models.neighbours``, for frames of up to ``MAX_ATOMS`` atoms), else on the host
        with mace's ``get_neighborhood``. The host path is equal, key by key, to
        ``batch(frames, device).to_dict()`` for the keys MACE's forward uses (node_attrs,
        positions, edge_index, shifts, unit_shifts, cell, batch, ptr, head); the device path
        finds the same edges in another order. Labels and loss weights, which MD frames do not
        have, are left out.
        """
        on_device = device.type == "cuda" if neighbours is None else neighbours == "device"
        sizes = [len(atoms) for atoms in frames]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        positions = [np.asarray(atoms.positions, dtype=float) for atoms in frames]
        pbcs = [tuple(bool(p) for p in atoms.pbc) for atoms in frames]
        cells = [np.array(atoms.cell, dtype=float) for atoms in frames]
        edges, shifts, unit_shifts = [], [], []
        searched = set()
        if on_device:
            cells = [mace_cell(x, c, p, self.r_max) for x, c, p in zip(positions, cells, pbcs, strict=True)]
            searched = {k for k, n in enumerate(sizes) if n <= MAX_ATOMS}
            for edge_index, shift, unit_shift in self._device_edges(positions, cells, pbcs, starts, searched, device):
                edges.append(edge_index)
                shifts.append(shift)
                unit_shifts.append(unit_shift)
        for k in range(len(frames)):
            if k in searched:
                continue
            edge_index, shift, unit_shift, cells[k] = get_neighborhood(
                positions=positions[k], cutoff=self.r_max, pbc=pbcs[k], cell=cells[k]
            )
            edges.append(torch.from_numpy(edge_index + starts[k]).to(device))
            shifts.append(torch.from_numpy(shift).to(device))
            unit_shifts.append(torch.from_numpy(unit_shift).to(device))

        def real(arrays: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.concatenate(arrays)).to(device=device, dtype=self.dtype)

        def index(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)

        return {
            "positions": real(positions),
            "node_attrs": real([self._node_attrs(atoms) for atoms in frames]),
            "edge_index": torch.cat(edges, dim=1).to(torch.int64),
            "shifts": torch.cat(shifts).to(self.dtype),
            "unit_shifts": torch.cat(unit_shifts).to(self.dtype),
            "cell": real(cells),
            "batch": index(np.repeat(np.arange(len(frames)), sizes)),
            "ptr": index(starts),
            "head": index(np.zeros(len(frames))),
        }

    def _device_edges(
        self,
        positions: list[np.ndarray],
        cells: list[np.ndarray],
        pbcs: list[tuple[bool, ...]],
        starts: np.ndarray,
        chosen: set[int],
        device: torch.device,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Edges of the chosen frames, searched on ``device`` in groups of equal size and pbc.

        MD does not wrap positions, and atoms that wandered cells away would widen the image
        range (the cost is cubic in it), so the search runs on positions wrapped into the cell,
        ``r = w + n @ cell``, and each image is mapped back: ``S = S_w - n_j + n_i``.
        """
        groups: dict[tuple[int, tuple[bool, ...]], list[int]] = {}
        for k in sorted(chosen):
            groups.setdefault((len(positions[k]), pbcs[k]), []).append(k)
        for (_, pbc), members in groups.items():
            wraps = [cell_offsets(positions[k], cells[k], pbc) for k in members]
            wrapped = [positions[k] - n @ cells[k] for k, n in zip(members, wraps, strict=True)]
            ranges = np.max(
                [image_ranges(w, cells[k], pbc, self.r_max) for k, w in zip(members, wrapped, strict=True)], axis=0
            )
            cell = torch.from_numpy(np.stack([cells[k] for k in members])).to(device)
            xyz = torch.from_numpy(np.stack(wrapped)).to(device)
            found, unit_shift = neighbour_lists(xyz, cell, ranges, self.r_max)
            which, i, j = found.unbind(dim=1)
            offsets = torch.from_numpy(np.stack(wraps)).to(device)  # [group, atoms, 3]
            unit_shift = unit_shift - offsets[which, j] + offsets[which, i]
            first_atom = torch.from_numpy(starts[members]).to(device)[which]
            edge_index = torch.stack([first_atom + i, first_atom + j])
            shift = torch.einsum("ea,eab->eb", unit_shift, cell[which])
            yield edge_index, shift, unit_shift

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
