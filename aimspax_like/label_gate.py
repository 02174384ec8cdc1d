"""The energy gate: a label far above every energy the campaign has seen is kept out of training.

The reference labels whatever it is given. A geometry that passed the guards can still be
unphysical in ways no cheap geometric check sees (a strained ring, a torsion no thermal motion
reaches), and its reference energy then lies eV above everything the system visits at the
target temperature. Training on it spends model capacity where no simulation will ever go and
shifts the fitted energies (the per-element energy refit follows it too).

``EnergyGate`` keeps the energies per atom of the accepted labels, per composition, and calls a
new label an outlier when it lies more than ``limit`` spreads (standard deviations) above their
mean. Only the high side is gated: a label far *below* the seen energies is a newly found
low-energy region, which is exactly what exploration is for. With fewer than ``min_count``
accepted labels of a composition the gate lets everything through (no spread to measure yet).
The spread has a floor (``floor_ev_per_atom``) so that a campaign of near-identical frames does
not call ordinary thermal motion an outlier.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def composition(numbers: np.ndarray) -> tuple[tuple[int, int], ...]:
    values, counts = np.unique(np.asarray(numbers, dtype=int), return_counts=True)
    return tuple((int(z), int(n)) for z, n in zip(values, counts, strict=True))


class EnergyGate:
    def __init__(self, limit: float, min_count: int = 5, floor_ev_per_atom: float = 1e-3) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = float(limit)
        self.min_count = int(min_count)
        self.floor = float(floor_ev_per_atom)
        self._seen: dict[tuple[tuple[int, int], ...], list[float]] = defaultdict(list)

    def add(self, numbers: np.ndarray, energy: float) -> None:
        """Record an accepted label."""
        if np.isfinite(energy):
            self._seen[composition(numbers)].append(float(energy) / len(numbers))

    def bound(self, numbers: np.ndarray) -> float:
        """The highest energy per atom accepted for this composition now (inf while unknown)."""
        seen = self._seen.get(composition(numbers), [])
        if len(seen) < self.min_count:
            return float("inf")
        spread = max(float(np.std(seen)), self.floor)
        return float(np.mean(seen)) + self.limit * spread

    def outlier(self, numbers: np.ndarray, energy: float) -> str | None:
        """Why this label must be held back, or None when it may be trained on."""
        per_atom = float(energy) / len(numbers)
        if not np.isfinite(per_atom):
            return "non-finite energy"
        bound = self.bound(numbers)
        if per_atom > bound:
            seen = self._seen[composition(numbers)]
            spreads = (per_atom - float(np.mean(seen))) / max(float(np.std(seen)), self.floor)
            return (f"energy {per_atom:.4f} eV/atom is {spreads:.1f} spreads above the mean of "
                    f"{len(seen)} accepted labels (limit {self.limit:g}, bound {bound:.4f} eV/atom)")
        return None
