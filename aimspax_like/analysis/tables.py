"""The report's tables as plain data (title, header, rows, note), rendered to Markdown and HTML.

Kept apart from both renderers so the two files of a report always show the same numbers.
Values arrive in the log's units (eV/A, eV/atom, eV/A^3) and are shown in meV units, which read
better at the accuracies a force field reaches; every header names its unit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aimspax_like.analysis import correlation, series
from aimspax_like.analysis.run_record import RunRecord
from aimspax_like.analysis.strict_json import as_float

DASH = "\u2014"


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    anchor: str = field(default="")


def milli(value: Any, digits: int = 1) -> str:
    """An eV-based value shown in meV units ("—" when missing or not finite)."""
    number = as_float(value)
    if number is None or number != number or abs(number) == float("inf"):
        return DASH
    return f"{number * 1000:.{digits}f}"


def num(value: Any, fmt: str = "{:g}") -> str:
    number = as_float(value)
    return DASH if number is None or number != number else fmt.format(number)


def analysis_table(record: RunRecord) -> Table:
    """Per trajectory and pooled: analysis points, Pearson r, mean uncertainty and true error."""
    points = series.analysis_points(record.events)
    header = ["trajectory", "points", "Pearson r", "mean \u03b4 (meV/\u00c5)", "mean true error (meV/\u00c5)"]
    if len(points) == 0:
        return Table("Analysis points", header, [], "No analysis points in this run: set al.analysis_every to "
                     "label a frame every K MD steps whatever its uncertainty (ground truth for the plots of "
                     "uncertainty against true error).", "analysis")
    rows = [["all" if row["trajectory"] is None else str(row["trajectory"]), str(row["points"]),
             num(row["r"], "{:.3f}"), milli(row["mean_delta"]), milli(row["mean_true_error"])]
            for row in correlation.per_trajectory(points)]
    return Table("Analysis points", header, rows, "Pearson r between the committee uncertainty (Eq. 1) and "
                 "the true force error at the worst atom, over the analysis points of each trajectory.", "analysis")


def test_table(record: RunRecord) -> Table | None:
    """The campaign's held-out test set: the final model per test temperature and over all frames."""
    test = (record.summary or {}).get("test") or record.results.get("test")
    if not test or not test.get("size"):
        return None
    header = ["temperature (K)", "frames", "F MAE (meV/\u00c5)", "F RMSE (meV/\u00c5)", "E MAE (meV/atom)",
              "members' F MAE (meV/\u00c5)", "uncertainty-error r"]
    rows = []
    groups = [(num(g.get("temperature_K")), g) for g in test.get("per_temperature", [])]
    for name, group in [*groups, ("all", test.get("all") or {})]:
        final = group.get("final") or {}
        members = " / ".join(milli(m.get("force_mae"), 0) for m in group.get("members", []))
        rows.append([name, str(group.get("frames", 0)), milli(final.get("force_mae")), milli(final.get("force_rmse")),
                     milli(final.get("energy_mae_per_atom"), 2), members or DASH,
                     num(group.get("uncertainty_error_r"), "{:.2f}")])
    return Table("Test-set errors", header, rows,
                 f"Final model: member {test.get('member', '?')}; {test.get('size')} frames from "
                 f"{test.get('sampler', '?')} MD, never used in training.", "test")


def systems_table(record: RunRecord) -> Table | None:
    """Labels and the final model's errors per chemical system (campaigns over several systems)."""
    rows_in = (record.summary or {}).get("systems") or record.results.get("systems") or []
    if len(rows_in) < 2:
        return None
    header = ["system", "atoms", "start structures", "imported", "IDG", "AL", "test", "failed labels",
              "valid F MAE (meV/\u00c5)", "test F MAE (meV/\u00c5)", "test E MAE (meV/atom)"]
    rows = []
    for row in rows_in:
        labels = row.get("labels", {})
        valid, test = row.get("valid") or {}, row.get("test") or {}
        rows.append([str(row.get("system")), str(row.get("atoms")), str(row.get("start_structures")),
                     *(str(labels.get(k, 0)) for k in ("import", "idg", "al", "test")), str(row.get("failed", 0)),
                     milli(valid.get("force_mae")), milli(test.get("force_mae")),
                     milli(test.get("energy_mae_per_atom"), 2)])
    return Table("Per system", header, rows, "Frames grouped by composition; errors of the final model. Failed "
                 "labels are counted where the label names its start structure (IDG and test set).", "systems")


