"""Reference labels: numbers against the backends themselves, failure classification, faults."""

from __future__ import annotations

import os

# tblite and PySCF start one OpenMP thread per core; on a shared 2-core test machine the
# spinning threads of an oversubscribed OpenMP pool make each 10 ms xTB call take seconds.
# Must be set before either library is loaded; an explicit user setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from aimspax_like.errors import ConfigError, SetupError
from aimspax_like.reference import (
    FailureKind,
    LabelFailure,
    LabelResult,
    check_reference_setup,
    label,
    make_calculator,
    supported_elements,
)
from aimspax_like.reference.results import SCFNotConverged, classify_exception

# Our own module, for the 'import' kind ('module:Name'); pytest decides its import name.
HERE = __name__


def cu_cluster() -> Atoms:
    """Six Cu atoms off a lattice, so every force component is non-zero."""
    rng = np.random.default_rng(7)
    base = np.array([[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5], [2.5, 2.5, 0], [1.2, 1.2, 2.0]])
    return Atoms("Cu6", positions=base + rng.normal(scale=0.1, size=base.shape))


def fd_forces(atoms: Atoms, spec: dict[str, Any], parts: list[tuple[int, int]], h: float) -> np.ndarray:
    """Central differences of the reference energy, for the chosen (atom, axis) components."""
    out = []
    for i, k in parts:
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[i, k] += sign * h
            moved.calc = make_calculator(spec, ".")
            energies.append(moved.get_potential_energy())
        out.append(-(energies[0] - energies[1]) / (2 * h))
    return np.array(out)


# --------------------------------------------------------------------------- calculators the
# tests import through the 'import' kind (module:Name, like a user's own calculator)


class ExplodingCalculator(Calculator):
    implemented_properties: ClassVar[list[str]] = ["energy", "forces"]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        raise ValueError("boom: basis set file unreadable\nsecond line")


class NaNCalculator(Calculator):
    implemented_properties: ClassVar[list[str]] = ["energy", "forces"]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": float("nan"), "forces": np.zeros((len(self.atoms), 3))}


class DyingCalculator(Calculator):
    implemented_properties: ClassVar[list[str]] = ["energy", "forces"]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        os._exit(3)  # stands for a segfault inside a compiled backend


def not_a_calculator() -> dict[str, float]:
    return {"energy": 0.0}


# --------------------------------------------------------------------------- import weight


