"""CP2K reference: setup checks everywhere, and real CP2K labels on a 2-atom silicon cell.

The real-CP2K tests need Debian's ``cp2k`` package (``cp2k_shell`` on PATH). They are skipped
when it is missing on a developer machine, but never under CI (``CI=true``), where a missing
binary must fail them. One label on the tiny cell takes about a second or two; starting the
shell a few more.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from aimspax_like.config import CP2KReference, config_from_dict
from aimspax_like.errors import ConfigError
from aimspax_like.reference import FailureKind, LabelFailure, LabelResult, check_reference_setup, cp2k, label
from aimspax_like.reference.calculators import make_calculator
from aimspax_like.reference.results import SCFNotConverged

HAVE_CP2K = shutil.which("cp2k_shell") is not None
UNDER_CI = os.environ.get("CI", "").lower() == "true"
_SKIP_WITHOUT_CP2K = pytest.mark.skipif(
    not HAVE_CP2K and not UNDER_CI, reason="CP2K is not installed (apt-get install cp2k); required under CI"
)


def needs_cp2k(test: Any) -> Any:
    """Real DFT with CP2K: skipped without it, except under CI."""
    return pytest.mark.dft(_SKIP_WITHOUT_CP2K(test))

# Fast settings: minimal basis, low cutoff, Gamma point only. Not physics, but a real DFT
# energy surface whose forces and stress must be its derivatives.
TINY: dict[str, Any] = {
    "kind": "cp2k",
    "basis_set": "SZV-MOLOPT-SR-GTH",
    "cutoff_Ry": 80.0,
    "eps_scf": 1e-7,
    "compute_stress": True,
}


def tiny_spec(**changes: Any) -> dict[str, Any]:
    """A full spec as the campaign ships it (every default filled in by the config model)."""
    return CP2KReference(**{**TINY, **changes}).model_dump(mode="json")


def silicon() -> Atoms:
    """Diamond-Si primitive cell with the second atom moved off its site (non-zero forces)."""
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.positions[1] += [0.06, -0.04, 0.03]
    return atoms


# --------------------------------------------------------------------------- without CP2K


def fake_install(tmp_path: Path, basis: str = "SZV-MOLOPT-SR-GTH", potential: str = "GTH-PBE") -> dict[str, Any]:
    """A stand-in executable and data folder with Si entries: checks only, nothing runs."""
    program = tmp_path / "bin" / "cp2k.fake"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\nexit 1\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    data = tmp_path / "data"
    data.mkdir()
    (data / "BASIS_MOLOPT").write_text(f"# comment\nSi {basis} {basis}-q4\n 1\n 2 0 1 7 1 1\n  1.0 0.5 0.5\n")
    (data / "GTH_POTENTIALS").write_text(f"Si {potential}-q4 {potential}\n 2 2\n 0.44 1 -6.26\n")
    return tiny_spec(command=f"{program} --shell", data_dir=str(data))


def test_config_defaults_and_kpoints() -> None:
    spec = CP2KReference().model_dump(mode="json")
    assert spec["kind"] == "cp2k" and spec["xc"] == "PBE" and spec["basis_set"] == "DZVP-MOLOPT-SR-GTH"
    assert spec["cutoff_Ry"] == 400.0 and spec["kpoints"] is None and spec["pseudo_potential"] == "auto"
    config = config_from_dict({"system": {"structures": "x.xyz"}, "reference": {"kind": "cp2k", "kpoints": [2, 2, 2]}})
    assert isinstance(config.reference, CP2KReference) and config.reference.kpoints == [2, 2, 2]
    for bad in ([2, 2], [0, 1, 1], [2, 2, 2, 2]):
        with pytest.raises(ConfigError, match="reference"):
            config_from_dict({"system": {"structures": "x.xyz"}, "reference": {"kind": "cp2k", "kpoints": bad}})


def test_template_input_has_what_was_asked() -> None:
    template = cp2k.template_from_spec(tiny_spec(kpoints=[2, 3, 4], max_scf=7), "/data")
    text = template.input_text()
    assert "SCHEME MONKHORST-PACK 2 3 4" in text and "EPS_SCF 1.000e-07" in text
    params = template.ase_parameters()
    assert params["pseudo_potential"] == "GTH-PBE" and params["max_scf"] == 7 and params["stress_tensor"]
    assert params["basis_set_file"] == "/data/BASIS_MOLOPT" and params["cutoff"] == pytest.approx(80 * 13.605693, 1e-6)
    assert "KPOINTS" not in cp2k.template_from_spec(tiny_spec()).input_text()  # Gamma point
    assert cp2k.template_from_spec(tiny_spec(xc="BLYP")).potential_name() == "GTH-BLYP"
    assert cp2k.template_from_spec(tiny_spec(xc="PBE0")).potential_name() == "GTH-PBE"


def test_command_parsing() -> None:
    assert cp2k.CP2KProfile("srun -n 64 cp2k.psmp --shell", None).executable() == "cp2k.psmp"
    assert cp2k.CP2KProfile("srun -n 64 cp2k.psmp --shell", None).launcher() == "srun"
    assert cp2k.CP2KProfile("env OMP_NUM_THREADS=2 cp2k_shell", None).executable() == "cp2k_shell"
    assert cp2k.CP2KProfile("OMP_NUM_THREADS=2 cp2k.ssmp -s", None).executable() == "cp2k.ssmp"


def test_setup_check_names_the_key(tmp_path: Path) -> None:
    spec = fake_install(tmp_path)
    check_reference_setup(spec, {14}, [silicon()])
    cases = [
        ({"basis_set": "DZVP-NOPE"}, {14}, "reference.basis_set", "DZVP-NOPE"),
        ({}, {6}, "reference.basis_set", "for C"),
        ({"pseudo_potential": "GTH-BLYP"}, {14}, "reference.pseudo_potential", "GTH-BLYP"),
        ({"command": "cp2k.does-not-exist --shell"}, {14}, "reference.command", "not found"),
        ({"command": "srun-nope -n 4 cp2k.psmp"}, {14}, "reference.command", "not found"),
        ({"data_dir": str(tmp_path / "missing")}, {14}, "reference.data_dir", "not a folder"),
        ({"basis_set_file": "BASIS_NOPE"}, {14}, "reference.basis_set_file", "BASIS_NOPE"),
    ]
    for changes, numbers, key, text in cases:
        with pytest.raises(ConfigError, match=text) as info:
            check_reference_setup({**spec, **changes}, numbers)
        assert info.value.key == key and "\n" not in str(info.value)
    molecule = Atoms("Si2", positions=[[0, 0, 0], [2.3, 0, 0]])
    with pytest.raises(ConfigError, match="periodic cells only") as info:
        check_reference_setup(spec, {14}, [silicon(), molecule])
    assert info.value.key == "reference.kind"


def test_label_refuses_molecules_without_running_anything(tmp_path: Path) -> None:
    spec = fake_install(tmp_path)
    started = cp2k.shells_started()
    outcome = label(Atoms("Si2", positions=[[0, 0, 0], [2.3, 0, 0]]), spec, str(tmp_path / "w"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.CRASHED
    assert "periodic cells only" in outcome.message and cp2k.shells_started() == started


def test_a_shell_that_does_not_start_is_a_crash_with_a_reason(tmp_path: Path) -> None:
    spec = fake_install(tmp_path)  # its 'CP2K' exits at once
    scratch = Path(tempfile.gettempdir()).glob(f"{cp2k._scratch_prefix()}{os.getpid()}-*")
    before = set(scratch)
    outcome = label(silicon(), spec, str(tmp_path / "w"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.CRASHED
    assert "CP2K shell did not start" in outcome.message and "cp2k.fake" in outcome.message
    assert set(Path(tempfile.gettempdir()).glob(f"{cp2k._scratch_prefix()}{os.getpid()}-*")) == before


ABORT_BOX = r"""
 *******************************************************************************
 *   ___                                                                       *
 *  /   \                                                                      *
 * [ABORT]                                                                     *
 *  \___/  The requested basis set <NOPE-BASIS> for element <Si> was not found *
 *    |            in the basis set files </usr/share/cp2k/BASIS_MOLOPT>       *
 *  O/|                                                                        *
 * /| |                                                                        *
 * / \                                          aobasis/basis_set_types.F:1509 *
 *******************************************************************************
