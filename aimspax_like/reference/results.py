"""What one reference label hands back: a result or a classified failure, as plain data.

A failed SCF must never crash a campaign, so ``label`` returns failures as values instead of
raising. Both outcome types are small frozen dataclasses of floats, strings and NumPy arrays,
which keeps them picklable: they travel back from Parsl workers and from the timeout child
process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import numpy as np

_MESSAGE_LIMIT = 300


class SCFNotConverged(Exception):
    """Raised by our calculators (and fault injection) when the SCF stopped unconverged."""


class FailureKind(str, Enum):
    """Why a label failed; the scheduler reacts differently to each (retry, skip, shrink)."""

    SCF_NOT_CONVERGED = "scf_not_converged"
    CRASHED = "crashed"
    TIMED_OUT = "timed_out"
    INVALID_RESULT = "invalid_result"  # came back, but non-finite or misshapen: never training data


def one_line(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    """First non-empty line of ``text``, shortened, so failure logs stay one row per label."""
    for line in str(text).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


@dataclass(frozen=True, eq=False)
class LabelResult:
    """A successful label: energy (eV), forces (eV/A) and, when asked for, stress (eV/A^3, Voigt).

    ``workdir`` is None when the scratch folder was removed. ``scf_cycles`` is the number of SCF
    iterations the label took, where the reference reports it (PySCF), else None. ``cpu_s`` is
    the CPU the label cost on its worker (``cpu_time``), None where it was not measured (a label
    rebuilt from the dataset). Instances compare by identity (``eq=False``): field-wise ``==``
    on NumPy arrays has no single truth value.
    """

    energy: float
    forces: np.ndarray
    stress: np.ndarray | None
    workdir: str | None
    wall_s: float
    scf_cycles: int | None = None
    cpu_s: float | None = None

    def __post_init__(self) -> None:
        # Normalise once here, so consumers never see lists, float32 or views of calculator state.
        object.__setattr__(self, "energy", float(self.energy))
        object.__setattr__(self, "forces", np.array(self.forces, dtype=float).reshape(-1, 3))
        if self.stress is not None:
            object.__setattr__(self, "stress", np.array(self.stress, dtype=float).reshape(6))

    @property
    def ok(self) -> bool:
        return True

    def cost(self) -> dict[str, float | int]:
        """What the label cost, for its ``label_done`` event: wall time and, where known, the
        worker's CPU time and SCF iterations (so the event log shows what warm workers save)."""
        cost: dict[str, float | int] = {"wall_s": self.wall_s}
        if self.cpu_s is not None:
            cost["cpu_s"] = round(float(self.cpu_s), 4)
        if self.scf_cycles is not None:
            cost["scf_cycles"] = int(self.scf_cycles)
        return cost


@dataclass(frozen=True)
class LabelFailure:
    """A failed label; ``workdir`` is kept on disk as evidence and named here.

    ``cpu_s``: the CPU the failed try cost on its worker, as for ``LabelResult``.
    """

    kind: FailureKind
    message: str
    workdir: str | None
    wall_s: float
    cpu_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FailureKind(self.kind))
        object.__setattr__(self, "message", one_line(self.message))

    @property
    def ok(self) -> bool:
        return False


LabelOutcome = LabelResult | LabelFailure

# Texts backends use for an SCF that gave up. tblite raises ase's CalculationFailed with
# "SCF not converged in N cycles"; FHI-aims prints "*** scf_solver: SCF cycle not converged.".
_SCF_PATTERN = re.compile(
    r"scf\b.*\bnot\s+converged|scf\s+cycle\s+did\s+not\s+converge|"
    r"self-consistency\s+cycle\s+did\s+not\s+converge|scf\s+did\s+not\s+converge",
    re.IGNORECASE,
)


def says_scf_not_converged(text: str) -> bool:
    """True for text that clearly reports a failed SCF.

    FHI-aims' routine "Self-consistency cycle not yet converged - restarting mixer" is not a
    failure and does not match: the pattern needs the word SCF or "did not converge".
    """
    return bool(_SCF_PATTERN.search(text))


def classify_exception(exc: BaseException) -> tuple[FailureKind, str]:
    """Map an exception from a calculation to a failure kind and a one-line message."""
    text = str(exc)
    message = one_line(f"{type(exc).__name__}: {one_line(text) or '(no message)'}")
    if isinstance(exc, SCFNotConverged) or says_scf_not_converged(text):
        return FailureKind.SCF_NOT_CONVERGED, message
    return FailureKind.CRASHED, message
