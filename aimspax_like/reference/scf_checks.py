"""Did the SCF converge? Decided from a finished calculator and the output files it wrote.

Several DFT codes, and ASE's calculators around them, report a failed SCF without raising:
ASE's ``Vasp`` sets ``calc.converged = False`` (read from the OUTCAR) and returns the energy and
forces of the last electronic step anyway; ``pw.x`` with ``scf_must_converge = .false.`` prints
"convergence has been achieved" and forces after its last allowed iteration (seen with QE 6.7,
see ``tests/data/scf_outputs``); FHI-aims with ``postprocess_anyway`` prints "WARNING!
SELF-CONSISTENCY CYCLE DID NOT CONVERGE" and then everything else; CP2K 2023 prints "SCF run NOT
converged" and carries on. A label from such a run must never be stored, so ``label`` asks
``scf_failure`` after every calculation and turns an answer into
``LabelFailure(SCF_NOT_CONVERGED, ...)``.

What is looked at (``scf_failure``):

* the calculator's own verdict: a ``converged`` or ``scf_converged`` attribute that is False
  (ASE's ``Vasp`` and any other calculator that exposes one);
* the output files in the calculator's folder (and the label's scratch folder), by name:
  ``OUTCAR`` and ``OSZICAR`` (VASP), ``*.pwo`` (Quantum ESPRESSO, ASE's name for pw.x output),
  ``aims.out`` (FHI-aims), ``cp2k.out`` (CP2K; also ``<label>.out`` of ASE's ``CP2K``), plus the
  output file a file-IO calculator's template names.

Only SCF verdicts are returned. Texts that mean the program crashed or stopped (QE's "S matrix
not positive definite", a missing "Have a nice day." in FHI-aims) are listed in ``MARKERS`` for
reference, but they are left to the crash path: the calculator raises on them or has no result
to read. This module imports only the standard library, as ``label`` does on every worker.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MARKERS",
    "Marker",
    "aims_failure",
    "cp2k_failure",
    "espresso_failure",
    "scf_failure",
    "vasp_oszicar_failure",
    "vasp_outcar_failure",
]

# What a marker means.
SCF_FAILED = "scf_not_converged"  # the SCF stopped unconverged: never a label
CONVERGED = "converged"  # the program's own statement that the SCF converged
CRASH = "crash"  # the program stopped with an error: no result; not an SCF verdict
NOTE = "note"  # routine text that looks alarming but decides nothing
FINISHED = "finished"  # the program ended normally (its absence means it did not finish)


@dataclass(frozen=True)
class Marker:
    """A text a code writes, and what it means (``SCF_FAILED``, ``CONVERGED``, ``CRASH``, ...)."""

    code: str
    text: str
    meaning: str
    where: str
    comment: str = ""


MARKERS: tuple[Marker, ...] = (
    # VASP (OUTCAR; OSZICAR has no verdict line, only the electronic steps)
    Marker("VASP", "aborting loop because EDIFF is reached", CONVERGED, "OUTCAR",
           "end of a converged electronic loop (VASP 5 and 6)"),
    Marker("VASP", "aborting loop EDIFF was not reached (unconverged)", SCF_FAILED, "OUTCAR",
           "VASP 6: the loop stopped after NELM steps"),
    Marker("VASP", "aborting loop because hard stop was set", SCF_FAILED, "OUTCAR",
           "VASP 6: the loop was stopped (STOPCAR LABORT) before EDIFF was reached"),
    Marker("VASP", "NELM electronic steps, no 'aborting loop' line", SCF_FAILED, "OUTCAR/OSZICAR",
           "VASP 5 writes nothing when NELM is reached; counted from the iterations"),
    Marker("VASP", "calc.converged is False", SCF_FAILED, "ASE Vasp",
           "ASE's read_convergence (note: also False for an unfinished IBRION 1-3 relaxation)"),
    # Quantum ESPRESSO pw.x
    Marker("Quantum ESPRESSO", "convergence NOT achieved after", SCF_FAILED, "pw.x output",
           "electron_maxstep reached; pw.x stops (also 'EXX convergence NOT achieved after')"),
    Marker("Quantum ESPRESSO", "convergence has been achieved in", CONVERGED, "pw.x output",
           "checked against the numbers: with scf_must_converge=.false. pw.x 6.7 prints it "
           "after an unconverged last iteration"),
    Marker("Quantum ESPRESSO", "estimated scf accuracy above scf convergence threshold", SCF_FAILED,
           "pw.x output", "the final 'estimated scf accuracy <' exceeds 'scf convergence threshold'"),
    Marker("Quantum ESPRESSO", "S matrix not positive definite", CRASH, "pw.x output",
           "cdiaghg/rdiaghg: overlap matrix not positive definite (bad geometry, ghost states); "
           "pw.x stops with an error box"),
    Marker("Quantum ESPRESSO", "too many bands are not converged", CRASH, "pw.x output",
           "c_bands: the iterative diagonalisation failed; pw.x stops with an error box"),
    Marker("Quantum ESPRESSO", "eigenvalues not converged", NOTE, "pw.x output",
           "c_bands warning inside a normal SCF step; harmless when the SCF converges"),
    Marker("Quantum ESPRESSO", "JOB DONE.", FINISHED, "pw.x output",
           "also printed after 'convergence NOT achieved ... stopping'"),
    # FHI-aims
    Marker("FHI-aims", "SCF cycle not converged", SCF_FAILED, "aims.out",
           "'*** scf_solver: SCF cycle not converged.': sc_iter_limit reached, FHI-aims stops"),
    Marker("FHI-aims", "SELF-CONSISTENCY CYCLE DID NOT CONVERGE", SCF_FAILED, "aims.out",
           "'* WARNING! SELF-CONSISTENCY CYCLE DID NOT CONVERGE': FHI-aims carried on "
           "(postprocess_anyway) and prints results that cannot be trusted"),
    Marker("FHI-aims", "Self-consistency cycle not yet converged - restarting mixer", NOTE, "aims.out",
           "routine mixer restart"),
    Marker("FHI-aims", "Self-consistency cycle converged.", CONVERGED, "aims.out", ""),
    Marker("FHI-aims", "Have a nice day.", FINISHED, "aims.out",
           "absent: the run did not finish (a crash or a kill, not an SCF verdict)"),
    # CP2K
    Marker("CP2K", "SCF run NOT converged", SCF_FAILED, "cp2k.out",
           "'*** WARNING in qs_scf.F:601 :: SCF run NOT converged ***' (2023.1, carries on); "
           "later versions abort with the same words unless IGNORE_CONVERGENCE_FAILURE"),
    Marker("CP2K", "SCF run converged in", CONVERGED, "cp2k.out", ""),
    Marker("CP2K", "Leaving inner SCF loop after reaching", NOTE, "cp2k.out",
           "inner loop hit its limit; with an outer SCF not a failure by itself"),
)

# Lower-case texts per code that mean the SCF gave up (the ones matched in output files).
VASP_SCF_FAILURE_MARKS = ("aborting loop ediff was not reached", "aborting loop because hard stop was set")
VASP_CONVERGED_MARK = "aborting loop because ediff is reached"
ESPRESSO_SCF_FAILURE_MARKS = ("convergence not achieved after",)
AIMS_SCF_FAILURE_MARKS = ("scf cycle not converged", "self-consistency cycle did not converge")
CP2K_SCF_FAILURE_MARKS = ("scf run not converged", "scf not converged")

VASP_DEFAULT_NELM = 60
# Output files larger than this are read as head + tail (a long MD OUTCAR): verdicts are at the end.
_READ_LIMIT = 64_000_000
_HEAD_BYTES = 2_000_000

_ITERATION = re.compile(r"-+\s*Iteration\s+(\d+)\s*\(\s*(\d+)\s*\)")
_NELM_OUTCAR = re.compile(r"^\s*NELM\s*=\s*(\d+)", re.MULTILINE)
_NELM_INCAR = re.compile(r"^\s*NELM\s*=\s*(\d+)", re.MULTILINE | re.IGNORECASE)
_OSZICAR_STEP = re.compile(r"^\s*[A-Za-z]{2,3}\s*:\s+\d+\s")
_OSZICAR_IONIC = re.compile(r"^\s*(\d+)\s+F=")
_QE_THRESHOLD = re.compile(r"scf convergence threshold\s*=\s*([-+0-9.EeDd]+)")
_QE_ACCURACY = re.compile(r"estimated scf accuracy\s*<\s*([-+0-9.EeDd]+)\s*Ry")


# --------------------------------------------------------------------------- per code, from text


def vasp_outcar_failure(text: str, nelm: int | None = None) -> str | None:
    """The SCF verdict of the last electronic loop in an OUTCAR (None: converged or no verdict).

    VASP 6 ends every loop with "aborting loop because EDIFF is reached" or "aborting loop EDIFF
    was not reached (unconverged)"; VASP 5 writes the first only, and nothing when the loop ran
    out of its NELM steps, so a last loop of NELM iterations without that line is unconverged.
    A loop that simply stops (a killed run) gives no verdict here.
    """
    return _vasp_outcar_verdict(text, nelm)[1]


def _vasp_outcar_verdict(text: str, nelm: int | None) -> tuple[bool | None, str | None]:
    """(True: the last loop says converged / False: unconverged / None: no verdict, message)."""
    lines = text.splitlines()
    headers = [(i, int(m.group(1)), int(m.group(2))) for i, ln in enumerate(lines) if (m := _ITERATION.search(ln))]
    start = 0
    last_step = None
    if headers:
        last_ionic = headers[-1][1]
        start = next(i for i, ionic, _ in headers if ionic == last_ionic)
        last_step = max(step for _, ionic, step in headers if ionic == last_ionic)
    verdict = None
    for line in lines[start:]:
        if "aborting loop" in line.lower():
            verdict = line.strip(" -")
    if verdict is not None:
        if VASP_CONVERGED_MARK in verdict.lower():
            return True, None
        return False, f"VASP: {verdict}"
    if nelm is None:
        found = _NELM_OUTCAR.search(text)
        nelm = int(found.group(1)) if found else None
    if last_step is not None and nelm is not None and last_step >= nelm:
        return False, (f"VASP: electronic loop ran all NELM={nelm} steps without "
                       "'aborting loop because EDIFF is reached'")
    return None, None


def vasp_oszicar_failure(text: str, nelm: int = VASP_DEFAULT_NELM) -> str | None:
    """Whether the last ionic step in an OSZICAR used all ``nelm`` electronic steps.

    The OSZICAR states no verdict; as pymatgen's ``Vasprun.converged_electronic`` and custodian's
    handlers do, a step that needed NELM electronic iterations counts as unconverged.
    """
    steps = 0
    last_complete = None
    ionic = None
    for line in text.splitlines():
        if _OSZICAR_STEP.match(line):
            steps += 1
        elif found := _OSZICAR_IONIC.match(line):
            last_complete, ionic, steps = steps, int(found.group(1)), 0
    count = steps if steps else last_complete  # a step still running counts too
    if count is not None and count >= nelm:
        where = f"ionic step {ionic}" if not steps and ionic is not None else "the last ionic step"
        return f"VASP: OSZICAR {where} used all NELM={nelm} electronic steps"
    return None


def espresso_failure(text: str) -> str | None:
    """pw.x: "convergence NOT achieved", or a final SCF accuracy above the threshold.

    The second catches pw.x runs with ``scf_must_converge = .false.``, which (QE 6.7) print
    "convergence has been achieved" and forces after the last allowed, unconverged iteration.
    """
    for line in text.splitlines():
        if any(mark in line.lower() for mark in ESPRESSO_SCF_FAILURE_MARKS):
            return f"Quantum ESPRESSO: {line.strip()}"
    threshold = _last_float(_QE_THRESHOLD, text)
    accuracy = _last_float(_QE_ACCURACY, text)
    if threshold is not None and accuracy is not None and accuracy > threshold:
        return (f"Quantum ESPRESSO: estimated scf accuracy {accuracy:.3g} Ry is above the scf "
                f"convergence threshold {threshold:.3g} Ry")
    return None


def aims_failure(text: str) -> str | None:
    """FHI-aims: "SCF cycle not converged" (it stopped) or "SELF-CONSISTENCY CYCLE DID NOT
    CONVERGE" (it carried on). The routine "Self-consistency cycle not yet converged -
    restarting mixer" does not match."""
    for line in text.splitlines():
        if any(mark in line.lower() for mark in AIMS_SCF_FAILURE_MARKS):
            return f"FHI-aims: {line.strip(' *')}"
    return None


