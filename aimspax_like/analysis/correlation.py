"""How well the committee's uncertainty tracks the true force error.

Active learning only works if a large Eq. 1 uncertainty means a large error. The analysis
points measure both on the same frames; the Pearson correlation between them (over the whole
run and over successive stretches of it) is the number the aims-PAX paper's Fig. 2 study
reports. Pure numpy, so the report's numbers can be checked against ``np.corrcoef``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aimspax_like.analysis.series import AnalysisPoints

MIN_POINTS = 3  # fewer points make any r meaningless (two points always give |r| = 1)


def pearson_r(x: np.ndarray, y: np.ndarray, min_points: int = MIN_POINTS) -> float | None:
    """Pearson's r of two samples, within [-1, 1]; None for fewer than ``min_points`` (at least 2),
    samples of different lengths, a non-finite value or a constant sample."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < max(2, min_points) or len(x) != len(y) or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    dx, dy = x - x.mean(), y - y.mean()
    norm = float(np.sqrt((dx * dx).sum() * (dy * dy).sum()))
    if norm == 0.0 or not np.isfinite(norm):
        return None
    return max(-1.0, min(1.0, float((dx * dy).sum() / norm)))


def linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """Least-squares line ``y = slope * x + intercept``; None without two distinct x values."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


@dataclass
class Segment:
    """One stretch of MD steps: its points' Pearson r and the training-set size meanwhile."""

    first_step: float
    last_step: float
    n: int
    r: float | None
    train_size: float  # mean over the segment's points (NaN if not logged)

    @property
    def mid_step(self) -> float:
        return 0.5 * (self.first_step + self.last_step)


def segments(points: AnalysisPoints, max_segments: int = 5, min_points: int = 8) -> list[Segment]:
    """Split points (ordered by MD step) into up to ``max_segments`` stretches of equal count,
    each of at least ``min_points`` points (fewer points: one segment, or none below MIN_POINTS)."""
    n = len(points)
    if n < MIN_POINTS:
        return []
    count = max(1, min(max_segments, n // min_points))
    order = np.argsort(points.step, kind="stable")
    out = []
    for chunk in np.array_split(order, count):
        sizes = points.train_size[chunk]
        finite = sizes[np.isfinite(sizes)]
        out.append(Segment(
            float(points.step[chunk].min()), float(points.step[chunk].max()), len(chunk),
            pearson_r(points.delta[chunk], points.true_error[chunk]),
            float(finite.mean()) if len(finite) else float("nan"),
        ))
    return out


def per_trajectory(points: AnalysisPoints) -> list[dict[str, float | int | None]]:
    """Per trajectory and over all: number of analysis points, Pearson r, mean uncertainty and
    mean true error (eV/A). The last row (trajectory None) pools every trajectory."""
    rows: list[dict[str, float | int | None]] = []
    groups = [(int(k), points.trajectory == k) for k in np.unique(points.trajectory)]
    for index, mask in [*groups, (None, np.ones(len(points), dtype=bool))]:
        chosen = points.select(mask)
        rows.append({
            "trajectory": index, "points": len(chosen),
            "r": pearson_r(chosen.delta, chosen.true_error),
            "mean_delta": float(chosen.delta.mean()) if len(chosen) else None,
            "mean_true_error": float(chosen.true_error.mean()) if len(chosen) else None,
        })
    return rows
