"""Warm label workers: the kept PySCF calculator restarts from the last density, the persistent
label server is killed (with its process group) on a timeout and replaced cold, failures never
leave warm state behind, and ``warm: false`` is cold every label. Real PySCF, tiny molecules."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as tests/test_reference.py: before PySCF loads

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import Calculator, all_changes

from aimspax_like.config import PySCFReference
from aimspax_like.reference import FailureKind, LabelFailure, LabelResult, label, warm_worker
from aimspax_like.reference.pyscf_calc import PySCFCalculator
from aimspax_like.reference.warm_worker import label_calculator, servers_started

HERE = __name__  # for the 'import' kind (module:Name)
SPEC: dict[str, Any] = {"kind": "pyscf", "xc": "PBE", "basis": "6-31g", "conv_tol": 1e-9}
_DIRECTION = np.random.default_rng(11).normal(size=(3, 3))


def water(step: int) -> Atoms:
    """Frame ``step`` of a smooth path: every atom moves about 0.02 A per step."""
    atoms = molecule("H2O")
    atoms.positions += 0.02 * step * _DIRECTION / np.linalg.norm(_DIRECTION, axis=1, keepdims=True)
    return atoms


def cold_cycles(atoms: Atoms, spec: dict[str, Any] = SPEC) -> int:
    """SCF iterations from PySCF's default guess, on a fresh calculator in this process."""
    calc = PySCFCalculator(warm=False, **{k: v for k, v in spec.items() if k in ("xc", "basis", "conv_tol")})
    probe = atoms.copy()
    probe.calc = calc
    probe.get_potential_energy()
    assert calc.scf_cycles is not None and calc.scf_cycles > 0
    return calc.scf_cycles


@pytest.fixture(autouse=True)
def _fresh_worker() -> Iterator[None]:
    """Every test starts as a fresh worker: no kept calculator, no idle label server."""
    warm_worker.forget_calculators()
    warm_worker.close_all_servers()
    yield
    warm_worker.forget_calculators()
    warm_worker.close_all_servers()


class SpawnsAndHangs(Calculator):
    """Starts a grandchild (as an MPI launcher would), notes its pid, then hangs."""

    implemented_properties: ClassVar[list[str]] = ["energy", "forces"]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        child = subprocess.Popen(["sleep", "60"])
        Path(self.directory, "grandchild.pid").write_text(str(child.pid))
        time.sleep(60)


