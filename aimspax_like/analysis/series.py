"""The event log as arrays: what each report figure plots, separated from how it is drawn.

Every function takes the events (as ``read_events`` returns them) and returns plain numpy
arrays or dicts, so the figures stay thin and the numbers can be tested without matplotlib.
Units are the log's: eV/A for forces and uncertainties, eV/atom for energies, unix seconds for
``t``. Infinite thresholds (the warm-up, logged as ``"inf"``) become NaN: nothing to draw.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from aimspax_like.analysis.strict_json import as_float

Events = list[dict[str, Any]]


def _finite(value: Any) -> float:
    number = as_float(value)
    return number if number is not None and np.isfinite(number) else float("nan")


@dataclass
class TrajectorySeries:
    """One AL trajectory: every uncertainty check and the frames sent to the reference."""

    index: int
    t: np.ndarray
    step: np.ndarray
    delta: np.ndarray  # Eq. 1, eV/A
    threshold: np.ndarray  # Eq. 2 at the check, eV/A; NaN while infinite
    submitted_step: np.ndarray
    submitted_delta: np.ndarray
    volume: np.ndarray  # cell volume at each check, A^3; NaN for non-periodic systems


def trajectory_series(events: Events) -> dict[int, TrajectorySeries]:
    """Uncertainty checks and label submissions of the AL phase, per trajectory index."""
    checks: dict[int, list[tuple[float, float, float, float, float]]] = {}
    sent: dict[int, list[tuple[float, float]]] = {}
    for e in events:
        if e["event"] == "uncertainty" and "trajectory" in e:
            checks.setdefault(int(e["trajectory"]), []).append(
                (e["t"], float(e.get("step", 0)), _finite(e.get("delta")), _finite(e.get("threshold")),
                 _finite(e.get("volume"))))
        elif e["event"] == "label_submitted" and e.get("phase", "al") == "al" and "delta" in e:
            sent.setdefault(int(e["trajectory"]), []).append((float(e.get("step", 0)), _finite(e["delta"])))
    series = {}
    for index in sorted(set(checks) | set(sent)):
        rows = np.array(checks.get(index, []), dtype=float).reshape(-1, 5)
        subs = np.array(sent.get(index, []), dtype=float).reshape(-1, 2)
        series[index] = TrajectorySeries(index, rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], subs[:, 0], subs[:, 1],
                                         rows[:, 4])
    return series


@dataclass
class AnalysisPoints:
    """Ground-truth analysis points: frames labelled every K steps whatever their uncertainty."""

    t: np.ndarray
    trajectory: np.ndarray
    step: np.ndarray
    delta: np.ndarray  # committee uncertainty (Eq. 1), eV/A
    threshold: np.ndarray  # eV/A, NaN while infinite
    true_error: np.ndarray  # max per-atom |mean force - reference force|, eV/A
    train_size: np.ndarray

    def __len__(self) -> int:
        return len(self.t)

    def select(self, mask: np.ndarray) -> AnalysisPoints:
        return AnalysisPoints(*(getattr(self, name)[mask] for name in self.__dataclass_fields__))


def analysis_points(events: Events) -> AnalysisPoints:
    """The ``analysis_point`` events with a finite uncertainty and true error, in log order.

    A driver killed between logging a point and its checkpoint logs that point again on resume:
    one point per (trajectory, step) is kept, the last logged.
    """
    rows: dict[tuple[Any, Any], tuple[float, ...]] = {}
    for e in events:
        if e["event"] != "analysis_point":
            continue
        delta, error = _finite(e.get("delta")), _finite(e.get("true_error"))
        if np.isfinite(delta) and np.isfinite(error):
            rows[(e.get("trajectory"), e.get("step"))] = (
                e["t"], float(e.get("trajectory", -1)), float(e.get("step", 0)), delta,
                _finite(e.get("threshold")), error, _finite(e.get("train_size")))
    table = np.array(list(rows.values()), dtype=float).reshape(-1, 7)
    return AnalysisPoints(*(table[:, k] for k in range(7)))


def train_size_timeline(events: Events) -> tuple[np.ndarray, np.ndarray]:
    """(t, training-set size) at every event that reports the size, sorted by time."""
    rows = [(e["t"], float(e["train_size"])) for e in events
            if e["event"] in ("label_done", "training_round", "analysis_point", "label_withheld")
            and isinstance(e.get("train_size"), int | float)]
    rows.sort()
    table = np.array(rows, dtype=float).reshape(-1, 2)
    return table[:, 0], table[:, 1]


def value_at(times: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Step-function lookup: the last value logged at or before each query time (NaN before the first)."""
    query = np.asarray(query, dtype=float)
    if len(times) == 0:
        return np.full(query.shape, np.nan)
    position = np.searchsorted(times, query, side="right") - 1
    out = values[np.clip(position, 0, None)].astype(float)
    out[position < 0] = np.nan
    return out


@dataclass
class TrainingRound:
    phase: str
    t: float
    train_size: float
    force_mae: dict[int, float]  # member -> validation force MAE, eV/A
    energy_mae: dict[int, float]  # member -> validation energy MAE, eV/atom


