"""``aimspax-like validate``: errors against an independent calculation, the stability criterion,
the RDF estimator, farthest point sampling, ``--test`` files and strict JSON.

The finished tiny campaign (``finished_campaign``: EMT Cu4Au2, a 2-member tiny MACE, test frames
at 400 and 560 K) is read-only; every test that writes copies it first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from aimspax_like.cli import main
from aimspax_like.validation.fps import farthest_point_sampling, frame_vectors, standardise
from aimspax_like.validation.rdf import distribution, pair_distances
from aimspax_like.validation.stability import StabilityCriterion, run_stability

ERROR_FIELDS = {"temperature_K", "frames", "energy_mae_per_atom", "energy_rmse_per_atom", "force_mae",
                "force_rmse", "stress_mae", "stress_rmse"}


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("parsl"))
    return target


def _strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"non-strict JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _test_frames(run: Path) -> list[Atoms]:
    from aimspax_like.data import DatasetStore

    return [f.to_atoms() for f in DatasetStore(run / "data" / "dataset.h5").frames(origin="test")]


def _by_hand(frames: list[Atoms], model: Path) -> dict[str, tuple[float, float]]:
    """MAE/RMSE of energy per atom and force components, with mace's own ASE calculator."""
    import mace  # noqa: F401
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64")
    e_err, f_err = [], []
    for atoms in frames:
        probe = atoms.copy()
        probe.calc = calc
        e_err.append((probe.get_potential_energy() - atoms.info["REF_energy"]) / len(atoms))
        f_err.append((probe.get_forces() - atoms.arrays["REF_forces"]).reshape(-1))
    e, f = np.array(e_err), np.concatenate(f_err)
    return {"energy": (np.abs(e).mean(), np.sqrt((e**2).mean())), "forces": (np.abs(f).mean(), np.sqrt((f**2).mean()))}


# --------------------------------------------------------------------------- errors


