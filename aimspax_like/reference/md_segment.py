"""A stretch of MD (or a relaxation) driven by the reference, run on a label worker.

Initial dataset generation and the test set may sample with the reference itself: every MD
step is a reference calculation, and every ``stride``-th frame is kept with the energy and forces
that step computed anyway. On a cluster that MD must not run in the driver: the driver is a GPU
job, and a reference such as ``srun -n 128 aims.x`` belongs in the label blocks, under the
reference's timeout. So the driver ships one *segment* at a time, ``steps`` MD steps from a
given phase-space point, to a worker as a task like a label, and gets back the end point with
its energy and forces (and stress): one labelled frame and where the trajectory continues.

The worker integrates with the same code the campaign uses everywhere else
(``sampling.dynamics.step_batch`` with a one-member committee), so reference MD samples the same
ensemble as active learning. A segment is one try: any failure (an SCF that does not converge
at some step, a crash, a timeout of ``timeout_s`` per step) returns a ``LabelFailure`` and the
driver rewinds that trajectory to its last good frame, as it would after a failed label.
``system.relax`` ships a BFGS relaxation of each start structure the same way.
Like ``label``, this module imports no torch, MACE or Parsl.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from aimspax_like.reference.faults import InjectedFault
from aimspax_like.reference.results import (
    FailureKind,
    LabelFailure,
    LabelResult,
    SCFNotConverged,
    classify_exception,
)

# Thermostat and barostat variables an ``MDState`` carries between segments.
_STATE_KEYS = ("chain", "barostat_chain", "cell_momentum")


@dataclass
class SegmentRequest:
    """Where a segment starts and how to integrate: plain data, it travels to another machine."""

    md: dict[str, Any]  # an ``MDConfig`` dumped to JSON types
    steps: int
    momenta: np.ndarray
    extra: dict[str, np.ndarray | None] = field(default_factory=dict)  # _STATE_KEYS
    rng_seed: int = 0
    relax_fmax: float | None = None  # set: a BFGS relaxation of at most ``steps`` steps instead of MD
    fixed: list[int] = field(default_factory=list)  # atoms held in place (FixAtoms of the start structure)


@dataclass(frozen=True)
class SegmentResult:
    """The segment's last frame: geometry, momenta, reference label, and integrator state."""

    positions: np.ndarray
    cell: np.ndarray
    momenta: np.ndarray
    extra: dict[str, np.ndarray | None]
    label: LabelResult
    temperature_K: float
    wall_s: float = 0.0
    workdir: str | None = None
    cpu_s: float | None = None  # the segment's CPU on its worker (``label.run_in_scratch``)
    info: dict[str, Any] = field(default_factory=dict)  # a relaxation: converged, steps, energy_start

    @property
    def ok(self) -> bool:
        return True


SegmentOutcome = SegmentResult | LabelFailure


class _LabelCalculator(Calculator):
    """The reference codes that run a fresh process per calculation (FHI-aims) or keep one per
    worker (CP2K) as an ASE calculator, through ``label``'s own runner; a failure raises."""

    implemented_properties = ("energy", "free_energy", "forces", "stress")

    def __init__(self, spec: dict[str, Any], workdir: str) -> None:
        super().__init__()
        self.spec = spec
        self.workdir = workdir

    def calculate(self, atoms: Atoms | None = None, properties: Any = ("energy",),
                  system_changes: Any = all_changes) -> None:
        from aimspax_like.reference.label import _geometry_only, _run

        super().calculate(atoms, properties, system_changes)
        outcome = _run(_geometry_only(self.atoms), self.spec, self.workdir, None)
        if isinstance(outcome, LabelFailure):
            raise _StepFailed(outcome)
        self.results = {"energy": outcome.energy, "free_energy": outcome.energy, "forces": outcome.forces}
        if outcome.stress is not None:
            self.results["stress"] = outcome.stress


