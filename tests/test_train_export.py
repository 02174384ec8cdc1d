"""``aimspax-like train`` (a fresh model on any dataset, plain or final recipe) and ``export``
(extxyz per split, MACE and LAMMPS model files, a manifest), on the finished tiny campaign.

The finished campaign (``finished_campaign``) is read-only: every command here writes into
``tmp_path`` through ``--out``. Training uses the campaign's tiny model (8 channels, max_L 0,
one interaction) for a handful of epochs: real MACE training, seconds per fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from aimspax_like.cli import main
from aimspax_like.data import DatasetStore, LabelledFrame

FAST = ["--max-epochs", "4", "--patience", "4", "--quiet"]


def _strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"non-strict JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _store(run: Path) -> DatasetStore:
    return DatasetStore(run / "data" / "dataset.h5")


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    return err[0]


# --------------------------------------------------------------------------- train


def test_train_plain_on_a_run(finished_campaign, tmp_path, capsys):
    run, _ = finished_campaign
    out = tmp_path / "fit"
    assert main(["train", str(run), "--out", str(out), *FAST, "--log-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| test | 6 |" in printed and str(out / "models" / "model.model") in printed
    for name in ("models/model.model", "train_report.json", "train_report.md", "learning_curve.png",
                 "logs/train.jsonl"):
        assert (out / name).is_file(), name
    report = _strict_json(out / "train_report.json")
    counts = _store(run).counts()["split"]
    assert report["data"]["train"] == counts["train"] and report["data"]["valid"] == counts["valid"]
    assert report["data"]["test"] == counts["test"]
    assert report["data"]["not_trained"] == counts["held"] + counts["analysis"] > 0
    assert report["references"]["training"] == sorted({f.reference for f in _store(run).frames(split="train")})
    # The run's campaign.yaml gives the defaults: its tiny model and its seed.
    assert report["settings"]["model"]["channels"] == 8 and report["settings"]["seeds"] == [3]
    curve = report["curve"]
    assert [r["epoch"] for r in curve] == list(range(1, len(curve) + 1)) and 1 <= len(curve) <= 4
    assert {(r["stage"], r["lr"], r["energy_weight"], r["forces_weight"]) for r in curve} == {(1, 0.01, 1.0, 1000.0)}
    for split in ("train", "valid", "test"):
        errors = report["errors"][split]
        assert errors["frames"] == counts[split] and errors["force_mae_meV_A"] > 0
        assert errors["force_rmse_meV_A"] >= errors["force_mae_meV_A"]
    log = [json.loads(line) for line in (out / "logs" / "train.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "train_start" and log[-1]["event"] == "train_end"
    assert sum(e["event"] == "train_epoch" for e in log) == len(curve)


def test_train_on_a_run_that_started_from_models_fits_a_fresh_model(finished_campaign, tmp_path):
    """A run whose members started from model files (model.start_from) still trains one fresh model."""
    import shutil

    import yaml

    run, _ = finished_campaign
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = yaml.safe_load((copy / "campaign.yaml").read_text())
    config["model"]["start_from"] = [str(p) for p in sorted((run / "models").glob("member_*.model"))]
    (copy / "campaign.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(copy), "--out", str(tmp_path / "fit"), *FAST]) == 0
    settings = _strict_json(tmp_path / "fit" / "train_report.json")["settings"]
    assert settings["model"]["ensemble_size"] == 1 and settings["model"]["start_from"] is None


def test_final_recipe_raises_the_energy_weight_and_lowers_lr_in_its_last_stage(finished_campaign, tmp_path):
    run, _ = finished_campaign
    out = tmp_path / "final"
    code = main(["train", str(run), "--out", str(out), "--recipe", "final", "--members", "2", "--max-epochs", "8",
                 "--patience", "8", "--lr-patience", "50", "--swa-start", "0.5", "--quiet"])
    assert code == 0
    report = _strict_json(out / "train_report.json")
    for member in report["members"]:
        rows = [r for r in report["curve"] if r["member"] == member["member"]]
        one = [r for r in rows if r["stage"] == 1]
        two = [r for r in rows if r["stage"] == 2]
        # Stage one: the training config's weights and rate; stage two from epoch 4 (0.5 x 8).
        assert [r["epoch"] for r in one] == [1, 2, 3, 4] and member["switch_epoch"] == 4
        assert member["switch_reason"] == "epoch"
        assert {(r["lr"], r["energy_weight"], r["forces_weight"]) for r in one} == {(0.01, 1.0, 1000.0)}
        assert [r["epoch"] for r in two] == [5, 6, 7, 8]
        assert {(r["lr"], r["energy_weight"], r["forces_weight"]) for r in two} == {(0.001, 1000.0, 100.0)}
        assert member["stage"] in (1, 2) and set(member["best_valid_loss"]) == {"1", "2"}
    best = report["best_member"]
    assert report["final_stage"] == report["members"][best]["stage"]
    models = out / "models"
    assert sorted(p.name for p in models.iterdir()) == ["best.model", "member_0.model", "member_1.model"]
    assert (models / "best.model").read_bytes() == (models / f"member_{best}.model").read_bytes()
    assert report["settings"]["seeds"] == [3, 4] and report["settings"]["refit_e0_at_switch"] is True


def test_final_recipe_keeps_each_stage_best_and_restores_the_weights(finished_campaign):
    """The trainer-level recipe: plateau drops end stage one early; the trainer's own loss weights
    are back afterwards, and the returned metrics are the kept model's, in those weights."""
    from aimspax_like.config import load_config
    from aimspax_like.models.fitting import FitSettings, build_ensemble
    from aimspax_like.models.training import EnsembleTrainer, FinalRecipe

    run, _ = finished_campaign
    config = load_config(run / "campaign.yaml")
    train = _store(run).atoms(split="train")
    valid = _store(run).atoms(split="valid")
    settings = FitSettings(config.model.model_copy(update={"ensemble_size": 1, "seeds": None}), config.training,
                           [0], "final", 10, 10)
    ensemble = build_ensemble(settings, train, [29, 79])
    trainer = EnsembleTrainer(ensemble, config.training, reset_after=None)
    # At a tiny rate the loss stalls (changes below the schedule's relative threshold 1e-4): the
    # plateau schedule (patience 1) drops the rate after epochs 3 and 5, and the second drop ends
    # stage one there, long before epoch 9 (0.9 x 10).
    for group in trainer._states[0].optimizer.param_groups:
        group["lr"] = 1e-6
    recipe = FinalRecipe(max_epochs=10, patience=10, swa_start=0.9, lr_patience=1)
    switched: list[tuple[int, int]] = []
    result = trainer.train_final_recipe(0, train, valid, recipe,
                                        on_switch=lambda k: switched.append((k, trainer._states[k].epochs)))
    one = [r for r in result.curve if r.stage == 1]
    assert switched == [(0, 5)]  # once, between the stages
    assert result.switch_reason == "lr_drops" and result.switch_epoch == len(one) == 5
    assert [r.lr for r in one] == pytest.approx([1e-6, 1e-6, 1e-6, 8e-7, 8e-7], rel=1e-12)
    two = [r for r in result.curve if r.stage == 2]
    assert two and two[0].lr == 1e-3 and two[0].energy_weight == 1000.0
    best_two = min(r.valid_loss for r in two)
    assert result.best_valid_loss[2] <= best_two + 1e-9
    assert result.best_valid_loss[1] == pytest.approx(min([r.valid_loss for r in one]), rel=1e-12) or not any(
        r.improved for r in one)
    assert trainer.cfg.energy_weight == config.training.energy_weight
    assert float(trainer.loss_fn.energy_weight) == config.training.energy_weight
    assert trainer.evaluate(0, valid)["loss"] == pytest.approx(result.metrics.valid_loss, rel=1e-12)


