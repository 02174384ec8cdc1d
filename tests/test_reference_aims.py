"""FHI-aims without the binary: input files, a stored real output, and stand-in executables.

The stand-in 'aims' is a shell script that prints the stored real output (or part of it), so
the whole label path runs: ASE writes control.in/geometry.in, the launch command runs in the
workdir, and our reader classifies aims.out.
"""

from __future__ import annotations

import shutil
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase import Atoms

from aimspax_like.errors import ConfigError
from aimspax_like.reference import FailureKind, LabelFailure, LabelResult, check_reference_setup, label
from aimspax_like.reference.aims import read_aims_outcome, split_command, write_aims_inputs
from aimspax_like.reference.calculators import make_calculator

STORED = Path(__file__).parent / "data" / "aims" / "water_singlepoint.out"
# Values printed in the stored output's final "Energy and forces in a compact form" block.
STORED_ENERGY = -0.206302072675943e04
STORED_FORCES = np.array(
    [
        [-0.478299830661005e01, -0.616960341437854e01, 0.162259424656531e-27],
        [0.692109878170016e01, -0.419925410034428e00, 0.0],
        [-0.213810047509011e01, 0.658952882441297e01, 0.243389136984796e-27],
    ]
)
SCF_FAILURE_LINE = "  *** scf_solver: SCF cycle not converged."


def water() -> Atoms:
    """The geometry of the stored calculation."""
    return Atoms("OH2", positions=[[0, 0, 0], [0.9584, 0, 0], [-0.24, 0.9279, 0]])


@pytest.fixture
def species_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "species"
    folder.mkdir()
    for name, z in (("H", 1), ("O", 8)):
        (folder / f"{z:02d}_{name}_default").write_text(
            f"  species        {name}\n    nucleus             {z}\n    hydro 2 p 1.8\n"
        )
    return folder