def test_label_module_imports_no_heavy_packages() -> None:
    code = (
        "import aimspax_like.reference.label, aimspax_like.reference, sys; "
        "heavy = ('torch', 'mace', 'e3nn', 'parsl', 'tblite', 'pyscf'); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------- values


def test_emt_cluster_matches_ase_emt(tmp_path: Path) -> None:
    atoms = cu_cluster()
    outcome = label(atoms, {"kind": "emt"}, str(tmp_path / "w"))
    assert isinstance(outcome, LabelResult) and outcome.ok
    direct = atoms.copy()
    direct.calc = EMT()
    assert outcome.energy == pytest.approx(direct.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(outcome.forces, direct.get_forces(), atol=1e-12)
    assert np.abs(outcome.forces).min() > 1e-4  # a real test: no component vanishes by symmetry
    assert outcome.stress is None
    assert atoms.calc is None  # the caller's atoms are not touched


def test_constraints_and_attached_calculator_are_ignored(tmp_path: Path) -> None:
    atoms = cu_cluster()
    atoms.set_constraint(FixAtoms(indices=[0]))
    atoms.calc = ExplodingCalculator()  # e.g. the MLIP used for MD; must not be used or pickled
    outcome = label(atoms, {"kind": "emt", "timeout_s": 30}, str(tmp_path / "w"))
    assert isinstance(outcome, LabelResult)
    raw = Atoms(atoms.numbers, atoms.positions, calculator=EMT())
    np.testing.assert_allclose(outcome.forces, raw.get_forces(), atol=1e-12)
    assert np.linalg.norm(outcome.forces[0]) > 1e-3


def test_lj_forces_match_finite_differences(tmp_path: Path) -> None:
    spec = {"kind": "lj", "sigma": 1.1, "epsilon": 0.7, "rc": 3.0, "smooth": True}
    rng = np.random.default_rng(3)
    atoms = Atoms("Ar4", positions=[[0, 0, 0], [1.2, 0, 0], [0, 1.3, 0], [0.1, 0.2, 1.25]])
    atoms.positions += rng.normal(scale=0.05, size=(4, 3))
    outcome = label(atoms, spec, str(tmp_path / "w"))
    assert isinstance(outcome, LabelResult)
    parts = [(i, k) for i in range(4) for k in range(3)]
    np.testing.assert_allclose(outcome.forces.ravel(), fd_forces(atoms, spec, parts, 1e-5), atol=1e-6)


def test_stress_for_periodic_cu_matches_strain_derivative(tmp_path: Path) -> None:
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms.rattle(0.05, seed=1)
    spec = {"kind": "emt", "compute_stress": True}
    outcome = label(atoms, spec, str(tmp_path / "w"))
    assert isinstance(outcome, LabelResult) and outcome.stress is not None
    direct = atoms.copy()
    direct.calc = EMT()
    np.testing.assert_allclose(outcome.stress, direct.get_stress(voigt=True), atol=1e-12)
    # sigma_xx = dE/d(eps_xx) / V, by central differences of a homogeneous strain.
    eps, energies = 1e-5, []
    for sign in (1, -1):
        strained = atoms.copy()
        strain = np.eye(3)
        strain[0, 0] += sign * eps
        strained.set_cell(atoms.cell @ strain, scale_atoms=True)
        strained.calc = EMT()
        energies.append(strained.get_potential_energy())
    expected = (energies[0] - energies[1]) / (2 * eps) / atoms.get_volume()
    assert outcome.stress[0] == pytest.approx(expected, abs=1e-6)
    # Not asked, or not periodic: no stress.
    assert label(atoms, {"kind": "emt"}, str(tmp_path / "a")).stress is None
    assert label(cu_cluster(), spec, str(tmp_path / "b")).stress is None


def test_xtb_water_matches_tblite_and_finite_differences(tmp_path: Path) -> None:
    from tblite.ase import TBLite

    atoms = molecule("H2O")
    atoms.positions[1] += [0.02, -0.03, 0.05]
    spec = {"kind": "xtb", "method": "GFN2-xTB", "accuracy": 1.0, "electronic_temperature": 300.0,
            "max_iterations": 250, "charge": 0, "multiplicity": 1}
    outcome = label(atoms, spec, str(tmp_path / "w"))
    assert isinstance(outcome, LabelResult)
    direct = atoms.copy()
    direct.calc = TBLite(method="GFN2-xTB", verbosity=0)
    assert outcome.energy == pytest.approx(direct.get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose(outcome.forces, direct.get_forces(), atol=1e-8)
    parts = [(i, k) for i in range(3) for k in range(3)]
    np.testing.assert_allclose(outcome.forces.ravel(), fd_forces(atoms, spec, parts, 1e-4), atol=1e-3)


def test_pyscf_pbe_matches_pyscf_directly(tmp_path: Path) -> None:
    from ase.units import Bohr, Hartree
    from pyscf import dft, gto

    atoms = Atoms("H2", positions=[[0, 0, 0], [0.05, 0.02, 0.78]])
    spec = {"kind": "pyscf", "xc": "PBE", "basis": "sto-3g", "conv_tol": 1e-10}
    outcome = label(atoms, spec, str(tmp_path / "w"))
    assert isinstance(outcome, LabelResult)
    mol = gto.M(atom=[("H", tuple(p)) for p in atoms.positions], basis="sto-3g", unit="Angstrom", verbose=0)
    mf = dft.RKS(mol)
    mf.xc = "PBE"
    mf.conv_tol = 1e-10
    energy = mf.kernel()
    gradient = mf.nuc_grad_method().kernel()
    assert outcome.energy == pytest.approx(energy * Hartree, abs=1e-6)
    np.testing.assert_allclose(outcome.forces, -gradient * Hartree / Bohr, atol=1e-5)


def test_pyscf_hartree_fock_water_forces_match_finite_differences(tmp_path: Path) -> None:
    atoms = molecule("H2O")
    atoms.positions[2] += [0.0, 0.04, -0.03]
    spec = {"kind": "pyscf", "xc": "HF", "basis": "sto-3g", "conv_tol": 1e-11}
    outcome = label(atoms, spec, str(tmp_path / "w"))
    assert isinstance(outcome, LabelResult)
    parts = [(0, 2), (1, 1), (2, 2)]
    got = outcome.forces[[p[0] for p in parts], [p[1] for p in parts]]
    np.testing.assert_allclose(got, fd_forces(atoms, spec, parts, 1e-4), atol=1e-4)
    assert np.abs(got).max() > 0.1


def test_pyscf_open_shell_uses_unrestricted_scf(tmp_path: Path) -> None:
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 1.05]])
    spec = {"kind": "pyscf", "xc": "HF", "basis": "sto-3g", "charge": 1, "spin": 1, "conv_tol": 1e-11}
    outcome = label(atoms, spec, str(tmp_path / "w"))
    assert isinstance(outcome, LabelResult)
    np.testing.assert_allclose(outcome.forces[1, 2], fd_forces(atoms, spec, [(1, 2)], 1e-4)[0], atol=1e-4)


