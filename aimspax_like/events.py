"""The structured event log (``logs/events.jsonl``) and the wall-time accounting.

Everything the engine decides is an event, one JSON object per line, so the summary, a later
resume and the tests are all built from the same record. Lines are flushed as they are written:
a killed driver leaves every event it logged before the kill.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from aimspax_like.analysis.strict_json import strict

logger = logging.getLogger(__name__)

# Called with each record (the dict ``emit`` returns) after it is written.
Listener = Callable[[dict[str, Any]], None]


class EventLog:
    """Append-only JSONL writer; also counts events by name for the summary.

    ``listeners`` (or ``add_listener``) see every record as it is logged: the live status display.
    """

    def __init__(self, path: Path | None, listeners: Iterable[Listener] = ()) -> None:
        self.path = path
        self._listeners: list[Listener] = list(listeners)
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")
        self.counts: Counter[str] = Counter()
        self.t0 = time.time()
        # Executors emit from Parsl's result thread and a block monitor, the scheduler from the
        # main thread: one lock keeps lines whole and counts exact.
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"t": round(time.time(), 4), "event": event, **strict(fields)}
        line = json.dumps(record) + "\n"
        with self._lock:
            self.counts[event] += 1
            if self._file is not None:
                self._file.write(line)
                self._file.flush()
        for listener in tuple(self._listeners):  # outside the lock: a listener may emit or be slow
            try:
                listener(record)
            except Exception:  # a broken display must never stop the campaign or lose an event
                logger.debug("event listener %r failed on %s", listener, event, exc_info=True)
        return record

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(record)`` with every record from now on, after it is written.

        It runs in the emitting thread (the driver's main thread, or an executor's result or
        monitor thread), so it must be quick and thread-safe; what it raises is logged and ignored.
        """
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every complete event of a log, also one a driver is appending to right now.

    A torn last line (a kill mid-write, or a write under way) or a damaged line is skipped,
    bytes that are not UTF-8 do not stop the reading, and a line that is not an event object
    (no ``event`` name) is left out.
    """
    events = []
    for line in Path(path).read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            events.append(record)
    return events


class WallClock:
    """Splits the driver's wall time into named buckets (ml, waiting, ...)."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.start = time.perf_counter()

    @contextmanager
    def measure(self, bucket: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[bucket] += time.perf_counter() - begin

    def add(self, bucket: str, seconds: float) -> None:
        self.seconds[bucket] += seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