def fake_aims(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "bin" / "aims.fake.x"
    script.parent.mkdir(exist_ok=True)
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def aims_spec(command: Path | str, species: Path, **extra: Any) -> dict[str, Any]:
    spec = {"kind": "aims", "command": str(command), "species_dir": str(species), "xc": "pbe",
            "parameters": {"relativistic": ["atomic_zora", "scalar"]}}
    spec.update(extra)
    return spec


def stored_lines() -> list[str]:
    return STORED.read_text().splitlines(keepends=True)


# --------------------------------------------------------------------------- inputs


def test_write_input_has_xc_forces_parameters_and_geometry(tmp_path: Path, species_dir: Path) -> None:
    atoms = water()
    calc = make_calculator(aims_spec("aims.x", species_dir), tmp_path / "w")
    write_aims_inputs(calc, atoms, ["energy", "forces"])
    control = [line.split() for line in (tmp_path / "w" / "control.in").read_text().splitlines()]
    assert ["xc", "pbe"] in control
    assert ["compute_forces", ".true."] in control
    assert ["relativistic", "atomic_zora", "scalar"] in control
    assert ["species", "H"] in control and ["species", "O"] in control
    geometry = [line.split() for line in (tmp_path / "w" / "geometry.in").read_text().splitlines()]
    rows = [row for row in geometry if row and row[0] == "atom"]
    assert [row[4] for row in rows] == ["O", "H", "H"]
    np.testing.assert_allclose([[float(x) for x in row[1:4]] for row in rows], atoms.positions, atol=1e-10)


# --------------------------------------------------------------------------- reading outputs


def test_stored_output_gives_energy_and_forces(tmp_path: Path) -> None:
    assert "not yet converged - restarting mixer" in STORED.read_text()  # routine, not a failure
    shutil.copy(STORED, tmp_path / "aims.out")
    outcome = read_aims_outcome(tmp_path, n_atoms=3)
    assert isinstance(outcome, LabelResult)
    assert outcome.energy == pytest.approx(STORED_ENERGY, abs=1e-8)
    np.testing.assert_allclose(outcome.forces, STORED_FORCES, atol=1e-10)


def test_output_cut_before_the_end_is_a_crash(tmp_path: Path) -> None:
    lines = stored_lines()
    end = next(i for i, line in enumerate(lines) if "Have a nice day." in line)
    (tmp_path / "aims.out").write_text("".join(lines[:end]))
    outcome = read_aims_outcome(tmp_path, n_atoms=3)
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.CRASHED
    assert "did not finish" in outcome.message


def test_output_with_scf_failure_line_is_scf_not_converged(tmp_path: Path) -> None:
    lines = stored_lines()
    cut = next(i for i, line in enumerate(lines) if "SCF    5 :" in line)
    (tmp_path / "aims.out").write_text("".join(lines[: cut + 1]) + SCF_FAILURE_LINE + "\n")
    outcome = read_aims_outcome(tmp_path)
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.SCF_NOT_CONVERGED
    assert "SCF cycle not converged" in outcome.message


def test_missing_output_and_wrong_atom_count_are_crashes(tmp_path: Path) -> None:
    missing = read_aims_outcome(tmp_path)
    assert isinstance(missing, LabelFailure) and missing.kind is FailureKind.CRASHED
    shutil.copy(STORED, tmp_path / "aims.out")
    wrong = read_aims_outcome(tmp_path, n_atoms=5)
    assert isinstance(wrong, LabelFailure) and "expected 5" in wrong.message


# --------------------------------------------------------------------------- whole label path


def test_label_runs_the_command_and_reads_its_output(tmp_path: Path, species_dir: Path) -> None:
    script = fake_aims(tmp_path, f"cat '{STORED}'")
    outcome = label(water(), aims_spec(script, species_dir), str(tmp_path / "run"))
    assert isinstance(outcome, LabelResult)
    assert outcome.energy == pytest.approx(STORED_ENERGY, abs=1e-8)
    np.testing.assert_allclose(outcome.forces, STORED_FORCES, atol=1e-10)
    assert not (tmp_path / "run").exists()
    kept = label(water(), aims_spec(script, species_dir, keep_workdir=True), str(tmp_path / "kept"))
    assert kept.ok
    assert {"control.in", "geometry.in", "aims.out"} <= {p.name for p in (tmp_path / "kept").iterdir()}


def test_label_classifies_a_crashed_and_an_unconverged_run(tmp_path: Path, species_dir: Path) -> None:
    crash = fake_aims(tmp_path, f"head -n 300 '{STORED}'; echo 'MPI_ABORT was invoked' >&2; exit 1")
    outcome = label(water(), aims_spec(crash, species_dir), str(tmp_path / "crash"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.CRASHED
    assert "exit code 1" in outcome.message and "MPI_ABORT" in outcome.message
    assert (tmp_path / "crash" / "aims.out").is_file()  # kept as evidence
    scf = fake_aims(tmp_path, f"head -n 300 '{STORED}'; echo '{SCF_FAILURE_LINE}'; exit 1")
    outcome = label(water(), aims_spec(scf, species_dir), str(tmp_path / "scf"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.SCF_NOT_CONVERGED


def test_periodic_inputs_ask_for_stress_and_need_a_k_grid(tmp_path: Path, species_dir: Path) -> None:
    script = fake_aims(tmp_path, f"cat '{STORED}'")
    box = water()
    box.set_cell([6.0, 6.0, 6.0])
    box.pbc = True
    no_grid = label(box, aims_spec(script, species_dir), str(tmp_path / "a"))
    assert isinstance(no_grid, LabelFailure) and "k-grid" in no_grid.message
    spec = aims_spec(script, species_dir, compute_stress=True)
    spec["parameters"]["k_grid"] = [2, 2, 2]
    outcome = label(box, spec, str(tmp_path / "b"))
    # The stored molecular output has no stress, so this label must fail rather than invent one.
    assert isinstance(outcome, LabelFailure) and "no stress" in outcome.message
    control = [line.split() for line in (tmp_path / "b" / "control.in").read_text().splitlines()]
    assert ["compute_analytical_stress", ".true."] in control and ["k_grid", "2", "2", "2"] in control


def test_timeout_kills_the_launched_program(tmp_path: Path, species_dir: Path) -> None:
    pidfile = tmp_path / "sleep.pid"
    script = fake_aims(tmp_path, f"sleep 30 &\necho $! > '{pidfile}'\nwait")
    start = time.monotonic()
    outcome = label(water(), aims_spec(script, species_dir, timeout_s=2.0), str(tmp_path / "w"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.TIMED_OUT
    assert time.monotonic() - start < 8.0
    stat_file = Path(f"/proc/{int(pidfile.read_text())}/stat")
    for _ in range(50):  # the killed 'sleep' may stay a zombie until its reaper runs
        if not stat_file.exists() or stat_file.read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the program launched by the label survived the timeout")


# --------------------------------------------------------------------------- setup checks


def test_split_command_finds_the_executable() -> None:
    assert split_command("aims.x") == (["aims.x"], "aims.x")
    assert split_command("srun -n 128 aims.x")[1] == "aims.x"
    assert split_command("mpirun -np 4 --bind-to core /opt/aims/aims.x")[1] == "/opt/aims/aims.x"


def test_check_setup_names_the_missing_executable(tmp_path: Path, species_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        check_reference_setup(aims_spec("aims.does-not-exist.x", species_dir), {1, 8})
    assert info.value.key == "reference.command" and "aims.does-not-exist.x" in str(info.value)
    script = fake_aims(tmp_path, "true")
    check_reference_setup(aims_spec(script, species_dir), {1, 8})
    if shutil.which("srun") is None:
        with pytest.raises(ConfigError, match="srun") as info:
            check_reference_setup(aims_spec(f"srun -n 4 {script}", species_dir), {1, 8})
        assert info.value.key == "reference.command"


def test_check_setup_needs_species_files(tmp_path: Path, species_dir: Path) -> None:
    script = fake_aims(tmp_path, "true")
    for folder in (None, tmp_path / "nowhere"):
        spec = aims_spec(script, species_dir)
        spec["species_dir"] = None if folder is None else str(folder)
        with pytest.raises(ConfigError) as info:
            check_reference_setup(spec, {1, 8})
        assert info.value.key == "reference.species_dir"
    with pytest.raises(ConfigError, match="06_C_default") as info:
        check_reference_setup(aims_spec(script, species_dir), {1, 6, 8})
    assert info.value.key == "reference.species_dir"
