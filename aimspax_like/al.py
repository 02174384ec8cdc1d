"""The active-learning phase: trajectories from the start structures, run by the scheduler.

Glue only: it builds an ``ALScheduler`` from the run context (trajectories dealt round-robin
over the start structures, labels stored through ``RunContext.store_label`` with the
train/valid alternation of ``al.valid_ratio``) and saves the updated members at the end.
"""

from __future__ import annotations

from typing import Any

from ase import Atoms

from aimspax_like.committee import Committee
from aimspax_like.context import RunContext
from aimspax_like.data import LabelledFrame
from aimspax_like.data.splits import SplitCounter
from aimspax_like.reference.results import LabelResult
from aimspax_like.scheduler import ALScheduler


def run_al(ctx: RunContext, committee: Committee) -> dict[str, Any]:
    config = ctx.config.al
    splits = SplitCounter(config.valid_ratio)

    def sink(atoms: Atoms, result: LabelResult, provenance: dict[str, Any]) -> LabelledFrame:
        return ctx.store_label(atoms, result, splits.next(), **provenance)

    scheduler = ALScheduler(
        config, committee, ctx.executor, sink, ctx.events, ctx.reference_spec, ctx.paths.labels,
        train_set_size=ctx.train_size, faults=ctx.faults, clock=ctx.clock, seed=ctx.config.seed,
        on_progress=ctx.on_progress,
    )
    for k in range(config.num_trajectories):
        scheduler.add_trajectory(ctx.structures[k % len(ctx.structures)])
    ctx.events.emit("phase_start", phase="al", trajectories=config.num_trajectories, mode=config.mode)
    result = scheduler.run()
    committee.save(ctx.paths.models)
    ctx.events.emit("phase_end", phase="al", reason=result.reason)
    return {**result.__dict__, "threshold": scheduler.threshold.value}