def cp2k_failure(text: str) -> str | None:
    """CP2K: "SCF run NOT converged" (a warning in 2023.1, an abort in later versions)."""
    for line in text.splitlines():
        if any(mark in line.lower() for mark in CP2K_SCF_FAILURE_MARKS):
            return f"CP2K: {line.strip(' *')}"
    return None


# --------------------------------------------------------------------------- a finished calculator


def scf_failure(calc: Any, workdir: str | Path | None = None) -> str | None:
    """A one-line message when ``calc`` (after its calculation) shows an unconverged SCF, else None.

    Looks at the output files in its ``directory`` and in ``workdir`` first (their message names
    the code and the text found), then at the calculator's ``converged``/``scf_converged``
    attribute (see the module docstring). Never raises.
    """
    for folder in _folders(calc, workdir):
        message = _files_failure(calc, folder)
        if message:
            return message
    for attribute in ("converged", "scf_converged"):
        try:
            value = getattr(calc, attribute, None)
        except Exception:  # a property that cannot answer is no verdict
            continue
        if _is_false(value):
            return f"{type(calc).__name__}: the calculator reports {attribute}=False"
    return None


def _is_false(value: Any) -> bool:
    """False, or a NumPy False; None (unknown), methods and other objects are no verdict."""
    if isinstance(value, bool):
        return value is False
    kind = type(value)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool") and not bool(value)


