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


def test_a_periodic_crop_keeps_the_cores_surroundings_and_no_atoms_meet_across_its_faces() -> None:
    from ase.geometry import get_distances

    from aimspax_like.substructures import crop_periodic

    cell = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((5, 5, 5))  # 500 atoms, 18 A
    cell.positions += np.random.default_rng(0).normal(0.0, 0.05, cell.positions.shape)
    cell.wrap()
    piece = crop_periodic(cell, [5], core_radius=2.8, buffer=3.5, rng=np.random.default_rng(1), tries=32)
    unshifted = crop_periodic(cell, [5], core_radius=2.8, buffer=3.5, tries=1)
    # Here the box around the core does not fit the lattice: unshifted, two atoms nearly coincide.
    assert unshifted.info["seam_too_close"] == 1.0 and unshifted.info["closest_pair"] < 0.5
    atoms = piece.atoms
    assert atoms.pbc.all() and len(atoms) < len(cell) and 1 <= piece.n_core < len(atoms)
    assert piece.info["seam_too_close"] == 0.0 and piece.info["composition_gap"] == 0.0  # one element
    _, lengths = get_distances(atoms.positions, cell=atoms.cell, pbc=True)
    np.fill_diagonal(lengths, np.inf)
    assert lengths.min() > 0.8 * 2.3
    # Within the buffer every core atom sees exactly the frame's neighbours (same distances).
    for local in np.flatnonzero(piece.core):
        parent = piece.parent_indices[local]
        _, in_frame = distances_from(cell, int(parent))
        _, in_box = get_distances(atoms.positions[local], atoms.positions, cell=atoms.cell, pbc=True)
        near_frame = np.sort(in_frame[(in_frame > 0) & (in_frame < 3.5)])
        near_box = np.sort(in_box[0][(in_box[0] > 0) & (in_box[0] < 3.5)])
        assert np.allclose(near_frame, near_box)
    with pytest.raises(ValueError, match="does not fit"):
        crop_periodic(cell, [5], core_radius=3.0, buffer=7.0)


def test_a_two_element_crop_keeps_the_stoichiometry_closest_to_the_frame() -> None:
    from aimspax_like.substructures import crop_periodic

    frame = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((4, 4, 4))  # 512 atoms, 22.6 A
    frame.positions += np.random.default_rng(3).normal(0.0, 0.05, frame.positions.shape)
    best = crop_periodic(frame, [0], core_radius=2.0, buffer=4.0, rng=np.random.default_rng(0), tries=32)
    first = crop_periodic(frame, [0], core_radius=2.0, buffer=4.0, tries=1)  # the unshifted box alone
    assert best.info["composition_gap"] <= first.info["composition_gap"]
    assert best.info["composition_gap"] < 0.1


def test_hydrogen_caps_close_the_bonds_a_vacuum_piece_cut() -> None:
    from ase.build import molecule

    from aimspax_like.substructures import cap_cut_bonds

    ethanol = molecule("CH3CH2OH")  # C0 C1 O2 H3..H8
    piece = carve(ethanol, [0], core_radius=0.1, buffer=1.2)  # C0 with its three hydrogens
    capped = cap_cut_bonds(ethanol, piece)
    assert capped.atoms.get_chemical_formula() == "CH4"
    assert capped.parent_indices[-1] == -1 and not capped.core[-1] and capped.core.sum() == 1
    cap = capped.atoms.positions[-1] - capped.atoms.positions[0]
    towards = ethanol.positions[1] - ethanol.positions[0]
    assert np.isclose(np.linalg.norm(cap), 0.76 + 0.31, atol=0.01)  # C-H from covalent radii
    assert np.allclose(cap / np.linalg.norm(cap), towards / np.linalg.norm(towards))
    assert cap_cut_bonds(ethanol, carve(ethanol, [0], 0.1, 5.0)).atoms.get_chemical_formula() == "C2H6O"


def _planner(**overrides):
    from aimspax_like.config import SubstructureConfig
    from aimspax_like.piece_planner import PiecePlanner

    settings = {"enabled": True, "min_atoms": 100, "core_radius": 2.8, "buffer": 3.0, **overrides}
    return PiecePlanner(SubstructureConfig(**settings), receptive_field=9.0)


