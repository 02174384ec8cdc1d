"""Campaign checkpoints: how they are written, what a resume may change, and when AL saves.

What a checkpoint holds is up to the objects that own the state: ``ALScheduler.state_dict``
(every trajectory, the labels in flight, the Eq. 2 threshold window, the counters, and the
committee's own ``state_dict``) and ``Committee.state_dict`` (the trainer: member weights,
optimisers, EMAs, shuffling generators, patience counters and validation history). This module
only writes and reads such payloads, says which config keys a resume may change, and provides
the ``Checkpointer`` that the AL phase hangs on the scheduler: it writes
``state/al_checkpoint.pt`` after every submitted label, every label that came back and every
training round, so the scheduler itself knows nothing about files. ``state/committee.pt`` (see
``Committee.save``) keeps the committee's state between phases.

Ordering makes it safe against a SIGKILL at any instant. A label enters ``dataset.h5`` (fsynced)
before any checkpoint refers to it, and a label is recorded as in flight in a checkpoint before
it can be stored. So on resume every in-flight label of the checkpoint is either already in the
dataset (it finished between the last checkpoint and the kill: it is adopted, not stored again)
or not (it is submitted again). Stored frames are identified by (origin, trajectory, MD step),
which is unique within a campaign.

Writes are atomic: a temporary file is written, flushed and fsynced, renamed over the old one
and the directory is fsynced, so a reader sees the old checkpoint or the new one, never half.

SIGTERM (SLURM, before the walltime kill) and SIGINT only set a flag
(``aimspax_like.signals.StopFlag``); the scheduler checkpoints and raises
``aimspax_like.errors.CampaignInterrupted`` at its next loop iteration.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import yaml

from aimspax_like.data.store import fsync_path
from aimspax_like.errors import SetupError

# 2: the AL payload holds the committee's own state_dict ("committee") instead of the trainer's.
FORMAT_VERSION = 2
AL_CHECKPOINT = "al_checkpoint.pt"
COMMITTEE_STATE = "committee.pt"

# Config keys a resume may change: they alter budgets, where labels run or what is exported,
# never what has been computed so far. A key matches itself and everything below it.
SAFE_TO_CHANGE = (
    "al.max_md_steps", "al.max_train_set_size", "al.train_set_counts", "al.max_labels_in_flight", "al.failures",
    "idg.max_set_size", "idg.trajectories_per_structure", "idg.converge", "training.allow_mixed_references",
    "cluster", "output", "faults", "reference.timeout_s", "reference.keep_workdir", "reference.warm", "site",
    "converge.max_epochs", "converge.patience", "al.analysis_every", "training.batched_members", "al.rounds",
    "otf.steps", "otf.write_every", "otf.checkpoint_every", "otf.log_every", "otf.validate_frames", "otf.max_failures",
)


# --------------------------------------------------------------------------- atomic files


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` (tensors, arrays, plain data) stamped with ``FORMAT_VERSION``, written atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, "saved": time.time(), **payload}, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's payload; a damaged or foreign file is a one-line SetupError."""
    import torch

    try:
        # Our own file, holding numpy RNG states and arrays: weights_only would refuse them.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch/pickle raise many types on a truncated or foreign file
        raise SetupError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise SetupError(f"{path}: not a campaign checkpoint (no format_version)")
    if state["format_version"] != FORMAT_VERSION:
        raise SetupError(f"{path}: checkpoint format_version {state['format_version']}, "
                         f"this engine reads {FORMAT_VERSION}")
    return state


# --------------------------------------------------------------------------- config changes


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _safe(key: str) -> bool:
    return any(key == safe or key.startswith(f"{safe}.") for safe in SAFE_TO_CHANGE)


def unsafe_changes(saved_yaml: str, current_yaml: str) -> list[str]:
    """Dotted keys whose value differs between two resolved configs and may not change.

    A key the saved record does not have at all was added to the engine after the run started
    (the record writes every key the engine knew): its default stands for what the older engine
    did, so it is not a change, and a run directory stays resumable across an upgrade. A key
    that disappeared from the current config is a change.
    """
    saved = dict(_flatten(yaml.safe_load(saved_yaml)))
    current = dict(_flatten(yaml.safe_load(current_yaml)))
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if k in saved and saved.get(k) != current.get(k) and not _safe(k)]


# --------------------------------------------------------------------------- the AL phase


class Stateful(Protocol):
    """What the ``Checkpointer`` needs of the object it saves (an ``ALScheduler``)."""

    def state_dict(self) -> dict[str, Any]: ...


class Checkpointer:
    """Scheduler observer: writes the AL checkpoint after every event it is told about."""

    def __init__(self, path: Path, scheduler: Stateful) -> None:
        self.path = path
        self.scheduler = scheduler
        self.writes = 0

    def __call__(self, event: str) -> None:
        save_checkpoint(self.path, {"phase": "al", "event": event, "al": self.scheduler.state_dict()})
        self.writes += 1