class DiesCalculator(Calculator):
    implemented_properties: ClassVar[list[str]] = ["energy", "forces"]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        os._exit(3)  # a segfault inside a compiled backend


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead (a container's init may be slow to reap it)


# --------------------------------------------------------------------------- warm starts


@pytest.mark.parametrize("timeout_s", [None, 60.0], ids=["in-process", "label-server"])
def test_warm_second_label_needs_fewer_cycles_and_agrees_with_cold(tmp_path: Path, timeout_s: float | None) -> None:
    spec = {**SPEC, "timeout_s": timeout_s}
    started = servers_started()
    first = label(water(0), spec, str(tmp_path / "a"))
    warm = label(water(1), spec, str(tmp_path / "b"))
    cold = label(water(1), {**spec, "warm": False}, str(tmp_path / "c"))
    assert isinstance(first, LabelResult) and isinstance(warm, LabelResult) and isinstance(cold, LabelResult)
    assert first.scf_cycles == cold_cycles(water(0))  # a worker's first label is cold
    assert cold.scf_cycles == cold_cycles(water(1))
    assert warm.scf_cycles is not None and warm.scf_cycles < cold.scf_cycles
    assert warm.energy == pytest.approx(cold.energy, abs=1e-6)
    np.testing.assert_allclose(warm.forces, cold.forces, atol=1e-4)
    # With a timeout both warm labels ran on one label server; the cold one in a fresh child.
    assert servers_started() == started + (1 if timeout_s else 0)


def test_other_molecule_or_atom_order_starts_cold(tmp_path: Path) -> None:
    spec = {**SPEC, "timeout_s": 60.0}
    assert label(water(0), spec, str(tmp_path / "w")).ok
    ammonia = molecule("NH3")
    other = label(ammonia, spec, str(tmp_path / "n"))
    assert isinstance(other, LabelResult) and other.scf_cycles == cold_cycles(ammonia)
    # Same elements, other order: another AO basis order, so no reuse either.
    assert label(water(0), spec, str(tmp_path / "w2")).ok
    swapped = water(1)[[1, 0, 2]]
    reordered = label(swapped, spec, str(tmp_path / "s"))
    assert isinstance(reordered, LabelResult) and reordered.scf_cycles == cold_cycles(swapped)
    # ... and another basis set is another calculator altogether.
    sto = {**spec, "basis": "sto-3g"}
    fresh = label(water(2), sto, str(tmp_path / "b"))
    assert isinstance(fresh, LabelResult) and fresh.scf_cycles == cold_cycles(water(2), sto)


def test_a_warm_start_that_does_not_converge_is_retried_cold() -> None:
    calc = PySCFCalculator(xc="PBE", basis="6-31g", max_cycle=9)
    first = water(0)
    first.calc = calc
    first.get_potential_energy()
    assert calc.scf_cycles == cold_cycles(water(0)) and not calc.warm_started
    calc._density = 3.0 * calc._density  # a guess with three times the electrons: 13 cycles
    moved = water(1)
    moved.calc = calc
    energy = moved.get_potential_energy()
    reference = water(1)
    reference.calc = PySCFCalculator(xc="PBE", basis="6-31g", warm=False)
    assert energy == pytest.approx(reference.get_potential_energy(), abs=1e-6)
    assert not calc.warm_started and calc.scf_cycles == 9 + cold_cycles(water(1))
    # The converged cold density is kept: the next frame starts warm again.
    again = water(2)
    again.calc = calc
    again.get_potential_energy()
    assert calc.warm_started and calc.scf_cycles < cold_cycles(water(2))


def test_kept_calculators_are_per_thread_and_spec_and_off_with_warm_false() -> None:
    mine = label_calculator(SPEC, "/tmp")
    assert label_calculator(SPEC, "/tmp") is mine
    assert label_calculator({**SPEC, "timeout_s": 30.0}, "/tmp") is mine  # limits do not matter
    assert label_calculator({**SPEC, "basis": "sto-3g"}, "/tmp") is not mine
    other: list[Any] = []
    thread = threading.Thread(target=lambda: other.append(label_calculator(SPEC, "/tmp")))
    thread.start()
    thread.join()
    assert other[0] is not mine
    cold = {**SPEC, "warm": False}
    assert label_calculator(cold, "/tmp") is not label_calculator(cold, "/tmp")
    assert label_calculator({"kind": "emt"}, "/tmp") is not label_calculator({"kind": "emt"}, "/tmp")


# --------------------------------------------------------------------------- failures


def test_timeout_kills_the_server_group_and_the_next_label_is_cold(tmp_path: Path) -> None:
    spec = {**SPEC, "timeout_s": 60.0}
    assert label(water(0), spec, str(tmp_path / "a")).ok
    started = servers_started()
    start = time.monotonic()
    hung = label(water(1), {**spec, "timeout_s": 1.5}, str(tmp_path / "h"), faults={"hang": 1.0, "hang_s": 30.0})
    assert isinstance(hung, LabelFailure) and hung.kind is FailureKind.TIMED_OUT
    assert 1.5 <= hung.wall_s < 5.0 and time.monotonic() - start < 5.0
    after = label(water(1), spec, str(tmp_path / "b"))
    assert isinstance(after, LabelResult) and after.scf_cycles == cold_cycles(water(1))
    assert servers_started() == started + 1  # the hung one was killed, a new one took over
    # A hung calculator's own child processes die with it: the whole group is killed.
    spawner = {"kind": "import", "path": f"{HERE}:SpawnsAndHangs", "timeout_s": 2.0}
    outcome = label(water(0), spawner, str(tmp_path / "s"))
    assert isinstance(outcome, LabelFailure) and outcome.kind is FailureKind.TIMED_OUT
    grandchild = int((tmp_path / "s" / "grandchild.pid").read_text())
    deadline = time.monotonic() + 5.0
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_failures_do_not_poison_the_next_label(tmp_path: Path) -> None:
    spec = {**SPEC, "timeout_s": 60.0}
    assert label(water(0), spec, str(tmp_path / "a")).ok
    started = servers_started()
    crashed = label(water(1), spec, str(tmp_path / "c"), faults={"crash": 1.0})
    assert isinstance(crashed, LabelFailure) and crashed.kind is FailureKind.CRASHED
    after = label(water(1), spec, str(tmp_path / "b"))
    assert isinstance(after, LabelResult) and after.scf_cycles == cold_cycles(water(1))
    assert servers_started() == started  # a Python-level failure keeps the server, not its state
    # A label that kills the server is a crash with its exit code; the next label gets a new one.
    dying = label(water(1), {"kind": "import", "path": f"{HERE}:DiesCalculator", "timeout_s": 60.0},
                  str(tmp_path / "d"))
    assert isinstance(dying, LabelFailure) and dying.kind is FailureKind.CRASHED
    assert "exit code 3" in dying.message
    again = label(water(2), spec, str(tmp_path / "e"))
    assert isinstance(again, LabelResult) and again.scf_cycles == cold_cycles(water(2))
    assert servers_started() == started + 1
    # In-process (no timeout) the same: an injected SCF failure drops the kept calculator.
    assert label(water(0), SPEC, str(tmp_path / "f")).ok
    failed = label(water(1), SPEC, str(tmp_path / "g"), faults={"scf_failure": 1.0})
    assert isinstance(failed, LabelFailure) and failed.kind is FailureKind.SCF_NOT_CONVERGED
    cold = label(water(1), SPEC, str(tmp_path / "h"))
    assert isinstance(cold, LabelResult) and cold.scf_cycles == cold_cycles(water(1))


def test_warm_false_is_cold_every_label(tmp_path: Path) -> None:
    spec = PySCFReference(basis="6-31g", timeout_s=60.0, warm=False).model_dump(mode="json")
    assert spec["warm"] is False
    started = servers_started()
    outcomes = [label(water(step), spec, str(tmp_path / f"l{step}")) for step in range(2)]
    assert all(isinstance(o, LabelResult) for o in outcomes)
    assert [o.scf_cycles for o in outcomes] == [cold_cycles(water(s), spec) for s in range(2)]
    assert servers_started() == started  # a fresh child per label, as before warm workers
    assert PySCFReference().warm is True