def _folders(calc: Any, workdir: str | Path | None) -> list[Path]:
    found: list[Path] = []
    for candidate in (getattr(calc, "directory", None), workdir):
        if candidate is None:
            continue
        with contextlib.suppress(OSError, TypeError, ValueError):
            folder = Path(candidate).absolute()
            if folder.is_dir() and folder not in found:
                found.append(folder)
    return found


def _class_names(calc: Any) -> set[str]:
    return {cls.__name__ for cls in type(calc).__mro__}


def _files_failure(calc: Any, folder: Path) -> str | None:
    """The first SCF failure in the known output files of ``folder``."""
    names = _class_names(calc)
    outcar, oszicar = folder / "OUTCAR", folder / "OSZICAR"
    outcar_says = None
    if outcar.is_file():
        outcar_says, message = _vasp_outcar_verdict(_read(outcar), _incar_nelm(folder))
        if message:
            return message
    if oszicar.is_file() and outcar_says is None:  # the OUTCAR's own verdict wins
        nelm = _incar_nelm(folder)
        if nelm is None and outcar.is_file():
            found = _NELM_OUTCAR.search(_read(outcar))
            nelm = int(found.group(1)) if found else None
        message = vasp_oszicar_failure(_read(oszicar), nelm or VASP_DEFAULT_NELM)
        if message:
            return message
    template_output = _template_output(calc)
    espresso = sorted(folder.glob("*.pwo"))
    aims = [folder / "aims.out"]
    cp2k = [folder / "cp2k.out"]
    if template_output:
        if "Espresso" in names:
            espresso.append(folder / template_output)
        elif "Aims" in names:
            aims.append(folder / template_output)
    if "CP2K" in names:  # ASE's CP2K writes <label>.out
        prefix = getattr(calc, "prefix", None) or Path(str(getattr(calc, "label", "") or "cp2k")).name
        cp2k.append(folder / f"{prefix}.out")
    checks = ((espresso, espresso_failure), (aims, aims_failure), (cp2k, cp2k_failure))
    for paths, check in checks:
        for path in _unique_files(paths):
            message = check(_read(path))
            if message:
                return message
    return None


