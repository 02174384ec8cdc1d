"""workflows/falcon_pt55.py: the configs it writes, and a real (very short) sweep read into its table."""

from __future__ import annotations

import json

import yaml
from workflow_helpers import load_workflow

study = load_workflow("falcon_pt55")


def test_run_config_sets_falcons_trigger_steps_output_and_settings(tmp_path) -> None:
    path = study.run_config(study.BASE, 0.05, 1234, tmp_path, ["model.channels=4", "otf.trigger.warmup=3"])
    config = yaml.safe_load(path.read_text())
    assert config["otf"]["trigger"]["threshold"] == 0.05
    assert config["otf"]["trigger"]["measure"] == "energy" and config["otf"]["trigger"]["energy_per_atom"] is False
    assert config["otf"]["trigger"]["warmup"] == 3 and config["model"]["channels"] == 4
    assert config["otf"]["steps"] == 1234
    assert config["output"]["directory"] == str(tmp_path / "eps_0.050")
    structure = config["system"]["structures"][0]
    assert structure.endswith("pt55_icosahedron.xyz") and (study.ROOT / "configs" / "structures").samefile(
        __import__("pathlib").Path(structure).parent)


def test_a_short_sweep_runs_the_engine_and_prints_the_table(tmp_path, capsys) -> None:
    """Two epsilons, 30 MD steps each, a 2-member 4-channel committee: the real ``otf`` command
    in subprocesses, read back from the runs' reports. A smaller epsilon never needs fewer labels
    on the same trajectory start (same seed, same start frames)."""
    settings = ["model.ensemble_size=2", "model.channels=4", "otf.start.frames=3", "otf.start.epochs=5",
                "otf.validate_frames=2", "otf.write_every=5"]
    argv = ["--steps", "30", "--epsilons", "0.02", "5.0", "--out", str(tmp_path), "--parallel", "2", "--plain-only"]
    for item in settings:
        argv += ["--set", item]
    assert study.main(argv) == 0
    out = capsys.readouterr().out
    assert "| epsilon (eV) |" in out and "FALCON" in out
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["epsilon"] for r in rows] == [0.02, 5.0]
    tight, loose = rows
    assert tight["labels"] >= loose["labels"]
    assert tight["steps"] == loose["steps"] == 30
    assert loose["check_frames"] == 2 and loose["energy_rmse_eV"] is not None
    assert tight["training_s"] > 0 or tight["labels"] == 0
    reference = json.loads((tmp_path / "reference_md_30.json").read_text())
    assert reference["steps"] == 30 and 20.0 < reference["energy_second_half_eV"] < 40.0  # Pt55 under EMT
    assert "EMT-only MD of the same start" in out
    # Finished runs are read, not rerun.
    before = (tmp_path / "eps_0.020" / "report" / "otf.json").stat().st_mtime_ns
    assert study.main(argv) == 0
    assert (tmp_path / "eps_0.020" / "report" / "otf.json").stat().st_mtime_ns == before
