"""Reference labels (EMT, LJ, xTB, PySCF, FHI-aims, CP2K, or any imported ASE calculator).

Everything here stays import-light: label workers import this package and must start fast, so
torch, MACE, e3nn and Parsl are never imported, and tblite / PySCF only when a label uses them.
"""

from aimspax_like.reference.calculators import check_reference_setup, make_calculator, supported_elements
from aimspax_like.reference.label import label
from aimspax_like.reference.results import (
    FailureKind,
    LabelFailure,
    LabelOutcome,
    LabelResult,
    SCFNotConverged,
)

__all__ = [
    "FailureKind",
    "LabelFailure",
    "LabelOutcome",
    "LabelResult",
    "SCFNotConverged",
    "check_reference_setup",
    "label",
    "make_calculator",
    "supported_elements",
]