"""


def test_abort_message_is_read_from_the_box() -> None:
    assert cp2k.cp2k_error_line(ABORT_BOX) == (
        "The requested basis set <NOPE-BASIS> for element <Si> was not found "
        "in the basis set files </usr/share/cp2k/BASIS_MOLOPT>"
    )
    assert cp2k.cp2k_error_line("  *** SCF run converged in     6 steps ***") == ""


def test_scf_failure_text_is_recognised() -> None:
    assert cp2k.says_cp2k_scf_failed(" *** WARNING in qs_scf.F:601 :: SCF run NOT converged ***")
    assert not cp2k.says_cp2k_scf_failed("  *** SCF run converged in     6 steps ***")


# --------------------------------------------------------------------------- real CP2K


@pytest.fixture(scope="module")
def shells() -> Iterator[None]:
    """Every test here shares this process's pool of CP2K shells; end them afterwards."""
    yield
    cp2k.close_all_shells()


@needs_cp2k
def test_bad_basis_stops_before_anything_runs() -> None:
    started = cp2k.shells_started()
    with pytest.raises(ConfigError, match="SZV-NOT-A-BASIS") as info:
        check_reference_setup(tiny_spec(basis_set="SZV-NOT-A-BASIS"), {14}, [silicon()])
    assert info.value.key == "reference.basis_set"
    check_reference_setup(tiny_spec(), {14}, [silicon()])  # the real installation passes
    assert cp2k.shells_started() == started


