"""FHI-aims through ASE: build the calculator, run it, and judge its ``aims.out`` ourselves.

ASE's ``Aims`` calculator raises on any unfinished output, which loses the distinction the
scheduler needs: an SCF that gave up (retry with other settings, or skip the point) versus a
crash (node failure, bad input). So ``run_aims`` writes the inputs and launches the code through
ASE, and ``read_aims_outcome`` classifies the output file by itself before asking ASE's reader
for energy and forces.

ASE 3.29 marks its FHI-aims readers/writers with a FutureWarning on every call (the IO moves to
a plugin); we silence exactly that warning around our calls, since the test suite treats
warnings as errors and the message is not actionable per label.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from aimspax_like.reference.results import FailureKind, LabelFailure, LabelOutcome, LabelResult, one_line
from aimspax_like.reference.scf_checks import AIMS_SCF_FAILURE_MARKS

OUTPUT_NAME = "aims.out"
ERROR_NAME = "aims.err"
FINISHED_MARK = "Have a nice day."
# Real FHI-aims failure texts (``scf_checks.MARKERS``): "*** scf_solver: SCF cycle not converged."
# (sc_iter_limit hit, FHI-aims stops) and "* WARNING! SELF-CONSISTENCY CYCLE DID NOT CONVERGE"
# (printed when it carries on with postprocess_anyway: the results that follow are not a label).
SCF_FAILURE_MARKS = AIMS_SCF_FAILURE_MARKS

# Launchers that may precede the FHI-aims executable in the configured command.
LAUNCHERS = frozenset({"srun", "mpirun", "mpiexec", "mpiexec.hydra", "aprun", "ibrun", "jsrun", "orterun"})


@contextmanager
def quiet_aims_io() -> Iterator[None]:
    """Silence ASE's per-call 'FHI-aims IO is moving to the ase-io-aims plugin' FutureWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FHI-aims IO is moving", category=FutureWarning)
        yield


def split_command(command: str) -> tuple[list[str], str]:
    """Return (argv, executable) for a launch command such as ``'srun -n 128 aims.x'``.

    The executable is the command itself when no MPI launcher leads; otherwise it is the last
    word after the launcher that is neither a flag nor a number (``-n 128`` style arguments).
    """
    argv = shlex.split(command)
    if not argv:
        raise ValueError("the command is empty")
    if os.path.basename(argv[0]) not in LAUNCHERS:
        return argv, argv[0]
    words = [w for w in argv[1:] if not w.startswith("-") and not w.isdigit() and "=" not in w]
    if not words:
        raise ValueError(f"no executable follows the launcher {argv[0]!r}")
    return argv, words[-1]


def missing_programs(command: str) -> list[str]:
    """Programs of the launch command (launcher and executable) that cannot be found."""
    argv, executable = split_command(command)
    wanted = [argv[0]] if argv[0] != executable else []
    wanted.append(executable)
    return [w for w in wanted if shutil.which(w) is None]


def missing_species_files(species_dir: str | Path, numbers: set[int]) -> list[str]:
    """Species default files FHI-aims would need for these elements but that are absent."""
    folder = Path(species_dir)
    names = [f"{z:02d}_{chemical_symbols[z]}_default" for z in sorted(numbers)]
    return [n for n in names if not (folder / n).is_file()]


def make_aims_calculator(spec: dict[str, Any], workdir: str | Path) -> Any:
    """ASE ``Aims`` with the configured command, species folder, xc and extra parameters."""
    from ase.calculators.aims import Aims, AimsProfile

    species_dir = spec.get("species_dir")
    profile = AimsProfile(command=spec.get("command", "aims.x"), default_species_directory=species_dir)
    parameters = {"xc": spec.get("xc", "pbe"), "compute_forces": True, **(spec.get("parameters") or {})}
    if species_dir is not None:
        parameters["species_dir"] = str(species_dir)
    return Aims(profile=profile, directory=str(workdir), **parameters)


