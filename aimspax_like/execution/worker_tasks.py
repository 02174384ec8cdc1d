"""What label workers run besides ``label`` itself: light functions, no Parsl, no torch.

Workers unpickle app functions by reference, so importing this module on a worker must load
nothing heavy (``tests/test_slurm_config.py`` checks it in a fresh interpreter).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ase import Atoms

    from aimspax_like.reference.results import LabelOutcome

BATCH_JOB_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")
"""Where each scheduler puts the job id (SLURM, PBS Pro/Torque, LSF, Grid Engine)."""


def placement() -> dict[str, Any]:
    """Where this process runs: host, pid, and the batch job and Parsl block it belongs to.

    ``slurm_job_id`` keeps its name for SLURM runs; ``batch_job_id`` is the job of any scheduler.
    """
    batch_job = next((os.environ[name] for name in BATCH_JOB_VARIABLES if os.environ.get(name)), None)
    return {
        "host": platform.node(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "batch_job_id": batch_job,
        "block": os.environ.get("PARSL_WORKER_BLOCK_ID"),
    }


def worker_report() -> dict[str, Any]:
    """A worker's placement and heavy modules loaded (``ParslLabelExecutor.probe``)."""
    heavy = [name for name in ("torch", "mace", "e3nn") if name in sys.modules]
    return {**placement(), "heavy_modules": heavy}


def label_with_placement(
    atoms: Atoms, spec: dict, workdir: str, faults: dict | None = None, seed: int | None = None
) -> tuple[LabelOutcome, dict[str, Any]]:
    """``label`` and where it ran, for workers that live in batch jobs.

    The outcome types stay as they are; the placement travels beside them and becomes a
    ``label_placed`` event, the record that a label ran inside a given batch job.
    """
    from aimspax_like.reference.label import label

    return label(atoms, spec, workdir, faults=faults, seed=seed), placement()
