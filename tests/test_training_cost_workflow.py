"""workflows/training_cost.py: the campaign files it writes and the table it prints."""

from __future__ import annotations

import json

import yaml
from workflow_helpers import load_workflow

study = load_workflow("training_cost")


def test_run_config_sets_mode_seed_output_and_the_given_settings(tmp_path) -> None:
    base = tmp_path / "campaign" / "base.yaml"
    base.parent.mkdir()
    base.write_text(yaml.safe_dump({"system": {"structures": "ethanol.xyz"}, "al": {"rounds": {"replay_size": 4}},
                                    "output": {"directory": "runs/x"}}))
    path = study.run_config(base, "replay", 2, tmp_path, ["al.max_epochs_per_point=2", "model.channels=8"])
    config = yaml.safe_load(path.read_text())
    assert config["system"]["structures"] == str((base.parent / "ethanol.xyz").resolve())
    assert config["seed"] == 2 and config["output"]["directory"] == str(tmp_path / "replay_2")
    assert config["al"]["rounds"] == {"replay_size": 4, "mode": "replay"}
    assert config["al"]["max_epochs_per_point"] == 2 and config["model"]["channels"] == 8


def _run(folder, training: float, md: float, final: float, members: list[float]) -> None:
    (folder / "report").mkdir(parents=True)
    al = {"md": {"cpu_s": md}, "training": {"cpu_s": training}, "io": {"cpu_s": 1.0}, "uncertainty": {"cpu_s": 0.5},
          "labelling": {"cpu_s": 2.0}, "driver": {"cpu_s": md + training + 3}}
    profile = {"al": al}
    summary = {"profile": profile, "labels": {"al": 40}, "md_steps": {"al": 1000},
               "test": {"all": {"final": {"force_mae": final}, "members": [{"force_mae": m} for m in members]}}}
    (folder / "report/summary.json").write_text(json.dumps(summary))


def test_table_reads_the_runs_and_prints_replay_over_full(tmp_path) -> None:
    _run(tmp_path / "full_0", training=40.0, md=100.0, final=0.030, members=[0.03, 0.05])
    _run(tmp_path / "replay_0", training=20.0, md=100.0, final=0.033, members=[0.04, 0.06])
    results = {m: {0: study.results_of(tmp_path / f"{m}_0")} for m in ("full", "replay")}
    assert results["full"][0]["cpu"]["total"] == 40.0 + 100.0 + 3 + 2.0  # driver + labels on the workers
    text = study.table(results)
    assert "| full | 0 | 100.0 | 0.5 | 40.0 | 1.0 | 145.0 | 1000 | 30.0 | 40.0 |" in text
    ratios = text.splitlines()[-1]
    assert "AL training CPU 0.50" in ratios and "AL phase CPU 0.86" in ratios
    assert "test F MAE final 1.10" in ratios and "test F MAE members 1.25" in ratios
