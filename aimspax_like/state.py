"""Campaign checkpoints: what is saved, how it is written, and what a resume may change.

The active-learning phase is the long one, so its whole state is checkpointed: the trainer
(member weights, optimisers, EMAs, shuffling generators, patience counters), every trajectory
(positions, momenta, cell, thermostat chain, step, RNG state, status, checkpoint geometry,
counters), the labels in flight (their frames and provenance, so they can be submitted again),
the Eq. 2 threshold window and the scheduler's counters. A ``Checkpointer`` observes the
scheduler and writes ``state/al_checkpoint.pt`` after every submitted label, every label that
came back and every training round: the scheduler itself knows nothing about files.

Ordering makes it safe against a SIGKILL at any instant. A label enters ``dataset.h5`` (fsynced)
before any checkpoint refers to it, and a label is recorded as in flight in a checkpoint before
it can be stored. So on resume every in-flight label of the checkpoint is either already in the
dataset (it finished between the last checkpoint and the kill: it is adopted, not stored again)
or not (it is submitted again). Stored frames are identified by (origin, trajectory, MD step),
which is unique within a campaign.

Writes are atomic: a temporary file is written, flushed and fsynced, renamed over the old one
and the directory is fsynced, so a reader sees the old checkpoint or the new one, never half.

SIGTERM (SLURM, before the walltime kill) and SIGINT only set a flag (``StopFlag``); the
scheduler checkpoints and raises ``CampaignInterrupted`` at its next loop iteration.
"""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from aimspax_like.data.store import fsync_path
from aimspax_like.errors import SetupError

FORMAT_VERSION = 1
AL_CHECKPOINT = "al_checkpoint.pt"

# Config keys a resume may change: they alter budgets, where labels run or what is exported,
# never what has been computed so far. A key matches itself and everything below it.
SAFE_TO_CHANGE = (
    "al.max_md_steps", "al.max_train_set_size", "al.max_labels_in_flight", "idg.max_set_size",
    "cluster", "output", "faults", "reference.timeout_s", "reference.keep_workdir",
    "converge.max_epochs", "converge.patience",
)


class CampaignInterrupted(Exception):
    """Raised at a clean stopping point after a signal; the checkpoint is already on disk."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; state saved, resume to continue")


class StopFlag:
    """Records SIGTERM/SIGINT instead of dying; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signum != 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving state and stopping at the next step "
              "(send it again to stop at once)", flush=True)

    def install(self) -> StopFlag:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


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
    """Dotted keys whose value differs between two resolved configs and may not change."""
    saved = dict(_flatten(yaml.safe_load(saved_yaml)))
    current = dict(_flatten(yaml.safe_load(current_yaml)))
    keys = sorted(set(saved) | set(current))
    return [k for k in keys if saved.get(k) != current.get(k) and not _safe(k)]


# --------------------------------------------------------------------------- the AL phase


def _atoms_dict(atoms: Any) -> dict[str, Any]:
    return {"numbers": atoms.numbers.copy(), "positions": atoms.get_positions(), "cell": atoms.cell.array.copy(),
            "pbc": atoms.pbc.copy()}


def _atoms_from(data: dict[str, Any]) -> Any:
    from ase import Atoms

    return Atoms(numbers=data["numbers"], positions=data["positions"], cell=data["cell"], pbc=data["pbc"])


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """Everything an ``ALScheduler`` needs to continue where it is now."""
    trajectories = []
    for t in scheduler.trajectories:
        md = t.md
        trajectories.append({
            "index": t.index, "atoms": _atoms_dict(md.atoms), "momenta": md.atoms.get_momenta(),
            "step": md.step, "chain": None if md.chain is None else md.chain.copy(),
            "rng": md.rng.bit_generator.state, "status": t.status.value, "checkpoint": _atoms_dict(t.checkpoint),
            "epochs_for_point": t.epochs_for_point, "labels_done": t.labels_done, "labels_failed": t.labels_failed,
            "labels_held": t.labels_held,
        })
    in_flight = [
        {"label": label_id, "trajectory": index, "frame": _atoms_dict(frame), "provenance": dict(provenance)}
        for label_id, (index, frame, provenance) in sorted(scheduler._in_flight.items())
    ]
    return {
        "trajectories": trajectories, "in_flight": in_flight, "threshold": scheduler.threshold.state_dict(),
        "next_label": scheduler._next_label, "training_rounds": scheduler.training_rounds,
        "training_debt": scheduler.training_debt, "trainer": scheduler.committee.trainer.state_dict(),
        "attempts": dict(scheduler.attempts),
    }


def restore_scheduler(scheduler: Any, state: dict[str, Any], is_stored: Any) -> dict[str, int]:
    """Put a checkpoint back into a scheduler whose trajectories were added as for a fresh run.

    Labels that were in flight are adopted when ``is_stored(provenance)`` says the dataset has
    them and submitted again otherwise; it may return the stored split, and a label stored as
    'held' is adopted as held. Returns how many of each.
    """
    from aimspax_like.scheduler import Status
    from aimspax_like.uncertainty import MovingAverageThreshold

    if len(state["trajectories"]) != len(scheduler.trajectories):
        raise SetupError(f"checkpoint has {len(state['trajectories'])} trajectories, "
                         f"the config {len(scheduler.trajectories)}")
    committee = scheduler.committee
    committee.trainer.load_state_dict(state["trainer"])
    committee.last_metrics = [m for m in committee.trainer.last_metrics if m is not None]
    for t, saved in zip(scheduler.trajectories, state["trajectories"], strict=True):
        md = t.md
        md.atoms.set_cell(saved["atoms"]["cell"])
        md.atoms.set_positions(saved["atoms"]["positions"])
        md.atoms.set_momenta(saved["momenta"])
        md.step = saved["step"]
        md.chain = saved["chain"]
        md.rng.bit_generator.state = saved["rng"]
        md.invalidate_forces()
        t.status = Status(saved["status"])
        t.checkpoint = _atoms_from(saved["checkpoint"])
        t.epochs_for_point, t.labels_done = saved["epochs_for_point"], saved["labels_done"]
        t.labels_failed = saved["labels_failed"]
        t.labels_held = saved.get("labels_held", 0)
    scheduler.threshold = MovingAverageThreshold.from_state_dict(state["threshold"])
    scheduler._next_label = state["next_label"]
    scheduler.training_rounds = state["training_rounds"]
    scheduler.training_debt = state["training_debt"]
    scheduler.attempts = dict(state.get("attempts", {}))
    counts = {"adopted": 0, "resubmitted": 0}
    for label in state["in_flight"]:
        frame = _atoms_from(label["frame"])
        stored = is_stored(label["provenance"])
        if stored:
            scheduler.adopt(label["label"], label["trajectory"], frame, held=stored == "held")
            counts["adopted"] += 1
        else:
            scheduler.launch(label["label"], label["trajectory"], frame, label["provenance"])
            counts["resubmitted"] += 1
    return counts


class Checkpointer:
    """Scheduler observer: writes the AL checkpoint after every event it is told about."""

    def __init__(self, path: Path, scheduler: Any) -> None:
        self.path = path
        self.scheduler = scheduler
        self.writes = 0

    def __call__(self, event: str) -> None:
        save_checkpoint(self.path, {"phase": "al", "event": event, "al": scheduler_state(self.scheduler)})
        self.writes += 1
