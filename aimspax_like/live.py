"""The driver's live status display, fed by the event log.

On a terminal the picture of ``analysis.status_render.render`` is redrawn in place a few times a second
(``rich.live.Live`` on stderr; the last picture stays when the campaign ends). When stderr is not a
terminal (a SLURM log file) it writes one timestamped line (``analysis.status_render.render_line``)
every ``interval_s`` seconds and at the start of every phase.

``LiveStatus.on_event`` is an ``EventLog`` listener (``run_campaign(..., on_event=...)``); the
object itself is also an ``on_progress`` callback, which adds what the log does not carry (the
exact MD step count every step, the epoch of convergence training). Nothing is drawn before the
first event, so a campaign refused at setup prints only its one error line.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from aimspax_like.analysis.status import Budgets, StatusTracker
from aimspax_like.analysis.status_render import render, render_line, timestamp
from aimspax_like.events import read_events

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 30.0
REFRESH_PER_SECOND = 4


class LiveStatus:
    """A live status display on ``stream`` (stderr by default); call ``close`` at the end."""

    def __init__(
        self,
        stream: TextIO | None = None,
        config: dict[str, Any] | Budgets | None = None,
        interval_s: float = LOG_INTERVAL_S,
        tty: bool | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.interval_s = interval_s
        self.tracker = StatusTracker(config)
        self._lock = threading.Lock()  # one writer at a time (events come from several threads)
        self._started = False
        self._closed = False
        self._live: Any = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_phase: str | None = None
        self.lines_written = 0

    # ------------------------------------------------------------------ input

    def on_event(self, record: dict[str, Any]) -> None:
        """An ``EventLog`` listener: every record the driver logs."""
        if record.get("event") == "campaign_start" and record.get("resume") and not self.tracker.events:
            self._replay_history(record)
        self.tracker.feed(record)
        self._start()
        if not self.tty and record.get("event") in ("phase_start", "phase_resume"):
            self._write_line()

    def __call__(self, status: dict[str, Any]) -> None:
        """An ``on_progress`` callback."""
        self.tracker.progress(status)

    def _replay_history(self, record: dict[str, Any]) -> None:
        """A resumed campaign: what the earlier driver runs logged counts too (labels, data, time)."""
        directory = record.get("directory")
        if not directory:
            return
        log = Path(directory) / "logs" / "events.jsonl"
        history = read_events(log) if log.is_file() else []
        starts = [k for k, r in enumerate(history) if r.get("event") == "campaign_start"]
        if starts:  # the last one is this run's own, already in the file
            self.tracker.feed_all(history[: starts[-1]])

    # ------------------------------------------------------------------ output

    def snapshot(self) -> dict[str, Any]:
        return self.tracker.snapshot(alive=not self._closed)

    def _renderable(self) -> Any:
        return render(self.snapshot())

    def _start(self) -> None:
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            if self.tty:
                from rich.console import Console
                from rich.live import Live

                console = Console(file=self.stream)
                self._live = Live(get_renderable=self._renderable, console=console,
                                  refresh_per_second=REFRESH_PER_SECOND, transient=False)
                self._live.start()
            else:
                self._ticker = threading.Thread(target=self._tick, name="live-status", daemon=True)
                self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write_line()

    def _write_line(self) -> None:
        with self._lock:
            if self._closed and self._ticker is None:
                return
            try:
                line = f"{timestamp()} {render_line(self.snapshot())}\n"
                self.stream.write(line)
                self.stream.flush()
            except Exception:  # a closed or full log file, a picture that fails: never the campaign
                logger.debug("live status line failed", exc_info=True)
                return
            self.lines_written += 1

    def close(self) -> None:
        """Stop redrawing; the last picture (or a last line) stays."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._write_line()
            self._ticker = None


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = ["LOG_INTERVAL_S", "LiveStatus"]