def write_aims_inputs(calc: Any, atoms: Atoms, properties: list[str]) -> None:
    """Write control.in and geometry.in into the calculator's directory."""
    with quiet_aims_io():
        calc.write_inputfiles(atoms, properties)


def run_aims(atoms: Atoms, spec: dict[str, Any], workdir: str | Path, want_stress: bool) -> LabelOutcome:
    """Write inputs, launch FHI-aims, and classify its output (never raises for a failed run)."""
    calc = make_aims_calculator(spec, workdir)
    properties = ["energy", "forces"] + (["stress"] if want_stress else [])
    write_aims_inputs(calc, atoms, properties)
    exit_note = ""
    try:
        calc.template.execute(Path(workdir), calc.profile)
    except subprocess.CalledProcessError as exc:
        exit_note = f"exit code {exc.returncode}"
    return read_aims_outcome(workdir, n_atoms=len(atoms), want_stress=want_stress, exit_note=exit_note)


def read_aims_outcome(
    workdir: str | Path,
    n_atoms: int | None = None,
    want_stress: bool = False,
    wall_s: float = 0.0,
    exit_note: str = "",
) -> LabelOutcome:
    """Classify ``workdir/aims.out``: SCF failure, crash, or a result with energy and forces."""
    workdir = Path(workdir)
    where = str(workdir)
    output = workdir / OUTPUT_NAME
    if not output.is_file():
        message = f"no {OUTPUT_NAME} written {_note(workdir, exit_note)}"
        return LabelFailure(FailureKind.CRASHED, message, where, wall_s)
    lines = output.read_text(errors="replace").splitlines()
    for line in lines:
        if any(mark in line.lower() for mark in SCF_FAILURE_MARKS):
            return LabelFailure(FailureKind.SCF_NOT_CONVERGED, f"FHI-aims: {line.strip()}", where, wall_s)
    if not any(line.strip() == FINISHED_MARK for line in lines[-20:]):
        last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "(empty)")
        message = f"FHI-aims did not finish {_note(workdir, exit_note)}; last line: {last}"
        return LabelFailure(FailureKind.CRASHED, message, where, wall_s)
    try:
        from ase.io import read

        with quiet_aims_io():
            results = read(output, format="aims-output", index=-1).calc.results
    except Exception as exc:
        return LabelFailure(FailureKind.CRASHED, f"unreadable {OUTPUT_NAME}: {exc!r}", where, wall_s)
    return _result_from(results, n_atoms, want_stress, where, wall_s)


def _result_from(
    results: dict[str, Any], n_atoms: int | None, want_stress: bool, where: str, wall_s: float
) -> LabelOutcome:
    energy = results.get("energy", results.get("free_energy"))
    forces = results.get("forces")
    if energy is None or forces is None:
        return LabelFailure(FailureKind.CRASHED, f"{OUTPUT_NAME} has no energy or forces", where, wall_s)
    forces = np.asarray(forces, dtype=float)
    if n_atoms is not None and forces.shape != (n_atoms, 3):
        message = f"{OUTPUT_NAME} has forces for {len(forces)} atoms, expected {n_atoms}"
        return LabelFailure(FailureKind.CRASHED, message, where, wall_s)
    stress = results.get("stress") if want_stress else None
    if want_stress and stress is None:
        return LabelFailure(FailureKind.CRASHED, f"{OUTPUT_NAME} has no stress", where, wall_s)
    return LabelResult(energy=float(energy), forces=forces, stress=stress, workdir=where, wall_s=wall_s)


def _note(workdir: Path, exit_note: str) -> str:
    """Exit code and the first line of aims.err, the usual clues for a crash."""
    err = workdir / ERROR_NAME
    first_err = one_line(err.read_text(errors="replace")) if err.is_file() else ""
    parts = [p for p in (exit_note, f"stderr: {first_err}" if first_err else "") if p]
    return f"({'; '.join(parts)})" if parts else ""

