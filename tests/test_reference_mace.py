"""The ``mace`` reference kind: a MACE model file labels the frames (aims-PAX's teacher reference).

The models are real (tiny ScaleShiftMACE members built and saved by this project, loaded by
mace's own ``MACECalculator``); labels go through the same ``label`` function the workers run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.build import molecule

from aimspax_like.cli import main
from aimspax_like.config import ModelConfig, load_config
from aimspax_like.data import reference_fingerprint
from aimspax_like.errors import ConfigError
from aimspax_like.models.ensemble import MACEEnsemble
from aimspax_like.reference import LabelResult, check_reference_setup, label, make_calculator

TINY = {"channels": 8, "max_L": 1, "r_max": 4.5, "num_interactions": 2, "correlation": 2,
        "radial_mlp": [8], "max_ell": 2, "device": "cpu"}
HCO = [1, 6, 8]


def tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 1-member MACE for H, C and O, saved as a model file; different seeds, different weights."""
    ensemble = MACEEnsemble.build(ModelConfig(**TINY, ensemble_size=1), seeds=[seed], atomic_numbers=HCO,
                                  atomic_energies={1: -13.6, 6: -1029.0, 8: -2041.0}, avg_num_neighbors=3.0)
    return ensemble.save(folder)[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("teacher"))


def spec(model: Path, **extra) -> dict:
    return {"kind": "mace", "model": str(model), "device": "cpu", "dtype": "float64", "compute_stress": False,
            "timeout_s": None, "keep_workdir": False, **extra}


def test_a_mace_model_labels_a_molecule_with_consistent_energy_and_forces(model_file, tmp_path):
    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=1)
    outcome = label(atoms, spec(model_file), str(tmp_path / "w"))
    assert isinstance(outcome, LabelResult), outcome
    assert outcome.forces.shape == (6, 3) and np.isfinite(outcome.energy)
    assert np.abs(outcome.forces).max() > 1e-4  # a rattled molecule feels forces
    # Forces are the energy's negative gradient: central differences of the labelled energy.
    h = 1e-4
    for i, k in ((0, 0), (4, 2)):
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[i, k] += sign * h
            energies.append(label(moved, spec(model_file), str(tmp_path / f"fd{i}{k}{sign}")).energy)
        assert -(energies[0] - energies[1]) / (2 * h) == pytest.approx(outcome.forces[i, k], abs=1e-5)
    assert not (tmp_path / "w").exists()  # scratch removed after a success


def test_the_model_is_loaded_once_per_process_and_again_when_the_file_changes(tmp_path):
    folder = tmp_path / "m"
    model = tiny_model(folder, seed=0)
    first = make_calculator(spec(model), tmp_path)
    assert make_calculator(spec(model), tmp_path / "other") is first  # cached: no reload per label
    atoms = molecule("H2O")
    atoms.calc = first
    before = atoms.get_potential_energy()
    replaced = tiny_model(tmp_path / "n", seed=5)
    shutil.copyfile(replaced, model)
    os.utime(model, ns=(os.stat(model).st_atime_ns, os.stat(model).st_mtime_ns + 10**9))
    second = make_calculator(spec(model), tmp_path)
    assert second is not first
    atoms.calc = second
    assert atoms.get_potential_energy() != pytest.approx(before)


def test_setup_check_names_the_model_key(model_file, tmp_path):
    check_reference_setup(spec(model_file), {1, 6, 8})
    with pytest.raises(ConfigError, match=r"^reference.model: model file not found: .*nope.model$"):
        check_reference_setup(spec(tmp_path / "nope.model"), {1, 8})
    with pytest.raises(ConfigError, match=r"reference.model: .* was not trained on N"):
        check_reference_setup(spec(model_file), {1, 7})
    junk = tmp_path / "junk.model"
    junk.write_text("not a model\n")
    with pytest.raises(ConfigError, match=r"reference.model: cannot load .*junk.model as a MACE model"):
        check_reference_setup(spec(junk), {1, 8})


def test_fingerprint_follows_the_file_contents_not_its_path(model_file, tmp_path):
    copy = tmp_path / "elsewhere" / "same.model"
    copy.parent.mkdir()
    shutil.copyfile(model_file, copy)
    other = tiny_model(tmp_path / "other", seed=3)
    assert reference_fingerprint(spec(model_file)) == reference_fingerprint(spec(copy))
    assert reference_fingerprint(spec(model_file)) != reference_fingerprint(spec(other))
    assert reference_fingerprint(spec(model_file)) != reference_fingerprint(spec(model_file, dtype="float32"))
    # Other kinds hash their settings exactly as before.
    emt = {"kind": "emt", "compute_stress": False, "timeout_s": 30.0, "keep_workdir": True}
    text = json.dumps({"kind": "emt", "compute_stress": False}, sort_keys=True, separators=(",", ":"))
    assert reference_fingerprint(emt) == hashlib.sha256(text.encode()).hexdigest()[:16]


def test_config_resolves_the_model_against_the_config_folder(model_file, tmp_path, capsys):
    folder = tmp_path / "campaign"
    folder.mkdir()
    shutil.copyfile(model_file, folder / "teacher.model")
    from ase.io import write

    write(folder / "water.xyz", molecule("H2O"))
    raw = {"system": {"structures": "water.xyz"}, "reference": {"kind": "mace", "model": "teacher.model"},
           "output": {"directory": str(tmp_path / "run")}}
    (folder / "campaign.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(folder / "campaign.yaml")
    assert config.reference.model == folder / "teacher.model"
    assert config.reference.dtype == "float64" and config.reference.device == "cpu"
    # A missing model file: one line naming the key, exit 2, no run directory.
    raw["reference"]["model"] = "missing.model"
    (folder / "campaign.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(folder / "campaign.yaml"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: reference.model: model file not found: {folder / 'missing.model'}"
    assert not (tmp_path / "run").exists()
    raw["reference"]["dtype"] = "float16"
    (folder / "campaign.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^reference.dtype: "):
        load_config(folder / "campaign.yaml")


def test_a_parsl_worker_labels_with_the_model(model_file, tmp_path, parsl_executor):
    """The worker path: the label function shipped to a real Parsl worker loads the model there."""
    atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    futures = [parsl_executor.submit(atoms, spec(model_file), str(tmp_path / f"w{i}")) for i in range(3)]
    outcomes = [f.result(timeout=120) for f in futures]
    assert all(isinstance(o, LabelResult) for o in outcomes), outcomes
    local = label(atoms, spec(model_file), str(tmp_path / "local"))
    for outcome in outcomes:
        np.testing.assert_allclose(outcome.forces, local.forces, atol=1e-10)
        assert outcome.energy == pytest.approx(local.energy, abs=1e-9)