def test_errors_agree_with_mace_calculator_per_temperature(finished_campaign, tmp_path, capsys):
    run = _copy(finished_campaign[0], tmp_path)
    code = main(["validate", str(run), "--no-stability", "--no-rdf", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "400 K" in out and "560 K" in out and "Cu" in out and "Au" in out
    report = _strict_json(run / "report" / "validation.json")
    assert set(report) == {"model", "test_set", "errors", "stability", "rdf", "figures"}
    assert report["stability"] is None and report["rdf"] is None
    assert report["model"] == str(run / "models" / "best.model")
    frames = _test_frames(run)
    assert report["test_set"]["frames"] == len(frames) == 6
    # The tiny campaign has one start structure: trajectory 0 is 400 K, trajectory 1 is 560 K.
    groups = {400.0: [a for a in frames if a.info["trajectory"] == 0],
              560.0: [a for a in frames if a.info["trajectory"] == 1]}
    rows = {row["temperature_K"]: row for row in report["errors"]["per_temperature"]}
    assert sorted(rows) == [400.0, 560.0]
    for temperature, group in groups.items():
        row = rows[temperature]
        assert set(row) == ERROR_FIELDS and row["frames"] == len(group) == 3
        hand = _by_hand(group, run / "models" / "best.model")
        assert row["energy_mae_per_atom"] == pytest.approx(hand["energy"][0], rel=1e-6, abs=1e-9)
        assert row["energy_rmse_per_atom"] == pytest.approx(hand["energy"][1], rel=1e-6, abs=1e-9)
        assert row["force_mae"] == pytest.approx(hand["forces"][0], rel=1e-6)
        assert row["force_rmse"] == pytest.approx(hand["forces"][1], rel=1e-6)
        assert row["stress_mae"] is None and row["stress_rmse"] is None
    overall = _by_hand(frames, run / "models" / "best.model")
    assert report["errors"]["all"]["force_mae"] == pytest.approx(overall["forces"][0], rel=1e-6)
    assert report["errors"]["all"]["temperature_K"] is None
    elements = {row["element"]: row for row in report["errors"]["per_element"]}
    assert elements["Cu"]["atoms"] == 4 * 6 and elements["Au"]["atoms"] == 2 * 6
    # Per element: the force samples of those atoms only, weighted back to the overall MAE.
    total = (elements["Cu"]["force_mae"] * 24 + elements["Au"]["force_mae"] * 12) / 36
    assert total == pytest.approx(overall["forces"][0], rel=1e-6)
    assert [f["file"] for f in report["figures"]] == ["validation_parity.png"]
    assert (run / "report" / "validation_parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_test_file_with_custom_keys_and_temperature_groups(finished_campaign, tmp_path):
    """REF_energy in info and REF_forces in arrays; frames without temperature_K group as 'all'."""
    run = _copy(finished_campaign[0], tmp_path)
    frames = _test_frames(run)
    images = []
    for k, atoms in enumerate(frames):
        image = Atoms(atoms.numbers, atoms.positions)
        image.info["REF_energy"] = atoms.info["REF_energy"]
        image.arrays["REF_forces"] = atoms.arrays["REF_forces"]
        if k < 4:
            image.info["temperature_K"] = 300.0 if k < 2 else 900.0
        images.append(image)
    write(tmp_path / "custom.xyz", images, format="extxyz")
    code = main(["validate", str(run), "--test", str(tmp_path / "custom.xyz"), "--energy-key", "REF_energy",
                 "--forces-key", "REF_forces", "--no-stability", "--no-rdf", "--quiet"])
    assert code == 0
    report = _strict_json(run / "report" / "validation.json")
    assert report["test_set"] == {"source": str(tmp_path / "custom.xyz"), "frames": 6}
    rows = report["errors"]["per_temperature"]
    assert [(r["temperature_K"], r["frames"]) for r in rows] == [(300.0, 2), (900.0, 2), (None, 2)]
    hand = _by_hand(frames, run / "models" / "best.model")
    assert report["errors"]["all"]["force_mae"] == pytest.approx(hand["forces"][0], rel=1e-6)

    # The plain ASE way (a SinglePointCalculator's energy/forces) needs no keys at all.
    plain = []
    for atoms in frames:
        image = Atoms(atoms.numbers, atoms.positions)
        image.calc = SinglePointCalculator(image, energy=atoms.info["REF_energy"], forces=atoms.arrays["REF_forces"])
        plain.append(image)
    write(tmp_path / "plain.xyz", plain, format="extxyz")
    assert main(["validate", str(run), "--test", str(tmp_path / "plain.xyz"), "--no-stability", "--no-rdf",
                 "--quiet"]) == 0
    again = _strict_json(run / "report" / "validation.json")
    assert again["errors"]["all"]["force_mae"] == pytest.approx(hand["forces"][0], rel=1e-6)
    assert [r["temperature_K"] for r in again["errors"]["per_temperature"]] == [None]

    # Errors alone need no start structures: a run whose structure file has moved still validates.
    config = (run / "campaign.yaml").read_text()
    moved = config.replace(str(finished_campaign[0].parent / "cluster.xyz"), str(tmp_path / "moved.xyz"))
    assert moved != config
    (run / "campaign.yaml").write_text(moved)
    assert main(["validate", str(run), "--test", str(tmp_path / "plain.xyz"), "--no-stability", "--no-rdf",
                 "--quiet"]) == 0


@pytest.mark.parametrize("extra", [["--energy-key", "DFT_energy"], ["--forces-key", "DFT_forces"],
                                   ["--stress-key", "DFT_stress"]])
def test_missing_key_is_one_line_exit_2_and_nothing_written(finished_campaign, tmp_path, capsys, extra):
    run = _copy(finished_campaign[0], tmp_path)
    test_file = tmp_path / "test.xyz"
    shutil.copy(run / "data" / "test.xyz", test_file)
    before = sorted(p.name for p in (run / "report").iterdir())
    code = main(["validate", str(run), "--test", str(test_file), "--energy-key", "REF_energy",
                 "--forces-key", "REF_forces", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and str(test_file) in err[0] and extra[1] in err[0]
    assert sorted(p.name for p in (run / "report").iterdir()) == before


def test_bad_inputs_exit_2(finished_campaign, tmp_path, capsys):
    run = _copy(finished_campaign[0], tmp_path)
    assert main(["validate", str(tmp_path / "nowhere")]) == 2
    assert main(["validate", str(run), "--model", str(tmp_path / "missing.model")]) == 2
    (tmp_path / "junk.model").write_text("not a model")
    assert main(["validate", str(run), "--model", str(tmp_path / "junk.model")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert not (run / "report" / "validation.json").exists()


def test_full_validate_with_stability_and_rdf(finished_campaign, tmp_path, capsys):
    run = _copy(finished_campaign[0], tmp_path)
    code = main(["validate", str(run), "--stability-runs", "2", "--stability-steps", "30", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "stable / runs" in out
    report = _strict_json(run / "report" / "validation.json")
    stability = report["stability"]
    assert stability["steps"] == 30 and stability["runs"] == 2 and stability["timestep_fs"] == 1.0
    assert isinstance(stability["criterion"], str) and stability["criterion"]
    assert [row["temperature_K"] for row in stability["per_temperature"]] == [400.0, 560.0]
    for row in stability["per_temperature"]:
        assert set(row) == {"temperature_K", "stable", "runs", "failed_at_steps"}
        assert row["runs"] == 2 and row["stable"] + len(row["failed_at_steps"]) == 2
        assert all(1 <= step <= 30 for step in row["failed_at_steps"])
    # The tiny campaign's test set is reference MD: its 400 K frames are the RDF's reference.
    assert report["rdf"]["temperature_K"] == 400.0 and report["rdf"]["file"] == "validation_rdf.png"
    assert "test frames" in report["rdf"]["reference"]
    assert [f["file"] for f in report["figures"]] == ["validation_parity.png", "validation_rdf.png"]
    assert all(f["caption"] for f in report["figures"])
    assert (run / "report" / "validation_rdf.png").is_file()
    # The report is written again, so the page carries the validation (stability table, its figures).
    assert f"report      {run / 'report' / 'index.html'}" in out
    page = (run / "report" / "index.html").read_text()
    assert "stable" in page and page.count("data:image/png;base64,") >= len(report["figures"]) + 1
    # A later validation without an RDF leaves no stale RDF figure behind.
    assert main(["validate", str(run), "--no-stability", "--no-rdf", "--quiet"]) == 0
    assert not (run / "report" / "validation_rdf.png").exists()


def test_rdf_reference_md_in_process_when_test_frames_are_not_reference_md(finished_campaign, tmp_path):
    """A --test file says nothing about how it was sampled: cheap EMT reference MD is run instead."""
    from aimspax_like.validation.report import ValidateOptions, validate_run

    run = _copy(finished_campaign[0], tmp_path)
    shutil.copy(run / "data" / "test.xyz", tmp_path / "test.xyz")
    options = ValidateOptions(test=tmp_path / "test.xyz", energy_key="REF_energy", forces_key="REF_forces",
                              stability=False, stability_runs=2, stability_steps=40, rdf_temperature=300.0)
    result = validate_run(run, options)
    assert result.report["stability"] is None
    assert result.report["rdf"]["temperature_K"] == 300.0
    assert "reference MD in-process (emt)" in result.report["rdf"]["reference"]


# --------------------------------------------------------------------------- the stability criterion


def test_molecule_criterion_stretched_bond_fails_fine_geometry_passes_nan_fails():
    water = molecule("H2O")
    criterion = StabilityCriterion.from_start(water)
    assert len(criterion.i) == 2  # two O-H bonds, no H-H bond
    assert criterion.check(water) is None
    wiggled = water.copy()
    wiggled.positions[1] += [0.3, 0.2, 0.0]  # O-H about 1.25 A: strained, still bonded
    assert criterion.check(wiggled) is None
    stretched = water.copy()
    direction = stretched.positions[1] - stretched.positions[0]
    stretched.positions[1] = stretched.positions[0] + 2.1 * direction / np.linalg.norm(direction)
    reason = criterion.check(stretched)
    assert reason is not None and "2.10 A" in reason
    assert criterion.check(stretched.copy()) is not None
    loose = StabilityCriterion.from_start(water, max_bond_A=2.5)
    assert loose.check(stretched) is None  # the limit is configurable
    broken = water.copy()
    broken.positions[2, 0] = np.nan
    assert "non-finite" in criterion.check(broken)
    assert "non-finite" in criterion.check(water, momenta=np.full((3, 3), np.inf))
    assert "non-finite" in criterion.check(water, forces=np.full((1, 3, 3), np.nan))


def test_metal_cluster_bonds_are_held_to_their_stretch_not_to_2_A():
    dimer = Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]])
    criterion = StabilityCriterion.from_start(dimer)
    assert criterion.check(dimer) is None  # 2.5 A > 2 A, but it is the start
    dimer.positions[1, 0] = 3.6  # 1.44 x the start length
    assert criterion.check(dimer) is None
    dimer.positions[1, 0] = 4.1  # past 1.5 x 2.64 A (the Cu-Cu covalent-radius sum)
    assert criterion.check(dimer) is not None


def test_solid_criterion_close_contact_and_volume():
    cell = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    criterion = StabilityCriterion.from_start(cell)
    assert criterion.periodic and criterion.check(cell) is None
    squeezed = cell.copy()
    squeezed.positions[1] = squeezed.positions[0] + [0.7, 0.0, 0.0]  # 0.7 A < 0.6 x 2.64 A
    assert "apart" in criterion.check(squeezed)
    for factor, fine in ((1.2, True), (1.6, False), (1 / 1.6, False)):
        scaled = cell.copy()
        scaled.set_cell(cell.cell * factor ** (1 / 3), scale_atoms=True)
        assert (criterion.check(scaled) is None) is fine, factor
    hot = cell.copy()
    hot.positions[0] += [0.2, -0.1, 0.1]  # atoms move in a solid; only the contacts and the volume count
    assert criterion.check(hot) is None


def test_run_stability_reports_the_failing_step_and_shares_one_force_call():
    """Pairs pushed apart by a constant force fail at the step their bond passes 2 A; NaN fails at step 1."""
    calls = []

    def push_apart(structures):
        calls.append(len(structures))
        out = []
        for atoms in structures:
            forces = np.zeros((len(atoms), 3))
            if atoms.info.get("push"):
                forces[0, 0], forces[1, 0] = -5.0, 5.0
            out.append(forces[None])
        return out

    h2 = Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])
    pushed = h2.copy()
    pushed.info["push"] = True
    result = run_stability(push_apart, [h2, pushed], [10.0, 20.0], runs=2, steps=60, seed=1,
                           max_atoms_per_call=None)
    rows = result.per_temperature([10.0, 20.0])
    assert [(r["stable"], r["runs"]) for r in rows] == [(1, 2), (1, 2)]
    failed = [o for o in result.outcomes if o.failed_at is not None]
    assert {o.structure for o in failed} == {1}  # run 1 starts from the pushed pair
    assert all(5 < o.failed_at < 60 and "bonded at the start" in o.reason for o in failed)
    assert calls[0] == 4  # all runs of all temperatures in one batched call

    def nan_forces(structures):
        return [np.full((1, len(a), 3), np.nan) for a in structures]

    result = run_stability(nan_forces, [h2], [300.0], runs=3, steps=5, max_atoms_per_call=None)
    assert [o.failed_at for o in result.outcomes] == [1, 1, 1]
    assert result.per_temperature([300.0])[0]["failed_at_steps"] == [1, 1, 1]


# --------------------------------------------------------------------------- RDF and FPS


def test_pair_distances_count_each_pair_once():
    simple_cubic = Atoms("Cu", cell=[3.0, 3.0, 3.0], pbc=True)
    distances = pair_distances(simple_cubic, r_max=3.1)
    assert len(distances) == 3 and np.allclose(distances, 3.0)  # 6 neighbours, each pair once
    triangle = Atoms("H3", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0]])
    assert sorted(np.round(pair_distances(triangle), 6)) == [1.0, 1.0, round(np.sqrt(2), 6)]
    r, density = distribution([triangle], r_max=2.0, bins=20)
    assert np.sum(density) * (r[1] - r[0]) == pytest.approx(1.0)  # unit area for molecules


def test_farthest_point_sampling_picks_spread_out_frames():
    points = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [5.0]])
    # First the point farthest from the mean (11), then the farthest from it (0), then 5.
    assert farthest_point_sampling(points, 3) == [4, 0, 5]
    assert sorted(farthest_point_sampling(points, 10)) == list(range(6))
    duplicates = np.zeros((4, 2))
    assert sorted(farthest_point_sampling(duplicates, 4)) == [0, 1, 2, 3]


def test_frame_vectors_are_per_element_means_in_a_fixed_order():
    descriptors = [np.array([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0]]), np.array([[5.0, 5.0]])]
    numbers = [np.array([1, 1, 8]), np.array([8])]
    vectors = frame_vectors(descriptors, numbers)
    assert vectors.tolist() == [[2.0, 1.0, 10.0, 10.0], [0.0, 0.0, 5.0, 5.0]]
    # Atom order does not matter.
    swapped = frame_vectors([descriptors[0][[2, 1, 0]]], [numbers[0][[2, 1, 0]]], elements=[1, 8])
    assert swapped.tolist() == [vectors[0].tolist()]
    assert np.allclose(standardise(vectors).std(axis=0)[vectors.std(axis=0) > 0], 1.0)
