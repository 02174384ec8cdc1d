"""Initial dataset generation: sample, label, train a few epochs, repeat until a stop criterion.

Each round collects ``points_per_member`` new training frames per member (plus validation
frames by ``valid_ratio``), deals the training frames out so that every member gets a disjoint
random subset, and trains every member ``intermediate_epochs`` epochs without re-initialising
its weights. It stops at ``max_epochs`` epochs, ``max_set_size`` labelled frames, or when the
mean validation force MAE drops below ``desired_acc * desired_acc_scale``.

With ``sampler: reference`` the reference drives the MD, in segments of ``stride`` steps run
as tasks on the label workers (``reference_md``), never in the driver; every segment's last
frame keeps the reference's own energy and forces (they were computed anyway). Several start
structures (a folder of molecules or cells) each get ``trajectories_per_structure`` trajectories
of their own, all running side by side. With ``sampler: foundation`` a foundation model drives
the MD here and the frames go to the label workers in parallel.

Imported frames (``import_data``) and start models (``model.start_from``) enter through
``start.initial_committee``: the committee trains on imported and IDG frames together.
``idg.converge`` trains every member to convergence at the end (the paper does so for its
perovskite before AL).

Resume. IDG is not checkpointed mid-phase: an interrupted IDG starts again from the frames it
already stored in ``dataset.h5``. The committee is rebuilt (fresh weights) from those frames and
the round loop runs again with its full epoch budget. Reference MD continues every trajectory
from its newest stored frame (fresh velocities); foundation MD replays its seeded MD and skips
every frame whose (trajectory, MD step) is already stored. No stored frame is labelled or stored
twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.committee import Committee
from aimspax_like.context import RunContext
from aimspax_like.data import LabelledFrame
from aimspax_like.data.splits import SplitCounter
from aimspax_like.errors import CampaignInterrupted
from aimspax_like.models.calibration import refit_atomic_energies
from aimspax_like.probe import ProbeResult, probe_committee
from aimspax_like.reference.results import LabelResult
from aimspax_like.reference_md import ReferenceMD, resume_starts
from aimspax_like.sampling.ase_md import SampledFrame, StridedSampler
from aimspax_like.start import initial_committee


class MemberDealer:
    """Deals training frames to members: each block of M frames goes to a random permutation."""

    def __init__(self, n_members: int, rng: np.random.Generator) -> None:
        self.n_members = n_members
        self.rng = rng
        self._order: list[int] = []

    def next(self) -> int:
        if not self._order:
            self._order = [int(k) for k in self.rng.permutation(self.n_members)]
        return self._order.pop()


def trajectories_per_structure(ctx: RunContext) -> int:
    """``idg.trajectories_per_structure``, or enough to keep every label worker busy."""
    given = ctx.config.idg.trajectories_per_structure
    if given is not None:
        return given
    return max(1, ctx.labeller.n_workers // len(ctx.structures))


def _reference_sampler(ctx: RunContext) -> ReferenceMD:
    """Reference MD on the workers, continuing each trajectory from its newest stored frame."""
    starts = resume_starts(ctx.structures, trajectories_per_structure(ctx), ctx.store.frames(origin="idg"))
    return ReferenceMD(ctx.labeller, "idg", starts, ctx.config.idg.md, ctx.config.idg.stride, seed=ctx.config.seed,
                       should_stop=ctx.should_stop)


def _foundation_sampler(ctx: RunContext) -> StridedSampler:
    from aimspax_like.models.foundation import idg_foundation_calculator

    calculator = idg_foundation_calculator(ctx.config)
    return StridedSampler(
        ctx.structures, lambda: calculator, ctx.config.idg.md, ctx.config.idg.stride, seed=ctx.config.seed
    )


class IDGPhase:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.config = ctx.config.idg
        self.n_members = ctx.config.model.ensemble_size
        self.frames: list[LabelledFrame] = ctx.store.frames(origin="idg")  # kept from an interrupted run
        self.imported: list[LabelledFrame] = ctx.store.frames(origin="import")
        self.splits = SplitCounter(self.config.valid_ratio, start=len(self.frames))
        self.dealer = MemberDealer(self.n_members, np.random.default_rng(ctx.config.seed + 7 + len(self.frames)))
        self.epochs = 0
        self._label_count = 0
        self.probe: ProbeResult | None = None
        self.extra_rounds = 0
        self._hot_warned = False

    def run(self) -> Committee:
        ctx = self.ctx
        ctx.events.emit("phase_start", phase="idg", sampler=self.config.sampler, resumed_frames=len(self.frames))
        sampler = _reference_sampler(ctx) if self.config.sampler == "reference" else _foundation_sampler(ctx)
        committee: Committee | None = None
        reason = ""
        while not reason:
            self._check_stop()
            new = self.frames if committee is None and self.frames else self._collect_round(sampler)
            if committee is None:
                committee = initial_committee(ctx, self.imported + self.frames)
            else:
                committee.add_all(new)
            with ctx.clock.measure("training"):
                metrics = committee.train_round(self.config.intermediate_epochs)
            self.epochs += self.config.intermediate_epochs
            ctx.events.emit(
                "training_round", phase="idg", epochs=self.config.intermediate_epochs,
                total_epochs=self.epochs, train_size=ctx.train_size(), members=[m.__dict__ for m in metrics],
            )
            ctx.progress(phase="idg", frames=len(ctx.store), epochs=self.epochs,
                         valid_mae=committee.valid_force_mae(), md_steps=sampler.total_steps)
            self._warn_hot_start(sampler)
            reason = self._stop_reason(committee)
            if reason and self.config.probe_steps:
                self.probe = self._probe(committee)
                if not self.probe.passed and self._may_extend(reason):
                    self.extra_rounds += 1
                    reason = ""
        if self.config.converge:
            converge_members(ctx, committee, "idg")
        probe = self.probe.as_dict() if self.probe is not None else None
        ctx.events.emit("phase_end", phase="idg", reason=reason, frames=len(self.frames),
                        epochs=self.epochs, md_steps=sampler.total_steps, probe=probe,
                        extra_rounds=self.extra_rounds)
        if self.probe is not None and not self.probe.passed:
            ctx.warn(f"the initial committee still fails the exploration probe ({self.probe.reason} after "
                     f"{self.probe.steps} steps) and the IDG budget is spent; active learning starts "
                     "anyway, guarded (raise idg.max_set_size or idg.probe_extra_rounds for a stronger start)",
                     key="idg.probe_steps")
        with ctx.clock.measure("io"):
            committee.save(ctx.paths.models)
        return committee

    def _probe(self, committee: Committee) -> ProbeResult:
        ctx = self.ctx
        with ctx.clock.measure("md"):
            result = probe_committee(committee, ctx.structures, ctx.config, self.config.probe_steps,
                                     seed=ctx.config.seed + self.epochs)
        ctx.events.emit("idg_probe", epochs=self.epochs, frames=len(self.frames), **result.as_dict())
        ctx.progress(phase="idg", probe="passed" if result.passed else f"failed at step {result.steps}")
        return result

    def _may_extend(self, reason: str) -> bool:
        """Another round for a committee that cannot explore yet, while the budget allows."""
        return (
            reason != "max_set_size"
            and len(self.frames) < self.config.max_set_size
            and self.extra_rounds < self.config.probe_extra_rounds
        )

    def _warn_hot_start(self, sampler: StridedSampler) -> None:
        """A start structure whose IDG MD runs far hotter than its target is far from a minimum."""
        if self._hot_warned:
            return
        target = self.config.md.temperature_K
        for index, hottest in enumerate(sampler.max_temperature):
            if hottest > self.config.hot_start_factor * target:
                self._hot_warned = True
                self.ctx.warn(
                    f"start structure {index} looks far from a minimum: its IDG MD reached {hottest:.0f} K "
                    f"at a target of {target:.0f} K; relax it first (system.relax: true)",
                    key="system.structures", structure=index, temperature_K=hottest,
                )

    def _check_stop(self) -> None:
        signum = int(self.ctx.should_stop())
        if signum:
            self.ctx.events.emit("idg_interrupted", signal=signum, frames=len(self.ctx.store))
            raise CampaignInterrupted(signum)

    def _stop_reason(self, committee: Committee) -> str:
        if self.epochs >= self.config.max_epochs:
            return "max_epochs"
        if len(self.frames) >= self.config.max_set_size:
            return "max_set_size"
        target = self.config.desired_acc
        if target is not None and committee.valid_force_mae() < target * self.config.desired_acc_scale:
            return "desired_acc"
        return ""

    # ------------------------------------------------------------------ collecting

    def _collect_round(self, sampler: StridedSampler) -> list[LabelledFrame]:
        """Label frames until this round has points_per_member training frames per member.

        Every label that comes back is stored, even past the round's target: a reference
        calculation that was paid for is never thrown away.
        """
        wanted_train = self.config.points_per_member * self.n_members
        new: list[LabelledFrame] = []
        while sum(f.split == "train" for f in new) < wanted_train:
            self._check_stop()
            room = self.config.max_set_size - len(self.frames) - len(new)
            if room <= 0 and new:
                break
            still_needed = wanted_train - sum(f.split == "train" for f in new)
            for atoms, result, sampled in self._label_batch(sampler, max(1, min(room, still_needed))):
                split = self.splits.next()
                member = self.dealer.next() if split == "train" else -1
                new.append(self.ctx.store_label(
                    atoms, result, split, origin="idg", trajectory=sampled.trajectory_id,
                    md_step=sampled.md_step, member=member,
                ))
            self.ctx.progress(phase="idg", frames=len(self.ctx.store), epochs=self.epochs,
                              md_steps=sampler.total_steps)
        self.frames.extend(new)
        return new

    def _label_batch(self, sampler: Any, limit: int) -> list[tuple[Atoms, LabelResult, SampledFrame]]:
        if self.config.sampler == "reference":
            with self.ctx.clock.measure("waiting"):
                sampled = [s for s in sampler.next_frames(limit) if not self._stored(s)]
            return [(s.atoms, s.label, s) for s in sampled]
        return self._label_by_workers(sampler, min(limit, self.ctx.labeller.n_workers))

    def _label_by_workers(
        self, sampler: StridedSampler, batch: int
    ) -> list[tuple[Atoms, LabelResult, SampledFrame]]:
        """Foundation-model frames labelled in parallel, ``batch`` at a time; failures dropped."""
        ctx = self.ctx
        with ctx.clock.measure("md"):
            sampled = [s for s in (sampler.next_frame() for _ in range(batch)) if not self._stored(s)]
        results = ctx.label_on_workers(
            "idg", [s.atoms for s in sampled], self._label_count,
            fields=[{"structure": s.structure, "step": s.md_step} for s in sampled],
        )
        self._label_count += len(sampled)
        return [(s.atoms, r, s) for s, r in zip(sampled, results, strict=True) if r is not None]

    def _stored(self, sampled: SampledFrame) -> bool:
        return self.ctx.is_stored("idg", sampled.trajectory_id, sampled.md_step)


def run_idg(ctx: RunContext) -> Committee:
    return IDGPhase(ctx).run()


def converge_members(ctx: RunContext, committee: Committee, phase: str) -> None:
    """Train every member to convergence on its own data (``converge.patience``/``max_epochs``).

    Each member keeps its own training subset, so the committee stays a committee; the best
    epoch of each is kept (``EnsembleTrainer.train_to_convergence``).
    """
    config = ctx.config.converge
    for member, (train, valid) in enumerate(committee.member_data()):
        if not train or not valid:
            continue
        with ctx.clock.measure("training"):
            metrics = committee.trainer.train_to_convergence(member, train, valid, patience=config.patience,
                                                             max_epochs=config.max_epochs)
        ctx.events.emit("converged", phase=phase, **metrics.__dict__)
        ctx.progress(phase=phase, member=member, converged_valid_mae=metrics.valid_force_mae)
    # Converged members carry per-member energy offsets that cost nothing in forces (see
    # models.calibration): refit them, so the committee's energies and their spread mean something.
    train = committee.all_train
    for member in range(committee.n_members):
        shifts = refit_atomic_energies(committee.ensemble, member, train)
        ctx.events.emit("e0_refit", member=member, shifts=shifts, converged=True)
    committee.last_metrics = [m for m in committee.trainer.last_metrics if m is not None]


def train_on_imports(ctx: RunContext) -> Committee:
    """IDG switched off, data imported or models given: the committee trains on the imported
    frames alone (start models without imported data go to active learning as they are).

    ``idg.max_epochs`` epochs (members on their own subsets), then convergence if
    ``idg.converge``; saved like an IDG committee.
    """
    frames = ctx.store.frames(origin="import")
    committee = initial_committee(ctx, frames)
    epochs = ctx.config.idg.max_epochs
    if not all(committee.member_train):  # start models alone: nothing to train on yet
        with ctx.clock.measure("io"):
            committee.save(ctx.paths.models)
        return committee
    with ctx.clock.measure("training"):
        metrics = committee.train_round(epochs)
    ctx.events.emit("training_round", phase="idg", epochs=epochs, total_epochs=epochs, train_size=ctx.train_size(),
                    members=[m.__dict__ for m in metrics])
    if ctx.config.idg.converge:
        converge_members(ctx, committee, "idg")
    with ctx.clock.measure("io"):
        committee.save(ctx.paths.models)
    return committee