def test_the_planner_carves_around_the_uncertain_atoms_or_labels_the_frame_whole(cell) -> None:
    forces = np.zeros((2, len(cell), 3))
    forces[0, 7] = [1.0, 0.0, 0.0]  # member 0 disagrees on atom 7 and, less, on a far atom
    _, from7 = distances_from(cell, 7)
    far = int(np.argmax(from7))
    forces[0, far] = [0.5, 0.0, 0.0]
    plan = _planner(box="vacuum").plan(cell, forces, threshold=0.1)
    assert plan.reason == "pieces" and plan.uncertain_atoms == 2
    assert [p.centres for p in plan.pieces] == [(7,), (far,)]
    assert all(7 in p.parent_indices[p.core] for p in plan.pieces[:1])
    assert len(_planner(box="vacuum", max_per_frame=1).plan(cell, forces, 0.1).pieces) == 1
    # Below the threshold everywhere (a stress trigger, say): the most uncertain atom still gets its piece.
    assert [p.centres for p in _planner(box="vacuum").plan(cell, forces, threshold=5.0).pieces] == [(7,)]
    assert _planner(min_atoms=500).plan(cell, forces, 0.1).reason == "small"
    assert _planner(buffer=6.0, box="vacuum").plan(cell, forces, 0.1).pieces == []  # nearly the whole cell
    assert not _planner().periodic(cell)  # auto: a 2 x 5.8 A box does not fit 14.4 A with room to shift
    large = cell.repeat((2, 1, 1)).repeat((1, 2, 2))  # 28.8 A: it does
    pieces = _planner().plan(large, np.concatenate([forces] * 8, axis=1), threshold=0.1).pieces
    assert pieces and all(p.atoms.pbc.all() and p.info["seam_too_close"] == 0.0 for p in pieces)


def test_relaxing_the_buffer_lowers_the_committees_disagreement_there_and_leaves_the_core(cell) -> None:
    from aimspax_like.config import ModelConfig
    from aimspax_like.models.ensemble import MACEEnsemble
    from aimspax_like.piece_planner import buffer_disagreement, relax_buffer

    model = ModelConfig(channels=8, max_L=0, r_max=4.0, num_interactions=1, correlation=2, radial_mlp=[8],
                        ensemble_size=2, device="cpu", dtype="float64")
    ensemble = MACEEnsemble.build(model, [0, 1], [29], {29: -3.0}, 12.0)
    piece = carve(cell, [3], core_radius=2.8, buffer=2.5)
    core_before = piece.atoms.positions[piece.core].copy()
    before, after = relax_buffer(ensemble, piece, steps=5, max_step=0.05)
    assert after < before
    assert np.array_equal(piece.atoms.positions[piece.core], core_before)
    value, _ = buffer_disagreement(ensemble, piece.atoms, ~piece.core)
    assert np.isclose(np.sqrt(float(value) / 3), after)


def test_a_reference_of_periodic_cells_only_refuses_pieces_in_vacuum(tmp_path) -> None:
    from campaign_helpers import tiny_config

    from aimspax_like.config import ConfigError, config_from_dict

    raw = tiny_config(tmp_path, al={"substructures": {"enabled": True, "box": "vacuum"}})
    raw["reference"] = {"kind": "cp2k"}
    with pytest.raises(ConfigError) as refused:
        config_from_dict(raw)
    assert refused.value.key == "al.substructures.box"
    raw["al"]["substructures"]["box"] = "auto"
    assert config_from_dict(raw).al.substructures.box == "auto"
    with pytest.raises(Exception, match="group_radius"):
        config_from_dict(tiny_config(tmp_path, al={"substructures": {"core_radius": 3.0, "group_radius": 4.0}}))


def test_without_vacuum_a_frame_no_box_fits_is_labelled_whole(cell) -> None:
    from aimspax_like.config import SubstructureConfig
    from aimspax_like.piece_planner import PiecePlanner

    forces = np.zeros((2, len(cell), 3))
    forces[0, 7] = [1.0, 0.0, 0.0]
    planner = PiecePlanner(SubstructureConfig(enabled=True, min_atoms=100, core_radius=2.8, buffer=3.0),
                           receptive_field=9.0, vacuum=False)
    plan = planner.plan(cell, forces, threshold=0.1)
    assert plan.pieces == [] and plan.reason.startswith("does not fit")


@pytest.mark.slow
def test_the_substructure_study_runs_and_prints_its_table(tmp_path, capsys) -> None:
    """The study end to end at toy size: a 256-atom cell, one label per arm, a short MD."""
    study = load_workflow("ideal_substructures")
    assert study.main(["--out", str(tmp_path), "--arms", "whole:1", "pieces:2", "--steps", "40", "--repeat", "4",
                       "--core", "2.0", "--buffer", "3.0", "--test-frames", "2", "--final-epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "| whole_1 |" in out and "| pieces_2 |" in out and "pieces_2/whole" in out
    import json

    rows = json.loads((tmp_path / "results.json").read_text())["arms"]
    pieces = rows["pieces_2"]
    assert pieces["atoms_labelled"] < 2 * 256 and pieces["core_atoms"] < pieces["atoms_labelled"]
    assert rows["whole_1"]["core_atoms"] == rows["whole_1"]["atoms_labelled"]
