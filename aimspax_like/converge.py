"""The last phase: train the best member (or all) to convergence.

Convergence training uses every training frame of the campaign (all IDG subsets and all
active-learning points) and stops when the validation loss has not improved for ``patience``
epochs, keeping the best weights. The per-element reference energies (E0) of every member are
then refitted to the training energies (``models.calibration``), the converged members' and
the others' alike: force-dominated losses leave a constant energy offset per member that costs
nothing in forces but spoils every reported energy and, member against member, the committee's
energy spread. The refit never changes forces.

"Best" is the lowest latest validation loss, a part of the trainer's state. Convergence is not
checkpointed: after a kill it starts again from the members the AL phase saved, and gets that
history (with the optimisers and EMAs) back from ``state/committee.pt`` (``Committee.from_files``),
so a resumed convergence trains the same member the same way as an uninterrupted one.

The held-out test set that follows is ``aimspax_like.testset`` (``run_test_set`` is re-exported
here for the campaign).
"""

from __future__ import annotations

import shutil
from typing import Any

from aimspax_like.committee import Committee
from aimspax_like.context import RunContext
from aimspax_like.models.calibration import refit_atomic_energies
from aimspax_like.testset import run_test_set

__all__ = ["run_converge", "run_test_set"]


def run_converge(ctx: RunContext, committee: Committee) -> dict[str, Any]:
    config = ctx.config.converge
    best = committee.best_member()
    if config.members != "all" and committee.n_members > 1 and not any(committee.trainer.last_metrics):
        # Without validation history best_member() is member 0 by default, not by merit (the
        # history comes with the members through state/committee.pt; see Committee.from_files).
        ctx.warn(f"no validation history for the members (state/committee.pt missing or saved with other "
                 f"weights): member {best} is converged without knowing it is the best", key="converge.members")
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
        ctx.events.emit("e0_refit", member=member, shifts=shifts, converged=True)
    for member in range(committee.n_members):  # the saved committee shares one E0 treatment
        if member not in results:
            shifts = refit_atomic_energies(committee.ensemble, member, train)
            ctx.events.emit("e0_refit", member=member, shifts=shifts, converged=False)
    if config.members == "all":
        best = min(results, key=lambda k: results[k].valid_loss)
    with ctx.clock.measure("io"):
        committee.save(ctx.paths.models)
        shutil.copyfile(ctx.paths.models / f"member_{best}.model", ctx.paths.models / "best.model")
    ctx.events.emit("phase_end", phase="converge", best_member=best)
    return {"best_member": best, "metrics": {k: v.__dict__ for k, v in results.items()}}