def test_pyscf_refuses_periodic_cells(tmp_path: Path) -> None:
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=[5, 5, 5], pbc=True)
    outcome = label(atoms, {"kind": "pyscf", "basis": "sto-3g"}, str(tmp_path / "w"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.CRASHED
    assert "molecules only" in outcome.message


# --------------------------------------------------------------------------- failures


def test_scf_failures_are_classified(tmp_path: Path) -> None:
    water = molecule("H2O")
    pyscf_out = label(water, {"kind": "pyscf", "basis": "sto-3g", "max_cycle": 1}, str(tmp_path / "p"))
    xtb_out = label(water, {"kind": "xtb", "max_iterations": 1}, str(tmp_path / "x"))
    for outcome, folder in ((pyscf_out, "p"), (xtb_out, "x")):
        assert isinstance(outcome, LabelFailure)
        assert outcome.kind is FailureKind.SCF_NOT_CONVERGED
        assert outcome.workdir == str(tmp_path / folder) and Path(outcome.workdir).is_dir()
        assert "\n" not in outcome.message
    assert "SCF not converged in 1 cycles" in xtb_out.message  # tblite's own text


def test_classification_of_messages() -> None:
    assert classify_exception(SCFNotConverged("x"))[0] is FailureKind.SCF_NOT_CONVERGED
    tblite_text = RuntimeError("SCF not converged in 250 cycles")
    assert classify_exception(tblite_text)[0] is FailureKind.SCF_NOT_CONVERGED
    routine = RuntimeError("Self-consistency cycle not yet converged - restarting mixer")
    assert classify_exception(routine)[0] is FailureKind.CRASHED
    kind, message = classify_exception(KeyError("positions"))
    assert kind is FailureKind.CRASHED and message == "KeyError: 'positions'"


def test_crashing_calculator_is_classified_crashed(tmp_path: Path) -> None:
    spec = {"kind": "import", "path": f"{HERE}:ExplodingCalculator"}
    outcome = label(cu_cluster(), spec, str(tmp_path / "w"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.CRASHED
    assert outcome.message == "ValueError: boom: basis set file unreadable"


def test_non_finite_results_are_invalid_and_never_retried(tmp_path: Path) -> None:
    from aimspax_like.events import EventLog
    from aimspax_like.labelling import Labeller

    outcome = label(cu_cluster(), {"kind": "import", "path": f"{HERE}:NaNCalculator"}, str(tmp_path / "w"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.INVALID_RESULT
    assert "non-finite" in outcome.message
    assert not Labeller(None, {}, tmp_path, EventLog(None), crashed_retries=3).may_retry(outcome, 0)


def test_import_kind_builds_calculators_with_kwargs_and_rejects_others(tmp_path: Path) -> None:
    calc = make_calculator({"kind": "import", "path": "ase.calculators.lj:LennardJones",
                            "kwargs": {"sigma": 2.0}}, tmp_path)
    assert calc.parameters["sigma"] == 2.0
    with pytest.raises(SetupError, match="not an ASE calculator"):
        make_calculator({"kind": "import", "path": f"{HERE}:not_a_calculator"}, tmp_path)
    outcome = label(cu_cluster(), {"kind": "import", "path": f"{HERE}:not_a_calculator"}, str(tmp_path / "w"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.CRASHED


def test_hang_with_timeout_is_timed_out_quickly(tmp_path: Path) -> None:
    start = time.monotonic()
    outcome = label(cu_cluster(), {"kind": "emt", "timeout_s": 1.0}, str(tmp_path / "w"),
                    faults={"hang": 1.0, "hang_s": 30.0})
    elapsed = time.monotonic() - start
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.TIMED_OUT
    assert 1.0 <= outcome.wall_s < 5.0 and elapsed < 5.0
    assert Path(outcome.workdir or "").is_dir()


def test_timeout_child_returns_the_same_numbers(tmp_path: Path) -> None:
    atoms = cu_cluster()
    inside = label(atoms, {"kind": "emt"}, str(tmp_path / "a"))
    child = label(atoms, {"kind": "emt", "timeout_s": 60}, str(tmp_path / "b"))
    assert isinstance(inside, LabelResult) and isinstance(child, LabelResult)
    assert child.energy == inside.energy
    np.testing.assert_array_equal(child.forces, inside.forces)
    assert not (tmp_path / "b").exists()


def test_child_that_dies_is_a_crash(tmp_path: Path) -> None:
    spec = {"kind": "import", "path": f"{HERE}:DyingCalculator", "timeout_s": 60}
    outcome = label(cu_cluster(), spec, str(tmp_path / "w"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.CRASHED
    assert "exit code 3" in outcome.message


# --------------------------------------------------------------------------- faults


def test_fault_rates_follow_the_requested_probabilities(tmp_path: Path) -> None:
    faults = {"scf_failure": 0.2, "crash": 0.1, "hang": 0.0, "hang_s": 1.0, "delay_s": 0.0}
    atoms = cu_cluster()
    kinds = []
    for seed in range(200):
        outcome = label(atoms, {"kind": "emt"}, str(tmp_path / f"l{seed}"), faults=faults, seed=seed)
        kinds.append(outcome.kind.value if isinstance(outcome, LabelFailure) else "ok")
    counts = {k: kinds.count(k) for k in ("scf_not_converged", "crashed", "ok")}
    # Binomial(200, p): 4 standard deviations are about 23, 17 and 26 labels.
    assert abs(counts["scf_not_converged"] - 40) <= 23
    assert abs(counts["crashed"] - 20) <= 17
    assert abs(counts["ok"] - 140) <= 26
    again = label(atoms, {"kind": "emt"}, str(tmp_path / "again"), faults=faults, seed=5)
    assert (again.kind.value if isinstance(again, LabelFailure) else "ok") == kinds[5]
    crashed = next(s for s, k in enumerate(kinds) if k == "crashed")
    failure = label(atoms, {"kind": "emt"}, str(tmp_path / "c"), faults=faults, seed=crashed)
    assert isinstance(failure, LabelFailure) and failure.message == "RuntimeError: injected crash"


def test_delay_stands_for_reference_cost(tmp_path: Path) -> None:
    outcome = label(cu_cluster(), {"kind": "emt"}, str(tmp_path / "w"), faults={"delay_s": 0.3})
    assert isinstance(outcome, LabelResult) and outcome.wall_s >= 0.3


# --------------------------------------------------------------------------- workdirs, pickling


def test_workdir_removed_on_success_kept_on_failure(tmp_path: Path) -> None:
    ok = label(cu_cluster(), {"kind": "emt"}, str(tmp_path / "deep" / "ok"))
    assert ok.ok and ok.workdir is None and not (tmp_path / "deep" / "ok").exists()
    kept = label(cu_cluster(), {"kind": "emt", "keep_workdir": True}, str(tmp_path / "kept"))
    assert kept.ok and kept.workdir == str(tmp_path / "kept") and (tmp_path / "kept").is_dir()
    bad = label(cu_cluster(), {"kind": "emt"}, str(tmp_path / "bad"), faults={"crash": 1.0})
    assert not bad.ok and bad.workdir == str(tmp_path / "bad") and (tmp_path / "bad").is_dir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the caller's file")
    assert label(cu_cluster(), {"kind": "emt"}, str(mine)).ok
    assert (mine / "notes.txt").read_text() == "the caller's file"


def test_failure_workdir_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    failure = label(cu_cluster(), {"kind": "emt"}, "rel/w", faults={"scf_failure": 1.0})
    assert failure.workdir == str(tmp_path / "rel" / "w")


def test_outcomes_survive_pickling() -> None:
    result = LabelResult(-1.5, np.arange(6.0).reshape(2, 3), np.arange(6.0), "/tmp/x", 2.5)
    failure = LabelFailure(FailureKind.TIMED_OUT, "no result\nafter 5 s", None, 5.0)
    r2, f2 = pickle.loads(pickle.dumps(result)), pickle.loads(pickle.dumps(failure))
    assert r2.ok and r2.energy == -1.5 and r2.workdir == "/tmp/x" and r2.wall_s == 2.5
    np.testing.assert_array_equal(r2.forces, result.forces)
    np.testing.assert_array_equal(r2.stress, result.stress)
    assert not f2.ok and f2 == failure and f2.kind is FailureKind.TIMED_OUT
    assert failure.message == "no result"  # one line by construction


# --------------------------------------------------------------------------- setup checks


def test_supported_elements() -> None:
    emt = supported_elements({"kind": "emt"})
    assert emt is not None and {1, 6, 7, 8, 13, 28, 29, 46, 47, 78, 79} == set(emt)
    assert supported_elements({"kind": "xtb"}) == frozenset(range(1, 87))
    for kind in ("lj", "pyscf", "aims", "import"):
        assert supported_elements({"kind": kind}) is None


def test_check_reference_setup_rejects_unsupported_elements() -> None:
    check_reference_setup({"kind": "emt"}, {29, 8})
    with pytest.raises(ConfigError) as info:
        check_reference_setup({"kind": "emt"}, {29, 3})
    assert info.value.key == "reference.kind" and "EMT cannot label Li" in str(info.value)
    with pytest.raises(ConfigError, match="GFN2-xTB cannot label Fr"):
        check_reference_setup({"kind": "xtb", "method": "GFN2-xTB"}, {1, 87})


def test_check_reference_setup_reports_missing_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    check_reference_setup({"kind": "xtb"}, {1, 8})
    check_reference_setup({"kind": "pyscf"}, {1, 8})
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pyscf" else real(name, *a)
    )
    with pytest.raises(ConfigError) as info:
        check_reference_setup({"kind": "pyscf"}, {1, 8})
    assert info.value.key == "reference.kind" and "pyscf" in str(info.value)


def test_check_reference_setup_checks_import_paths() -> None:
    check_reference_setup({"kind": "import", "path": "ase.calculators.emt:EMT"}, {29})
    for path in ("no_such_module_xyz:Calc", "ase.calculators.emt:NoSuchCalc"):
        with pytest.raises(ConfigError) as info:
            check_reference_setup({"kind": "import", "path": path}, {29})
        assert info.value.key == "reference.path"
