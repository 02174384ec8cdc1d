"""Refitting E0s removes a member's energy offset and leaves its forces alone."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.calculators.emt import EMT

from aimspax_like.config import ModelConfig
from aimspax_like.models.calibration import refit_atomic_energies
from aimspax_like.models.ensemble import MACEEnsemble


def _frames(n: int) -> list[Atoms]:
    rng = np.random.default_rng(0)
    frames = []
    for k in range(n):
        atoms = Atoms("Cu3Au" if k % 2 else "Cu2Au2",
                      positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [1.2, 1.2, 2.0]])
        atoms.positions += rng.normal(scale=0.1, size=(4, 3))
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy() + 7.0  # an offset to recover
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    return frames


def test_refit_removes_energy_bias_without_changing_forces():
    frames = _frames(12)
    config = ModelConfig(ensemble_size=1, channels=8, max_L=0, r_max=4.5, num_interactions=1, radial_mlp=[8],
                         dtype="float64", device="cpu")
    ensemble = MACEEnsemble.build(config, [0], [29, 79], {29: 0.0, 79: 0.0}, avg_num_neighbors=3.0)
    before = ensemble.predict(frames)
    shifts = refit_atomic_energies(ensemble, 0, frames)
    after = ensemble.predict(frames)
    reference = np.array([a.info["REF_energy"] for a in frames])
    counts = np.array([[np.count_nonzero(a.numbers == z) for z in (29, 79)] for a in frames])
    # The new residuals are the lstsq residuals: orthogonal to the element counts ...
    residual = reference - after.energies[0]
    np.testing.assert_allclose(counts.T @ residual, 0.0, atol=1e-8)
    assert abs(residual.mean()) < abs((reference - before.energies[0]).mean())
    # ... the shift is exactly what was added, and forces did not move.
    np.testing.assert_allclose(after.energies[0] - before.energies[0], counts @ [shifts[29], shifts[79]], atol=1e-9)
    np.testing.assert_allclose(after.forces, before.forces, atol=1e-12)