def _error_row(name: str, group: dict[str, Any]) -> list[str]:
    return [name, str(group.get("frames", 0)), milli(group.get("energy_mae_per_atom"), 2),
            milli(group.get("energy_rmse_per_atom"), 2), milli(group.get("force_mae")), milli(group.get("force_rmse")),
            milli(group.get("stress_mae"), 2), milli(group.get("stress_rmse"), 2)]


def validation_tables(record: RunRecord) -> list[Table]:
    """The tables of ``report/validation.json`` (written by the validation command), if any."""
    validation = record.validation
    if not validation:
        return []
    errors = validation.get("errors") or {}
    test_set = validation.get("test_set") or {}
    header = ["temperature (K)", "frames", "E MAE (meV/atom)", "E RMSE (meV/atom)", "F MAE (meV/\u00c5)",
              "F RMSE (meV/\u00c5)", "stress MAE (meV/\u00c5\u00b3)", "stress RMSE (meV/\u00c5\u00b3)"]
    rows = [_error_row(num(g.get("temperature_K")), g) for g in errors.get("per_temperature", [])]
    if errors.get("all"):
        rows.append(_error_row("all", errors["all"]))
    tables = [Table("Validation errors", header, rows,
                    f"Model {validation.get('model', '?')} on {test_set.get('frames', '?')} frames from "
                    f"{test_set.get('source', '?')}.", "validation")]
    elements = errors.get("per_element") or []
    if elements:
        header = ["element", "atoms", "F MAE (meV/\u00c5)", "F RMSE (meV/\u00c5)"]
        tables.append(Table("Force errors per element", header,
                            [[str(e.get("element", "?")), str(e.get("atoms", DASH)), milli(e.get("force_mae")),
                              milli(e.get("force_rmse"))] for e in elements]))
    stability = validation.get("stability")
    if stability:
        rows = [[num(s.get("temperature_K")), f"{s.get('stable', 0)} / {s.get('runs', 0)}"]
                for s in stability.get("per_temperature", [])]
        tables.append(Table("MD stability", ["temperature (K)", "stable runs"], rows,
                            f"{stability.get('runs', '?')} runs of {stability.get('steps', '?')} steps at "
                            f"{num(stability.get('timestep_fs'))} fs; stable means: "
                            f"{stability.get('criterion', '?')}."))
    return tables


def glance_table(record: RunRecord) -> Table:
    """The campaign at a glance: status, phases, frames by origin, the AL outcome."""
    now = time.time()
    last = record.events[-1] if record.events else None
    stored = series.label_times(record.events)
    rounds, _ = series.training_rounds(record.events)
    thresholds = [as_float(e.get("threshold")) for e in record.of("uncertainty")]
    al = (record.summary or {}).get("al") or record.results.get("al") or {}
    rows = [
        ["run directory", str(record.root)],
        ["status", record.status + ("" if last is None else
                                    f" (last event '{last['event']}' {_age(now - last['t'])} ago)")],
        ["phases done", ", ".join(record.phases.get("done", [])) or "none yet"],
        ["labelled frames", ", ".join(f"{k} {len(v)}" for k, v in stored.items()) or "none yet"],
        ["training rounds", f"{len(rounds)} ({sum(r.phase == 'al' for r in rounds)} in active learning)"],
        ["AL stop", str(al.get("reason", DASH))],
        ["latest threshold (eV/\u00c5)", num(thresholds[-1], "{:.4g}") if thresholds else DASH],
    ]
    return Table("At a glance", ["", ""], rows, anchor="glance")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
