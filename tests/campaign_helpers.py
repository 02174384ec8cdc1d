"""The tiny end-to-end campaign shared by the campaign and SLURM tests.

A 6-atom Cu/Au cluster labelled by EMT and a 2-member MACE ensemble of 8 channels: small
enough that IDG, AL, convergence and a test set run in well under a minute on 2 cores.
"""

from __future__ import annotations

from ase import Atoms
from ase.io import write


def tiny_cluster() -> Atoms:
    positions = [[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5], [2.5, 2.5, 0], [1.3, 1.3, 2.0]]
    return Atoms("Cu4Au2", positions=positions)


def tiny_config(tmp_path, **overrides) -> dict:
    write(tmp_path / "cluster.xyz", tiny_cluster())
    config = {
        "system": {"structures": str(tmp_path / "cluster.xyz")},
        "reference": {"kind": "emt"},
        "model": {"ensemble_size": 2, "channels": 8, "max_L": 0, "r_max": 4.5, "num_interactions": 1,
                  "correlation": 2, "radial_mlp": [8], "num_radial_basis": 6, "dtype": "float64",
                  "device": "cpu"},
        "training": {"batch_size": 4},
        "idg": {"stride": 5, "points_per_member": 3, "intermediate_epochs": 3, "max_epochs": 6,
                "max_set_size": 40, "md": {"temperature_K": 400}},
        "al": {"num_trajectories": 3, "check_every": 2, "warmup": 4, "max_train_set_size": 18,
               "max_md_steps": 300, "intermediate_epochs": 1, "max_epochs_per_point": 2,
               "valid_ratio": 0.25, "md": {"temperature_K": 400}},
        "converge": {"patience": 3, "max_epochs": 8},
        "test_set": {"size": 3, "stride": 5},  # 3 frames at 400 K and 3 at 560 K
        "output": {"directory": str(tmp_path / "run")},
        "seed": 3,
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value}
    return config
