"""The stress-training study (workflows/stress_training.py), its --quick path in miniature.

A 4-atom copper cell, a tiny MACE and two epochs per stress weight: the numbers mean nothing,
but every part runs (NPT reference MD with stress labels, strained cells, training with and
without the stress term, evaluation, tables) and every number of the table is finite.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
from workflow_helpers import load_workflow

study = load_workflow("stress_training")

TINY = ["channels=8", "max_L=0", "r_max=4.5", "num_interactions=1", "correlation=2", "radial_mlp=[8]",
        "num_radial_basis=6"]


def test_full_voigt_order_and_strained_cells_carry_a_larger_compression():
    full = study._full(np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]))[0]
    assert np.array_equal(full, [[1, 6, 5], [6, 2, 4], [5, 4, 3]])  # ASE Voigt: xx yy zz yz xz xy
    frame = study.CELLS["cubic1"]()
    frame.info["REF_stress"] = np.zeros(6)
    small, large = study.strained([frame], [0.98, 1.02])
    assert math.isclose(small.get_volume() / frame.get_volume(), 0.98)
    # Compressed cells push outwards: higher pressure (-trace/3) than stretched ones.
    assert -small.info["REF_stress"][:3].mean() > -large.info["REF_stress"][:3].mean()
    assert small.arrays["REF_forces"].shape == (4, 3)


def test_quick_path_on_a_tiny_cell_gives_a_finite_table(tmp_path):
    table = tmp_path / "stress_training.md"
    argv = ["--quick", "--cell", "cubic1", "--train-frames", "4", "--test-size", "3", "--strained-frames", "2",
            "--max-epochs", "2", "--equilibration-steps", "20", "--out", str(tmp_path), "--table", str(table)]
    for item in TINY:
        argv += ["--model", item]
    assert study.main(argv) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["weight"], r["seed"]) for r in results["runs"]] == [(0.0, 0), (1000.0, 0)]
    assert results["data"]["tests"] == {"300 K": 3, "600 K": 3, "strained": 4}
    for run in results["runs"]:
        for key in ("stress_mae", "pressure_mae_GPa", "force_mae", "energy_mae"):
            assert set(run[key]) == {"300 K", "600 K", "strained"}
            assert all(math.isfinite(v) and v >= 0 for v in run[key].values())
        for name, value in run["stress_mae"].items():  # evaluate's units (eV/A^3 x 1000) pinned
            assert math.isclose(value, run["stress_mae_direct"][name], rel_tol=1e-9)

    text = table.read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| (0|1000) \| ", line)]
    assert len(rows) == 4  # every run, then the means
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        numbers = [float(x) for c in cells for x in re.findall(r"[-+]?\d+\.?\d*(?:e[-+]?\d+)?", c)]
        assert numbers and all(math.isfinite(x) for x in numbers)
        assert "nan" not in row.lower() and "inf" not in row.lower()
    assert "ratio S MAE w=0 / w 600 K" in text and "train-mean" in text