def _write_custom_xyz(run: Path, path: Path) -> list[LabelledFrame]:
    """The run's train+valid frames under foreign keys, with no split or provenance in the file."""
    frames = [f for f in _store(run).frames() if f.split in ("train", "valid")]
    images = []
    for frame in frames:
        atoms = frame.to_atoms()
        atoms.calc = None
        atoms.info = {"my_energy": frame.energy}
        atoms.arrays = {k: v for k, v in atoms.arrays.items() if k in ("numbers", "positions")}
        atoms.arrays["my_forces"] = frame.forces
        images.append(atoms)
    write(path, images, format="extxyz")
    return frames


def test_train_on_an_extxyz_file_with_custom_keys(finished_campaign, tmp_path, capsys):
    run, _ = finished_campaign
    data = tmp_path / "mine.xyz"
    frames = _write_custom_xyz(run, data)
    assert main(["train", str(data), *FAST]) == 2
    assert "'REF_energy'" in _error_line(capsys) and not (tmp_path / "mine_model").exists()
    assert main(["train", str(data), "--energy-key", "my_energy", "--forces-key", "my_forces", *FAST]) == 0
    report = _strict_json(tmp_path / "mine_model" / "train_report.json")
    assert report["source"]["kind"] == "extxyz"
    assert report["data"]["valid_drawn"] == round(0.1 * len(frames)) == report["data"]["valid"]
    assert report["data"]["train"] + report["data"]["valid"] == len(frames)
    assert report["data"]["test"] == 0 and report["errors"]["test"] is None
    assert report["references"]["training"] == [""]  # a foreign file declares no reference


