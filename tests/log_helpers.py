"""Event logs opened by a test, closed after it by ``conftest``'s autouse fixture.

Tests that build a scheduler by hand open an ``EventLog``; an unclosed file would surface as a
ResourceWarning (an error under this suite's warning filter) in some later test.
"""

from __future__ import annotations

from pathlib import Path

from aimspax_like.events import EventLog

_OPEN: list[EventLog] = []


def open_event_log(path: Path) -> EventLog:
    log = EventLog(path)
    _OPEN.append(log)
    return log


def close_event_logs() -> None:
    while _OPEN:
        _OPEN.pop().close()
