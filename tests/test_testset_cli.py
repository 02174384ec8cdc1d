"""``aimspax-like testset``: MD at several temperatures, farthest point sampling, labels, extxyz.

Uses the finished tiny campaign (EMT Cu4Au2; its best.model gives the descriptors and drives the
model MD) read-only, and the session's Parsl executor for the model-driven labels.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.io import read

from aimspax_like.cli import main


def _emt_agrees(frames) -> None:
    for atoms in frames:
        probe = atoms.copy()
        probe.calc = EMT()
        assert atoms.get_potential_energy() == pytest.approx(probe.get_potential_energy(), abs=1e-5)
        assert np.allclose(atoms.get_forces(), probe.get_forces(), atol=1e-5)


def test_reference_test_set_round_trips_through_validate(finished_campaign, tmp_path, capsys):
    run = finished_campaign[0]
    output = tmp_path / "test_set.xyz"
    code = main(["testset", str(run), "--output", str(output), "--temperatures", "300,600", "--frames", "3",
                 "--stride", "4", "--pool", "3", "--quiet"])
    assert code == 0
    assert "wrote       6 frames" in capsys.readouterr().out
    frames = read(output, ":")
    assert [a.info["temperature_K"] for a in frames] == [300.0] * 3 + [600.0] * 3
    assert "momenta" not in frames[0].arrays
    _emt_agrees(frames)  # reference MD frames keep the reference's own labels (positions written to 1e-8 A)

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("parsl"))
    assert main(["validate", str(copy), "--test", str(output), "--no-stability", "--no-rdf", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "300 K" in out and "600 K" in out


def test_model_driven_test_set_is_labelled_on_the_workers(finished_campaign, parsl_executor, tmp_path):
    from aimspax_like.validation.make_testset import TestsetOptions, make_test_set

    output = tmp_path / "model.xyz"
    options = TestsetOptions(output=output, sampler="model", temperatures=[350.0], frames=2, stride=3, pool=2)
    result = make_test_set(finished_campaign[0], options, executor=parsl_executor)
    assert [(r["temperature_K"], r["candidates"], r["frames"]) for r in result.per_temperature] == [(350.0, 4, 2, )]
    frames = read(output, ":")
    assert len(frames) == 2 and all(a.info["temperature_K"] == 350.0 for a in frames)
    _emt_agrees(frames)  # labels came from the reference, not from the model that drove the MD


@pytest.mark.parametrize("case", ["no_parent", "exists", "model_without_model", "fps_without_model", "bad_frames"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(finished_campaign, tmp_path, capsys, case):
    run = finished_campaign[0]
    output = tmp_path / "out.xyz"
    args = ["testset", str(run), "--output", str(output), "--frames", "1", "--quiet"]
    if case == "no_parent":
        output = tmp_path / "missing" / "out.xyz"
        args[3] = str(output)
    elif case == "exists":
        output.write_text("keep me")
    elif case == "model_without_model":
        # A config file (not a run directory) has no best.model to drive the MD with.
        args[1] = str(run / "campaign.yaml")
        args += ["--sampler", "model"]
    elif case == "fps_without_model":
        args[1] = str(run / "campaign.yaml")  # FPS needs descriptors: no model here either
    elif case == "bad_frames":
        args[-2:] = ["0", "--quiet"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "exists":
        assert output.read_text() == "keep me"
