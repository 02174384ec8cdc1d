"""The on-the-fly-in-ASE example (workflows/otf_in_ase.py), run small: a vacancy relaxation and NPT
MD of a 32-atom Cu cell with the on-the-fly calculator and EMT as the reference.

One run of the script's ``main`` (about 25 s on 2 cores) is shared by the tests, which judge its
results with EMT itself: the relaxed geometry (checked with EMT until EMT's own forces meet the
criterion), the barostat's volume, the stored labels.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from workflow_helpers import load_workflow

from aimspax_like.data import DatasetStore
from aimspax_like.events import read_events
from aimspax_like.otf import OTF_ORIGIN, OTF_SOURCE

FMAX = 0.05
STEPS = 150
MAX_CHECKS = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("otf_in_ase")
    workflow = load_workflow("otf_in_ase")
    capture = out / "stdout.txt"
    with capture.open("w") as handle, contextlib.redirect_stdout(handle):
        code = workflow.main(["--steps", str(STEPS), "--fmax", str(FMAX), "--max-checks", str(MAX_CHECKS),
                              "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "results.json").read_text()), capture.read_text()


def test_the_optimisation_is_checked_with_emt_until_emts_forces_meet_the_criterion(run) -> None:
    _, results, stdout = run
    opt = results["optimise"]
    checks = opt["checks"]
    # converged means by EMT's own forces at the final geometry, which is the last checked one
    assert opt["converged"], [c["reference_fmax"] for c in checks]
    assert 1 <= len(checks) <= MAX_CHECKS
    assert opt["emt_fmax_at_final"] < FMAX + 0.01
    assert checks[-1]["reference_fmax"] == pytest.approx(opt["emt_fmax_at_final"], abs=1e-9)
    assert checks[-1]["reference_energy"] == pytest.approx(opt["emt_energy_at_final"], abs=1e-9)
    # every check came after BFGS had converged on the calculator; all but the last failed by EMT's forces
    assert all(c["driver_fmax"] < FMAX for c in checks)
    assert all(c["reference_fmax"] > FMAX for c in checks[:-1])
    assert [c["step"] for c in checks] == sorted(c["step"] for c in checks) and checks[-1]["step"] == opt["steps"]
    # next to EMT's own minimum
    relaxation = opt["emt_energy_at_start"] - opt["emt_energy"]  # EMT's own, about 0.25 eV here
    assert abs(opt["emt_energy_at_final"] - opt["emt_energy"]) < min(0.01, relaxation / 20)  # eV, 31 atoms
    assert opt["max_position_difference"] < 0.05  # A
    # the committee took most steps alone: fewer reference calls (checks included) than BFGS steps,
    # and one call per BFGS evaluation plus one per check (BFGS reads the check's answer from the cache)
    assert len(checks) <= opt["labels"] < opt["steps"]
    assert opt["calls"] == opt["steps"] + 1 + len(checks)
    assert f"converged by EMT's own forces after {len(checks)} check(s)" in stdout
    assert stdout.count("  check ") == len(checks)


def test_npt_moves_the_cell_to_emts_thermal_lattice_constant(run) -> None:
    _, results, _ = run
    md = results["npt"]
    assert md["steps"] == STEPS and md["calls"] == STEPS + 1  # one force+stress call per MTK step
    # the barostat acts: the 0 K cell expands at 800 K and its volume fluctuates by percents
    assert md["volume_max"] > 1.02 * md["volume_start"]
    assert md["a_mean"] > md["a_start"]
    assert 0.95 * md["volume_start"] < md["volume_min"] and md["volume_max"] < 1.25 * md["volume_start"]
    assert md["a_mean"] == pytest.approx(md["emt_a_mean"], rel=0.015)
    assert 600 < md["t_mean"] < 1000
    assert np.isfinite(md["pressure_mae_gpa"]) and md["pressure_mae_gpa"] < 5.0
    assert all(0 <= s <= STEPS for s in md["labelled_steps"]) and len(md["labelled_steps"]) == md["labels"]


def test_every_label_is_stored_with_a_finite_stress_and_logged(run) -> None:
    out, results, stdout = run
    frames = DatasetStore.open(out / "otf.h5").frames()
    otf = [f for f in frames if f.origin == OTF_ORIGIN]
    assert len(otf) == results["labels"] == results["optimise"]["labels"] + results["npt"]["labels"]
    assert all(f.source == OTF_SOURCE for f in otf)
    assert len(frames) == results["seed_frames"] + results["labels"]
    for frame in frames:
        assert frame.stress is not None
        stress = np.asarray(frame.stress)
        assert stress.size in (6, 9) and np.isfinite(stress).all()
    labels = [e for e in read_events(out / "events.jsonl") if e["event"] == "otf_label"]
    assert len(labels) == results["labels"]
    # the closing table: one row per phase with its reference calls
    table = stdout.strip().splitlines()[-4:]
    assert table[0].split()[:2] == ["phase", "steps"]
    assert [row.split()[0] for row in table[1:]] == ["setup", "optimise", "NPT"]
    assert int(table[3].split()[-2]) == results["npt"]["labels"]
