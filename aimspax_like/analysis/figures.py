"""The report's figures: one function per figure, each returning where it wrote the PNG and
a caption that says how to read it (or None when the run holds nothing to draw).

Drawn on matplotlib ``Figure`` objects with the Agg canvas, never through ``pyplot``: no
display is needed, no global figure state leaks between calls or threads, and a driver that
writes its report at the end of a campaign opens no window. Data are in the log's units (eV/A,
eV/atom); axes say which unit they show (meV where the numbers read better so).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from aimspax_like.analysis import correlation, profile, series
from aimspax_like.analysis.run_record import RunRecord
from aimspax_like.analysis.summary import guard_counts

DPI = 100
MAX_PANELS = 8
ANG = "\u00c5"  # the Angstrom sign (DejaVu Sans, matplotlib's default font, has it)
PHASE_COLOURS = {"idg": "#d9e8f5", "al": "#fbe3cc", "converge": "#dcefd9", "test": "#eeeeee"}
PHASE_NAMES = {"idg": "IDG rounds", "al": "AL rounds", "converge": "convergence training"}


@dataclass
class FigureFile:
    """A written figure: its file, a short title and a caption telling how to read it.

    Every figure function takes the run and the PNG path to write (``ALL_FIGURES`` names them).
    """

    file: Path
    title: str
    caption: str


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained", dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _with_breaks(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Insert a gap wherever x goes back (a resumed trajectory repeats steps): no line drawn back."""
    back = np.nonzero(np.diff(x) < 0)[0] + 1
    return np.insert(x.astype(float), back, np.nan), np.insert(y.astype(float), back, np.nan)


def _legend_from(fig: Figure, axes: list[Any], ncol: int = 4) -> None:
    """One legend for the figure, every distinct label once, below the panels."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=ncol, frameon=False)


def _log_axis(ax: Any, axis: str = "y") -> None:
    """Log scale with plain tick numbers (0.05, 0.1, 0.2), not 5 x 10^-2: easier to compare to a threshold."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log", nonpositive="mask")

    def minor(value: float, _position: int) -> str:
        low, high = sorted(target.get_view_interval())
        decades = math.log10(high / low) if low > 0 and high > low else 3.0
        keep = (2, 3, 5) if decades < 1.5 else (3,) if decades < 2.5 else ()
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9)) if value > 0 else 0
        return f"{value:g}" if mantissa in keep else ""

    target.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    target.set_minor_formatter(FuncFormatter(minor))


# ----------------------------------------------------------------------------- a: trajectories


def trajectories(record: RunRecord, out: Path) -> FigureFile | None:
    """(a) Per AL trajectory: uncertainty, threshold, labels, true error and training-set size vs MD step."""
    traj = series.trajectory_series(record.events)
    if not traj:
        return None
    points = series.analysis_points(record.events)
    size_t, size = series.train_size_timeline(record.events)
    shown = list(traj)[:MAX_PANELS]
    ncols = 1 if len(shown) == 1 else 2
    nrows = math.ceil(len(shown) / ncols)
    fig = _figure(12, 2.6 * nrows + 1.0)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    used = []
    for ax, index in zip(axes, shown, strict=False):
        s = traj[index]
        ax.plot(*_with_breaks(s.step, s.delta), color="C0", lw=0.9, label="uncertainty \u03b4 (Eq. 1)")
        ax.plot(*_with_breaks(s.step, s.threshold), color="C3", lw=1.2, ls="--", label="threshold (Eq. 2)")
        if len(s.submitted_step):
            ax.scatter(s.submitted_step, s.submitted_delta, marker="^", s=28, color="C1", zorder=3,
                       label="\u03b4 of a frame sent to the reference")
        mine = points.select(points.trajectory == index)
        if len(mine):
            ax.scatter(mine.step, mine.true_error, marker="o", s=22, facecolors="none", edgecolors="k", zorder=4,
                       label="true force error (analysis point)")
        _log_axis(ax)
        ax.set_title(f"trajectory {index}", fontsize=10)
        ax.set_xlabel("MD step of this trajectory")
        ax.set_ylabel(f"δ, threshold, error (eV/{ANG}, log)")
        ax.grid(alpha=0.3, which="major")
        twin = ax.twinx()
        twin.step(s.step, series.value_at(size_t, size, s.t), where="post", color="0.45", lw=1.0,
                  label="training-set size (all trajectories)")
        twin.set_ylabel("training-set size (frames)", color="0.35")
        twin.tick_params(axis="y", colors="0.35")
        used += [ax, twin]
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    _legend_from(fig, used)
    fig.suptitle("Active learning per trajectory: uncertainty, threshold and training-set size", fontsize=12)
    more = f" Only the first {len(shown)} of {len(traj)} trajectories are shown." if len(traj) > len(shown) else ""
    caption = (
        "Each panel is one AL trajectory. The blue line is the committee uncertainty \u03b4 (Eq. 1: the largest "
        "per-atom force spread among the members, eV/\u00c5, log scale) at every check; the dashed red line is "
        "the moving-average threshold (Eq. 2; absent during the warm-up, when it is infinite). Orange triangles "
        "mark frames whose \u03b4 exceeded the threshold and were sent to the reference. Open circles are "
        "ground-truth analysis points: the true force error of the committee mean at that frame (drawn "
        "only when al.analysis_every is set). The grey step line (right axis) is the size of the shared "
        "training set when the step ran: \u03b4 should fall as it grows." + more)
    return FigureFile(_save(fig, out), "Uncertainty along each trajectory", caption)


