"""The energy gate: a label far above the energies the system visits is kept out of training.

The reference labels whatever it is given. A geometry that passed the guards can still be
unphysical in ways no cheap geometric check sees (a strained ring, a torsion no thermal motion
reaches), and its reference energy then lies eV above everything the system visits at the
target temperature. Training on it spends model capacity where no simulation will ever go and
shifts the fitted energies (the per-element energy refit follows it too).

``EnergyGate`` measures the thermal distribution of energies per atom, per composition, on the
*reference* frames of the initial dataset (reference or foundation MD at the IDG temperature:
an unbiased sample, unlike active-learning labels, which are chosen for being unusual and
would let the bound creep upwards label by label). A new label is an outlier when its energy
per atom lies more than ``limit`` spreads (standard deviations) above that distribution's centre
(its mean, but never below its lowest frame plus the harmonic 3/2 k_B T per atom: ``center``).
For harmonic motion, the mean at 1.4 times the IDG temperature lies about 1.5 spreads higher
and its hottest frames about 5, so the default of 6 keeps hot but physical frames.

Only the high side is gated: a label far *below* is a newly found low-energy region, which is
exactly what exploration is for. A held label is *confirmed* (released into training) once an
accepted label lands within one spread of it: the region is then reached by ordinary sampling,
not by one runaway trajectory. A composition without enough reference frames (``min_count``)
is measured on its accepted labels instead; with none, the gate lets everything through. The
spread has floors (``floor_ev_per_atom`` and, given the temperature, half the harmonic thermal
spread) so that a few near-identical initial frames do not make ordinary thermal motion look
like an outlier.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from ase.units import kB

Composition = tuple[tuple[int, int], ...]


def composition(numbers: np.ndarray) -> Composition:
    values, counts = np.unique(np.asarray(numbers, dtype=int), return_counts=True)
    return tuple((int(z), int(n)) for z, n in zip(values, counts, strict=True))


class EnergyGate:
    def __init__(
        self, limit: float, temperature_K: float | None = None, min_count: int = 3, floor_ev_per_atom: float = 1e-3
    ) -> None:
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.limit = float(limit)
        self.temperature_K = temperature_K
        self.min_count = int(min_count)
        self.floor = float(floor_ev_per_atom)
        self._reference: dict[Composition, list[float]] = defaultdict(list)
        self._accepted: dict[Composition, list[float]] = defaultdict(list)

    def add(self, numbers: np.ndarray, energy: float, reference: bool = False) -> None:
        """Record a label: a thermal reference frame (IDG) or an accepted AL label."""
        if np.isfinite(energy):
            target = self._reference if reference else self._accepted
            target[composition(numbers)].append(float(energy) / len(numbers))

    def _sample(self, numbers: np.ndarray) -> list[float]:
        key = composition(numbers)
        reference = self._reference.get(key, [])
        return reference if len(reference) >= self.min_count else self._accepted.get(key, [])

    def spread(self, numbers: np.ndarray) -> float:
        sample = self._sample(numbers)
        if len(sample) < self.min_count:
            return float("inf")
        return max(float(np.std(sample)), self.floor, self.thermal_floor(len(numbers)))

    def thermal_floor(self, n_atoms: int) -> float:
        """Half the harmonic estimate of the potential energy's spread per atom at the AL temperature.

        For N atoms in harmonic wells the potential energy fluctuates by sqrt(3N/2) k_B T, i.e.
        sqrt(3 / 2N) k_B T per atom. Reference MD with weak friction samples somewhat less
        (measured about 0.6 of it for ethanol at 500 K), so half of it is a floor that a
        handful of initial frames cannot undercut by chance.
        """
        if self.temperature_K is None:
            return 0.0
        return 0.5 * float(np.sqrt(1.5 / n_atoms)) * kB * self.temperature_K

    def center(self, numbers: np.ndarray) -> float:
        """Where the thermal distribution lies: the sample's mean, but at least its lowest frame
        plus the harmonic mean excess 3/2 k_B T per atom at the AL temperature.

        Short IDG MD starts from a minimum and may end before it has heated up (a 21-atom
        molecule needs ~1 ps with the default friction): its mean lies below what the AL
        trajectories visit at equilibrium, and a bound built on it held back most ordinary
        labels. Equipartition says where the equilibrium mean is, above the lowest frame seen.
        """
        sample = self._sample(numbers)
        mean = float(np.mean(sample))
        if self.temperature_K is None:
            return mean
        return max(mean, float(np.min(sample)) + 1.5 * kB * self.temperature_K)

    def bound(self, numbers: np.ndarray) -> float:
        """The highest energy per atom trained on for this composition (inf while unknown)."""
        sample = self._sample(numbers)
        if len(sample) < self.min_count:
            return float("inf")
        return self.center(numbers) + self.limit * self.spread(numbers)

    def outlier(self, numbers: np.ndarray, energy: float) -> str | None:
        """Why this label must be held back, or None when it may be trained on."""
        per_atom = float(energy) / len(numbers)
        if not np.isfinite(per_atom):
            return "non-finite energy"
        bound = self.bound(numbers)
        if per_atom > bound:
            sample = self._sample(numbers)
            spreads = (per_atom - self.center(numbers)) / self.spread(numbers)
            return (f"energy {per_atom:.4f} eV/atom is {spreads:.1f} spreads above the thermal centre of "
                    f"{len(sample)} frames (limit {self.limit:g}, bound {bound:.4f} eV/atom)")
        return None

    def confirms(self, numbers: np.ndarray, held_energy: float, accepted_energy: float) -> bool:
        """Does an accepted label (same composition) land within one spread of a held one?"""
        return abs(held_energy - accepted_energy) / len(numbers) <= self.spread(numbers)
