"""Reference labels (EMT, LJ, xTB, PySCF, FHI-aims, CP2K, a MACE model file, or any imported ASE
calculator), and stretches of reference MD run on the workers (``md_segment``).

Everything here stays import-light: label workers import this package and must start fast, so
Parsl is never imported, torch, MACE and e3nn only by the ``mace`` kind's labels, and tblite /
PySCF only when a label uses them.
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
