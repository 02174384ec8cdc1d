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
    """Splits the driver's time into named buckets, per phase, in wall and CPU seconds.

    Buckets: ``md`` (committee forces and integration), ``uncertainty`` (Eq. 1 / Eq. 2 checks and
    guards), ``training``, ``io`` (checkpoints, committee saves, dataset writes), ``waiting`` (for
    labels), and ``labelling``: the label time spent on the workers (``add``; wall and CPU as the
    worker measured them, not driver time). The phase is what ``in_phase`` set; time outside every
    phase (start-up, relaxation, the final evaluation) belongs to ``OUTSIDE``.

    Measures are exclusive: a measure opened inside another (a dataset write while waiting for
    labels) is subtracted from the outer one, so the buckets of a phase never add up to more than
    the phase took and each second is counted once. CPU is ``time.process_time``: the whole
    driver process, every thread included (torch's intra-op threads, Parsl's threads; with the
    thread label executor, the labels themselves too).

    ``seconds`` keeps the wall seconds per bucket over all phases (the older, flat record);
    ``profile()`` gives ``{phase: {bucket: {"wall_s", "cpu_s"}}}`` with a ``driver`` entry per
    phase for the whole of the driver's time in it (buckets and the rest).
    """

    OUTSIDE = "other"
    DRIVER = "driver"

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.phase = self.OUTSIDE
        self._profile: dict[str, dict[str, list[float]]] = {}
        self._open = threading.local()  # per thread: [inner wall, inner cpu] of every open measure
        self._lock = threading.Lock()

    def _record(self, phase: str, bucket: str, wall: float, cpu: float) -> None:
        with self._lock:
            if bucket != self.DRIVER:
                self.seconds[bucket] += wall
            cell = self._profile.setdefault(phase, {}).setdefault(bucket, [0.0, 0.0])
            cell[0] += wall
            cell[1] += cpu

    @contextmanager
    def measure(self, bucket: str) -> Iterator[None]:
        stack = self._open.__dict__.setdefault("stack", [])
        phase = self.phase
        wall0, cpu0 = time.perf_counter(), time.process_time()
        stack.append([0.0, 0.0])
        try:
            yield
        finally:
            inner_wall, inner_cpu = stack.pop()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            if stack:  # the enclosing measure gives this time up
                stack[-1][0] += wall
                stack[-1][1] += cpu
            self._record(phase, bucket, max(0.0, wall - inner_wall), max(0.0, cpu - inner_cpu))

    def add(self, bucket: str, seconds: float, cpu_s: float | None = None) -> None:
        """Time spent elsewhere (a label on a worker): recorded as given, never subtracted from a measure.

        ``cpu_s`` None (a worker that did not measure it) adds no CPU.
        """
        self._record(self.phase, bucket, float(seconds), float(cpu_s or 0.0))

    @contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        """Attribute what happens inside to ``phase``; its whole driver time is its ``driver`` entry."""
        previous, self.phase = self.phase, phase
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.phase = previous
            self._record(phase, self.DRIVER, time.perf_counter() - wall0, time.process_time() - cpu0)

    def profile(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{phase: {bucket: {"wall_s": s, "cpu_s": s}}}`` so far, ``driver`` included per phase.

        The ``OUTSIDE`` phase's ``driver`` entry is the run's time so far less every phase's.
        """
        with self._lock:
            cells = {phase: {bucket: list(v) for bucket, v in buckets.items()}
                     for phase, buckets in self._profile.items()}
        inside = [b[self.DRIVER] for p, b in cells.items() if p != self.OUTSIDE and self.DRIVER in b]
        rest = [max(0.0, self.elapsed - sum(c[0] for c in inside)),
                max(0.0, self.cpu_elapsed - sum(c[1] for c in inside))]
        cells.setdefault(self.OUTSIDE, {})[self.DRIVER] = rest
        return {phase: {bucket: {"wall_s": round(v[0], 4), "cpu_s": round(v[1], 4)} for bucket, v in buckets.items()}
                for phase, buckets in cells.items()}

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def cpu_elapsed(self) -> float:
        """Driver CPU seconds (all threads) since the clock started."""
        return time.process_time() - self.cpu_start