@needs_cp2k
def test_forces_and_stress_are_derivatives_of_the_energy(tmp_path: Path, shells: None) -> None:
    """Energy, forces and stress from one persistent shell; one central difference checks both.

    Moving atom 1 by ``t * u`` and straining the cell by ``t * eps`` changes the energy at
    ``dE/dt = -F_1 . u + V * sum(stress * eps)`` (ASE's stress sign). Three labels on one shell:
    the later ones must not start CP2K again and are faster than the first, which did.
    """
    spec = tiny_spec()
    check_reference_setup(spec, {14}, [silicon()])
    started = cp2k.shells_started()
    atoms = silicon()
    t0 = time.monotonic()
    first = label(atoms, spec, str(tmp_path / "centre"))
    first_s = time.monotonic() - t0
    assert isinstance(first, LabelResult), first
    assert np.isfinite(first.energy) and np.isfinite(first.forces).all() and first.stress is not None
    assert np.isfinite(first.stress).all() and np.abs(first.forces).max() > 0.1
    assert cp2k.shells_started() == started + 1
    assert first.workdir is None and not (tmp_path / "centre").exists()  # scratch removed on success

    u = np.array([0.6, -0.8, 0.0])
    eps = np.array([[1.0, 0.2, 0.0], [0.2, -0.5, 0.0], [0.0, 0.0, 0.3]])
    h = 0.004
    energies, times = [], []
    for sign in (1, -1):
        moved = atoms.copy()
        moved.set_cell(atoms.cell @ (np.eye(3) + sign * h * eps), scale_atoms=True)
        moved.positions[1] += sign * h * u
        t0 = time.monotonic()
        outcome = label(moved, spec, str(tmp_path / f"moved{sign}"))
        times.append(time.monotonic() - t0)
        assert isinstance(outcome, LabelResult), outcome
        energies.append(outcome.energy)
    assert cp2k.shells_started() == started + 1  # the same CP2K process did all three
    assert min(times) < first_s

    s = first.stress
    stress = np.array([[s[0], s[5], s[4]], [s[5], s[1], s[3]], [s[4], s[3], s[2]]])
    predicted = -first.forces[1] @ u + atoms.get_volume() * np.sum(stress * eps)
    finite_difference = (energies[0] - energies[1]) / (2 * h)
    assert finite_difference == pytest.approx(predicted, rel=0.02, abs=0.02)


