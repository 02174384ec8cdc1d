"""The active-learning phase: trajectories from the start structures, run by the scheduler.

Glue only: it builds an ``ALScheduler`` from the run context (trajectories dealt round-robin
over the start structures, labels stored through ``RunContext.store_label`` with the
train/valid alternation of ``al.valid_ratio``), checkpoints it after every label and training
round (``state.Checkpointer`` writing ``ALScheduler.state_dict``), resumes it from
``state/al_checkpoint.pt`` when one exists (``ALScheduler.load_state_dict``), and saves the
updated members (and with them the committee's state, ``Committee.save``) at the end.

The split counter needs no checkpoint: the k-th AL label's split depends only on k, and k is
the number of AL frames in the dataset.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from ase import Atoms

from aimspax_like.committee import Committee
from aimspax_like.config import PERIODIC_ONLY_REFERENCES
from aimspax_like.context import RunContext
from aimspax_like.data import LabelledFrame
from aimspax_like.data.splits import SplitCounter
from aimspax_like.label_gate import EnergyGate
from aimspax_like.piece_planner import PiecePlanner
from aimspax_like.reference.results import LabelResult
from aimspax_like.scheduler import ALScheduler
from aimspax_like.state import AL_CHECKPOINT, Checkpointer, load_checkpoint


def _guards(guards_config: Any) -> Callable[[Atoms, Any], list[Any]]:
    from aimspax_like.guards import build_guards

    return lambda start, md: build_guards(start, md.temperature_K, guards_config)


def _energy_gate(ctx: RunContext, frames: list[LabelledFrame]) -> EnergyGate | None:
    """The gate, primed with every accepted label so far (IDG frames and earlier AL labels)."""
    limit = ctx.config.al.guards.energy_outlier
    if limit is None:
        return None
    hottest = max(ctx.config.al.md_for(k).temperature_K for k in range(ctx.config.al.num_trajectories))
    gate = EnergyGate(limit, temperature_K=hottest)
    for frame in frames:
        if frame.split in ("train", "valid") and not frame.is_piece:
            gate.add(frame.numbers, frame.energy, reference=frame.origin == "idg")
    return gate


def _budget(ctx: RunContext, stored: list[LabelledFrame]) -> tuple[Callable[[], int], str]:
    """What ``al.max_train_set_size`` counts, and the words for it (``al.train_set_counts``).

    ``shared``: the training set as stored, every member's IDG frames included. ``per_member``
    (aims-PAX's rule): member k trains on its own IDG frames (``member == k``) plus every shared
    frame (``member == -1``); the budget is the largest member's count. Frames of one member
    come from IDG only and AL adds shared frames only, so during AL the largest count is the
    stored training set minus every member's own frames plus the largest member's own.
    """
    if ctx.config.al.train_set_counts == "shared":
        return ctx.train_size, "the shared training set"
    own = Counter(f.member for f in stored if f.split == "train" and f.member >= 0)
    largest, everyone = max(own.values(), default=0), sum(own.values())
    return (lambda: ctx.train_size() - everyone + largest), "the largest member's training set"


def _planner(ctx: RunContext, committee: Committee) -> PiecePlanner | None:
    """``al.substructures``: the planner, its core radius defaulting to the receptive field."""
    config = ctx.config.al.substructures
    if not config.enabled:
        return None
    model = ctx.config.model
    return PiecePlanner(config, model.r_max * model.num_interactions, ensemble=committee.ensemble, seed=ctx.config.seed,
                        vacuum=ctx.config.reference.kind not in PERIODIC_ONLY_REFERENCES)


def run_al(ctx: RunContext, committee: Committee) -> dict[str, Any]:
    config = ctx.config.al
    stored = ctx.store.frames()  # read once: the gate, the split counter, held labels, resume
    al_frames = [f for f in stored if f.origin == "al"]
    splits = SplitCounter(config.valid_ratio, start=sum(f.split in ("train", "valid") for f in al_frames))

    def sink(atoms: Atoms, result: LabelResult, provenance: dict[str, Any]) -> LabelledFrame:
        provenance = dict(provenance)
        if provenance["origin"] == "analysis":  # ground truth for the report, never for training
            return ctx.store_label(atoms, result, "analysis", **provenance)
        held, release = provenance.pop("held", False), provenance.pop("release", False)
        if release:
            return ctx.release_label("al", provenance["trajectory"], provenance["md_step"], splits.next())
        return ctx.store_label(atoms, result, "held" if held else splits.next(), **provenance)

    if config.rounds.mode == "replay":
        committee.bound_rounds(config.rounds, config.max_epochs_per_point, ctx.config.seed)
    budget_size, counted = _budget(ctx, stored)
    if budget_size() >= config.max_train_set_size:
        ctx.warn(f"{counted} already holds {budget_size()} frames, at or above "
                 f"al.max_train_set_size ({config.max_train_set_size}): active learning labels nothing; "
                 f"raise al.max_train_set_size (al.train_set_counts: {config.train_set_counts}; "
                 "IDG frames count towards it)",
                 key="al.max_train_set_size")
    scheduler = ALScheduler(
        config, committee, ctx.executor, sink, ctx.events, ctx.reference_spec, ctx.paths.labels,
        train_set_size=ctx.train_size, budget_size=budget_size, faults=ctx.faults, clock=ctx.clock,
        seed=ctx.config.seed,
        on_progress=ctx.on_progress, should_stop=ctx.should_stop,
        guards=_guards(config.guards), energy_gate=_energy_gate(ctx, stored), trust_factor=config.guards.trust_factor,
        labeller=ctx.labeller, planner=_planner(ctx, committee),
    )
    scheduler.held = [
        (f.to_atoms(), LabelResult(f.energy, f.forces, f.stress, None, 0.0),
         {"origin": "al", "trajectory": f.trajectory, "md_step": f.md_step, "uncertainty": f.uncertainty})
        for f in al_frames if f.split == "held"
    ]
    for k in range(config.num_trajectories):
        scheduler.add_trajectory(ctx.structures[k % len(ctx.structures)])
    checkpoint = ctx.paths.state / AL_CHECKPOINT
    if checkpoint.exists():
        state = load_checkpoint(checkpoint)
        stored_splits = {(f.trajectory, f.md_step, f.piece): f.split for f in al_frames}
        forces = {(f.origin, f.trajectory, f.md_step): f.forces for f in stored
                  if f.origin in ("al", "analysis") and not f.is_piece}
        counts = scheduler.load_state_dict(
            state["al"], lambda p: stored_splits.get((p["trajectory"], p["md_step"], p.get("piece", -1))),
            stored_forces=lambda origin, trajectory, step: forces.get((origin, trajectory, step)),
        )
        ctx.events.emit("phase_resume", phase="al", checkpoint_event=state.get("event"), **counts)
    else:
        ctx.events.emit("phase_start", phase="al", trajectories=config.num_trajectories, mode=config.mode)
    checkpointer = Checkpointer(checkpoint, scheduler)

    def write_checkpoint(event: str) -> None:  # a checkpoint is the clock's 'io', wherever it is taken
        with ctx.clock.measure("io"):
            checkpointer(event)

    scheduler.observers.append(write_checkpoint)
    result = scheduler.run()
    with ctx.clock.measure("io"):
        committee.save(ctx.paths.models)
    ctx.events.emit("phase_end", phase="al", reason=result.reason)
    return {**result.__dict__, "threshold": scheduler.threshold.value, "held": len(scheduler.held),
            "analysis_points": 0 if scheduler.analysis is None else scheduler.analysis.points}