class _StepFailed(Exception):
    """A failed reference step inside a segment, carrying its classified failure."""

    def __init__(self, failure: LabelFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class _SCFCheckedCalculator(Calculator):
    """An imported calculator whose every evaluation is checked as a label is (``scf_checks``):
    a step whose SCF did not converge raises ``SCFNotConverged`` instead of moving the atoms on
    unconverged forces (ASE's ``Vasp`` and ``Espresso`` can return them without raising)."""

    def __init__(self, inner: Any, workdir: str) -> None:
        super().__init__()
        self.inner = inner
        self.workdir = workdir
        self.implemented_properties = list(getattr(inner, "implemented_properties", ("energy", "forces")))

    def calculate(self, atoms: Atoms | None = None, properties: Any = ("energy",),
                  system_changes: Any = all_changes) -> None:
        from aimspax_like.reference.scf_checks import scf_failure

        super().calculate(atoms, properties, system_changes)
        assert self.atoms is not None
        for name in properties:
            self.inner.get_property(name, self.atoms)
        unconverged = scf_failure(self.inner, self.workdir)
        if unconverged:
            raise SCFNotConverged(unconverged)
        self.results = dict(self.inner.results)


def _calculator(spec: dict[str, Any], workdir: str) -> Calculator:
    if spec["kind"] in ("aims", "cp2k"):
        return _LabelCalculator(spec, workdir)
    from aimspax_like.reference.calculators import keep_in_scratch, make_calculator

    calc = make_calculator(spec, workdir)
    keep_in_scratch(calc, workdir)
    if spec["kind"] == "import":  # the built-in kinds raise on a failed SCF or have none
        return _SCFCheckedCalculator(calc, workdir)
    return calc


def run_segment(
    atoms: Atoms, spec: dict[str, Any], workdir: str, faults: dict[str, Any] | None = None,
    seed: int | None = None, request: SegmentRequest | None = None,
) -> SegmentOutcome:
    """Integrate ``request.steps`` reference MD steps from ``atoms`` with ``request.momenta``.

    The fault draw (tests and benchmarks) happens once per segment, as for one label. With
    ``timeout_s`` every step has that long: the segment runs in a child process that is killed
    after ``timeout_s x (steps + 1)`` seconds.
    """
    from aimspax_like.reference.label import run_in_scratch

    if request is None:
        raise ValueError("run_segment needs a SegmentRequest")
    return run_in_scratch(_integrate, atoms, spec, workdir, faults, seed, extra=(request,),
                          timeout_scale=request.steps + 1)


def _integrate(
    atoms: Atoms, spec: dict[str, Any], workdir: str, fault: InjectedFault | None, request: SegmentRequest
) -> SegmentOutcome:
    """The segment itself, in this process; every exception becomes a classified failure."""
    from aimspax_like.config import MDConfig
    from aimspax_like.sampling.ase_md import calculator_forces, calculator_stresses
    from aimspax_like.sampling.dynamics import MDState, step_batch

    try:
        if fault is not None:
            fault.apply()
        atoms.calc = _calculator(spec, workdir)
        if request.fixed:  # the label's bare geometry lost the start structure's constraint
            from ase.constraints import FixAtoms

            atoms.set_constraint(FixAtoms(indices=list(request.fixed)))
        atoms.set_momenta(np.asarray(request.momenta, dtype=float))
        state = MDState(atoms, MDConfig.model_validate(request.md), np.random.default_rng(request.rng_seed))
        for key in _STATE_KEYS:
            value = request.extra.get(key)
            setattr(state, key, None if value is None else np.array(value, dtype=float))
        info: dict[str, Any] = {}
        if request.relax_fmax is not None:
            info = _relax(atoms, request.relax_fmax, request.steps)
        else:
            for _ in range(request.steps):
                step_batch([state], calculator_forces, calculator_stresses, None)
        energy = float(atoms.get_potential_energy())
        forces = np.array(atoms.get_forces())
        want_stress = bool(spec.get("compute_stress")) and bool(atoms.pbc.all())
        stress = np.array(atoms.get_stress(voigt=True)) if want_stress else None
    except _StepFailed as exc:
        return replace(exc.failure, workdir=workdir)
    except Exception as exc:  # reference MD failures are data, not crashes
        kind, message = classify_exception(exc)
        return LabelFailure(kind, message, workdir, 0.0)
    values = [np.atleast_1d(energy), forces.ravel(), atoms.positions.ravel(), atoms.get_momenta().ravel()]
    if stress is not None:
        values.append(stress)
    if not all(np.isfinite(v).all() for v in values):
        return LabelFailure(FailureKind.INVALID_RESULT, "non-finite energy, forces, stress or positions "
                            "in reference MD", workdir, 0.0)
    extra = {key: None if getattr(state, key) is None else np.array(getattr(state, key)) for key in _STATE_KEYS}
    return SegmentResult(
        positions=np.array(atoms.positions), cell=np.array(atoms.cell.array), momenta=np.array(atoms.get_momenta()),
        extra=extra, label=LabelResult(energy, forces, stress, workdir, 0.0), temperature_K=state.temperature(),
        workdir=workdir, info=info,
    )


def _relax(atoms: Atoms, fmax: float, steps: int) -> dict[str, Any]:
    """BFGS to ``fmax`` (eV/A) in at most ``steps`` steps (``system.relax``), momenta zeroed."""
    from ase.optimize import BFGS

    atoms.set_momenta(np.zeros((len(atoms), 3)))
    energy_start = float(atoms.get_potential_energy())
    optimizer = BFGS(atoms, logfile=None)
    converged = bool(optimizer.run(fmax=fmax, steps=steps))
    return {"converged": converged, "steps": int(optimizer.nsteps), "energy_start": energy_start}


def segment_with_placement(
    atoms: Atoms, spec: dict[str, Any], workdir: str, faults: dict[str, Any] | None = None,
    seed: int | None = None, request: SegmentRequest | None = None,
) -> tuple[SegmentOutcome, dict[str, Any]]:
    """``run_segment`` and where it ran (SLURM workers), as ``execution.label_with_placement``."""
    from aimspax_like.execution.worker_tasks import placement

    return run_segment(atoms, spec, workdir, faults, seed, request), placement()