@needs_cp2k
def test_timeout_kills_the_shell_and_the_next_label_starts_a_new_one(tmp_path: Path, shells: None) -> None:
    spec = tiny_spec()
    warm = label(silicon(), spec, str(tmp_path / "warm"))  # make sure a shell is idle in the pool
    assert isinstance(warm, LabelResult), warm
    idle = cp2k._POOL.take(cp2k.spec_key(spec))
    assert idle is not None and idle.pid is not None
    pid = idle.pid
    cp2k._POOL.give_back(idle)
    started = cp2k.shells_started()
    moved = silicon()
    moved.positions[0] += [0.1, 0.0, -0.1]  # a new geometry, so CP2K has an SCF to run
    t0 = time.monotonic()
    outcome = label(moved, {**spec, "timeout_s": 0.2}, str(tmp_path / "late"))
    assert time.monotonic() - t0 < 10
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.TIMED_OUT, outcome
    assert (tmp_path / "late").is_dir()  # kept as evidence
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the shell is gone, not left running
    again = label(moved, spec, str(tmp_path / "again"))
    assert isinstance(again, LabelResult), again
    assert cp2k.shells_started() == started + 1


@needs_cp2k
def test_scf_not_converged_is_typed(tmp_path: Path, shells: None) -> None:
    spec = tiny_spec(max_scf=1, keep_workdir=True)
    outcome = label(silicon(), spec, str(tmp_path / "scf"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.SCF_NOT_CONVERGED, outcome
    assert "not converged" in outcome.message.lower()
    assert "SCF run NOT converged" in (tmp_path / "scf" / cp2k.OUTPUT_NAME).read_text()
    calc = make_calculator(spec, tmp_path / "md")  # the reference-driven MD path raises instead
    atoms = silicon()
    atoms.calc = calc
    with pytest.raises(SCFNotConverged):
        atoms.get_potential_energy()


@needs_cp2k
def test_large_cell_change_rebuilds_the_grid(tmp_path: Path, shells: None) -> None:
    """A 1% strain reuses the force environment; 8% builds a new one (its header is printed)."""
    spec = tiny_spec(keep_workdir=True)
    marker = "GLOBAL| Force Environment number"
    base = silicon()
    texts = []
    for name, scale in (("start", 1.0), ("small", 1.01), ("large", 1.08)):
        atoms = base.copy()
        atoms.set_cell(base.cell * scale, scale_atoms=True)
        outcome = label(atoms, spec, str(tmp_path / name))
        assert isinstance(outcome, LabelResult), outcome
        texts.append((tmp_path / name / cp2k.OUTPUT_NAME).read_text())
    assert marker not in texts[1] and "SCF run converged" in texts[1]
    assert marker in texts[2] and "SCF run converged" in texts[2]


def test_scratch_of_dead_workers_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cp2k.tempfile, "gettempdir", lambda: str(tmp_path))
    dead_pid = 4_194_305  # above the largest pid Linux can hand out (2**22)
    prefix = cp2k._scratch_prefix()
    dead = tmp_path / f"{prefix}{dead_pid}-abc"
    mine = tmp_path / f"{prefix}{os.getpid()}-abc"
    other_host = tmp_path / f"aimspax-cp2k-elsewhere-{dead_pid}-abc"
    for folder in (dead, mine, other_host):
        folder.mkdir()
    cp2k._remove_orphaned_scratch()
    assert not dead.exists() and mine.exists() and other_host.exists()


def test_a_campaign_on_a_molecule_with_cp2k_is_refused_before_it_starts(tmp_path: Path) -> None:
    from ase.build import molecule
    from ase.io import write

    from aimspax_like.campaign import check_inputs
    from aimspax_like.config import config_from_dict
    from aimspax_like.errors import ConfigError

    write(tmp_path / "water.xyz", molecule("H2O"))
    config = config_from_dict({"system": {"structures": str(tmp_path / "water.xyz")},
                               "reference": {"kind": "cp2k", "command": "no-such-cp2k-shell"},
                               "output": {"directory": str(tmp_path / "run")}})
    with pytest.raises(ConfigError, match="periodic cells only"):
        check_inputs(config)
    assert not (tmp_path / "run").exists()
