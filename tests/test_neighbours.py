"""The device-side neighbour search (used on GPUs) finds exactly mace's edges; run here on the CPU."""

from __future__ import annotations

import mace  # noqa: F401  (first: e3nn needs the torch.load switch mace sets)
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from aimspax_like.config import ModelConfig
from aimspax_like.models import graphs as graphs_module
from aimspax_like.models.ensemble import MACEEnsemble
from aimspax_like.models.neighbours import image_ranges

R_MAX = 4.5
CPU = torch.device("cpu")


def frames() -> list[Atoms]:
    """Every case the image search must get right, in an order that interleaves sizes."""
    rng = np.random.default_rng(11)
    small_cell = bulk("Cu", "fcc", a=3.6, cubic=True)  # 3.6 A < r_max: images up to +-2 needed
    small_cell.positions += rng.normal(scale=0.05, size=(4, 3))
    triclinic = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))  # primitive, 60-degree cell
    triclinic.positions += rng.normal(scale=0.05, size=(8, 3))
    unwrapped = small_cell.copy()  # MD does not wrap: atoms cells away from the origin cell
    unwrapped.positions[0] += 2.0 * unwrapped.cell[0] - 3.0 * unwrapped.cell[2]
    unwrapped.positions[2] += np.array([7.3, -4.1, 0.2])
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=4.0)  # periodic in x and y only
    slab.positions += rng.normal(scale=0.05, size=slab.positions.shape)
    ethanol = molecule("CH3CH2OH")
    ethanol.center(vacuum=20.0)  # a cell, but not periodic
    water = molecule("H2O")  # no cell at all
    twin = small_cell.copy()
    twin.rattle(0.05, seed=2)  # same size and pbc as small_cell: searched together
    return [small_cell, ethanol, triclinic, unwrapped, slab, water, twin]


@pytest.fixture(scope="module")
def ensemble() -> MACEEnsemble:
    return MACEEnsemble.build(
        ModelConfig(channels=8, max_L=0, r_max=R_MAX, num_interactions=2, correlation=2, radial_mlp=[8],
                    max_ell=2, device="cpu", dtype="float64", ensemble_size=1),
        seeds=[0], atomic_numbers=[1, 6, 8, 29], atomic_energies={}, avg_num_neighbors=10.0,
    )


def edge_set(graph: dict[str, torch.Tensor]) -> set[tuple[int, int, int, int, int]]:
    senders, receivers = graph["edge_index"].tolist()
    shifts = graph["unit_shifts"].round().to(torch.int64).tolist()
    return {(i, j, *s) for i, j, s in zip(senders, receivers, shifts, strict=True)}


def test_device_search_finds_exactly_maces_edges_and_the_same_forces(ensemble):
    host = ensemble.graphs.md_batch(frames(), CPU, neighbours="host")
    device = ensemble.graphs.md_batch(frames(), CPU, neighbours="device")
    assert set(host) == set(device)
    assert edge_set(device) == edge_set(host)
    assert device["edge_index"].shape == host["edge_index"].shape
    for key in ("positions", "node_attrs", "cell", "batch", "ptr", "head"):
        assert torch.equal(device[key], host[key]), key
    pairs = set(zip(*device["edge_index"].tolist(), strict=True))
    assert len(pairs) < device["edge_index"].shape[1]  # small cells: (i, j) repeats across images
    # each edge's Cartesian shift is its image times its own structure's cell
    vectors = lambda g: (g["positions"][g["edge_index"][1]] - g["positions"][g["edge_index"][0]] + g["shifts"])  # noqa: E731
    lengths = lambda g: torch.sort(torch.linalg.vector_norm(vectors(g), dim=1)).values  # noqa: E731
    torch.testing.assert_close(lengths(device), lengths(host), rtol=0, atol=1e-12)
    assert float(lengths(device).max()) < R_MAX
    member = ensemble.members[0]
    ours = member(device, training=False, compute_force=True)
    theirs = member(host, training=False, compute_force=True)
    torch.testing.assert_close(ours["forces"], theirs["forces"], rtol=0, atol=1e-10)
    torch.testing.assert_close(ours["energy"], theirs["energy"], rtol=0, atol=1e-10)


def test_large_frames_fall_back_to_the_host_search(ensemble, monkeypatch):
    monkeypatch.setattr(graphs_module, "MAX_ATOMS", 5)  # only the 4-atom cells and water go to the device
    mixed = ensemble.graphs.md_batch(frames(), CPU, neighbours="device")
    host = ensemble.graphs.md_batch(frames(), CPU, neighbours="host")
    assert edge_set(mixed) == edge_set(host)


def test_image_range_covers_the_cutoff_and_the_spread():
    cell = np.diag([3.0, 10.0, 2.0])
    inside = np.array([[0.5, 1.0, 0.5], [2.5, 9.0, 1.5]])
    assert image_ranges(inside, cell, (True, True, True), 4.5).tolist() == [2, 1, 2]
    assert image_ranges(inside, cell, (True, False, False), 4.5).tolist() == [2, 0, 0]
    far = inside + np.array([30.0, 0.0, 0.0])  # shifting all atoms together changes nothing
    assert image_ranges(far, cell, (True, True, True), 4.5).tolist() == [2, 1, 2]
    spread = np.array([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])  # three cells apart along x
    assert image_ranges(spread, cell, (True, True, True), 4.5).tolist() == [4, 0, 2]
