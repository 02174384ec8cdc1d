"""``aimspax-like report RUN``: figures, a Markdown summary and one self-contained HTML page.

Writes ``report/figures/*.png``, ``report/summary.md`` and ``report/index.html`` of a run
directory. Everything is read from the run's own record (the event log, ``state/results.json``,
``report/summary.json`` and, when the validation command has run, ``report/validation.json``),
never from live objects: so the same report comes out at the end of a campaign, on a campaign
that is still running, and on one that was killed before it wrote its summary (the text is then
built from the events alone). Nothing but ``report/`` is written, and the dataset is not opened.
"""

from __future__ import annotations

import html
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from aimspax_like.analysis import figures, profile, report_html, series, tables
from aimspax_like.analysis.figures import FigureFile
from aimspax_like.analysis.run_record import RunRecord, load_run
from aimspax_like.analysis.strict_json import as_float
from aimspax_like.analysis.summary import render

NO_ANALYSIS = ("No analysis points in this run, so there is no plot of true error against uncertainty: "
               "set al.analysis_every to label a frame every K MD steps whatever its uncertainty.")
# Why a figure is missing, by file name (its function had nothing to draw).
# Why a figure is absent, told on the page; None: its absence needs no word.
MISSING: dict[str, str | None] = {
    "trajectories.png": "No active-learning uncertainty check logged yet: no per-trajectory plot.",
    "error_vs_uncertainty.png": NO_ANALYSIS,
    "correlation_segments.png": "Too few analysis points for a correlation per stretch of the run (16 or more "
                                "give at least two segments of 8).",
    "learning_curves.png": "No training round logged yet: no learning curves.",
    "labels_and_workers.png": "No label logged yet: no plot of labels over time.",
    "wall_time.png": "No driver run logged: no wall-time plot.",
    "cpu_profile.png": None,  # a killed driver run leaves no profile; the wall-time figure says so
    "failures_and_guards.png": "No reference calculation failed and no guard fired: nothing to plot.",
    "cell_volumes.png": None,  # only periodic cells have one: nothing to explain for molecules
}


@dataclass
class Report:
    """The files one report wrote."""

    index: Path
    markdown: Path
    figures: list[FigureFile]
    notes: list[str]

    @property
    def paths(self) -> list[Path]:
        return [self.index, self.markdown, *(f.file for f in self.figures)]


def summary_text(record: RunRecord) -> str:
    """The end-of-campaign text summary if the run has one; else what the events tell so far."""
    if record.summary is not None:
        try:
            return render(record.summary)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # a summary.json of another version: fall back to the events
    return interim_text(record)


def interim_text(record: RunRecord) -> str:
    """A summary of a campaign that has no ``summary.json`` (running, stopped or killed)."""
    events = record.events
    stored = Counter(str(e.get("origin")) for e in record.of("frame_stored"))
    failed = Counter(str(e.get("kind")) for e in record.of("label_failed"))
    steps: dict[int, float] = {}
    for e in record.of("uncertainty"):
        steps[int(e["trajectory"])] = max(steps.get(int(e["trajectory"]), 0), float(e.get("step", 0)))
    rounds, _ = series.training_rounds(events)
    open_phases = [e.get("phase") for e in record.of("phase_start")]
    for e in record.of("phase_end"):
        if e.get("phase") in open_phases:
            open_phases.remove(e.get("phase"))
    lines = [f"campaign   {record.root} ({record.status}; no summary yet: built from the event log)",
             f"phases     done: {', '.join(record.phases.get('done', [])) or 'none'}"
             + (f"; under way: {', '.join(map(str, open_phases))}" if open_phases and record.status == "running"
                else (f"; unfinished: {', '.join(map(str, open_phases))}" if open_phases else "")),
             f"labels     stored: {', '.join(f'{k} {v}' for k, v in stored.items()) or 'none'}; failed tries: "
             f"{', '.join(f'{k} {v}' for k, v in failed.items()) or 'none'}"]
    if steps:
        threshold = as_float(record.of("uncertainty")[-1].get("threshold"))
        lines.append(f"al         {len(steps)} trajectories at MD steps {sum(steps.values()):.0f} in all; "
                     f"{sum(r.phase == 'al' for r in rounds)} training rounds; threshold "
                     + ("warming up (infinite)" if threshold == float("inf") else f"{threshold:.4g} eV/A"))
    if rounds:
        maes = "  ".join(f"m{k}: {v * 1000:.1f}" for k, v in sorted(rounds[-1].force_mae.items()))
        lines.append(f"valid F MAE (meV/A, latest round)  {maes}")
    lines.extend(f"warning    {e.get('message')}" for e in record.of("warning"))
    wall = series.wall_seconds(events, None)
    if wall:
        lines.append(f"wall time  {wall['total']:.1f} s over {len(record.of('campaign_start'))} driver run(s)")
    lines.extend(profile.render(profile.from_events(events)))  # the driver runs that have ended
    return "\n".join(lines)


