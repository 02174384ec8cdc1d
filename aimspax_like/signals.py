"""SIGTERM/SIGINT as a flag the campaign polls, so a stop always lands at a clean point.

SLURM sends SIGTERM some time before the walltime kill, and a user presses Ctrl-C; dying at
once would lose the labels in flight and leave a phase half written. ``StopFlag`` only records
the signal; the scheduler and the phases look at it between steps, save their state and raise
``aimspax_like.errors.CampaignInterrupted``. A second signal means "now": it interrupts at once.
"""

from __future__ import annotations

import signal
from typing import Any

_ACTIVE: list[StopFlag] = []  # the installed flag(s), innermost last


def stop_requested() -> int:
    """The signal number once an installed ``StopFlag`` caught one, else 0.

    For loops that may run for minutes far from the campaign's own checks (a training round of
    a large model, waiting for a batch of DFT labels): they look here and stop within seconds.
    """
    return _ACTIVE[-1].signum if _ACTIVE else 0


class StopFlag:
    """Records SIGTERM/SIGINT instead of dying; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signum != 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving state and stopping within seconds "
              "(send it again to stop at once)", flush=True)

    def install(self) -> StopFlag:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        _ACTIVE.append(self)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)
