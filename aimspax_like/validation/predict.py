"""One MACE model file as the model under test: loaded once, evaluated in batches.

The file is loaded through the engine's ``MACEEnsemble`` (as a one-member ensemble), so that
validation evaluates it with the same graph construction and batched forward pass the campaign
used for MD and training, and the stability runs share its batched force call. Stress is asked
of the model only where the test set has reference stress (periodic frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from aimspax_like.errors import SetupError
from aimspax_like.sampling.batch import chunks

# Frames per forward pass when evaluating a test set: large enough to share the call overhead,
# small enough that a test set of big cells does not hold every graph in memory at once.
ATOMS_PER_CALL = 1024


@dataclass
class Predictions:
    energies: np.ndarray  # [n_frames] eV
    forces: list[np.ndarray]  # per frame [n_atoms, 3] eV/A
    stresses: list[np.ndarray | None]  # per frame Voigt [6] eV/A^3, None where not asked


def load_model(path: Path, device: str = "auto", dtype: str = "float64"):  # -> MACEEnsemble
    """The model file as a one-member ``MACEEnsemble``; an unreadable file is a ``SetupError``."""
    from aimspax_like.models.ensemble import MACEEnsemble

    if not Path(path).is_file():
        raise SetupError(f"{path}: model file not found")
    try:
        return MACEEnsemble.load([path], device=device, dtype=dtype)
    except Exception as exc:  # a foreign or damaged file: torch/pickle raise many types
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise SetupError(f"{path}: could not load a MACE model ({type(exc).__name__}: {detail})") from None


def predict(ensemble, atoms_list: Sequence[Atoms], stress: Sequence[bool] | None = None) -> Predictions:
    """Energy, forces (and stress where ``stress[i]``) of every frame, in chunks of frames."""
    import torch

    from aimspax_like.data.frames import _voigt

    model = ensemble.members[0]
    wanted = list(stress) if stress is not None else [False] * len(atoms_list)
    energies: list[float] = []
    forces: list[np.ndarray] = []
    stresses: list[np.ndarray | None] = []
    for chunk in chunks(list(range(len(atoms_list))), ATOMS_PER_CALL, lambda i: len(atoms_list[i])):
        frames = [atoms_list[i] for i in chunk]
        need_stress = any(wanted[i] for i in chunk)
        graph = ensemble.graphs.md_batch(frames, ensemble.device)
        out = model(graph, training=False, compute_force=True, compute_stress=need_stress)
        energy = out["energy"].detach().cpu().to(torch.float64).numpy()
        force = out["forces"].detach().cpu().to(torch.float64).numpy()
        starts = np.concatenate([[0], np.cumsum([len(a) for a in frames])])
        stress_out = out.get("stress") if need_stress else None
        for k, i in enumerate(chunk):
            energies.append(float(energy[k]))
            forces.append(force[starts[k]:starts[k + 1]].copy())
            if wanted[i] and stress_out is not None:
                stresses.append(_voigt(stress_out[k].detach().cpu().to(torch.float64).numpy()))
            else:
                stresses.append(None)
    return Predictions(np.asarray(energies, dtype=float), forces, stresses)


def force_fn(ensemble):  # -> ForceFn
    """The batched MD force call of the model (one ``[1, n_atoms, 3]`` array per structure)."""

    def forces(structures: list[Atoms]) -> list[np.ndarray]:
        prediction = ensemble.predict(structures)
        return [prediction.forces_of(s) for s in range(len(structures))]

    return forces
