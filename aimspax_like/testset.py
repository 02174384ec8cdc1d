"""The held-out test set: sampled without the model under test, at several temperatures.

A model judged on frames from its own MD only meets the geometries it already handles well, so
here the test MD is driven by the reference itself (``sampler: reference``: on the label workers,
in segments, see ``reference_md``; the frames keep the reference's energy and forces, no extra
label) or by the IDG foundation model with the frames
labelled by the reference on the label workers (``sampler: foundation``). ``auto`` follows
``idg.sampler``. It runs once per temperature: ``test_set.temperatures_K``, by default the AL
temperatures plus one ``HIGH_TEMPERATURE_FACTOR`` times the highest of them (500 K -> 700 K),
``test_set.size`` frames each, every ``stride``-th MD step, with seeds apart from IDG's.

Where a frame comes from. A stored frame has no temperature field, so test frames carry the
temperature in ``trajectory``: ``trajectory = temperature_index * n_structures + structure``
(``temperature_of``), with the temperatures listed in the results and the ``phase_end`` event.

What is reported, per temperature and over all test frames: the force MAE (eV/A) and energy
MAE per atom (eV/atom) of the final model (the converged best member) and of every member,
and the Pearson correlation between the committee's Eq. 1 uncertainty and the true error of
the committee-mean force (the largest per-atom error norm against the reference): how well
the committee's disagreement ranks the frames it gets wrong.

Resume. An interrupted test set keeps the frames it stored: reference MD continues each
trajectory from its newest stored frame; foundation MD replays its seeded MD and a frame already
stored (same origin, trajectory and MD step) is taken from the dataset instead of being
labelled or stored again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.analysis.correlation import pearson_r
from aimspax_like.committee import Committee
from aimspax_like.config import CampaignConfig
from aimspax_like.context import RunContext
from aimspax_like.data import LabelledFrame
from aimspax_like.errors import CampaignInterrupted, ConfigError
from aimspax_like.ground_truth import true_force_error
from aimspax_like.reference.results import LabelResult
from aimspax_like.reference_md import ReferenceMD, resume_starts
from aimspax_like.sampling.ase_md import SampledFrame, StridedSampler
from aimspax_like.uncertainty import max_atomic_uncertainty

HIGH_TEMPERATURE_FACTOR = 1.4  # the extra test temperature over the highest AL one (paper: 500 -> 700 K)
SEED_OFFSET = 99  # test MD seeds: seed + 99 + temperature index (IDG uses seed itself)


def temperatures_of(config: CampaignConfig) -> list[float]:
    """``test_set.temperatures_K``, or the AL temperatures plus one 1.4 times the highest."""
    if config.test_set.temperatures_K is not None:
        return [float(t) for t in config.test_set.temperatures_K]
    al = sorted({float(config.al.md_for(k).temperature_K) for k in range(config.al.num_trajectories)})
    return [*al, round(HIGH_TEMPERATURE_FACTOR * al[-1], 6)]


def sampler_kind(config: CampaignConfig) -> str:
    """``reference`` or ``foundation`` (``auto`` resolved from ``idg.sampler``)."""
    kind = config.test_set.sampler
    return config.idg.sampler if kind == "auto" else kind


def check_test_set(config: CampaignConfig) -> None:
    """Raise ``ConfigError`` if the test set cannot be sampled as configured."""
    if config.test_set.size and sampler_kind(config) == "foundation" and not config.idg.foundation_model:
        raise ConfigError("test_set.sampler", "foundation needs idg.foundation_model")


def temperature_of(trajectory: int, temperatures: list[float], n_structures: int) -> float:
    """The test temperature of a stored test frame, decoded from its ``trajectory``."""
    return temperatures[int(trajectory) // n_structures]


def run_test_set(ctx: RunContext, committee: Committee, member: int) -> dict[str, Any] | None:
    """Sample the test set (see the module docstring), store it, report the errors on it."""
    config = ctx.config.test_set
    if config.size == 0:
        return None
    check_test_set(ctx.config)
    temperatures = temperatures_of(ctx.config)
    kind = sampler_kind(ctx.config)
    ctx.events.emit("phase_start", phase="test", sampler=kind, temperatures_K=temperatures)
    sampling = _TestSampling(ctx, kind)
    groups = []
    for index, temperature in enumerate(temperatures):
        frames = sampling.collect(index, temperature)
        errors = committee_errors(committee, [f.to_atoms() for f in frames], member)
        groups.append({"temperature_K": temperature, **errors})
    atoms = [f.to_atoms() for f in sampling.frames]
    overall = committee_errors(committee, atoms, member)
    ctx.events.emit("phase_end", phase="test", size=len(atoms), sampler=kind, temperatures_K=temperatures,
                    per_temperature=groups, all=overall)
    return {
        "size": len(atoms), "member": member, "sampler": kind, "temperatures_K": temperatures,
        "trajectory_encoding": "temperature_index * n_structures + structure",
        "per_temperature": groups, "all": overall,
    }


# --------------------------------------------------------------------------- errors


def committee_errors(committee: Committee, atoms: list[Atoms], member: int) -> dict[str, Any]:
    """Errors of the final model (``member``) and of every member, and the uncertainty-error r."""
    if not atoms:
        return {"frames": 0, "final": None, "members": [], "uncertainty_error_r": None,
                "mean_uncertainty": None, "mean_max_force_error": None}
    members = [committee.trainer.evaluate(k, atoms) for k in range(committee.n_members)]
    prediction = committee.ensemble.predict(atoms)
    uncertainty, error = [], []
    for s, frame in enumerate(atoms):
        forces = prediction.forces_of(s)  # [M, n_atoms, 3]
        uncertainty.append(max_atomic_uncertainty(forces))
        error.append(true_force_error(forces.mean(axis=0), frame.arrays["REF_forces"]))
    return {
        "frames": len(atoms),
        "final": members[member],
        "members": members,
        "uncertainty_error_r": pearson_r(uncertainty, error, min_points=2),
        "mean_uncertainty": float(np.mean(uncertainty)),
        "mean_max_force_error": float(np.mean(error)),
    }


# --------------------------------------------------------------------------- sampling


class _TestSampling:
    """Collects ``test_set.size`` stored frames per temperature, by reference or foundation MD."""

    def __init__(self, ctx: RunContext, kind: str) -> None:
        self.ctx = ctx
        self.kind = kind
        self.config = ctx.config.test_set
        self.n_structures = len(ctx.structures)
        self.stored = {(f.trajectory, f.md_step): f for f in ctx.store.frames(origin="test")}
        self.frames: list[LabelledFrame] = []
        self._calculator: Any = None
        self._label_count = 0

    def collect(self, index: int, temperature: float) -> list[LabelledFrame]:
        sampler = self._sampler(index, temperature)
        frames: list[LabelledFrame] = []
        if self.kind == "reference":  # reference MD continues from the stored frames (see reference_md)
            frames = sorted(self._stored_at(index), key=lambda f: (f.md_step, f.trajectory))[: self.config.size]
        attempts = 0
        while len(frames) < self.config.size and attempts < 3 * self.config.size:
            self._check_stop()
            wanted = self.config.size - len(frames)
            if self.kind == "reference":
                with self.ctx.clock.measure("waiting"):
                    sampled = sampler.next_frames(wanted)
            else:
                with self.ctx.clock.measure("md"):
                    batch = min(wanted, max(1, getattr(self.ctx.executor, "n_workers", 1)))
                    sampled = [sampler.next_frame() for _ in range(batch)]
            attempts += len(sampled)
            frames.extend(self._label(index, sampled))
            self.ctx.progress(phase="test", temperature_K=temperature, frames=len(frames))
        self.frames.extend(frames)
        return frames

    def _stored_at(self, index: int) -> list[LabelledFrame]:
        """Test frames already stored at temperature ``index`` (a resumed test set)."""
        return [f for (trajectory, _), f in self.stored.items() if trajectory // self.n_structures == index]

    def _sampler(self, index: int, temperature: float) -> Any:
        ctx = self.ctx
        md = self.config.md.model_copy(update={"temperature_K": temperature})
        seed = ctx.config.seed + SEED_OFFSET + index
        if self.kind == "reference":  # on the label workers, one trajectory per start structure
            starts = resume_starts(ctx.structures, 1, self._stored_at(index), offset=index * self.n_structures)
            return ReferenceMD(ctx.labeller, "test", starts, md, self.config.stride, seed=seed,
                               should_stop=ctx.should_stop, fields={"temperature_index": index})
        if self._calculator is None:
            from aimspax_like.models.foundation import idg_foundation_calculator

            self._calculator = idg_foundation_calculator(ctx.config)
        calculator = self._calculator
        return StridedSampler(ctx.structures, lambda: calculator, md, self.config.stride, seed=seed)

    def _label(self, index: int, sampled: list[SampledFrame]) -> list[LabelledFrame]:
        """Store the sampled frames (reference MD) or label them on the workers (foundation MD)."""
        ctx = self.ctx
        done: list[LabelledFrame] = []
        fresh = []
        for s in sampled:
            key = (index * self.n_structures + s.structure, s.md_step)
            if key in self.stored:  # replayed after a resume
                done.append(self.stored[key])
            elif self.kind == "reference":
                done.append(self._store(s, key, s.label))
            else:
                fresh.append((s, key))
        results = ctx.label_on_workers(
            "test", [s.atoms for s, _ in fresh], self._label_count,
            fields=[{"structure": s.structure, "step": s.md_step, "temperature_index": index} for s, _ in fresh],
        )
        self._label_count += len(fresh)
        for (s, key), result in zip(fresh, results, strict=True):
            if result is not None:
                done.append(self._store(s, key, result))
        return done

    def _store(self, sampled: SampledFrame, key: tuple[int, int], result: LabelResult) -> LabelledFrame:
        frame = self.ctx.store_label(sampled.atoms, result, "test", origin="test", trajectory=key[0], md_step=key[1])
        self.stored[key] = frame
        return frame

    def _check_stop(self) -> None:
        signum = int(self.ctx.should_stop())
        if signum:
            self.ctx.events.emit("test_interrupted", signal=signum, frames=len(self.frames))
            raise CampaignInterrupted(signum)