def test_train_on_an_ase_database(finished_campaign, tmp_path):
    import ase.db

    run, _ = finished_campaign
    path = tmp_path / "frames.db"
    with ase.db.connect(path) as db:
        for frame in _store(run).frames(split="train"):
            atoms = frame.to_atoms()
            atoms.calc = SinglePointCalculator(atoms, energy=frame.energy, forces=frame.forces)
            atoms.info = {}
            db.write(atoms)
    out = tmp_path / "db_fit"
    assert main(["train", str(path), "--out", str(out), "--valid-fraction", "0.25", *FAST]) == 0
    report = _strict_json(out / "train_report.json")
    assert report["source"]["kind"] == "ase-db" and report["data"]["valid"] == round(0.25 * 18)


def _mixed_store(run: Path, path: Path) -> None:
    frames = [f for f in _store(run).frames() if f.split in ("train", "valid", "test")]
    mixed = [dataclasses.replace(f, reference="otherlevel00000") if i % 3 == 0 else f for i, f in enumerate(frames)]
    DatasetStore.create(path).extend(mixed)


def test_mixed_references_are_refused_unless_allowed(finished_campaign, tmp_path, capsys):
    run, _ = finished_campaign
    data = tmp_path / "mixed.h5"
    _mixed_store(run, data)
    out = tmp_path / "mixed_fit"
    assert main(["train", str(data), "--out", str(out), *FAST]) == 2
    line = _error_line(capsys)
    assert "--allow-mixed-references" in line and "otherlevel00000" in line
    assert not out.exists()
    assert main(["train", str(data), "--out", str(out), "--allow-mixed-references", *FAST]) == 0
    report = _strict_json(out / "train_report.json")
    assert len(report["references"]["training"]) == 2


@pytest.mark.parametrize("case", ["missing", "extension", "empty", "only_test", "not_a_run", "fraction",
                                  "config_key", "out_exists", "final_epochs"])
