"""The active-learning phase: trajectories from the start structures, run by the scheduler.

Glue only: it builds an ``ALScheduler`` from the run context (trajectories dealt round-robin
over the start structures, labels stored through ``RunContext.store_label`` with the
train/valid alternation of ``al.valid_ratio``), checkpoints it after every label and training
round (``state.Checkpointer``), resumes it from ``state/al_checkpoint.pt`` when one exists, and
saves the updated members at the end.

The split counter needs no checkpoint: the k-th AL label's split depends only on k, and k is
the number of AL frames in the dataset.
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
from aimspax_like.state import AL_CHECKPOINT, Checkpointer, load_checkpoint, restore_scheduler


def _monitors(start: Atoms, md: Any) -> list[Any]:
    from aimspax_like.sampling.monitors import default_monitors

    return default_monitors(start, md.temperature_K)


def run_al(ctx: RunContext, committee: Committee) -> dict[str, Any]:
    config = ctx.config.al
    splits = SplitCounter(config.valid_ratio, start=ctx.store.counts()["origin"]["al"])

    def sink(atoms: Atoms, result: LabelResult, provenance: dict[str, Any]) -> LabelledFrame:
        return ctx.store_label(atoms, result, splits.next(), **provenance)

    scheduler = ALScheduler(
        config, committee, ctx.executor, sink, ctx.events, ctx.reference_spec, ctx.paths.labels,
        train_set_size=ctx.train_size, faults=ctx.faults, clock=ctx.clock, seed=ctx.config.seed,
        on_progress=ctx.on_progress, should_stop=ctx.should_stop,
        monitors=_monitors if config.stability_monitors else None,
    )
    for k in range(config.num_trajectories):
        scheduler.add_trajectory(ctx.structures[k % len(ctx.structures)])
    checkpoint = ctx.paths.state / AL_CHECKPOINT
    if checkpoint.exists():
        state = load_checkpoint(checkpoint)
        counts = restore_scheduler(
            scheduler, state["al"], lambda p: ctx.is_stored(p["origin"], p["trajectory"], p["md_step"])
        )
        ctx.events.emit("phase_resume", phase="al", checkpoint_event=state.get("event"), **counts)
    else:
        ctx.events.emit("phase_start", phase="al", trajectories=config.num_trajectories, mode=config.mode)
    scheduler.observers.append(Checkpointer(checkpoint, scheduler))
    result = scheduler.run()
    committee.save(ctx.paths.models)
    ctx.events.emit("phase_end", phase="al", reason=result.reason)
    return {**result.__dict__, "threshold": scheduler.threshold.value}
