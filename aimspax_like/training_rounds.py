"""Which frames an active-learning training round trains each member on.

The paper's continual learning trains every member on its whole training set after every new
point, so a round costs as much as the set is large and a campaign's training grows with the
square of its labels. A *bounded* round (``al.rounds.mode: replay``) trains the new points, the
frames that have not yet had ``al.max_epochs_per_point`` epochs, together with a sample of the
earlier frames drawn afresh every round (replay, so that the members do not forget what they
knew), and every ``full_every``-th round is a pass over everything. Its cost no longer depends
on how many labels came before.

Replay draws uniformly, or (``replay_weighting: error``) with a probability that grows with the
member's force error on a frame: importance replay, which spends the epochs where the member
is still wrong. The errors are measured on every full-pass round (one forward pass over the
member's training set, far cheaper than the pass's training), half of each probability stays
uniform so that a frame the member once fitted well is still seen now and then.

Frames are known by their content (``frame_key``), not by position: a campaign resumed from
its dataset rebuilds the members' lists in storage order, which can differ from the order in
which a running campaign added them. Everything the planner knows is plain data
(``state_dict``), kept in the committee's checkpoint, so a resumed campaign draws the same
rounds as one that never stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.config import RoundsConfig
from aimspax_like.models.graphs import frame_key

# A frame the committee held before the planner started (IDG data) counts as trained this much.
_ALREADY_TRAINED = 1 << 30


@dataclass(frozen=True)
class RoundPlan:
    """One round: the positions in each member's training list it trains, and whether it is a
    full pass."""

    indices: list[list[int]]
    full: bool

    def sizes(self) -> list[int]:
        return [len(i) for i in self.indices]


class RoundPlanner:
    """Plans bounded rounds and remembers what each frame has been trained."""

    def __init__(self, config: RoundsConfig, epochs_per_point: int, seed: int) -> None:
        self.config = config
        self.epochs_per_point = int(epochs_per_point)
        self.seed = int(seed)
        self.rounds = 0  # rounds planned so far (full or not)
        self.epochs_seen: dict[str, int] = {}  # frame key (hex) -> epochs trained on it
        self.errors: list[dict[str, float]] = []  # per member: frame key -> force RMSE (eV/A)

    # ------------------------------------------------------------------ frames

    def know(self, member_train: Sequence[Sequence[Atoms]]) -> None:
        """Frames already held when the planner starts have been trained (by IDG or earlier)."""
        for train in member_train:
            for atoms in train:
                self.epochs_seen.setdefault(_key(atoms), _ALREADY_TRAINED)

    def is_new(self, atoms: Atoms) -> bool:
        return self.epochs_seen.get(_key(atoms), 0) < self.epochs_per_point

    # ------------------------------------------------------------------ rounds

    def plan(self, member_train: Sequence[Sequence[Atoms]]) -> RoundPlan:
        """The next round's frames per member (full pass: all of them)."""
        full = self.config.mode == "full" or (self.rounds + 1) % self.config.full_every == 0
        if full:
            return RoundPlan([list(range(len(train))) for train in member_train], True)
        indices = []
        for k, train in enumerate(member_train):
            keys = [_key(atoms) for atoms in train]
            new = [i for i, key in enumerate(keys) if self.epochs_seen.get(key, 0) < self.epochs_per_point]
            old = [i for i, key in enumerate(keys) if self.epochs_seen.get(key, 0) >= self.epochs_per_point]
            chosen = sorted(new + self._replay(k, old, keys))
            indices.append(chosen)
        return RoundPlan(indices, False)

    def trained(self, member_train: Sequence[Sequence[Atoms]], plan: RoundPlan, epochs: int) -> None:
        """Count the epochs a round gave its frames (a frame shared by members counts once)."""
        self.rounds += 1
        done = {_key(train[i]) for train, chosen in zip(member_train, plan.indices, strict=True) for i in chosen}
        for key in done:
            self.epochs_seen[key] = min(self.epochs_seen.get(key, 0) + int(epochs), _ALREADY_TRAINED)

    def record_errors(self, member: int, frames: Sequence[Atoms], errors: Sequence[float]) -> None:
        """The member's force RMSE on each of its training frames (measured on a full pass)."""
        while len(self.errors) <= member:
            self.errors.append({})
        self.errors[member] = {_key(a): float(e) for a, e in zip(frames, errors, strict=True)}

    def wants_errors(self, plan: RoundPlan) -> bool:
        """Whether this round's end should measure per-frame errors (error weighting, full pass)."""
        return self.config.mode == "replay" and self.config.replay_weighting == "error" and plan.full

    def _replay(self, member: int, old: list[int], keys: list[str]) -> list[int]:
        size = min(self.config.replay_size, len(old))
        if size == 0:
            return []
        rng = np.random.default_rng([self.seed, self.rounds, member])
        probabilities = None
        if self.config.replay_weighting == "error" and member < len(self.errors) and self.errors[member]:
            known = self.errors[member]
            fallback = max(known.values())  # a frame not measured yet: as hard as the hardest
            weights = np.array([known.get(keys[i], fallback) for i in old], dtype=float)
            weights = np.where(np.isfinite(weights) & (weights > 0), weights, 0.0)
            if weights.sum() > 0:
                probabilities = 0.5 * weights / weights.sum() + 0.5 / len(old)
        return [old[i] for i in rng.choice(len(old), size=size, replace=False, p=probabilities)]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "epochs_seen": dict(self.epochs_seen),
                "errors": [dict(e) for e in self.errors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])
        self.epochs_seen = {str(k): int(v) for k, v in state["epochs_seen"].items()}
        self.errors = [{str(k): float(v) for k, v in e.items()} for e in state["errors"]]


def member_force_errors(predict: Callable[[Sequence[Atoms]], np.ndarray], frames: Sequence[Atoms],
                        chunk: int = 32) -> list[float]:
    """Force RMSE (eV/A) of one member on each frame; ``predict`` returns the member's forces of
    a list of frames, atoms concatenated in order."""
    errors: list[float] = []
    for start in range(0, len(frames), chunk):
        part = frames[start:start + chunk]
        forces = predict(part)
        offset = 0
        for atoms in part:
            n = len(atoms)
            reference = atoms.arrays.get("REF_forces")
            if reference is None:
                errors.append(float("nan"))
            else:
                errors.append(float(np.sqrt(np.mean((forces[offset:offset + n] - reference) ** 2))))
            offset += n
    return errors


def _key(atoms: Atoms) -> str:
    return frame_key(atoms).hex()
