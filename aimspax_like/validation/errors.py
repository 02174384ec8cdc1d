"""Test errors of a model: per temperature, over all frames, and per element.

Pure numpy on reference labels and predictions, so the numbers can be checked by hand.
Conventions (the same as the trainer's validation metrics, so the two can be compared):

* energy: per atom, ``(E_pred - E_ref) / n_atoms`` per frame; a frame counts once whatever its
  size, and frames of different sizes are comparable;
* forces: every Cartesian component of every atom is one sample (mace's convention);
* stress: the six independent (Voigt) components of every frame that has a reference stress;
  ``None`` where no frame has one.

Per element, the force samples of that element's atoms only: a model can be good on average
and bad on the rare element (a few O in many H and C), which the mean over all atoms hides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from ase.data import chemical_symbols

from aimspax_like.validation.predict import Predictions
from aimspax_like.validation.testdata import TestFrame


def mae_rmse(errors: np.ndarray) -> tuple[float | None, float | None]:
    """Mean absolute and root-mean-square of the samples (``None, None`` when there are none)."""
    values = np.asarray(errors, dtype=float).reshape(-1)
    if values.size == 0:
        return None, None
    return float(np.mean(np.abs(values))), float(math.sqrt(np.mean(values**2)))


def group_errors(frames: Sequence[TestFrame], predictions: Predictions, indices: Sequence[int],
                 temperature: float | None) -> dict[str, Any]:
    """The error entry of one group of frames (a temperature, or all of them)."""
    energy = [(predictions.energies[i] - frames[i].energy) / len(frames[i].atoms) for i in indices]
    forces = [predictions.forces[i] - frames[i].forces for i in indices]
    stress = [predictions.stresses[i] - frames[i].stress for i in indices
              if frames[i].stress is not None and predictions.stresses[i] is not None]
    e_mae, e_rmse = mae_rmse(np.asarray(energy))
    f_mae, f_rmse = mae_rmse(np.concatenate(forces) if forces else np.zeros(0))
    s_mae, s_rmse = mae_rmse(np.concatenate(stress) if stress else np.zeros(0))
    return {
        "temperature_K": temperature, "frames": len(indices),
        "energy_mae_per_atom": e_mae, "energy_rmse_per_atom": e_rmse,
        "force_mae": f_mae, "force_rmse": f_rmse,
        "stress_mae": s_mae, "stress_rmse": s_rmse,
    }


def temperature_groups(frames: Sequence[TestFrame]) -> list[tuple[float | None, list[int]]]:
    """Frame indices per temperature, ascending; frames without a temperature last (``None``)."""
    groups: dict[float | None, list[int]] = {}
    for i, frame in enumerate(frames):
        groups.setdefault(frame.temperature_K, []).append(i)
    known = sorted(t for t in groups if t is not None)
    return [(t, groups[t]) for t in known] + ([(None, groups[None])] if None in groups else [])


def element_errors(frames: Sequence[TestFrame], predictions: Predictions) -> list[dict[str, Any]]:
    """Force MAE/RMSE per element, elements by atomic number."""
    numbers = np.concatenate([f.atoms.numbers for f in frames])
    diff = np.concatenate([predictions.forces[i] - f.forces for i, f in enumerate(frames)])
    rows = []
    for z in sorted({int(n) for n in numbers}):
        mask = numbers == z
        mae, rmse = mae_rmse(diff[mask])
        rows.append({"element": chemical_symbols[z], "atoms": int(mask.sum()), "force_mae": mae, "force_rmse": rmse})
    return rows


def error_report(frames: Sequence[TestFrame], predictions: Predictions) -> dict[str, Any]:
    """``errors`` of ``report/validation.json``: per temperature, all frames, per element."""
    per_temperature = [group_errors(frames, predictions, idx, t) for t, idx in temperature_groups(frames)]
    overall = group_errors(frames, predictions, list(range(len(frames))), None)
    return {"per_temperature": per_temperature, "all": overall,
            "per_element": element_errors(frames, predictions)}