def _template_output(calc: Any) -> str | None:
    """The output file name of ASE's GenericFileIOCalculator template (``espresso.pwo``, ``aims.out``)."""
    template = getattr(calc, "template", None)
    name = getattr(template, "outputname", None)
    return name if isinstance(name, str) and name else None


def _unique_files(paths: Iterable[Path]) -> list[Path]:
    seen: list[Path] = []
    for path in paths:
        if path.is_file() and path not in seen:
            seen.append(path)
    return seen


def _incar_nelm(folder: Path) -> int | None:
    incar = folder / "INCAR"
    if not incar.is_file():
        return None
    text = "\n".join(line.split("#")[0].split("!")[0] for line in _read(incar).splitlines())
    found = _NELM_INCAR.search(text.replace(";", "\n"))
    return int(found.group(1)) if found else None


def _read(path: Path) -> str:
    """The file as text; a huge one as its head and tail (never raises)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            if size <= _READ_LIMIT:
                return handle.read().decode(errors="replace")
            head = handle.read(_HEAD_BYTES)
            handle.seek(size - (_READ_LIMIT - _HEAD_BYTES))
            return (head + b"\n" + handle.read()).decode(errors="replace")
    except OSError:
        return ""


def _last_float(pattern: re.Pattern[str], text: str) -> float | None:
    value = None
    for found in pattern.finditer(text):
        with contextlib.suppress(ValueError):
            value = float(found.group(1).replace("D", "E").replace("d", "e"))
    return value