# ----------------------------------------------------------------------------- b, c: analysis points


def error_vs_uncertainty(record: RunRecord, out: Path) -> FigureFile | None:
    """(b) True error against uncertainty at analysis points, fit line and Pearson r."""
    points = series.analysis_points(record.events)
    if len(points) == 0:
        return None
    fig = _figure(7.5, 6)
    ax = fig.subplots()
    indices = np.unique(points.trajectory).astype(int)
    if len(indices) <= 10:
        for k, index in enumerate(indices):
            mine = points.select(points.trajectory == index)
            ax.scatter(mine.delta, mine.true_error, s=18, alpha=0.75, color=f"C{k}", label=f"trajectory {index}")
    else:
        dots = ax.scatter(points.delta, points.true_error, s=14, alpha=0.75, c=points.trajectory, cmap="viridis")
        fig.colorbar(dots, ax=ax, label="trajectory index")
    r = correlation.pearson_r(points.delta, points.true_error)
    fit = correlation.linear_fit(points.delta, points.true_error)
    low, high = float(points.delta.min()), float(points.delta.max())
    log = low > 0 and high / low > 30
    grid = np.geomspace(low, high, 100) if log else np.linspace(low, high, 100)
    r_text = "n/a" if r is None else f"{r:.2f}"
    if fit is not None:
        slope, intercept = fit
        ax.plot(grid, slope * grid + intercept, color="k", lw=1.5,
                label=f"least squares: error = {slope:.2f} \u03b4 {intercept:+.3f} eV/{ANG}")
    if float(points.true_error.min()) <= high and float(points.true_error.max()) >= low:
        ax.plot(grid, grid, color="0.5", ls=":", lw=1, label="error = \u03b4")  # only where it meets the data
    if log:
        _log_axis(ax, "x")
        _log_axis(ax, "y")
    ax.set_xlabel(f"committee uncertainty \u03b4 (Eq. 1), eV/{ANG}")
    ax.set_ylabel(f"true force error: max over atoms |F\u0305 \u2212 F_ref|, eV/{ANG}")
    ax.set_title(f"True error vs uncertainty at analysis points\nPearson r = {r_text}, n = {len(points)}",
                 fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    caption = (
        "Every point is a ground-truth analysis point: a frame labelled every al.analysis_every MD steps "
        "whatever its uncertainty. x is the committee uncertainty \u03b4 (Eq. 1), y the true error of the "
        "committee-mean force at the worst atom. A high Pearson r (title) means \u03b4 ranks frames by their "
        "true error, which is what the threshold relies on; the dotted line (drawn where it meets the data) marks "
        "error = \u03b4, the black "
        "line is the least-squares fit over all points. Colours are trajectories.")
    return FigureFile(_save(fig, out), "True error vs uncertainty", caption)


def correlation_segments(record: RunRecord, out: Path) -> FigureFile | None:
    """(c) Pearson r per stretch of MD steps, per trajectory and pooled, with the training-set size."""
    points = series.analysis_points(record.events)
    pooled = correlation.segments(points)
    if sum(s.r is not None for s in pooled) < 2:
        return None  # one segment is the whole-run r of figure (b): nothing new to show
    fig = _figure(10, 4.8)
    ax = fig.subplots()
    indices = np.unique(points.trajectory).astype(int)
    for k, index in enumerate(indices[:MAX_PANELS]):
        own = [s for s in correlation.segments(points.select(points.trajectory == index)) if s.r is not None]
        if own:
            ax.plot([s.mid_step for s in own], [s.r for s in own], marker="o", ms=4, lw=0.9, alpha=0.7,
                    color=f"C{k}", label=f"trajectory {index}")
    good = [s for s in pooled if s.r is not None]
    ax.plot([s.mid_step for s in good], [s.r for s in good], marker="s", ms=7, lw=2.2, color="k",
            label="all trajectories")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("MD step (middle of the segment)")
    ax.set_ylabel("Pearson r (uncertainty vs true error)")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot([s.mid_step for s in pooled], [s.train_size for s in pooled], color="0.45", ls="--", marker="d",
              ms=5, label="training-set size (mean over segment)")
    twin.set_ylabel("training-set size (frames)", color="0.35")
    twin.tick_params(axis="y", colors="0.35")
    _legend_from(fig, [ax, twin])
    ax.set_title("Uncertainty\u2013error correlation through the run", fontsize=11)
    more = (f" Trajectory lines are drawn for the first {MAX_PANELS} of {len(indices)} trajectories."
            if len(indices) > MAX_PANELS else "")
    caption = (
        "The analysis points are split by MD step into up to 5 segments of equal count (at least 8 points "
        "each where there are enough); each marker is the Pearson r between uncertainty and true error "
        "inside one segment, per trajectory (thin) and over all trajectories (black). The dashed grey line "
        "(right axis) is the training-set size during the segment. r near 1 means the uncertainty ranks "
        "frames well; a segment with fewer than 3 points or a constant uncertainty has no r and is not "
        "drawn." + more)
    return FigureFile(_save(fig, out), "Correlation through the run", caption)


# ----------------------------------------------------------------------------- d: learning curves


def _phase_spans(ax: Any, phases: list[str]) -> None:
    start = 0
    for k in range(1, len(phases) + 1):
        if k == len(phases) or phases[k] != phases[start]:
            phase = phases[start]
            ax.axvspan(start + 0.5, k + 0.5, color=PHASE_COLOURS.get(phase, "#f4f4f4"), zorder=0,
                       label=PHASE_NAMES.get(phase, f"{phase} rounds"))
            start = k


def learning_curves(record: RunRecord, out: Path) -> FigureFile | None:
    """(d) Validation force and energy MAE per member against the training round."""
    rounds, converged = series.training_rounds(record.events)
    if not rounds:
        return None
    fig = _figure(12, 4.8)
    axes = fig.subplots(1, 2)
    x = np.arange(1, len(rounds) + 1)
    members = sorted({m for r in rounds for m in r.force_mae})
    for ax, key, unit, name in ((axes[0], "force_mae", f"meV/{ANG}", "force"),
                                (axes[1], "energy_mae", "meV/atom", "energy")):
        _phase_spans(ax, [r.phase for r in rounds] + (["converge"] if converged else []))
        for k, member in enumerate(members):
            values = np.array([getattr(r, key).get(member, np.nan) for r in rounds]) * 1000
            ax.plot(x, values, color=f"C{k}", lw=1.2, label=f"member {member}")
        for r in converged:
            for member, value in getattr(r, key).items():
                colour = f"C{members.index(member)}" if member in members else "k"
                ax.scatter([len(rounds) + 1], [value * 1000], marker="*", s=160, color=colour, edgecolors="k",
                           zorder=4, label="after convergence training")
        _log_axis(ax)
        ax.set_xlabel("training round (IDG rounds, then one AL round per update)")
        ax.set_ylabel(f"validation {name} MAE ({unit}, log scale)")
        ax.set_title(f"Validation {name} MAE", fontsize=11)
        ax.grid(alpha=0.3, which="both")
        ax.set_xlim(0.5, len(rounds) + (1.6 if converged else 0.5))
        ax.xaxis.get_major_locator().set_params(integer=True)
    _legend_from(fig, list(axes), ncol=5)
    caption = (
        "Validation errors of every committee member after each training round: force MAE in meV/\u00c5 "
        "(left) and energy MAE in meV/atom (right), log scale. The shaded background tells the phase "
        "(blue: initial dataset generation, orange: active learning, one round per training update). Stars "
        "(green, last) are the members' errors after convergence training. Members are "
        "validated on the shared validation set as it stood at that round, so early values use fewer "
        "frames. The energy errors here are those of the members as they trained, before the per-element "
        "reference energies (E0) are refitted to the whole training set at the end: a large energy MAE "
        "that stays flat is mostly a constant offset per member, which the refit removes (the test-set "
        "table shows the saved members' energy errors).")
    return FigureFile(_save(fig, out), "Learning curves", caption)


# ----------------------------------------------------------------------------- e: labels and workers


def labels_and_workers(record: RunRecord, out: Path) -> FigureFile | None:
    """(e) Cumulative labelled frames per origin, and labels in flight vs connected workers, over wall time."""
    t0 = record.t0
    times = series.label_times(record.events)
    if t0 is None or not (times or record.of("label_submitted")):
        return None
    end = (record.events[-1]["t"] - t0) / 60
    fig = _figure(11, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for k, (origin, t) in enumerate(sorted(times.items(), key=lambda item: item[1][0])):
        minutes = np.concatenate([[0.0], (t - t0) / 60, [end]])
        counts = np.concatenate([[0], np.arange(1, len(t) + 1), [len(t)]])
        top.step(minutes, counts, where="post", color=f"C{k}", lw=1.6, label=f"{origin} ({len(t)})")
    failed = [e["t"] for e in record.of("label_failed")]
    if failed:
        minutes = (np.array(failed) - t0) / 60
        top.step(np.concatenate([[0.0], minutes, [end]]), np.concatenate([[0], np.arange(1, len(failed) + 1),
                 [len(failed)]]), where="post", color="C3", ls=":", label=f"failed tries ({len(failed)})")
    top.set_ylabel("labelled frames (cumulative)")
    top.set_title("Labelled frames stored in the dataset, by origin", fontsize=11)
    flight_t, flight = series.in_flight_timeline(record.events)
    work_t, workers = series.workers_timeline(record.events)
    peak = 1.0
    if len(flight_t):
        minutes = (flight_t - t0) / 60
        bottom.step(np.concatenate([minutes, [end]]), np.concatenate([flight, [flight[-1]]]), where="post",
                    color="C0", lw=0.6, alpha=0.45, label="labels in flight")
        edges, mean = series.binned_mean(minutes, flight, end, bins=60)
        if len(edges):
            bottom.stairs(mean, edges, color="C0", lw=1.8, label="labels in flight, mean per 1/60 of the run")
        peak = max(peak, float(flight.max()))
    if len(work_t):
        bottom.step(np.concatenate([(work_t - t0) / 60, [end]]), np.concatenate([workers, [workers[-1]]]),
                    where="post", color="k", ls="--", lw=1.2, label="label workers connected")
        peak = max(peak, float(workers.max()))
    bottom.set_ylim(0, peak * 1.45)
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.set_ylabel("labels / workers")
    bottom.set_xlabel("wall-clock time since the campaign started (min)")
    bottom.set_title("Worker utilisation", fontsize=11)
    top.set_ylim(0, max([len(t) for t in times.values()] + [len(failed), 1]) * 1.15)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        for e in record.of("phase_start"):
            ax.axvline((e["t"] - t0) / 60, color="0.6", lw=0.8, ls="-.")
        for e in record.of("campaign_start")[1:]:
            ax.axvline((e["t"] - t0) / 60, color="C3", lw=1.2, label="driver resumed")
    for e in record.of("phase_start"):
        top.annotate(str(e.get("phase", "?")).upper(), ((e["t"] - t0) / 60, 1), xycoords=("data", "axes fraction"),
                     xytext=(3, -12), textcoords="offset points", fontsize=8, color="0.35")
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="origin (frames)", title_fontsize=8)
    bottom.legend(fontsize=8, loc="upper center", ncol=3)
    caption = (
        "Top: labelled frames entering the dataset, cumulative per origin (initial dataset generation, "
        "active learning, test set, analysis points), against wall-clock minutes since the first driver "
        "start; dash-dotted lines mark where each phase began, a red line a resumed driver. Bottom: labels "
        "in flight on the reference (submitted, not yet back; thin line exact, thick line averaged over "
        "1/60 of the run) against the label workers connected (dashed). In flight well below the workers "
        "means idle workers (the ML side is the bottleneck); in flight at the worker count means labels "
        "queue (the reference is). Frames labelled by reference-driven MD in the driver never pass the "
        "workers and show only on top. Worker counts come from the block monitor where the executor "
        "reports one, else from the executor's size.")
    return FigureFile(_save(fig, out), "Labels and workers over time", caption)


# ----------------------------------------------------------------------------- f: wall time


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 2 * 3600:
        return 3600.0, "h"
    if seconds >= 600:
        return 60.0, "min"
    return 1.0, "s"


def wall_time(record: RunRecord, out: Path) -> FigureFile | None:
    """(f) Where the driver's wall time went, and the label time spent on the workers."""
    wall = series.wall_seconds(record.events, record.summary)
    if wall is None or wall["total"] <= 0:
        return None
    other = max(0.0, wall["total"] - wall["md"] - wall["training"] - wall["waiting"])
    rows = [("MD sampling (driver, ML)", wall["md"], "C0"), ("training (driver, ML)", wall["training"], "C2"),
            ("waiting for labels (driver)", wall["waiting"], "C1"),
            ("other driver time (setup, I/O, test set)", other, "0.6"),
            ("label time on workers (summed)", wall["labelling"], "C4")]
    scale, unit = _time_unit(max(wall["total"], wall["labelling"]))
    fig = _figure(10, 3.8)
    ax = fig.subplots()
    names = [name for name, _, _ in rows][::-1]
    values = [value / scale for _, value, _ in rows][::-1]
    bars = ax.barh(names, values, color=[colour for _, _, colour in rows][::-1])
    bars[0].set_hatch("//")
    for k, (bar, value) in enumerate(zip(bars, values, strict=True)):
        share = f"{value * scale / wall['total'] * 100:.0f}% of wall" if k else "summed over workers"
        ax.annotate(f"{value:.1f} {unit} ({share})", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel(f"time ({unit})")
    ax.set_xlim(0, max(values) * 1.35 if max(values) > 0 else 1)
    ax.set_title(f"Where the time went: {wall['total'] / scale:.1f} {unit} of driver wall time", fontsize=11)
    ax.grid(alpha=0.3, axis="x")
    note = "" if record.summary or wall.get("buckets_logged") else (
        " No driver run has ended cleanly yet, so only the total wall time is known so far.")
    caption = (
        "The first four bars split the driver's wall time (summed over every driver run of a resumed "
        "campaign): MD sampling and training are the ML work, waiting is time with nothing to do but wait "
        "for labels, the rest is setup, file I/O and the test set. The hatched bar is the reference time "
        "spent on the label workers, summed over workers (it overlaps the driver's time). Little waiting "
        "and a large worker time mean that parallel sampling hid the labels' "
        "cost." + note)
    return FigureFile(_save(fig, out), "Where the time went", caption)


def cpu_profile(record: RunRecord, out: Path) -> FigureFile | None:
    """(f2) CPU seconds per phase, stacked by kind of work (the summary's CPU profile table)."""
    summary_profile = (record.summary or {}).get("profile")
    merged = summary_profile if isinstance(summary_profile, dict) and summary_profile else \
        profile.from_events(record.events)
    rows = [(phase, values) for phase, values in profile.cpu_rows(merged) if phase != "total"]
    if not rows or sum(values[-1] for _, values in rows) <= 0:
        return None
    titles = [title for _, title in profile.COLUMNS] + ["other"]
    colours = ["C0", "C3", "C2", "C4", "C1", "C8", "0.6"]
    scale, unit = _time_unit(max(values[-1] for _, values in rows))
    fig = _figure(10, 0.9 + 0.55 * len(rows))
    ax = fig.subplots()
    names = [phase for phase, _ in rows][::-1]
    left = np.zeros(len(rows))
    for k, title in enumerate(titles):
        widths = np.array([values[k] for _, values in rows][::-1]) / scale
        ax.barh(names, widths, left=left, color=colours[k], label=title)
        left += widths
    for y, (total, (_, values)) in enumerate(zip(left, rows[::-1], strict=True)):
        ax.annotate(f"{values[-1] / scale:.1f} {unit}", (total, y), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_xlim(0, max(left) * 1.15)
    ax.set_xlabel(f"CPU time ({unit})")
    ax.legend(ncol=len(titles), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(alpha=0.3, axis="x")
    caption = (
        "CPU time per phase, stacked by kind of work, summed over every driver run that ended cleanly: md "
        "(the committee's forces and the integration), uncert (Eq. 1, Eq. 2, guards, the energy gate), train "
        "(training rounds and convergence), labels (the references' CPU on the workers, the programs they "
        "start included), io (checkpoints, model saves, dataset writes), wait (the driver waiting for labels) "
        "and other (the rest of the driver's CPU). A phase dominated by md gains little from cheaper "
        "training; one dominated by train is where bounded rounds (al.rounds) pay.")
    return FigureFile(_save(fig, out), "Where the CPU went", caption)


# ----------------------------------------------------------------------------- g: failures and guards


def _count_bars(ax: Any, counts: dict[str, int], title: str, empty: str, colour: str) -> None:
    ax.set_title(title, fontsize=11)
    if not counts or not any(counts.values()):
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.3")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    names = list(counts)[::-1]
    bars = ax.barh(names, [counts[n] for n in names], color=colour, height=0.6)
    for bar in bars:
        ax.annotate(f"{int(bar.get_width())}", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=9)
    ax.set_xlabel("count")
    ax.set_xlim(0, max(counts.values()) * 1.2 + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3, axis="x")


def failures_and_guards(record: RunRecord, out: Path) -> FigureFile | None:
    """(g) Failed label tries by kind and the AL guards' decisions."""
    guards = guard_counts(record.events)
    failures = series.failure_kinds(record.events)
    decisions = {f"MD frame rejected: {name}": n for name, n in guards["md_unstable"].items()}
    if not decisions:
        decisions["MD frame rejected by a guard"] = 0
    decisions["label held (energy gate)"] = guards["held"]
    decisions["held label released"] = guards["released"]
    decisions["beyond the trust bound"] = guards["trust_exceeded"]
    decisions["label withheld (budget full)"] = len(record.of("label_withheld"))
    if not any(failures.values()) and not any(decisions.values()):
        return None  # nothing failed, no guard fired: the report says so in one line
    fig = _figure(12, 1.6 + 0.35 * max(len(decisions), 4))
    left, right = fig.subplots(1, 2)
    _count_bars(left, failures, "Failed reference tries by kind",
                "no label failed", "C3")
    _count_bars(right, decisions if any(decisions.values()) else {}, "Guard decisions in active learning",
                "no guard fired", "C1")
    caption = (
        "Left: failed reference calculations by kind (a try that was retried counts too, it cost reference "
        "time). Right: what the physical guards decided during active learning: MD frames rejected by a "
        "guard (the trajectory rewinds; nothing is labelled), labels held out of training by the energy "
        "gate (and later released), frames beyond the trust bound, and labels withheld because the "
        "training-set budget was already covered by labels in flight.")
    return FigureFile(_save(fig, out), "Failures and guards", caption)


# ----------------------------------------------------------------------------- h: cell volumes


def cell_volumes(record: RunRecord, out: Path) -> FigureFile | None:
    """(h) Periodic cells: each AL trajectory's cell volume against MD step (NPT sampling at a glance)."""
    traj = {k: s for k, s in series.trajectory_series(record.events).items() if np.isfinite(s.volume).any()}
    if not traj:
        return None
    fig = _figure(10, 4.2)
    ax = fig.subplots()
    for index, s in traj.items():
        ax.plot(*_with_breaks(s.step, s.volume), lw=1.0, label=f"trajectory {index}")
    ax.set_xlabel("MD step of the trajectory")
    ax.set_ylabel(f"cell volume ({ANG}\u00b3)")
    ax.grid(alpha=0.3)
    _legend_from(fig, [ax], ncol=min(len(traj), 6))
    fig.suptitle("Cell volume along each active-learning trajectory", fontsize=12)
    caption = (
        "The cell volume of every periodic AL trajectory at each uncertainty check (\u00c5\u00b3). Under NPT "
        "it should fluctuate around a plateau; a steady drift means the barostat has not equilibrated, a "
        "jump back is a rewind to the trajectory's last labelled frame. Constant lines are NVT.")
    return FigureFile(_save(fig, out), "Cell volumes", caption)


ALL_FIGURES: tuple[tuple[str, Callable[[RunRecord, Path], FigureFile | None]], ...] = (
    ("trajectories.png", trajectories),
    ("cell_volumes.png", cell_volumes),
    ("error_vs_uncertainty.png", error_vs_uncertainty),
    ("correlation_segments.png", correlation_segments),
    ("learning_curves.png", learning_curves),
    ("labels_and_workers.png", labels_and_workers),
    ("wall_time.png", wall_time),
    ("cpu_profile.png", cpu_profile),
    ("failures_and_guards.png", failures_and_guards),
)
"""(file name, function): each function draws into the given file, or returns None with nothing to draw."""