def test_bad_input_is_one_error_line_and_nothing_written(finished_campaign, tmp_path, capsys, case):
    run, _ = finished_campaign
    out = tmp_path / "out"
    source, extra, expected = str(run), [], ""
    if case == "missing":
        source, expected = str(tmp_path / "nope.xyz"), "nope.xyz: file not found"
    elif case == "extension":
        (tmp_path / "data.txt").write_text("hello\n")
        source, expected = str(tmp_path / "data.txt"), "unknown file type '.txt'"
    elif case == "empty":
        DatasetStore.create(tmp_path / "empty.h5")
        source, expected = str(tmp_path / "empty.h5"), "no training frames (no frames at all)"
    elif case == "only_test":
        DatasetStore.create(tmp_path / "test.h5").extend(_store(run).frames(split="test"))
        source, expected = str(tmp_path / "test.h5"), "no training frames (6 test)"
    elif case == "not_a_run":
        (tmp_path / "folder").mkdir()
        source, expected = str(tmp_path / "folder"), "not a run directory"
    elif case == "fraction":
        extra, expected = ["--valid-fraction", "1.5"], "--valid-fraction: must lie between 0 and 1"
    elif case == "config_key":
        (tmp_path / "size.yaml").write_text("model:\n  chanels: 16\n")
        extra, expected = ["--config", str(tmp_path / "size.yaml")], "size.yaml: model.chanels: unknown key"
    elif case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine\n")
        expected = "folder exists and is not empty; pass --overwrite"
    elif case == "final_epochs":
        extra, expected = ["--recipe", "final", "--max-epochs", "1"], "--max-epochs: the final recipe needs"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", source, "--out", str(out), *extra, "--quiet"]) == 2
    assert expected in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "out_exists":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_config_file_and_flags_size_the_model(finished_campaign, tmp_path):
    run, _ = finished_campaign
    config = tmp_path / "big.yaml"
    config.write_text("model:\n  channels: 16\n  max_L: 1\ntraining:\n  batch_size: 3\n")
    out = tmp_path / "big"
    assert main(["train", str(run), "--out", str(out), "--config", str(config), "--r-max", "4.0",
                 "--max-epochs", "1", "--quiet"]) == 0
    settings = _strict_json(out / "train_report.json")["settings"]
    assert (settings["model"]["channels"], settings["model"]["max_L"], settings["model"]["r_max"]) == (16, 1, 4.0)
    assert settings["training"]["batch_size"] == 3 and settings["model"]["num_interactions"] == 1  # the run's
    from aimspax_like.validation.predict import load_model

    model = load_model(out / "models" / "model.model", device="cpu").members[0]
    assert float(model.r_max) == 4.0 and str(model.node_embedding.linear.irreps_out) == "16x0e"


# --------------------------------------------------------------------------- export


def test_export_writes_mace_ready_files_and_a_manifest(finished_campaign, tmp_path, capsys):
    run, _ = finished_campaign
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--model", "all"]) == 0
    printed = capsys.readouterr()
    store = _store(run)
    for split in ("train", "valid", "test"):
        stored = store.frames(split=split)
        images = read(out / f"{split}.xyz", ":")
        assert len(images) == len(stored) > 0
        for atoms, frame in zip(images, stored, strict=True):
            assert atoms.info["split"] == split  # never a held or analysis frame
            assert np.array_equal(atoms.arrays["REF_forces"], frame.forces)
            assert atoms.info["REF_energy"] == frame.energy
            assert np.array_equal(atoms.positions, frame.positions)
    manifest = _strict_json(out / "manifest.json")
    assert manifest["frames"] == {s: len(store.frames(split=s)) for s in ("train", "valid", "test")}
    assert manifest["not_exported"]["analysis"] == len(store.frames(split="analysis")) > 0
    assert manifest["mace_keys"] == {"energy_key": "REF_energy", "forces_key": "REF_forces",
                                     "stress_key": "REF_stress"}
    assert manifest["config"]["seed"] == 3 and manifest["config"]["model"]["channels"] == 8
    listed = {entry["path"]: entry for entry in manifest["files"]}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(listed) == on_disk
    for path, entry in listed.items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == entry["sha256"]
    for name in ("best.model", "member_0.model", "member_1.model"):
        assert (out / "models" / name).read_bytes() == (run / "models" / name).read_bytes()
    lammps = manifest["lammps"]
    if lammps["written"]:
        assert (out / lammps["file"]).is_file() and lammps["check"]["ok"], lammps
        assert lammps["check"]["max_force_diff_eV_A"] < 1e-8
    else:  # mace's tool could not run here: the reason is recorded and said in one line
        assert lammps["reason"] and "LAMMPS model not written" in printed.err


