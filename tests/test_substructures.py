"""Substructures of large frames: grouping uncertain atoms, carving pieces (whole across periodic
boundaries, core and buffer marked), and the locality check on a real EMT cell."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from workflow_helpers import load_workflow

from aimspax_like.substructures import carve, distances_from, force_locality, group_uncertain_atoms, min_width


@pytest.fixture
def cell():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((4, 4, 4))  # 256 atoms, 14.4 A
    atoms.positions += np.random.default_rng(0).normal(0.0, 0.05, atoms.positions.shape)
    atoms.wrap()
    return atoms


def test_groups_take_the_most_uncertain_atom_first_and_the_uncertain_atoms_near_it(cell) -> None:
    u = np.zeros(len(cell))
    _, from0 = distances_from(cell, 0)
    near0 = [int(i) for i in np.argsort(from0)[1:4]]  # three neighbours of atom 0
    far = int(np.argmax(from0))
    u[0], u[near0], u[far] = 0.9, 0.5, 0.7
    groups = group_uncertain_atoms(cell, u, threshold=0.3, group_radius=3.0)
    assert [g.centre for g in groups] == [0, far]
    assert set(groups[0].members) == {0, *near0} and groups[1].members == (far,)
    assert len(group_uncertain_atoms(cell, u, threshold=0.3, group_radius=3.0, max_groups=1)) == 1
    assert group_uncertain_atoms(cell, u, threshold=1.0, group_radius=3.0) == []
    with pytest.raises(ValueError, match="shape"):
        group_uncertain_atoms(cell, u[:-1], threshold=0.3, group_radius=3.0)


def test_a_piece_across_the_periodic_boundary_comes_out_whole_with_its_core_marked(cell) -> None:
    corner = int(np.argmin(np.linalg.norm(cell.positions, axis=1)))  # near the origin: the sphere wraps
    piece = carve(cell, [corner], core_radius=3.0, buffer=2.5)
    _, lengths = distances_from(cell, corner)
    assert set(piece.parent_indices) == set(np.flatnonzero(lengths <= 5.5))
    assert set(piece.parent_indices[piece.core]) == set(np.flatnonzero(lengths <= 3.0))
    assert not piece.atoms.pbc.any()
    centre = piece.atoms.positions[list(piece.parent_indices).index(corner)]
    # Unwrapped: in-piece distances equal the parent's minimum-image distances.
    np.testing.assert_allclose(np.linalg.norm(piece.atoms.positions - centre, axis=1),
                               lengths[piece.parent_indices], atol=1e-9)
    with pytest.raises(ValueError, match="minimum image"):
        carve(cell, [corner], core_radius=6.0, buffer=2.0)  # 8 A > half of 14.4 A
    assert min_width(cell) == pytest.approx(14.4, abs=1e-6)


def test_two_centres_share_one_piece(cell) -> None:
    _, from0 = distances_from(cell, 0)
    other = int(np.argsort(from0)[1])
    piece = carve(cell, [0, other], core_radius=2.0, buffer=1.0)
    assert {0, other} <= set(piece.parent_indices[piece.core])
    assert piece.centres == (0, other)


def test_the_force_on_a_centre_converges_with_the_radius_of_its_piece(cell) -> None:
    """EMT is local: the error falls by orders of magnitude from 4 to 6.5 A."""
    rows = force_locality(cell, [0, 77], [4.0, 5.0, 6.5], EMT)
    errors = [r["error_mean"] for r in rows]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2 * errors[0]
    assert rows[0]["atoms"] < rows[2]["atoms"]


def test_the_locality_workflow_prints_its_table(tmp_path, capsys) -> None:
    study = load_workflow("ideal_locality")
    assert study.main(["--element", "Cu", "--repeat", "3", "--steps", "20", "--centres", "2",
                       "--radii", "4", "5", "9", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "| 5.0 |" in out.out and "9.5e-02" in out.out  # IDEAL's value beside ours
    assert "do not fit" in out.err  # 9 A does not fit a 10.8 A cell
    assert (tmp_path / "table.md").is_file()
