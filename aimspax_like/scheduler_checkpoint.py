"""What an AL scheduler saves in a checkpoint and how it is put back (``ALScheduler``'s base).

Kept apart from the loop in ``scheduler``: this is the contract with ``state/al_checkpoint.pt``
(plain data: arrays, dicts, RNG states; writing the file is ``aimspax_like.state``'s business),
and it changes when the checkpoint format does, not when the loop's policy does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from aimspax_like.errors import SetupError
from aimspax_like.sampling.state import load_phase_space, phase_space_dict
from aimspax_like.structures import atoms_from_arrays, atoms_to_arrays
from aimspax_like.uncertainty import MovingAverageThreshold


class SchedulerCheckpoint:
    """``state_dict`` / ``load_state_dict`` over the attributes ``ALScheduler`` keeps."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue from here: trajectories (geometry, momenta, thermostat
        chain, step, RNG, status, checkpoint geometry, counters), the labels in flight (frame and
        provenance, so they can be submitted again), the threshold window, the counters and the
        committee's own state, and the frames whose substructures are in flight (each piece is a
        label in flight of its own). Held labels and the energy gate are not in it: they are
        rebuilt from the dataset, which has them already.
        """
        trajectories = []
        for t in self.trajectories:
            md = t.md
            trajectories.append({
                "index": t.index, **phase_space_dict(md), "status": t.status.value,
                "checkpoint": atoms_to_arrays(t.checkpoint),
                "epochs_for_point": t.epochs_for_point, "labels_done": t.labels_done,
                "labels_failed": t.labels_failed, "labels_held": t.labels_held,
            })
        in_flight = [
            {"label": label_id, "trajectory": index, "frame": atoms_to_arrays(frame), "provenance": dict(provenance)}
            for label_id, (index, frame, provenance) in sorted(self._in_flight.items())
        ]
        committee_state = getattr(self.committee, "state_dict", None)
        return {
            "trajectories": trajectories, "in_flight": in_flight, "threshold": self.threshold.state_dict(),
            "next_label": self._next_label, "training_rounds": self.training_rounds,
            "training_debt": self.training_debt, "attempts": dict(self.attempts),
            "committee": committee_state() if committee_state is not None else None,
            "analysis": None if self.analysis is None else self.analysis.state_dict(),
            "piece_groups": [
                {"trajectory": index, "md_step": step, "parent": atoms_to_arrays(group.parent),
                 "left": group.left, "stored": group.stored}
                for (index, step), group in sorted(self._groups.items())
            ],
        }

    def load_state_dict(
        self, state: dict[str, Any], is_stored: Callable[[dict[str, Any]], str | None],
        stored_forces: Callable[[str, int, int], np.ndarray | None] | None = None,
    ) -> dict[str, int]:
        """Put a ``state_dict`` back into a scheduler whose trajectories were added as for a fresh run.

        Labels that were in flight are adopted when ``is_stored(provenance)`` says the dataset has
        them (it returns the stored split; a label stored as 'held' is adopted as held) and
        submitted again otherwise. Returns how many of each ({"adopted", "resubmitted"}).
        Analysis labels (``al.analysis_every``) are put back the same way, answered from
        ``stored_forces(origin, trajectory, md_step)`` where the dataset has them.
        """
        from aimspax_like.scheduler import Status  # the loop's module imports this one

        if len(state["trajectories"]) != len(self.trajectories):
            raise SetupError(f"checkpoint has {len(state['trajectories'])} trajectories, "
                             f"the config {len(self.trajectories)}")
        load_committee = getattr(self.committee, "load_state_dict", None)
        if state["committee"] is not None and load_committee is not None:
            load_committee(state["committee"])
        for t, saved in zip(self.trajectories, state["trajectories"], strict=True):
            md = t.md
            load_phase_space(md, saved)
            md.invalidate_forces()
            t.status = Status(saved["status"])
            t.checkpoint = atoms_from_arrays(saved["checkpoint"])
            t.epochs_for_point, t.labels_done = saved["epochs_for_point"], saved["labels_done"]
            t.labels_failed = saved["labels_failed"]
            t.labels_held = saved.get("labels_held", 0)
        self.threshold = MovingAverageThreshold.from_state_dict(state["threshold"])
        self._next_label = state["next_label"]
        self.training_rounds = state["training_rounds"]
        self.training_debt = state["training_debt"]
        self.attempts = dict(state.get("attempts", {}))
        from aimspax_like.scheduler import PieceGroup

        self._groups = {
            (g["trajectory"], g["md_step"]): PieceGroup(atoms_from_arrays(g["parent"]), g["left"], g["stored"])
            for g in state.get("piece_groups", [])
        }
        counts = {"adopted": 0, "resubmitted": 0}
        for label in state["in_flight"]:
            frame = atoms_from_arrays(label["frame"])
            stored = is_stored(label["provenance"])
            if stored:
                self.adopt(label["label"], label["trajectory"], frame, held=stored == "held",
                           provenance=label["provenance"])
                counts["adopted"] += 1
            else:
                self.launch(label["label"], label["trajectory"], frame, label["provenance"])
                counts["resubmitted"] += 1
        if self.analysis is not None and state.get("analysis"):
            found = stored_forces or (lambda origin, trajectory, step: None)
            extra = self.analysis.load_state_dict(state["analysis"], found)
            counts["analysis_adopted"], counts["analysis_resubmitted"] = extra["adopted"], extra["resubmitted"]
        return counts