def _figures(record: RunRecord, folder: Path) -> tuple[list[FigureFile], list[str]]:
    """Draw every figure: (the figures written, a note for each one with nothing to draw).

    A figure with nothing to draw leaves no stale file of an earlier report behind.
    """
    written, notes = [], []
    for name, draw in figures.ALL_FIGURES:
        path = folder / name
        figure = draw(record, path)
        if figure is None:
            path.unlink(missing_ok=True)
            note = MISSING.get(name, f"{name}: nothing to draw.")
            if note and (name != "correlation_segments.png" or len(series.analysis_points(record.events))):
                notes.append(note)
        else:
            written.append(figure)
    return written, notes


def _validation_figures(record: RunRecord) -> list[FigureFile]:
    """The figures ``validation.json`` lists, when their files exist inside ``report/``."""
    out = []
    report = record.report_dir.resolve()
    for item in (record.validation or {}).get("figures") or []:
        if not isinstance(item, dict) or not item.get("file"):
            continue
        path = (report / str(item["file"])).resolve()
        if path.is_file() and path.is_relative_to(report):
            title = f"Validation: {path.stem.replace('_', ' ')}"
            out.append(FigureFile(path, title, str(item.get("caption", ""))))
    return out


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path)


def _markdown(record: RunRecord, text: str, groups: list[tables.Table], drawn: list[FigureFile],
              validation: list[FigureFile], notes: list[str]) -> str:
    lines = [f"# Campaign report: {record.root.name}", "",
             f"Status: **{record.status}**; generated {time.strftime('%Y-%m-%d %H:%M:%S')}. "
             "The same report with its figures embedded: `index.html`.", "",
             "## Summary", "", "```", text, "```", ""]
    for table in groups:
        lines += [f"## {table.title}", ""]
        if table.rows:
            if any(table.header):
                lines += ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
            else:
                lines += ["| | |", "|---|---|"]
            lines += ["| " + " | ".join(row) + " |" for row in table.rows]
            lines.append("")
        if table.note:
            lines += [table.note, ""]
    lines += ["## Figures", ""]
    numbered = [(str(k), f) for k, f in enumerate(drawn, 1)] + [(f"V{k}", f) for k, f in enumerate(validation, 1)]
    for number, figure in numbered:
        relative = _relative(figure.file, record.report_dir)
        lines += [f"**Figure {number}. {figure.title}** ([{relative}]({relative})): {figure.caption}", ""]
    lines += [f"_{note}_\n" for note in notes]
    return "\n".join(lines)


def _html(record: RunRecord, text: str, table_groups: list[list[tables.Table]], drawn: list[FigureFile],
          validation_drawn: list[FigureFile], notes: list[str]) -> str:
    glance, analysis, test, systems, validation = table_groups
    overview = "\n".join(map(report_html.table_html, glance))
    sections = [("summary", "Summary", overview + f"<h3>Text summary</h3><pre>{html.escape(text)}</pre>")]
    if test:
        sections.append(("test", "Test set", "\n".join(map(report_html.table_html, test))))
    if systems:
        sections.append(("systems", "Per system", "\n".join(map(report_html.table_html, systems))))
    if validation:
        body = "\n".join(map(report_html.table_html, validation))
        body += "".join(report_html.figure_html(f"V{k}", f) for k, f in enumerate(validation_drawn, 1))
        if (record.validation or {}).get("rdf"):
            body += '<p class="note">Radial distribution functions: see <code>report/validation.json</code>.</p>'
        sections.append(("validation", "Validation", body))
    sections.append(("analysis", "Uncertainty vs true error", "\n".join(map(report_html.table_html, analysis))))
    figure_body = "".join(report_html.figure_html(k, f) for k, f in enumerate(drawn, 1))
    figure_body += "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    sections.append(("figures", "Figures", figure_body))
    subtitle = (f'<span class="badge">{html.escape(record.status)}</span> &nbsp; {html.escape(str(record.root))}'
                f" &nbsp; generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return report_html.page(f"Campaign report: {record.root.name}", subtitle, sections)


def make_report(run_dir: Path | str) -> Report:
    """Write the report of a run directory (``RunDirectoryError`` if it is none) and list its files."""
    record = load_run(run_dir)
    folder = record.report_dir / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    drawn, notes = _figures(record, folder)
    validation_drawn = _validation_figures(record)
    test = tables.test_table(record)
    systems = tables.systems_table(record)
    groups = [[tables.glance_table(record)], [tables.analysis_table(record)], [test] if test else [],
              [systems] if systems else [], tables.validation_tables(record)]
    text = summary_text(record)
    markdown = record.report_dir / "summary.md"
    markdown.write_text(_markdown(record, text, [t for group in groups for t in group], drawn, validation_drawn,
                                  notes), encoding="utf-8")
    index = record.report_dir / "index.html"
    index.write_text(_html(record, text, groups, drawn, validation_drawn, notes), encoding="utf-8")
    return Report(index, markdown, drawn, notes)


def write_report(run_dir: Path | str) -> Path:
    """Write ``report/`` of a run directory; returns the path of ``index.html``."""
    return make_report(run_dir).index
