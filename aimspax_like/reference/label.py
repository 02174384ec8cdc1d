"""Label one structure with the reference method, turning every failure into data.

``label`` is what Parsl ships to workers, so it must import fast (no torch, MACE or Parsl here)
and must never raise for a failed calculation: SCF failures, crashes and timeouts come back as
``LabelFailure`` so the active-learning loop can decide what to do with the point.

Timeouts need a separate process: a hung SCF inside a C extension cannot be interrupted from
Python. With ``timeout_s`` set the calculation runs in a fresh Python child in its own session,
so that on timeout the whole process group, including an MPI launcher and FHI-aims under it,
is terminated and then killed. Without ``timeout_s`` it runs in the calling process.

Warm workers (``reference.warm``, on by default; ``warm_worker``): the in-process Python
references keep their calculator, and so their SCF density, between the labels of a worker,
and their timed labels run on one persistent child per worker (killed, and started again cold,
only on a timeout or a crash) instead of a fresh one per label.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.reference.calculators import keep_in_scratch
from aimspax_like.reference.cpu_time import CpuMeter
from aimspax_like.reference.faults import InjectedFault, draw_fault
from aimspax_like.reference.results import (
    FailureKind,
    LabelFailure,
    LabelOutcome,
    LabelResult,
    SCFNotConverged,
    classify_exception,
)
from aimspax_like.reference.scf_checks import scf_failure
from aimspax_like.reference.warm_worker import label_calculator, run_on_server, run_target, serves

__all__ = ["LabelOutcome", "SCFNotConverged", "label"]

_TERM_GRACE_S = 2.0


def label(
    atoms: Atoms,
    spec: dict[str, Any],
    workdir: str,
    faults: dict[str, Any] | None = None,
    seed: int | None = None,
) -> LabelOutcome:
    """Energy, forces (and stress for periodic cells when asked) of ``atoms``, or a failure.

    ``spec`` is the reference config as a plain dict; ``faults`` the optional fault-injection
    mapping (tests and benchmarks only) drawn with ``seed``. The scratch folder ``workdir`` is
    removed after a success unless ``keep_workdir`` is set (only when it was created here or was
    empty, so a caller's files are never deleted); after a failure it is kept as evidence.
    """
    return run_in_scratch(_run, atoms, spec, workdir, faults, seed)


def run_in_scratch(
    target: Callable[..., Any],
    atoms: Atoms,
    spec: dict[str, Any],
    workdir: str,
    faults: dict[str, Any] | None = None,
    seed: int | None = None,
    extra: tuple[Any, ...] = (),
    timeout_scale: float = 1.0,
) -> Any:
    """What every worker task of the reference shares: ``target(geometry, spec, folder, fault, *extra)``.

    One fault draw, the scratch folder (absolute; removed after a success unless
    ``keep_workdir``, and only when it was created here or was empty), the reference's timeout
    (``timeout_s x timeout_scale``, in a killable child; CP2K times its persistent shell itself)
    and the wall and CPU time. ``target`` never raises; what fails around it becomes a failure
    too. Serves ``label`` and a stretch of reference MD (``md_segment.run_segment``).

    CPU (``cpu_time``): this worker's own share, plus the children it started and reaped (a
    timeout child, a subprocess reference), plus what a label server reports it spent (the
    server lives on, so it is never reaped here; its reaping, e.g. after a timeout, is left out
    so that no label is charged for the server's earlier ones).
    """
    start = time.monotonic()
    cpu = CpuMeter()
    fault = draw_fault(faults, seed)
    geometry = _geometry_only(atoms)
    folder = Path(workdir).absolute()  # outcomes travel to other machines: no relative paths
    removable = not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return LabelFailure(FailureKind.CRASHED, f"cannot create workdir: {exc}", str(folder), 0.0)
    timeout_s = spec.get("timeout_s")
    args = (geometry, spec, str(folder), fault, *extra)
    served = False
    try:
        if timeout_s and spec["kind"] != "cp2k":  # CP2K times its persistent shell itself
            served = serves(spec)
            runner = run_on_server if served else _run_with_timeout  # warm: one child per worker
            outcome = runner(target, args, str(folder), float(timeout_s) * timeout_scale, start)
        else:
            outcome = run_target(target, args)  # a failure drops the worker's warm calculator
    except Exception as exc:  # e.g. no process could be started: still a failure, not a raise
        kind, message = classify_exception(exc)
        outcome = LabelFailure(kind, message, str(folder), 0.0)
    server_cpu = (outcome.cpu_s or 0.0) if served else 0.0
    outcome = replace(outcome, wall_s=time.monotonic() - start, cpu_s=cpu.seconds(children=not served) + server_cpu)
    if outcome.ok and removable and not spec.get("keep_workdir"):
        shutil.rmtree(folder, ignore_errors=True)
        outcome = replace(outcome, workdir=None)
    return outcome


def _geometry_only(atoms: Atoms) -> Atoms:
    """A bare copy: no calculator (e.g. a MACE model) to pickle, no initial charges or
    constraints that would change what the reference computes or which forces it reports."""
    return Atoms(
        numbers=atoms.get_atomic_numbers(),
        positions=atoms.get_positions(),
        cell=atoms.get_cell(),
        pbc=atoms.get_pbc(),
    )


def _run(atoms: Atoms, spec: dict[str, Any], workdir: str, fault: InjectedFault | None) -> LabelOutcome:
    """Run the calculation in this process; every exception becomes a classified failure."""
    want_stress = bool(spec.get("compute_stress")) and bool(all(atoms.pbc))
    calc: Any = None
    try:
        if spec["kind"] == "cp2k":  # one CP2K shell per worker; it applies faults and timeouts
            from aimspax_like.reference.cp2k import run_cp2k

            return _require_finite(run_cp2k(atoms, spec, workdir, want_stress, fault), len(atoms))
        if fault is not None:
            fault.apply()
        if spec["kind"] == "aims":
            from aimspax_like.reference.aims import run_aims

            outcome = run_aims(atoms, spec, workdir, want_stress)
        else:
            calc = label_calculator(spec, workdir)  # the worker's kept one when warm
            keep_in_scratch(calc, workdir)  # file-writing imported calculators stay in scratch
            atoms.calc = calc
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces()
            stress = atoms.get_stress(voigt=True) if want_stress else None
            unconverged = scf_failure(calc, workdir)  # codes that report a failed SCF without raising
            if unconverged:
                return LabelFailure(FailureKind.SCF_NOT_CONVERGED, unconverged, workdir, 0.0)
            outcome = LabelResult(energy, forces, stress, workdir, 0.0, scf_cycles=getattr(calc, "scf_cycles", None))
    except Exception as exc:
        kind, message = classify_exception(exc)
        unconverged = scf_failure(calc, workdir) if calc is not None and kind is FailureKind.CRASHED else None
        if unconverged:  # e.g. ASE could not read pw.x's output because pw.x stopped unconverged
            kind, message = FailureKind.SCF_NOT_CONVERGED, f"{unconverged} ({message})"
        return LabelFailure(kind, message, workdir, 0.0)
    return _require_finite(outcome, len(atoms))


def _require_finite(outcome: LabelOutcome, n_atoms: int) -> LabelOutcome:
    if not isinstance(outcome, LabelResult):
        return outcome
    values = [np.atleast_1d(outcome.energy), outcome.forces.ravel()]
    if outcome.stress is not None:
        values.append(outcome.stress)
    if not all(np.isfinite(v).all() for v in values):
        return LabelFailure(FailureKind.INVALID_RESULT, "non-finite energy, forces or stress", outcome.workdir, 0.0)
    if outcome.forces.shape != (n_atoms, 3):
        message = f"forces of shape {outcome.forces.shape} for {n_atoms} atoms"
        return LabelFailure(FailureKind.INVALID_RESULT, message, outcome.workdir, 0.0)
    return outcome


# --------------------------------------------------------------------------- timeout

# The child re-creates the parent's import path before unpickling anything of ours.
_CHILD_CODE = (
    "import pickle, sys; sys.path[:0] = pickle.load(sys.stdin.buffer); "
    "from aimspax_like.reference.label import _child_entry; _child_entry()"
)
_OUTCOME_FILE = ".label_outcome.pickle"
_LOG_FILE = "label_child.log"


def _child_entry() -> None:
    """Body of the timeout child: run the task, leave the outcome in a file for the parent."""
    target, args, workdir = pickle.load(sys.stdin.buffer)
    outcome = target(*args)
    target = Path(workdir) / _OUTCOME_FILE
    partial = target.with_suffix(".partial")
    partial.write_bytes(pickle.dumps(outcome))
    partial.replace(target)  # atomic: the parent never reads half a pickle


def _run_with_timeout(
    target: Callable[..., Any],
    args: tuple[Any, ...],
    workdir: str,
    timeout_s: float,
    start: float,
) -> Any:
    """Run ``target(*args)`` (a module-level function: a label, or a stretch of reference MD)
    in a fresh interpreter in its own session; kill its group on timeout. The target returns
    an outcome (``LabelResult``/``LabelFailure`` or the like), never raises.

    A fresh interpreter (not fork) is immune to threads of earlier calculations, never re-runs
    the caller's main script, and works from daemonic workers; it costs about half a second of
    imports, negligible next to a DFT label. Its own session means the process group holds the
    MPI launcher and FHI-aims too, so a timeout kills all of them.
    """
    folder = Path(workdir)
    (folder / _OUTCOME_FILE).unlink(missing_ok=True)
    with open(folder / _LOG_FILE, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # a child dead at start shows in _collect
            proc.stdin.write(pickle.dumps(list(sys.path)))
            proc.stdin.write(pickle.dumps((target, args, workdir)))
            proc.stdin.close()
        proc.wait(timeout=max(0.0, start + timeout_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        message = f"no result after {timeout_s:g} s; label process killed"
        return LabelFailure(FailureKind.TIMED_OUT, message, workdir, 0.0)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    return _collect(folder, proc.returncode, workdir)


def _collect(folder: Path, returncode: int, workdir: str) -> LabelOutcome:
    result_file = folder / _OUTCOME_FILE
    if not result_file.is_file():
        log = folder / _LOG_FILE
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        message = f"label process died without a result (exit code {returncode})"
        if tail:
            message += f": {tail[0]}"
        return LabelFailure(FailureKind.CRASHED, message, workdir, 0.0)
    outcome: LabelOutcome = pickle.loads(result_file.read_bytes())
    result_file.unlink()
    if outcome.ok:
        (folder / _LOG_FILE).unlink(missing_ok=True)
    return outcome


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, wait a little, then SIGKILL whatever is left."""
    for sig, wait_s in ((signal.SIGTERM, _TERM_GRACE_S), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