def test_exported_models_reproduce_the_committee_in_mace_calculator(finished_campaign, tmp_path):
    import mace  # noqa: F401
    from mace.calculators import MACECalculator

    from aimspax_like.models.ensemble import MACEEnsemble

    run, _ = finished_campaign
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--model", "members", "--no-lammps"]) == 0
    members = sorted((out / "models").glob("member_*.model"))
    committee = MACEEnsemble.load(sorted((run / "models").glob("member_*.model")), device="cpu")
    frames = read(out / "test.xyz", ":")
    expected = committee.predict(frames)
    calc = MACECalculator(model_paths=[str(p) for p in members], device="cpu", default_dtype="float64")
    for s, atoms in enumerate(frames):
        probe = atoms.copy()
        probe.calc = calc
        assert probe.get_potential_energy() == pytest.approx(expected.mean_energies[s], abs=1e-9)
        assert np.allclose(probe.get_forces(), expected.forces_of(s).mean(axis=0), atol=1e-9)
    assert _strict_json(out / "manifest.json")["lammps"] == {"written": False, "reason": "--no-lammps"}


def test_export_of_a_train_folder_and_bad_inputs(finished_campaign, tmp_path, capsys):
    run, _ = finished_campaign
    fit = tmp_path / "fit"
    assert main(["train", str(run), "--out", str(fit), "--max-epochs", "1", "--quiet"]) == 0
    assert main(["export", str(fit), "--no-lammps"]) == 0
    manifest = _strict_json(fit / "export" / "manifest.json")
    assert [m["file"] for m in manifest["models"]] == ["models/model.model"]
    assert manifest["frames"] == {"train": 0, "valid": 0, "test": 0}
    assert manifest["config"]["train_settings"]["recipe"] == "plain"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "absent")]) == 2
    assert "absent: not found" in _error_line(capsys)
    assert main(["export", str(fit), "--no-lammps"]) == 2  # its export folder exists now
    assert "--overwrite" in _error_line(capsys)
    partial = tmp_path / "partial"
    (partial / "models").mkdir(parents=True)
    (partial / "campaign.yaml").write_text((run / "campaign.yaml").read_text())
    (partial / "models" / "member_0.model").write_bytes((run / "models" / "member_0.model").read_bytes())
    assert main(["export", str(partial), "--no-lammps"]) == 2
    assert "best.model: not found" in _error_line(capsys) and not (partial / "export").exists()


def test_train_on_periodic_frames_reports_stress_errors(tmp_path, capsys):
    """Labels in ASE's own keys (energy/forces/stress as calculator results) are found without
    any key flag, and stress-labelled cells get stress errors in the report and the table."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(0)
    images = []
    for _ in range(10):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.set_cell(atoms.cell * (1 + 0.02 * rng.normal()), scale_atoms=True)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        atoms.get_stress()
        images.append(atoms)
    write(tmp_path / "cu.xyz", images)
    args = ["train", str(tmp_path / "cu.xyz"), "--channels", "8", "--max-L", "0", "--num-interactions", "1",
            "--r-max", "4.0", "--device", "cpu", *FAST]
    assert main(args) == 0
    assert "stress MAE (meV/Å³)" in capsys.readouterr().out
    report = _strict_json(tmp_path / "cu_model" / "train_report.json")
    train = report["errors"]["train"]
    assert train["stress_frames"] == report["data"]["train"] == 9 and train["stress_mae_meV_A3"] > 0
