"""A run directory as the report reads it: read-only, tolerant, safe while a driver writes.

The report may be asked for while a campaign still runs (or after one was killed), so nothing
here takes the run lock, opens the HDF5 dataset, or trusts a file to be whole: the event log
skips a torn last line (``read_events``), and a JSON or YAML file that cannot be parsed reads as
missing. Only a folder without ``campaign.yaml`` is refused (it is not a run directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aimspax_like.analysis.strict_json import revive
from aimspax_like.errors import RunDirectoryError
from aimspax_like.events import read_events
from aimspax_like.run_lock import driver_state


@dataclass
class RunRecord:
    """Everything the report uses of one run directory (events, results, config, summaries)."""

    root: Path
    config: dict[str, Any]
    events: list[dict[str, Any]]
    results: dict[str, Any]
    phases: dict[str, Any]
    summary: dict[str, Any] | None
    validation: dict[str, Any] | None
    driver: dict[str, Any] = field(default_factory=dict)  # run_lock.driver_state: is a driver on it now
    _by_name: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for event in self.events:
            self._by_name.setdefault(str(event.get("event")), []).append(event)

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def of(self, *names: str) -> list[dict[str, Any]]:
        """The events of the given names, in log order."""
        if len(names) == 1:
            return list(self._by_name.get(names[0], []))
        return [e for e in self.events if e.get("event") in names]

    @property
    def t0(self) -> float | None:
        """Unix time of the first driver start (the zero of every wall-clock axis)."""
        starts = self.of("campaign_start")
        if starts:
            return float(starts[0]["t"])
        return float(self.events[0]["t"]) if self.events else None

    @property
    def status(self) -> str:
        """``finished``, ``stopped`` (ended cleanly before the end: resume), ``running``,
        ``killed`` (no clean end and no live driver lock) or ``not started`` (no events)."""
        starts = self.of("campaign_start")
        if not starts:
            return "not started"
        last_start = float(starts[-1]["t"])
        summary_file = self.report_dir / "summary.json"
        if self.summary is not None and summary_file.exists() and summary_file.stat().st_mtime >= last_start:
            return "finished"
        ended = any(e.get("event") == "campaign_end" and e["t"] >= last_start for e in self.events)
        if ended:
            return "stopped"
        if self.driver.get("alive"):
            return "running"
        return "killed"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return revive(value) if isinstance(value, dict) else None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def load_run(run_dir: Path | str) -> RunRecord:
    """Read a run directory; ``RunDirectoryError`` if it holds no ``campaign.yaml``."""
    root = Path(run_dir)
    if not (root / "campaign.yaml").is_file():
        raise RunDirectoryError(f"{root}: not a run directory (no campaign.yaml)")
    events_file = root / "logs" / "events.jsonl"
    try:
        events = [e for e in read_events(events_file) if isinstance(e, dict) and "t" in e and "event" in e]
    except OSError:
        events = []
    return RunRecord(
        root=root,
        config=_read_yaml(root / "campaign.yaml"),
        events=events,
        results=_read_json(root / "state" / "results.json") or {},
        phases=_read_json(root / "state" / "phases.json") or {},
        summary=_read_json(root / "report" / "summary.json"),
        validation=_read_json(root / "report" / "validation.json"),
        driver=driver_state(root),
    )
