"""The event log is a documented interface: docs/events.md lists every event and every field.

Three checks: the engine's source (every ``emit("name", field=...)`` call, found by parsing the
package), the fields that arrive through ``**`` (the dataclasses and dicts behind them), and
the log of a real campaign (every record's name and keys).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import aimspax_like
from aimspax_like.events import read_events

DOC = Path(__file__).resolve().parents[1] / "docs" / "events.md"
PACKAGE = Path(aimspax_like.__file__).resolve().parent
COMMON = {"t", "event"}


def documented() -> dict[str, set[str]]:
    """``{event: {field, ...}}`` from the doc's ``### `name` `` sections and their tables."""
    events: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"^### `([A-Za-z_0-9]+)`\s*$", line)
        if heading:
            current = heading.group(1)
            events[current] = set()
            continue
        row = re.match(r"^\| `([A-Za-z_0-9]+)` \|", line)
        if row and current is not None:
            events[current].add(row.group(1))
    return events


def emitted_in_source() -> dict[str, set[str]]:
    """``{event: {literal keyword fields}}`` of every emit call in the package."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("emit", "_emit") and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                fields = found.setdefault(node.args[0].value, set())
                fields.update(kw.arg for kw in node.keywords if kw.arg is not None)
    return found


def test_the_doc_parses_into_events_with_fields():
    doc = documented()
    assert len(doc) > 40
    empty = [name for name, fields in doc.items() if not fields]
    assert not empty, f"events without a field table: {empty}"


def test_every_event_in_the_source_is_documented_with_its_fields():
    doc, source = documented(), emitted_in_source()
    missing = sorted(set(source) - set(doc))
    assert not missing, f"events emitted but not in docs/events.md: {missing}"
    undocumented = {name: sorted(fields - doc[name]) for name, fields in source.items() if fields - doc[name]}
    assert not undocumented, f"fields emitted but not documented: {undocumented}"


def test_the_doc_lists_no_event_the_engine_never_writes():
    stale = sorted(set(documented()) - set(emitted_in_source()))
    assert not stale, f"documented but never emitted: {stale}"


def test_fields_that_arrive_through_double_star_are_documented():
    from aimspax_like.execution import placement
    from aimspax_like.models.training import MemberMetrics
    from aimspax_like.probe import ProbeResult
    from aimspax_like.scheduler import ALResult

    doc = documented()
    assert {f.name for f in dataclasses.fields(ALResult)} <= doc["al_stop"]
    assert {f.name for f in dataclasses.fields(MemberMetrics)} <= doc["converged"]
    assert set(ProbeResult(True, 3, "").as_dict()) <= doc["idg_probe"]
    assert set(placement()) <= doc["label_placed"]
    from aimspax_like.reference.results import LabelResult

    cost = LabelResult(0.0, [[0.0, 0.0, 0.0]], None, None, 1.0, scf_cycles=7).cost()
    assert cost == {"wall_s": 1.0, "scf_cycles": 7} and set(cost) <= doc["label_done"]


def test_every_record_of_a_real_campaign_is_documented(finished_campaign):
    run, _ = finished_campaign
    doc = documented()
    seen: dict[str, set[str]] = {}
    for record in read_events(run / "logs" / "events.jsonl"):
        seen.setdefault(record["event"], set()).update(set(record) - COMMON)
    assert {"campaign_start", "label_done", "training_round", "analysis_point", "campaign_end"} <= set(seen)
    unknown = sorted(set(seen) - set(doc))
    assert not unknown, f"events in the log but not documented: {unknown}"
    extra = {name: sorted(keys - doc[name]) for name, keys in seen.items() if keys - doc[name]}
    assert not extra, f"fields in the log but not documented: {extra}"


@pytest.mark.parametrize("name", ["uncertainty", "analysis_point", "label_submitted"])
def test_infinite_thresholds_are_documented_as_the_string_inf(name):
    assert '"inf"' in DOC.read_text().split(f"### `{name}`")[1].split("### ")[0]
