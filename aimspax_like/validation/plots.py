"""The validation figures, drawn with matplotlib's Agg canvas (files only, no display needed).

``Figure`` objects are made directly instead of through ``pyplot``: nothing global (backend,
current figure) changes in the caller's process, and no figure is left open.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _label(temperature: float | None) -> str:
    return "no temperature" if temperature is None else f"{temperature:g} K"


def _parity_panel(axes, groups: Sequence[tuple[float | None, np.ndarray, np.ndarray]], unit: str, what: str,
                  scale: float, mae_unit: str) -> None:
    """One parity panel: a colour per temperature, the y = x line, the MAE of all points in the legend."""
    everything = np.concatenate([np.concatenate([ref, pred]) for _, ref, pred in groups]) if groups else np.zeros(1)
    lo, hi = float(everything.min()), float(everything.max())
    pad = 0.05 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray"]
    for k, (temperature, ref, pred) in enumerate(groups):
        mae = float(np.mean(np.abs(pred - ref))) * scale if len(ref) else float("nan")
        axes.scatter(ref, pred, s=6 if len(ref) > 500 else 12, alpha=0.6, color=colours[k % len(colours)],
                     label=f"{_label(temperature)}: MAE {mae:.3g} {mae_unit}", edgecolors="none")
    axes.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="y = x")
    axes.set_xlim(lo, hi)
    axes.set_ylim(lo, hi)
    axes.set_aspect("equal")
    axes.set_xlabel(f"reference {what} ({unit})")
    axes.set_ylabel(f"predicted {what} ({unit})")
    axes.legend(fontsize=7, loc="upper left")


def parity_plot(path: Path, energy_groups: Sequence[tuple[float | None, np.ndarray, np.ndarray]],
                force_groups: Sequence[tuple[float | None, np.ndarray, np.ndarray]], title: str) -> Path:
    """Predicted vs reference energy per atom (eV/atom) and force components (eV/A), per temperature.

    Each group is ``(temperature, reference values, predicted values)``; MAEs in the legends are
    in meV/atom and meV/A.
    """
    figure = _figure(10.0, 5.0)
    left, right = figure.subplots(1, 2)
    _parity_panel(left, energy_groups, "eV/atom", "energy per atom", 1000.0, "meV/atom")
    _parity_panel(right, force_groups, "eV/Å", "force component", 1000.0, "meV/Å")
    figure.suptitle(title, fontsize=9)
    figure.savefig(path)
    return path


def rdf_plot(path: Path, r: np.ndarray, model: np.ndarray, reference: np.ndarray, periodic: bool,
             model_label: str, reference_label: str, title: str) -> Path:
    """The model-MD and reference-MD distributions on one set of axes."""
    figure = _figure(6.5, 4.2)
    axes = figure.subplots()
    axes.plot(r, reference, color="black", linewidth=1.6, label=reference_label)
    axes.plot(r, model, color="tab:red", linewidth=1.2, linestyle="--", label=model_label)
    axes.set_xlabel("r (Å)")
    axes.set_ylabel("g(r)" if periodic else "pair-distance density (1/Å)")
    axes.set_xlim(0, float(r[-1] + (r[1] - r[0]) / 2) if len(r) > 1 else 1.0)
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.savefig(path)
    return path