def training_rounds(events: Events) -> tuple[list[TrainingRound], list[TrainingRound]]:
    """The intermediate training rounds (IDG, AL) and the final ``converged`` metrics per member."""
    rounds = []
    for e in events:
        if e["event"] != "training_round":
            continue
        members = [m for m in e.get("members", []) if isinstance(m, dict)]
        rounds.append(TrainingRound(
            str(e.get("phase", "?")), e["t"], _finite(e.get("train_size")),
            {int(m.get("member", k)): _finite(m.get("valid_force_mae")) for k, m in enumerate(members)},
            {int(m.get("member", k)): _finite(m.get("valid_energy_mae_per_atom")) for k, m in enumerate(members)},
        ))
    converged = [TrainingRound("converge", e["t"], float("nan"),
                               {int(e.get("member", 0)): _finite(e.get("valid_force_mae"))},
                               {int(e.get("member", 0)): _finite(e.get("valid_energy_mae_per_atom"))})
                 for e in events if e["event"] == "converged"]
    return rounds, converged


def label_times(events: Events) -> dict[str, np.ndarray]:
    """Times at which labelled frames entered the dataset, by origin (idg, al, test, ...).

    ``frame_stored`` is logged by the one door into the dataset, so it also counts frames
    labelled by reference-driven MD in the driver (which never pass the workers). Logs without
    it fall back to ``label_done`` by phase (AL labels of old logs carry no phase: ``al``).
    """
    times: dict[str, list[float]] = {}
    stored = [e for e in events if e["event"] == "frame_stored"]
    for e in stored or [e for e in events if e["event"] == "label_done"]:
        key = e.get("origin") if stored else e.get("phase", "al")
        times.setdefault(str(key or "?"), []).append(e["t"])
    return {key: np.sort(np.array(t, dtype=float)) for key, t in times.items()}


def binned_mean(t: np.ndarray, values: np.ndarray, end: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Time-weighted mean of a step function (``values[k]`` holds from ``t[k]`` to ``t[k+1]``)
    over ``bins`` equal stretches from ``t[0]`` to ``end``: (bin edges, mean per bin)."""
    if len(t) == 0 or end <= t[0]:
        return np.array([]), np.array([])
    edges = np.linspace(t[0], end, bins + 1)
    knots = np.concatenate([t, [end]])
    # Integral of the step function at any time: cumulative area up to each knot, then linear.
    area = np.concatenate([[0.0], np.cumsum(values * np.diff(knots))])
    at = np.interp(edges, knots, area)
    return edges, np.diff(at) / np.diff(edges)


def in_flight_timeline(events: Events) -> tuple[np.ndarray, np.ndarray]:
    """(t, labels in flight): +1 per submission, -1 per label back for good (done, held, failed
    without retry). A driver start resets the count (a resume re-sends its labels silently)."""
    t, n, count = [], [], 0
    for e in events:
        name = e["event"]
        if name == "campaign_start":
            count = 0
        elif name == "label_submitted":
            count += 1
        elif name in ("label_done", "label_held") or (name == "label_failed" and not e.get("retry")):
            count = max(0, count - 1)
        else:
            continue
        t.append(e["t"])
        n.append(count)
    return np.array(t, dtype=float), np.array(n, dtype=float)


def workers_timeline(events: Events) -> tuple[np.ndarray, np.ndarray]:
    """(t, connected label workers): block-monitor ``workers`` events, else the executor's size."""
    if any(e["event"] == "workers" for e in events):
        rows = [(e["t"], float(e.get("connected") or 0) if e["event"] == "workers" else 0.0) for e in events
                if e["event"] in ("workers", "executor_stopped")]
    else:
        rows = []
        for e in events:
            if e["event"] == "executor_started":
                rows.append((e["t"], float(e.get("n_workers") or e.get("max_workers") or 0)))
            elif e["event"] == "executor_stopped":
                rows.append((e["t"], 0.0))
    table = np.array(rows, dtype=float).reshape(-1, 2)
    return table[:, 0], table[:, 1]


def wall_seconds(events: Events, summary: dict[str, Any] | None) -> dict[str, float] | None:
    """Driver wall time by bucket (``total``, ``md``, ``training``, ``waiting``, ``labelling``).

    A finished campaign's summary already adds up every driver run; otherwise each driver run
    (``campaign_start`` .. its last event) adds its wall time and its ``campaign_end`` buckets.
    None when no run has logged anything to measure.
    """
    wall = (summary or {}).get("wall_s")
    if isinstance(wall, dict) and "total" in wall:
        return {"total": wall["total"], "md": wall.get("md", 0.0), "training": wall.get("training", 0.0),
                "waiting": wall.get("waiting", 0.0), "labelling": wall.get("labelling_worker_s", 0.0)}
    total, buckets, t0, t1, measured = 0.0, Counter(), None, None, False
    for e in events:
        if e["event"] == "campaign_start":
            if t0 is not None:
                total += t1 - t0
            t0 = t1 = e["t"]
        elif t0 is not None:
            t1 = e["t"]
            if e["event"] == "campaign_end" and isinstance(e.get("seconds"), dict):
                buckets.update({k: float(v) for k, v in e["seconds"].items()})
                measured = True
    if t0 is not None:
        total += t1 - t0
    if t0 is None:
        return None
    return {"total": total, "md": buckets["md"], "training": buckets["training"], "waiting": buckets["waiting"],
            "labelling": buckets["labelling"], "buckets_logged": float(measured)}


def failure_kinds(events: Events) -> dict[str, int]:
    """Failed label tries by kind (a retried try counts too: it cost reference time)."""
    return dict(Counter(str(e.get("kind", "unknown")) for e in events if e["event"] == "label_failed"))
