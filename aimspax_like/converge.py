"""The last phases: train the best member (or all) to convergence, then measure on a test set.

Convergence training uses every training frame of the campaign (all IDG subsets and all
active-learning points) and stops when the validation loss has not improved for ``patience``
epochs, keeping the best weights. The per-element reference energies are then refitted to the
training energies (``models.calibration``): force-dominated losses leave a constant energy
offset that costs nothing in forces but spoils every reported energy.

The test set is sampled by MD with the final model, as a user would run it, and labelled by the
same reference on the label workers; it never enters training.
"""

from __future__ import annotations

import shutil
from typing import Any

from aimspax_like.committee import Committee
from aimspax_like.context import RunContext
from aimspax_like.models.calibration import refit_atomic_energies
from aimspax_like.reference.results import LabelFailure
from aimspax_like.sampling.ase_md import StridedSampler
from aimspax_like.scheduler import outcome_of


def run_converge(ctx: RunContext, committee: Committee) -> dict[str, Any]:
    config = ctx.config.converge
    best = committee.best_member()
    members = list(range(committee.n_members)) if config.members == "all" else [best]
    ctx.events.emit("phase_start", phase="converge", members=members)
    train, valid = committee.all_train, committee.valid
    results = {}
    for member in members:

        def on_epoch(metrics, member=member):
            ctx.progress(phase="converge", member=member, epoch=metrics.epoch, valid_mae=metrics.valid_force_mae)

        with ctx.clock.measure("training"):
            metrics = committee.trainer.train_to_convergence(
                member, train, valid, patience=config.patience, max_epochs=config.max_epochs, on_epoch=on_epoch,
            )
        results[member] = metrics
        ctx.events.emit("converged", **metrics.__dict__)
        shifts = refit_atomic_energies(committee.ensemble, member, train)
        ctx.events.emit("e0_refit", member=member, shifts=shifts)
    if config.members == "all":
        best = min(results, key=lambda k: results[k].valid_loss)
    committee.save(ctx.paths.models)
    shutil.copyfile(ctx.paths.models / f"member_{best}.model", ctx.paths.models / "best.model")
    ctx.events.emit("phase_end", phase="converge", best_member=best)
    return {"best_member": best, "metrics": {k: v.__dict__ for k, v in results.items()}}


def run_test_set(ctx: RunContext, committee: Committee, member: int) -> dict[str, Any] | None:
    """Sample ``test_set.size`` frames with the final model, label them, report its errors."""
    config = ctx.config.test_set
    if config.size == 0:
        return None
    from aimspax_like.models.foundation import load_foundation_calculator

    ctx.events.emit("phase_start", phase="test")
    model_file = ctx.paths.models / "best.model"
    if not model_file.exists():
        model_file = ctx.paths.models / f"member_{member}.model"
    calculator = load_foundation_calculator(str(model_file), device="cpu", dtype=ctx.config.model.dtype)
    sampler = StridedSampler(
        ctx.structures, lambda: calculator, config.md, config.stride, seed=ctx.config.seed + 99
    )
    frames, attempts = [], 0
    while len(frames) < config.size and attempts < 3 * config.size:
        batch = [sampler.next_frame() for _ in range(min(config.size - len(frames), 8))]
        attempts += len(batch)
        futures = [
            ctx.executor.submit(s.atoms, ctx.reference_spec, str(ctx.paths.labels / f"test_{attempts}_{i}"),
                                None, seed=i)
            for i, s in enumerate(batch)
        ]
        for sampled, future in zip(batch, futures, strict=True):
            with ctx.clock.measure("waiting"):
                outcome = outcome_of(future)
            if isinstance(outcome, LabelFailure):
                ctx.events.emit("label_failed", phase="test", kind=outcome.kind.value, message=outcome.message)
                continue
            frames.append(ctx.store_label(sampled.atoms, outcome, "test", origin="test",
                                          trajectory=sampled.structure, md_step=sampled.md_step))
    atoms = [f.to_atoms() for f in frames]
    errors = {k: committee.trainer.evaluate(k, atoms) for k in range(committee.n_members)} if atoms else {}
    ctx.events.emit("phase_end", phase="test", size=len(frames), errors=errors)
    return {"size": len(frames), "member": member, "errors": errors}
