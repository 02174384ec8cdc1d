"""Label executors: Parsl workers give the same outcomes as in-process ASE, in parallel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.emt import EMT
from ase.cluster import Icosahedron, Octahedron

from aimspax_like.config import LocalCluster
from aimspax_like.errors import ConfigError
from aimspax_like.execution import (
    LabelExecutor,
    ParslLabelExecutor,
    ThreadLabelExecutor,
    make_label_executor,
)
from aimspax_like.reference.results import FailureKind, LabelFailure, LabelResult

EMT_SPEC = {"kind": "emt"}


def _clusters() -> list[Atoms]:
    rng = np.random.default_rng(0)
    clusters = [
        Icosahedron("Cu", 2),
        Octahedron("Cu", 3),
        Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0]]),
    ]
    for atoms in clusters:
        atoms.rattle(0.05, rng=rng)
    return clusters


def _direct_emt(atoms: Atoms) -> tuple[float, np.ndarray]:
    atoms = atoms.copy()
    atoms.calc = EMT()
    return atoms.get_potential_energy(), atoms.get_forces()


def _label_all(executor: LabelExecutor, tmp_path: Path) -> list[LabelResult | LabelFailure]:
    futures = [executor.submit(a, EMT_SPEC, str(tmp_path / f"l{i}")) for i, a in enumerate(_clusters())]
    return [f.result(timeout=60) for f in futures]


def _assert_match_direct_emt(outcomes: list[LabelResult | LabelFailure]) -> None:
    for atoms, outcome in zip(_clusters(), outcomes, strict=True):
        assert isinstance(outcome, LabelResult), outcome
        energy, forces = _direct_emt(atoms)
        assert outcome.energy == pytest.approx(energy, abs=1e-10)
        np.testing.assert_allclose(outcome.forces, forces, atol=1e-10)


def test_parsl_emt_labels_equal_direct_ase(parsl_executor: ParslLabelExecutor, tmp_path: Path) -> None:
    _assert_match_direct_emt(_label_all(parsl_executor, tmp_path))


def test_thread_executor_gives_the_same_outcomes(tmp_path: Path) -> None:
    with ThreadLabelExecutor(max_workers=2) as executor:
        _assert_match_direct_emt(_label_all(executor, tmp_path))


def test_labels_run_in_parallel_worker_processes(parsl_executor: ParslLabelExecutor, tmp_path: Path) -> None:
    atoms = Icosahedron("Cu", 2)
    start = time.perf_counter()
    futures = [
        parsl_executor.submit(atoms, EMT_SPEC, str(tmp_path / f"slow{i}"), faults={"delay_s": 2.0})
        for i in range(2)
    ]
    assert time.perf_counter() - start < 0.5, "submit must not wait for the label"
    outcomes = [f.result(timeout=30) for f in futures]
    wall = time.perf_counter() - start
    assert all(isinstance(o, LabelResult) for o in outcomes), outcomes
    assert wall < 3.5, f"two 2 s labels took {wall:.1f} s: they did not overlap"
    # Not this process: the workers are separate processes.
    pids = {parsl_executor.probe().result(timeout=30)["pid"] for _ in range(4)}
    assert os.getpid() not in pids


def test_failed_label_is_a_result_not_an_exception(
    parsl_executor: ParslLabelExecutor, tmp_path: Path
) -> None:
    future = parsl_executor.submit(
        Icosahedron("Cu", 2), EMT_SPEC, str(tmp_path / "fail"), faults={"scf_failure": 1.0}, seed=1
    )
    outcome = future.result(timeout=30)
    assert isinstance(outcome, LabelFailure)
    assert outcome.kind is FailureKind.SCF_NOT_CONVERGED


def test_wait_first_completed_and_callbacks(parsl_executor: ParslLabelExecutor, tmp_path: Path) -> None:
    atoms = Icosahedron("Cu", 2)
    slow = parsl_executor.submit(atoms, EMT_SPEC, str(tmp_path / "slow"), faults={"delay_s": 3.0})
    fast = parsl_executor.submit(atoms, EMT_SPEC, str(tmp_path / "fast"))
    seen: list[Future] = []
    fast.add_done_callback(seen.append)
    done, not_done = wait([slow, fast], timeout=30, return_when=FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    assert seen == [fast]
    assert isinstance(slow.result(timeout=30), LabelResult)


def test_submit_snapshots_the_atoms(parsl_executor: ParslLabelExecutor, tmp_path: Path) -> None:
    atoms = Icosahedron("Cu", 2)
    expected, _ = _direct_emt(atoms)
    future = parsl_executor.submit(atoms, EMT_SPEC, str(tmp_path / "snap"))
    atoms.positions *= 1.3  # the caller's MD moves on right away
    assert future.result(timeout=30).energy == pytest.approx(expected, abs=1e-10)


def test_workers_never_load_torch(parsl_executor: ParslLabelExecutor, tmp_path: Path) -> None:
    assert isinstance(
        parsl_executor.submit(Icosahedron("Cu", 2), EMT_SPEC, str(tmp_path / "t")).result(30), LabelResult
    )
    for _ in range(4):
        assert parsl_executor.probe().result(timeout=30)["heavy_modules"] == []


def test_label_module_imports_without_torch() -> None:
    code = (
        "import sys, aimspax_like.reference.label, aimspax_like.execution\n"
        "heavy = {'torch', 'mace', 'e3nn'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_parsl_files_stay_in_run_dir(parsl_executor: ParslLabelExecutor) -> None:
    assert parsl_executor.parsl_dir.is_dir()
    assert any(parsl_executor.parsl_dir.glob("*/parsl.log"))
    assert any(parsl_executor.parsl_dir.rglob("worker_*.log"))
    assert not (Path.cwd() / "runinfo").exists()


def test_factory_builds_parsl_for_local_and_rejects_unknown_kinds(tmp_path: Path) -> None:
    assert isinstance(make_label_executor(LocalCluster(), tmp_path), ParslLabelExecutor)
    with pytest.raises(ConfigError) as info:
        make_label_executor(LocalCluster.model_construct(kind="pbs"), tmp_path)  # type: ignore[arg-type]
    assert info.value.key == "cluster.kind"


def test_events_and_unfinished_futures_on_shutdown(tmp_path: Path) -> None:
    events: list[tuple[str, dict]] = []
    executor = ThreadLabelExecutor(max_workers=1, on_event=lambda name, data: events.append((name, data)))
    with executor:
        atoms = Icosahedron("Cu", 2)
        running = executor.submit(atoms, EMT_SPEC, str(tmp_path / "a"), faults={"delay_s": 0.5})
        queued = executor.submit(atoms, EMT_SPEC, str(tmp_path / "b"))
    assert queued.cancelled()
    assert isinstance(running.result(timeout=10), LabelResult)
    assert [name for name, _ in events] == ["executor_started", "executor_stopped"]


def test_parsl_start_does_not_wait_for_workers_and_shutdown_cancels(
    parsl_executor: ParslLabelExecutor, tmp_path: Path
) -> None:
    # A second executor next to the session one: each owns its DataFlowKernel.
    events: list[tuple[str, dict]] = []
    executor = ParslLabelExecutor(
        LocalCluster(max_workers=1), tmp_path, on_event=lambda n, d: events.append((n, d))
    )
    start = time.perf_counter()
    with executor:
        assert time.perf_counter() - start < 5.0
        pending = executor.submit(
            Icosahedron("Cu", 2), EMT_SPEC, str(tmp_path / "never"), faults={"delay_s": 30}
        )
    assert pending.cancelled()
    assert [name for name, _ in events] == ["executor_started", "executor_stopped"]
    assert events[0][1]["run_dir"].startswith(str(tmp_path / "parsl"))
    # Its cleanup left the session's executor alone.
    again = parsl_executor.submit(Icosahedron("Cu", 2), EMT_SPEC, str(tmp_path / "again"))
    assert isinstance(again.result(timeout=30), LabelResult)


def test_worker_lost_for_good_becomes_a_crashed_failure(
    parsl_executor: ParslLabelExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What Parsl reports once a label killed its worker on every try (real deaths cost ~5 s each).
    from parsl.executors.high_throughput.errors import WorkerLost

    def dying_app(*args: object, **kwargs: object) -> Future:
        future: Future = Future()
        future.set_exception(WorkerLost(0, "localhost"))
        return future

    monkeypatch.setitem(parsl_executor._apps, "label", dying_app)
    outcome = parsl_executor.submit(Icosahedron("Cu", 2), EMT_SPEC, str(tmp_path / "dead")).result(timeout=5)
    assert isinstance(outcome, LabelFailure)
    assert outcome.kind is FailureKind.CRASHED
    assert "worker" in outcome.message


_ORPHAN_DRIVER = """
import os, signal, sys
from aimspax_like.config import LocalCluster
from aimspax_like.execution import ParslLabelExecutor
executor = ParslLabelExecutor(LocalCluster(max_workers=1), sys.argv[1], heartbeat_period=1, heartbeat_threshold=4)
executor.start()
assert executor.wait_ready(60)
print(executor._htex.interchange_proc.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind: a node failure, an OOM kill
"""


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_driver_leaves_no_interchange_or_worker_pool_behind(tmp_path: Path) -> None:
    """Parsl's interchange outlives a SIGKILLed driver and keeps its worker pool (and on SLURM
    the allocation) alive; the interchange guard ends it, and the pool follows on heartbeat."""
    run_dir = tmp_path / "killed_driver"
    log = tmp_path / "driver.log"
    with log.open("w") as out:  # a file, not a pipe: orphans holding a pipe would hang the test
        code = subprocess.run([sys.executable, "-c", _ORPHAN_DRIVER, str(run_dir)], stdout=out, stderr=out,
                              timeout=120).returncode
    assert code == -9, log.read_text()[-2000:]
    interchange = int(log.read_text().split()[0])
    pools = [p for p in _processes_mentioning(str(run_dir)) if p != interchange]
    assert pools  # the worker pool outlives the driver at first, as on a real cluster
    deadline = time.monotonic() + 10
    while _alive(interchange) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(interchange), "the interchange outlived its driver"
    deadline = time.monotonic() + 30  # heartbeat threshold 4 s, plus the pool's own shutdown
    while any(map(_alive, pools)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [p for p in pools if _alive(p)], "a worker pool outlived its interchange"
