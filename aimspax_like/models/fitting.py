"""Fit a fresh MACE model (or a small ensemble) to a finished dataset: ``aimspax-like train``.

The campaign's converge phase continues members that active learning has already shaped; a
final model is usually trained from scratch instead, on every labelled frame, possibly larger
than the committee (the paper trains its large model that way). This module is that recipe,
kept beside the trainer and free of any file handling: frames in, trained ensemble and its
training record out.

* Normalisation comes from the training frames as in a campaign (E0 by least squares, average
  neighbour count, RMS force scale), so a fit is independent of any earlier model.
* Each member trains on all training frames with its own seed (``seeds[k]``), either to
  convergence with patience (``plain``, the converge phase's recipe) or with the paper's final
  recipe (``final``: reduce-on-plateau, then stage two; ``training.FinalRecipe``).
* Per-element E0s are refitted to the training energies at the end, as the converge phase does
  (``models.calibration``): force-dominated losses leave a constant energy offset. The final
  recipe refits them at the switch to stage two as well (``refit_at_switch``): otherwise stage
  two's raised energy weight is spent learning that constant, which the last refit removes
  anyway, instead of energy differences. Measured on the quickstart's ethanol data (40 epochs,
  one seed): test force MAE 41.3 against 47.2 meV/A, energy MAE 1.37 against 1.56 meV/atom.
* The best member is the lowest validation loss in the training config's weights, measured after
  the refit, so members trained through different stages compare on one scale.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ase import Atoms

from aimspax_like.config import ModelConfig, TrainingConfig
from aimspax_like.models.calibration import refit_atomic_energies
from aimspax_like.models.ensemble import MACEEnsemble, atomic_energies_from_data, average_neighbors, force_scale
from aimspax_like.models.training import EnsembleTrainer, EpochRecord, FinalRecipe, MemberMetrics

RECIPES = ("plain", "final")


@dataclass
class FitSettings:
    """Everything that decides a fit besides the frames."""

    model: ModelConfig
    training: TrainingConfig
    seeds: list[int]
    recipe: str  # one of RECIPES
    max_epochs: int
    patience: int
    final: FinalRecipe | None = None  # the final recipe's settings (recipe "final")
    refit_at_switch: bool = True  # final recipe: refit the E0s when stage two begins

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.recipe == "final" and self.final is None:
            self.final = FinalRecipe(max_epochs=self.max_epochs, patience=self.patience)
        if not self.seeds:
            raise ValueError("a fit needs at least one seed (one member)")


@dataclass
class MemberFit:
    """One member's training: its record and where its model came from."""

    member: int
    seed: int
    epochs: int
    stage: int  # stage of the kept checkpoint (always 1 for the plain recipe)
    switch_epoch: int | None  # when stage two began; None: never
    switch_reason: str
    best_valid_loss: dict[int, float]  # per stage, in that stage's loss weights
    valid: dict[str, float]  # after the E0 refit, training-config weights: loss, MAEs (eV units)
    e0_shifts: dict[int, float]  # eV per element added by the refit
    seconds: float
    curve: list[EpochRecord] = field(default_factory=list)


@dataclass
class FitResult:
    ensemble: MACEEnsemble
    members: list[MemberFit]
    best: int  # index of the best member


def build_ensemble(settings: FitSettings, train: Sequence[Atoms], atomic_numbers: Sequence[int]) -> MACEEnsemble:
    """Fresh members normalised on the training frames; ``atomic_numbers`` are the model's elements
    (every element of every split, so a test frame's element is known to the model)."""
    zs = sorted({int(z) for z in atomic_numbers})
    return MACEEnsemble.build(
        settings.model, settings.seeds, atomic_numbers=zs,
        atomic_energies=atomic_energies_from_data(train, zs),
        avg_num_neighbors=average_neighbors(train, settings.model.r_max),
        scale=force_scale(train),
    )


def fit(
    settings: FitSettings,
    train: Sequence[Atoms],
    valid: Sequence[Atoms],
    atomic_numbers: Sequence[int],
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_member: Callable[[MemberFit], None] | None = None,
) -> FitResult:
    """Build and train every member, refit its E0s, pick the best; see the module docstring.

    ``valid`` may be empty: the members then validate on their training frames (the trainer's
    rule), which stops nothing early, so give validation frames whenever there are any.
    """
    if not train:
        raise ValueError("a fit needs at least one training frame")
    ensemble = build_ensemble(settings, train, atomic_numbers)
    trainer = EnsembleTrainer(ensemble, settings.training, reset_after=None)
    check = list(valid) if valid else list(train)
    members = []
    for k, seed in enumerate(settings.seeds):
        start = time.perf_counter()
        member = _train_member(trainer, settings, k, seed, train, valid, on_epoch)
        member.e0_shifts = refit_atomic_energies(ensemble, k, train)
        member.valid = trainer.evaluate(k, check)
        member.seconds = time.perf_counter() - start
        members.append(member)
        if on_member is not None:
            on_member(member)
    best = min(range(len(members)), key=lambda k: _or_inf(members[k].valid["loss"]))
    return FitResult(ensemble, members, best)


def _train_member(
    trainer: EnsembleTrainer,
    settings: FitSettings,
    k: int,
    seed: int,
    train: Sequence[Atoms],
    valid: Sequence[Atoms],
    on_epoch: Callable[[EpochRecord], None] | None,
) -> MemberFit:
    if settings.recipe == "final":
        recipe = settings.final or FinalRecipe(max_epochs=settings.max_epochs, patience=settings.patience)
        ensemble = trainer.ensemble

        def refit(member: int) -> None:
            refit_atomic_energies(ensemble, member, train)

        result = trainer.train_final_recipe(k, train, valid, recipe, on_epoch=_quiet(on_epoch),
                                            on_switch=refit if settings.refit_at_switch else None)
        return MemberFit(k, seed, result.metrics.epoch, result.stage, result.switch_epoch, result.switch_reason,
                         result.best_valid_loss, {}, {}, 0.0, result.curve)
    curve: list[EpochRecord] = []
    cfg = settings.training

    def record(metrics: MemberMetrics) -> None:
        entry = EpochRecord(
            member=k, epoch=metrics.epoch, stage=1, lr=float(cfg.lr), energy_weight=float(cfg.energy_weight),
            forces_weight=float(cfg.forces_weight), stress_weight=float(cfg.stress_weight),
            train_loss=metrics.train_loss, valid_loss=metrics.valid_loss, valid_force_mae=metrics.valid_force_mae,
            valid_energy_mae_per_atom=metrics.valid_energy_mae_per_atom, valid_stress_mae=metrics.valid_stress_mae,
            improved=metrics.improved,
        )
        curve.append(entry)
        if on_epoch is not None:
            on_epoch(entry)

    trainer.train_to_convergence(k, train, valid, patience=settings.patience, max_epochs=settings.max_epochs,
                                 on_epoch=record)
    best = min((r.valid_loss for r in curve), default=math.nan)
    return MemberFit(k, seed, len(curve), 1, None, "", {1: best}, {}, {}, 0.0, curve)


def _quiet(on_epoch: Callable[[EpochRecord], None] | None) -> Callable[[EpochRecord], bool | None] | None:
    """A progress callback that never asks the recipe to stop (its return value is ignored)."""
    if on_epoch is None:
        return None

    def call(record: EpochRecord) -> bool:
        on_epoch(record)
        return False

    return call


def _or_inf(value: float) -> float:
    return math.inf if math.isnan(value) else value
