"""Deterministic fault injection for tests and benchmarks (never for production labels).

The scheduler's failure handling (retries, skipping points, timeouts) can only be exercised
if references fail on demand. The ``faults`` section of the config gives probabilities for an
SCF failure, a crash and a hang, plus a fixed delay that stands for DFT cost. The draw happens
once per label from ``np.random.default_rng(seed)``, so a seeded campaign fails the same labels
every time.

The three probabilities describe disjoint outcomes taken from one uniform draw, so each
happens at exactly its requested rate while they sum to at most 1 (beyond that, the later ones
get only what is left). A hang sleeps ``hang_s`` and then labels normally: with ``timeout_s``
set it becomes TIMED_OUT, without it it is merely a very slow label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from aimspax_like.reference.results import SCFNotConverged


@dataclass(frozen=True)
class InjectedFault:
    """What to do to one label before the real calculation runs."""

    kind: str | None  # "scf_failure", "crash", "hang" or None
    delay_s: float = 0.0
    hang_s: float = 0.0

    def apply(self) -> None:
        """Sleep and/or raise as drawn; returns normally when the real calculation should run."""
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        if self.kind == "scf_failure":
            raise SCFNotConverged("injected SCF failure")
        if self.kind == "crash":
            raise RuntimeError("injected crash")
        if self.kind == "hang":
            time.sleep(self.hang_s)


def draw_fault(faults: dict[str, Any] | None, seed: int | None = None) -> InjectedFault | None:
    """Decide this label's fault from the config's ``faults`` mapping (None: no injection)."""
    if not faults:
        return None
    u = np.random.default_rng(seed).random()
    kind = None
    edge = 0.0
    for name in ("scf_failure", "crash", "hang"):
        edge += float(faults.get(name, 0.0))
        if u < edge:
            kind = name
            break
    return InjectedFault(
        kind=kind,
        delay_s=float(faults.get("delay_s", 0.0)),
        hang_s=float(faults.get("hang_s", 3600.0)),
    )
