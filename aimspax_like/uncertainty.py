"""Query-by-committee uncertainty (Eq. 1) and the shared moving-average threshold (Eq. 2).

Pure functions and one small class, so they can be checked against numbers computed by hand.

Eq. 1::

    delta = max_i sqrt( 1/(3M) * sum_j sum_k (F_ijk - mean_j F_ijk)^2 )

with i over atoms, j over the M committee members and k over x, y, z (population normalisation).

Eq. 2::

    threshold = (1 + c_x) * mean(last N deltas of all trajectories)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np


def atomic_force_std(forces: np.ndarray) -> np.ndarray:
    """Per-atom committee force standard deviation.

    ``forces`` has shape ``[n_members, n_atoms, 3]``; the result has shape ``[n_atoms]``.
    """
    forces = np.asarray(forces, dtype=float)
    if forces.ndim != 3 or forces.shape[2] != 3:
        raise ValueError(f"forces must have shape [n_members, n_atoms, 3], got {forces.shape}")
    deviation = forces - forces.mean(axis=0, keepdims=True)
    n_members = forces.shape[0]
    return np.sqrt((deviation**2).sum(axis=(0, 2)) / (3 * n_members))


def max_atomic_uncertainty(forces: np.ndarray) -> float:
    """Eq. 1: the largest per-atom committee force standard deviation of one structure."""
    return float(atomic_force_std(forces).max())


def stress_uncertainty(stresses: np.ndarray) -> float:
    """The committee's stress disagreement of one cell: the largest standard deviation over members
    of any of the 9 stress components (eV/A^3). ``stresses [n_members, 3, 3]``.

    Eq. 1 looks at atoms only; a cell whose virial the members disagree on can pass it while its
    barostat is driven by a poorly known stress (solids under NPT).
    """
    return float(np.asarray(stresses, dtype=float).reshape(len(stresses), 9).std(axis=0).max())


def max_atomic_uncertainty_per_system(forces: np.ndarray, system_idx: np.ndarray, n_systems: int) -> np.ndarray:
    """Eq. 1 for every system of a batch at once (``forces [M, n_atoms_total, 3]``)."""
    per_atom = atomic_force_std(forces)
    result = np.full(n_systems, -np.inf)
    np.maximum.at(result, np.asarray(system_idx), per_atom)
    return result


class MovingAverageThreshold:
    """Eq. 2, shared by all trajectories.

    The threshold is infinite until ``warmup`` uncertainties have been seen (no label is asked
    for while the average means nothing), and stops moving once ``freeze()`` is called (the
    caller freezes it when the training set reaches ``freeze_threshold_at`` frames).
    """

    def __init__(self, window: int = 400, c_x: float = 0.0, warmup: int = 10) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        if warmup <= 0:
            raise ValueError("warmup must be positive")
        self.window = window
        self.c_x = c_x
        self.warmup = warmup
        self._values: deque[float] = deque(maxlen=window)
        self.n_seen = 0
        self.frozen_value: float | None = None

    def update(self, deltas: float | Iterable[float]) -> float:
        """Add uncertainties (in the order they were computed) and return the new threshold."""
        values = [deltas] if isinstance(deltas, int | float) else list(deltas)
        for value in values:
            if math.isfinite(value):
                self._values.append(float(value))
                self.n_seen += 1
        return self.value

    @property
    def value(self) -> float:
        if self.frozen_value is not None:
            return self.frozen_value
        if self.n_seen < self.warmup or not self._values:
            return math.inf
        return (1.0 + self.c_x) * (sum(self._values) / len(self._values))

    @property
    def frozen(self) -> bool:
        return self.frozen_value is not None

    def freeze(self) -> None:
        """Keep the current value from now on (only once it is finite)."""
        if self.frozen_value is None and math.isfinite(self.value):
            self.frozen_value = self.value

    def exceeded(self, delta: float) -> bool:
        return delta > self.value

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "c_x": self.c_x,
            "warmup": self.warmup,
            "values": list(self._values),
            "n_seen": self.n_seen,
            "frozen_value": self.frozen_value,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> MovingAverageThreshold:
        threshold = cls(state["window"], state["c_x"], state["warmup"])
        threshold._values.extend(state["values"])
        threshold.n_seen = state["n_seen"]
        threshold.frozen_value = state["frozen_value"]
        return threshold
