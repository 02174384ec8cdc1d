"""A live status line on stderr (rewritten in place on a terminal, a line every 15 s in logs)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


class ProgressLine:
    def __init__(self, stream: TextIO | None = None, interval_s: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval_s if interval_s is not None else (0.2 if self.tty else 15.0)
        self.start = time.monotonic()
        self._last = -math.inf
        self._width = 0

    def __call__(self, status: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        text = f"[{now - self.start:7.1f}s] " + " ".join(f"{k}={_fmt(v)}" for k, v in status.items())
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
