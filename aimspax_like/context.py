"""What every phase shares: the run directory's paths, the dataset, the event log, the labeller.

``RunContext.store_label`` is the single door through which a reference label enters the
campaign: the frame is durable in ``data/dataset.h5`` (and logged) before anything learns
from it or refers to it. It also refuses duplicates: a frame whose (origin, trajectory, MD step)
is already stored (a resumed campaign meeting a label it stored before it was killed) is not
written again, and the stored frame is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ase import Atoms

from aimspax_like.config import CampaignConfig
from aimspax_like.data import DatasetStore, LabelledFrame, reference_fingerprint
from aimspax_like.events import EventLog, WallClock
from aimspax_like.labelling import Labeller
from aimspax_like.reference.results import LabelResult


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "campaign.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def dataset(self) -> Path:
        return self.data / "dataset.h5"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def events(self) -> Path:
        return self.logs / "events.jsonl"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def folders(self) -> tuple[Path, ...]:
        """The folders a new run directory is laid out with."""
        return (self.state, self.data, self.models, self.logs, self.labels)

    def member_models(self) -> list[Path]:
        return sorted(self.models.glob("member_*.model"), key=lambda p: int(p.stem.split("_")[1]))


@dataclass
class RunContext:
    config: CampaignConfig
    paths: RunPaths
    store: DatasetStore
    events: EventLog
    executor: Any  # aimspax_like.execution.LabelExecutor; kept untyped so no phase imports parsl
    structures: list[Atoms]
    clock: WallClock = field(default_factory=WallClock)
    on_progress: Callable[[dict[str, Any]], None] | None = None
    split_counts: dict[str, int] = field(default_factory=dict)
    should_stop: Callable[[], int] = lambda: 0  # a signal number once SIGTERM/SIGINT arrived
    stored_keys: set[tuple[str, int, int, int]] = field(default_factory=set)
    labeller: Labeller = field(init=False)

    def __post_init__(self) -> None:
        self.labeller = Labeller.for_campaign(self.config, self.executor, self.paths.labels, self.events, self.clock,
                                              should_stop=lambda: self.should_stop())
        # Counted once from the file, then kept in step by store_label (the stop criteria ask
        # for the training-set size every MD step; reopening the HDF5 file each time is waste).
        self.split_counts = dict(self.store.counts()["split"])
        self.stored_keys = set(self.store.keys())

    def is_stored(self, origin: str, trajectory: int = -1, md_step: int = -1, piece: int = -1) -> bool:
        return (origin, int(trajectory), int(md_step), int(piece)) in self.stored_keys

    @property
    def reference_spec(self) -> dict[str, Any]:
        return self.config.reference.model_dump(mode="json")

    @property
    def faults(self) -> dict[str, Any] | None:
        return None if self.config.faults is None else self.config.faults.model_dump(mode="json")

    @property
    def fingerprint(self) -> str:
        return reference_fingerprint(self.reference_spec)

    def store_label(self, atoms: Atoms, result: LabelResult, split: str, **provenance: Any) -> LabelledFrame:
        key = (provenance.get("origin", ""), int(provenance.get("trajectory", -1)),
               int(provenance.get("md_step", -1)), int(provenance.get("piece", -1)))
        if key[2] >= 0 and key in self.stored_keys:  # frames without an MD step have no identity
            self.events.emit("frame_duplicate", origin=key[0], trajectory=key[1], md_step=key[2], piece=key[3])
            return next(f for f in self.store.frames(origin=key[0])
                        if (f.trajectory, f.md_step, f.piece) == key[1:])
        stress = None if int(provenance.get("piece", -1)) >= 0 else result.stress  # a piece's is not a label
        frame = LabelledFrame.from_atoms(
            atoms, result.energy, result.forces, stress, split=split,
            reference=self.fingerprint, label_wall_s=result.wall_s, **provenance,
        )
        with self.clock.measure("io"):  # the durable write (and its fsync): the profile's 'io'
            index = self.store.append(frame)
        self.stored_keys.add(key)
        self.split_counts[split] = self.split_counts.get(split, 0) + 1
        self.events.emit(
            "frame_stored", index=index, split=split, origin=provenance.get("origin"),
            trajectory=provenance.get("trajectory", -1), member=provenance.get("member", -1),
        )
        return frame

    def store_frames(self, frames: list[LabelledFrame]) -> list[LabelledFrame]:
        """Store frames labelled elsewhere (imported data) in one write; those already stored are
        skipped by the same identity as ``store_label``'s. Returns the frames that were new."""
        new = [f for f in frames
               if not (f.md_step >= 0 and self.is_stored(f.origin, f.trajectory, f.md_step, f.piece))]
        if new:
            with self.clock.measure("io"):
                self.store.extend(new)
            for frame in new:
                self.stored_keys.add((frame.origin, frame.trajectory, frame.md_step, frame.piece))
                self.split_counts[frame.split] = self.split_counts.get(frame.split, 0) + 1
        return new

    def label_on_workers(
        self, phase: str, frames: list[Atoms], first_label: int, fields: list[dict[str, Any]] | None = None,
    ) -> list[LabelResult | None]:
        """Label frames on the workers in parallel (IDG and test-set batches); a failure is None.

        Goes through the campaign's one ``Labeller`` (same folders, seeds, retries, events and
        stop rule as active learning); label ``k`` is number ``first_label + k`` of ``phase``.
        """
        return self.labeller.label_all(phase, frames, first_label, fields)

    def release_label(self, origin: str, trajectory: int, md_step: int, split: str) -> LabelledFrame:
        """A held label joins ``split`` (durably: the store's split column is rewritten)."""
        index = self.store.index_of(origin, trajectory, md_step)
        with self.clock.measure("io"):
            self.store.set_split(index, split)
        self.split_counts["held"] = self.split_counts.get("held", 0) - 1
        self.split_counts[split] = self.split_counts.get(split, 0) + 1
        frame = self.store.frame(index)
        self.events.emit("frame_released", index=index, split=split, origin=origin, trajectory=trajectory)
        return frame

    def warn(self, message: str, **fields: Any) -> None:
        """Something the user must see even without reading the log: stderr and a ``warning`` event."""
        import sys

        self.events.emit("warning", message=message, **fields)
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def train_size(self) -> int:
        return self.split_counts.get("train", 0)

    def progress(self, **status: Any) -> None:
        """Report progress; also where convergence training (not checkpointed) obeys a stop."""
        if status.get("phase") == "converge" and self.should_stop():
            from aimspax_like.errors import CampaignInterrupted

            raise CampaignInterrupted(int(self.should_stop()))
        if self.on_progress is not None:
            self.on_progress(status)
