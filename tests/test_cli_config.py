"""Config validation and the CLI's contract for bad input: exit 2, one line naming the key or
file, and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ase.build import molecule
from ase.io import write

from aimspax_like.cli import main
from aimspax_like.config import CampaignConfig, config_from_dict, load_config
from aimspax_like.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _base(tmp_path: Path) -> dict:
    write(tmp_path / "water.xyz", molecule("H2O"))
    return {
        "system": {"structures": "water.xyz"},
        "reference": {"kind": "lj"},
        "output": {"directory": str(tmp_path / "run")},
    }


def _set(config: dict, dotted: str, value) -> dict:
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return config


BAD_INPUTS = [
    # (dotted key to set, value, text expected in the one-line error)
    ("al.windw", 400, "al.windw: unknown key"),
    ("typo_section", {}, "typo_section: unknown key"),
    ("al.num_trajectories", "four", "al.num_trajectories"),
    ("model.channels", 2.5, "model.channels"),
    ("al.valid_ratio", 1.5, "al.valid_ratio"),
    ("al.valid_ratio", 0.0, "al.valid_ratio"),
    ("idg.valid_ratio", -0.1, "idg.valid_ratio"),
    ("al.window", 0, "al.window"),
    ("al.window", -5, "al.window"),
    ("reference.kind", "vasp", "reference"),
    ("reference.xc", "PBE", "reference.xc: unknown key"),  # xc is not an LJ setting
    ("system.structures", "missing.xyz", "missing.xyz"),
    ("reference", {"kind": "emt"}, "Li"),  # structure below holds Li; EMT cannot label it
    ("idg.sampler", "foundation", "idg"),  # foundation sampler without a model
    ("idg.foundation_model", "no/such/model.model", "no/such/model.model"),
    ("model.seeds", [1, 2], "model"),
    ("reference.compute_stress", True, "reference.compute_stress"),  # molecule, no cell
    ("model.device", "cuda", "model.device"),  # torch is told below that it sees no GPU
    ("reference", {"kind": "cp2k", "cutoff_Ry": -1.0}, "error: reference.cutoff_Ry: "),  # no union tag
    ("reference", {"kind": "mace", "model": "teacher.model", "dtype": "half"}, "error: reference.dtype: "),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_INPUTS, ids=[f"{k}={v}" for k, v, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, key, value, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = _set(_base(tmp_path), key, value)
    if expected == "Li":
        write(tmp_path / "water.xyz", molecule("LiF"))
    if key == "idg.foundation_model":
        config["idg"]["sampler"] = "foundation"
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["run", str(path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err
    assert not (tmp_path / "run").exists()


def test_missing_section_and_unreadable_files(tmp_path, capsys):
    config = _base(tmp_path)
    del config["reference"]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "a.yaml")]) == 2
    assert "reference: required key is missing" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err
    (tmp_path / "garbage.xyz").write_text("this is not\na structure file\n")
    config = _base(tmp_path)
    config["system"]["structures"] = "garbage.xyz"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "b.yaml")]) == 2
    assert "garbage.xyz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_existing_run_directory_needs_overwrite(tmp_path, capsys):
    config = _base(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "c.yaml"), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


def test_phase_needs_previous_phase(tmp_path, capsys):
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(_base(tmp_path)))
    assert main(["al", str(tmp_path / "d.yaml"), "--quiet"]) == 2
    assert "needs finished idg" in capsys.readouterr().err


def test_defaults_are_the_papers_numbers():
    config = config_from_dict({"system": {"structures": "x.xyz"}, "reference": {"kind": "emt"}})
    assert (config.al.window, config.al.c_x, config.idg.stride) == (400, 0.0, 20)
    assert (config.al.md.temperature_K, config.al.md.timestep_fs, config.al.md.friction_per_fs) == (500, 1, 0.001)
    assert (config.training.lr, config.training.ema_decay, config.training.clip_grad) == (0.01, 0.99, 10)
    assert (config.training.energy_weight, config.training.forces_weight, config.training.batch_size) == (1, 1000, 5)
    model = config.model
    assert (model.channels, model.max_L, model.r_max, model.num_radial_basis) == (32, 1, 6.0, 8)
    assert (model.num_interactions, model.correlation, model.radial_mlp) == (2, 3, [32, 32, 32])
    assert (model.ensemble_size, config.converge.patience) == (4, 50)


def test_resolved_config_round_trips_with_every_default(tmp_path):
    config = config_from_dict(_base(tmp_path))
    again = CampaignConfig.model_validate(yaml.safe_load(config.resolved_yaml()))
    assert again == config
    assert "max_epochs_per_point" in config.resolved_yaml()


def test_init_template_is_a_valid_config(tmp_path, capsys):
    target = tmp_path / "campaign.yaml"
    assert main(["init", str(target)]) == 0
    write(tmp_path / "geometry.xyz", molecule("H2O"))
    config = load_config(target)
    assert config.reference.kind == "xtb" and config.al.window == 400
    assert main(["init", str(target)]) == 2  # no silent overwrite


def test_config_error_names_nested_md_list_key():
    data = {"system": {"structures": "x.xyz"}, "reference": {"kind": "emt"},
            "al": {"num_trajectories": 2, "md": [{"temperature_K": 300}, {"temprature_K": 400}]}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert "al.md.1.temprature_K" in str(info.value)


def test_console_script_schema_runs():
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "aimspax-like"), "schema"], capture_output=True, text=True, check=True
    ).stdout
    assert '"CampaignConfig"' in out or '"title": "CampaignConfig"' in out
    assert sys.executable  # the venv's python ran this test
