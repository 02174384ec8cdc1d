"""The CPU profile of a campaign: where its time went, per phase and per kind of work.

The driver's clock (``events.WallClock``) splits each driver run into phases and buckets and
logs the result as the ``profile`` of its ``campaign_end`` event:
``{phase: {bucket: {"wall_s": s, "cpu_s": s}}}``. This module adds those up over the driver runs
of a resumed campaign and renders them as the summary's table. A driver run killed outright
(no ``campaign_end``) leaves no profile: its time is missing here, though not from the total
wall time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Profile = dict[str, dict[str, dict[str, float]]]

# (bucket, column title): the driver's own buckets, then the label workers' CPU.
COLUMNS = (("md", "md"), ("uncertainty", "uncert"), ("training", "train"), ("labelling", "labels"),
           ("io", "io"), ("waiting", "wait"))
DRIVER = "driver"  # a phase's whole driver time, the buckets and the rest (``WallClock.DRIVER``)
PHASE_ORDER = ("idg", "al", "converge", "test")
OUTSIDE = "other"  # time outside the phases (``WallClock.OUTSIDE``)


def merge(profiles: Iterable[Profile | None]) -> Profile:
    """The sum of several profiles (driver runs of one campaign); malformed parts are skipped."""
    total: Profile = {}
    for profile in profiles:
        if not isinstance(profile, dict):
            continue
        for phase, buckets in profile.items():
            if not isinstance(buckets, dict):
                continue
            into = total.setdefault(str(phase), {})
            for bucket, cell in buckets.items():
                if not isinstance(cell, dict):
                    continue
                sums = into.setdefault(str(bucket), {"wall_s": 0.0, "cpu_s": 0.0})
                for key in sums:
                    value = cell.get(key)
                    if isinstance(value, int | float) and value == value:  # numbers; NaN (null) skipped
                        sums[key] += float(value)
    return {phase: {bucket: {k: round(v, 3) for k, v in cell.items()} for bucket, cell in buckets.items()}
            for phase, buckets in total.items()}


def from_events(events: list[dict[str, Any]]) -> Profile:
    """Every ``campaign_end`` profile of the log, added up."""
    return merge(e.get("profile") for e in events if e.get("event") == "campaign_end")


def _phases(profile: Profile) -> list[str]:
    known = [p for p in PHASE_ORDER if p in profile]
    extra = sorted(p for p in profile if p not in PHASE_ORDER and p != OUTSIDE)
    return known + extra + ([OUTSIDE] if OUTSIDE in profile else [])


def _get(profile: Profile, phase: str, bucket: str, key: str) -> float:
    return float(profile.get(phase, {}).get(bucket, {}).get(key, 0.0))


def cpu_rows(profile: Profile) -> list[tuple[str, list[float]]]:
    """One row per phase (and a total): CPU seconds per column, then ``other`` and ``total``.

    ``other`` is the driver's CPU in the phase outside every named bucket (event writing,
    progress, evaluation); ``total`` is the driver's CPU in the phase plus its labels' CPU on
    the workers.
    """
    rows = []
    for phase in _phases(profile):
        values = [_get(profile, phase, bucket, "cpu_s") for bucket, _ in COLUMNS]
        driver = _get(profile, phase, DRIVER, "cpu_s")
        labels = _get(profile, phase, "labelling", "cpu_s")
        driver_buckets = sum(values) - labels
        rows.append((phase, [*values, max(0.0, driver - driver_buckets), max(driver, driver_buckets) + labels]))
    if rows:
        rows.append(("total", [sum(column) for column in zip(*(values for _, values in rows), strict=True)]))
    return rows


def render(profile: Profile | None) -> list[str]:
    """The summary's lines: the CPU table, then the wall time per phase (none without a profile)."""
    if not profile:
        return []
    rows = cpu_rows(profile)
    titles = [title for _, title in COLUMNS] + ["other", "total"]
    digits = 2 if rows[-1][1][-1] < 10 else 1  # a short test run still shows its small numbers
    cells = [[f"{v:.{digits}f}" for v in values] for _, values in rows]
    widths = [max(len(t), *(len(c[k]) for c in cells)) for k, t in enumerate(titles)]
    head = "cpu profile (s)"
    names = [f"  {name}" for name, _ in rows]  # indented under the title: no row reads as another summary line
    first = max(len(head), *(len(name) for name in names))
    lines = [head.ljust(first) + "".join(f"  {t:>{w}}" for t, w in zip(titles, widths, strict=True))]
    for name, row in zip(names, cells, strict=True):
        lines.append(name.ljust(first) + "".join(f"  {c:>{w}}" for c, w in zip(row, widths, strict=True)))
    phases = _phases(profile)
    walls = ", ".join(f"{p} {_get(profile, p, DRIVER, 'wall_s'):.1f}" for p in phases)
    label_wall = sum(_get(profile, p, "labelling", "wall_s") for p in phases)
    lines.append(f"wall by phase (s)  {walls} (driver); labels {label_wall:.1f} on the workers (summed)")
    return lines
