"""Continual training of the committee: every member keeps its weights, optimiser and EMA.

Active learning trains in many short rounds (a few epochs after each batch of new labels), so
nothing here is ever re-initialised between rounds: weights, AMSGrad moments, the EMA shadow,
the shuffling generator and the patience counters all carry over, and ``state_dict`` captures
all of them for checkpoint/resume.

Loss. Training uses mace's ``WeightedEnergyForcesLoss``:
``w_E * mean_graphs(((E_pred - E_ref) / n_atoms)^2) + w_F * mean_components((F_pred - F_ref)^2)``
(per-frame ``config_weight`` and missing labels handled as mace does), with the force mean taken
over labelled atoms only: a substructure's buffer atoms carry no force label (``models.losses``). With stress labels and
``training.stress_weight > 0`` it is mace's ``WeightedEnergyForcesStressLoss``, which adds
``w_S * mean_components((S_pred - S_ref)^2)`` (eV/A^3) over the frames that carry a stress: an
NPT trajectory is driven by the committee's virial, which must be trained like its forces.
Validation reports the same expression over the whole set (not averaged per batch), plus force
MAE (eV/A, over components, as mace's ``mae_f``), energy MAE per atom (eV/atom) and, where
frames have stress labels, stress MAE (eV/A^3, over the 9 components).

EMA. The live weights of ``ensemble.members[k]`` are the EMA-averaged weights whenever the
trainer is not inside one of its methods, so ``ensemble.predict``, ``ensemble.save`` and
``evaluate`` all see the smoothed model. The raw (optimised) weights are kept aside and swapped
back in only for optimisation steps. The trainer is not thread-safe: call ``predict`` between
trainer calls, not during them.

Patience. An improvement must lower the validation loss by a relative ``min_rel_improvement``
(default 1e-6): below that a "better" loss is round-off, and counting it would keep a stalled
member from ever getting its optimiser reset.

Final recipe. ``train_final_recipe`` trains one member the way the paper trains a model from
scratch on a finished dataset (``FinalRecipe``): a reduce-on-plateau learning rate, then a
"stage two" (mace_run_train's ``--stage_two``, formerly ``--swa``) with the energy weight raised
and a lower learning rate, keeping the best validation checkpoint of each stage. It is separate
from ``train_to_convergence`` (patience only), which the campaign's converge phase uses unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import mace  # noqa: F401  (first: sets the torch.load switch e3nn needs under torch >= 2.6)
import torch
from ase import Atoms
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch_ema import ExponentialMovingAverage

from aimspax_like.config import TrainingConfig
from aimspax_like.errors import CampaignInterrupted
from aimspax_like.models.ensemble import MACEEnsemble
from aimspax_like.models.graphs import loader
from aimspax_like.models.losses import MaskedEnergyForcesLoss, MaskedEnergyForcesStressLoss, node_force_weights
from aimspax_like.signals import stop_requested

FrameSplit = tuple[Sequence[Atoms], Sequence[Atoms]]
_log = logging.getLogger(__name__)


@dataclass
class MemberMetrics:
    """One member after a training round (or convergence run), on its validation frames."""

    member: int
    epoch: int  # epochs trained so far by this member, all rounds together
    train_loss: float  # graph-weighted mean batch loss of the last epoch (raw weights); NaN if none
    valid_loss: float
    valid_force_mae: float  # eV/A
    valid_energy_mae_per_atom: float  # eV/atom
    improved: bool
    optimizer_reset: bool
    valid_stress_mae: float = math.nan  # eV/A^3; NaN when no validation frame has a stress label


@dataclass
class _MemberState:
    optimizer: torch.optim.Optimizer
    ema: ExponentialMovingAverage | None
    generator: torch.Generator
    raw: list[torch.Tensor] | None = None  # raw weights while the live model holds EMA weights
    best_loss: float = math.inf
    since_best: int = 0  # epochs trained since the last improvement
    epochs: int = 0
    last: MemberMetrics | None = None


@dataclass(frozen=True)
class FinalRecipe:
    """The paper's recipe for a model trained from scratch on a finished dataset.

    aims-PAX trains its large final model for a fixed number of epochs with a reduce-on-plateau
    learning rate (factor 0.8) and, after three quarters of them, "swaps" the loss weights
    (energy up, forces down) and drops the learning rate to 1e-3: forces are learned early, the
    energy's last meV/atom only once the energy term dominates. That is mace_run_train's stage
    two (``--stage_two``/``--swa``, defaults ``--swa_energy_weight 1000 --swa_forces_weight 100
    --swa_stress_weight 10 --swa_lr 1e-3``, start at ``max_num_epochs // 4 * 3``), whose weights
    are the defaults here. Unlike a fixed-length run, a stage also ends when its validation loss
    has not improved for ``patience`` epochs (stage one then goes on to stage two), and stage two
    starts early once the plateau schedule has lowered the learning rate ``lr_drops_to_switch``
    times: the first stage has converged by then, more epochs at a lower rate buy little.

    ``swa_stress_weight=None`` scales the training stress weight as the forces' weight is scaled,
    so stress keeps its balance against forces in stage two.
    """

    max_epochs: int
    patience: int
    swa_start: float = 0.75  # fraction of max_epochs after which stage two starts at the latest
    swa_lr: float = 1e-3
    swa_energy_weight: float = 1000.0
    swa_forces_weight: float = 100.0
    swa_stress_weight: float | None = None
    lr_factor: float = 0.8
    lr_patience: int | None = None  # plateau patience in epochs; None: max(1, patience // 5)
    lr_drops_to_switch: int = 2

    def __post_init__(self) -> None:
        checks = {
            "max_epochs": self.max_epochs >= 2,  # one epoch per stage at least
            "patience": self.patience >= 1,
            "swa_start": 0.0 < self.swa_start < 1.0,
            "swa_lr": self.swa_lr > 0,
            "swa_energy_weight": self.swa_energy_weight >= 0,
            "swa_forces_weight": self.swa_forces_weight >= 0,
            "swa_stress_weight": self.swa_stress_weight is None or self.swa_stress_weight >= 0,
            "lr_factor": 0.0 < self.lr_factor < 1.0,
            "lr_patience": self.lr_patience is None or self.lr_patience >= 1,
            "lr_drops_to_switch": self.lr_drops_to_switch >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"FinalRecipe: invalid {', '.join(bad)} ({self})")

    @property
    def start_epoch(self) -> int:
        """Epochs of stage one at most (at least 1, and at least 1 left for stage two)."""
        return min(self.max_epochs - 1, max(1, int(self.max_epochs * self.swa_start)))

    @property
    def plateau_patience(self) -> int:
        return self.lr_patience if self.lr_patience is not None else max(1, self.patience // 5)

    def stage_two_weights(self, training_cfg: TrainingConfig) -> tuple[float, float, float]:
        """(energy, forces, stress) weights of stage two."""
        stress = self.swa_stress_weight
        if stress is None:
            factor = self.swa_forces_weight / training_cfg.forces_weight if training_cfg.forces_weight > 0 else 1.0
            stress = training_cfg.stress_weight * factor
        return float(self.swa_energy_weight), float(self.swa_forces_weight), float(stress)


@dataclass
class EpochRecord:
    """One epoch of a recipe: the stage, the learning rate and loss weights it ran with, and its
    validation. ``valid_loss`` is in the stage's own weights (stage losses do not compare)."""

    member: int
    epoch: int  # the member's epochs so far, all calls together
    stage: int  # 1, or 2 after the switch
    lr: float  # learning rate of this epoch's steps
    energy_weight: float
    forces_weight: float
    stress_weight: float
    train_loss: float
    valid_loss: float
    valid_force_mae: float  # eV/A
    valid_energy_mae_per_atom: float  # eV/atom
    valid_stress_mae: float  # eV/A^3, NaN without stress labels
    improved: bool  # a new best of its stage


@dataclass
class RecipeResult:
    """What ``train_final_recipe`` returns.

    ``metrics`` describe the returned model on the validation frames in the *training config's*
    weights, so members and recipes compare on one scale; ``best_valid_loss`` is each stage's
    best in that stage's weights. ``stage`` says which stage's checkpoint was kept: 2 when stage
    two beat the model it started from (stage one's best), else 1.
    """

    metrics: MemberMetrics
    stage: int
    switch_epoch: int | None  # the member's epoch count when stage two began; None: it never did
    switch_reason: str  # "epoch" (swa_start reached), "lr_drops", "patience", or "" (no stage two)
    best_valid_loss: dict[int, float]
    curve: list[EpochRecord]


@dataclass
class _StageOutcome:
    """One recipe stage's best checkpoint (its entry state until an epoch beats it) and its end."""

    best_loss: float
    snapshot: dict[str, Any]
    train_loss: float  # of the best epoch; NaN while the entry state is the best
    improved: bool = False  # whether any epoch beat the entry state
    reason: str = "epoch"  # why the stage ended: "epoch", "patience", "lr_drops", "stopped"
    stopped: bool = False  # on_epoch asked to end the whole recipe


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """mace_run_train's grouping: L2 decay only on interaction linears and products.

    Any parameter outside the named blocks lands in a final no-decay group, so nothing is left
    untrained if a mace version adds one.
    """
    decay, no_decay = [], []
    for name, p in model.interactions.named_parameters():
        (decay if "linear.weight" in name or "skip_tp_full.weight" in name else no_decay).append(p)
    groups = [
        {"name": "embedding", "params": list(model.node_embedding.parameters()), "weight_decay": 0.0},
        {"name": "interactions_decay", "params": decay, "weight_decay": weight_decay},
        {"name": "interactions_no_decay", "params": no_decay, "weight_decay": 0.0},
        {"name": "products", "params": list(model.products.parameters()), "weight_decay": weight_decay},
        {"name": "readouts", "params": list(model.readouts.parameters()), "weight_decay": 0.0},
    ]
    seen = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if id(p) not in seen]
    groups.append({"name": "other", "params": rest, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


class EnsembleTrainer:
    """Trains each member of a ``MACEEnsemble`` on its own train/valid frames."""

    def __init__(
        self,
        ensemble: MACEEnsemble,
        training_cfg: TrainingConfig,
        reset_after: int | None,
        min_rel_improvement: float = 1e-6,
        batched: bool | None = None,
    ) -> None:
        self.ensemble = ensemble
        # None: ``training_cfg.batched_members`` decides (see ``_use_batched``).
        self.batched = batched
        self._stack_template: torch.nn.Module | None = None  # built on the first batched round
        self._batched_proven = False  # a batched round has completed here (see _batched_round)
        self.cfg = training_cfg
        self.reset_after = reset_after if reset_after and reset_after > 0 else None
        self.min_rel_improvement = float(min_rel_improvement)
        self.stress_weight = float(training_cfg.stress_weight)
        # A batch without any stress label (molecules, or frames labelled without stress) trains on
        # energies and forces alone: mace's stress loss needs a predicted stress for every batch.
        self.loss_fn = MaskedEnergyForcesLoss(training_cfg.energy_weight, training_cfg.forces_weight)
        self.stress_loss_fn = MaskedEnergyForcesStressLoss(
            training_cfg.energy_weight, training_cfg.forces_weight, self.stress_weight)
        for loss in (self.loss_fn, self.stress_loss_fn):
            loss.to(device=ensemble.device, dtype=ensemble.dtype)
        self._states = [self._new_state(k) for k in range(len(ensemble))]

    # ------------------------------------------------------------------ public API

    @property
    def last_metrics(self) -> list[MemberMetrics | None]:
        return [st.last for st in self._states]

    def train_round(self, member_data: Sequence[FrameSplit], epochs: int) -> list[MemberMetrics]:
        """``epochs`` epochs per member on its train frames, then one validation.

        ``member_data[k] = (train, valid)``. A member whose valid list is empty is validated on
        its train frames (early IDG rounds can leave a member without validation points).
        After the validation, a member that has not improved for ``reset_after`` epochs gets a
        fresh optimiser (weights kept) and ``optimizer_reset=True``.
        """
        if len(member_data) != len(self._states):
            raise ValueError(f"{len(member_data)} data splits for {len(self._states)} members")
        if epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self._use_batched(member_data):
            return self._batched_round(member_data, epochs)
        return [self._round(k, train, valid, epochs) for k, (train, valid) in enumerate(member_data)]

    def train_to_convergence(
        self,
        member: int,
        train: Sequence[Atoms],
        valid: Sequence[Atoms],
        patience: int,
        max_epochs: int,
        on_epoch: Callable[[MemberMetrics], bool | None] | None = None,
    ) -> MemberMetrics:
        """Train epoch by epoch until ``patience`` epochs pass without improvement, keep the best.

        The model as it stands on entry is the first candidate, so convergence never returns a
        worse model than it was given. Restoring the best epoch restores all of it (raw and EMA
        weights, EMA shadow and optimiser moments), so later training continues from a
        consistent state, not with moments accumulated by the discarded epochs.

        ``on_epoch`` sees every epoch's metrics; returning True stops early (the best state is
        still restored). The result is the best epoch's metrics with ``epoch`` set to the total
        epochs trained and ``improved`` telling whether it beat the member's best before the
        call.
        """
        st = self._states[member]
        train_g, valid_g = self._graphs(train, valid)
        self._use_ema(member)
        start = self._errors(member, valid_g)
        best_loss, since, snapshot = start["loss"], 0, self._snapshot(member)
        best = self._metrics(member, math.nan, start, improved=False, reset=False)
        for _ in range(max_epochs):
            train_loss = self._epoch(member, train_g)
            errors = self._errors(member, valid_g)
            improved = self._better(errors["loss"], best_loss)
            metrics = self._metrics(member, train_loss, errors, improved, reset=False)
            if improved:
                best_loss, since, snapshot, best = errors["loss"], 0, self._snapshot(member), metrics
            else:
                since += 1
            if (on_epoch is not None and on_epoch(metrics)) or since >= patience:
                break
        self._restore(member, snapshot)
        result = replace(best, epoch=st.epochs, improved=self._better(best_loss, st.best_loss))
        st.best_loss, st.since_best, st.last = min(best_loss, st.best_loss), 0, result
        return result

    def train_final_recipe(
        self,
        member: int,
        train: Sequence[Atoms],
        valid: Sequence[Atoms],
        recipe: FinalRecipe,
        on_epoch: Callable[[EpochRecord], bool | None] | None = None,
        on_switch: Callable[[int], None] | None = None,
    ) -> RecipeResult:
        """Train one member with ``recipe`` (see ``FinalRecipe``); keep the best checkpoint.

        ``on_switch(member)`` runs when stage two begins, after stage one's best checkpoint is
        restored and before stage two's first validation (an E0 refit: see ``models.fitting``).

        Stage one trains with the training config's loss weights and learning rate while a
        ``ReduceLROnPlateau`` on the validation loss lowers the rate. It ends after
        ``recipe.start_epoch`` epochs, after ``lr_drops_to_switch`` drops of the rate, or after
        ``patience`` epochs without improvement. Stage two starts from stage one's best
        checkpoint (raw and EMA weights, optimiser moments) with the stage-two loss weights, the
        learning rate set to ``swa_lr`` and a fresh plateau schedule, and runs until
        ``max_epochs`` epochs in all or ``patience`` epochs without improvement. Its first
        candidate is the checkpoint it starts from, so it never returns a model worse in the
        stage-two loss than stage one's best; ``RecipeResult.stage`` says which one was kept.

        ``on_epoch`` sees every epoch; returning True ends the recipe (the best checkpoint of the
        current stage is kept). The optimiser is left with the kept checkpoint's learning rate.
        """
        st = self._states[member]
        train_g, valid_g = self._graphs(train, valid)
        curve: list[EpochRecord] = []
        end = st.epochs + recipe.max_epochs
        base = (float(self.cfg.energy_weight), float(self.cfg.forces_weight), float(self.stress_weight))
        self._use_ema(member)
        one = self._stage(member, 1, base, (train_g, valid_g), recipe, st.epochs + recipe.start_epoch, curve, on_epoch)
        kept, best_loss = one, {1: one.best_loss}
        stage, switch_epoch, reason = 1, None, ""
        if not one.stopped and st.epochs < end:
            self._restore(member, one.snapshot)
            switch_epoch, reason = st.epochs, one.reason
            if on_switch is not None:
                on_switch(member)
            for group in st.optimizer.param_groups:
                group["lr"] = float(recipe.swa_lr)
            two = self._stage(member, 2, recipe.stage_two_weights(self.cfg), (train_g, valid_g), recipe, end, curve,
                              on_epoch)
            best_loss[2] = two.best_loss
            if two.improved:
                kept, stage = two, 2
        self._restore(member, kept.snapshot)
        errors = self._errors(member, valid_g)  # in the training config's weights again
        improved = self._better(errors["loss"], st.best_loss)
        metrics = self._metrics(member, kept.train_loss, errors, improved, reset=False)
        st.best_loss, st.since_best, st.last = min(errors["loss"], st.best_loss), 0, metrics
        return RecipeResult(metrics, stage, switch_epoch, reason, best_loss, curve)

    def _stage(
        self,
        k: int,
        stage: int,
        weights: tuple[float, float, float],
        graphs: tuple[list, list],
        recipe: FinalRecipe,
        until: int,
        curve: list[EpochRecord],
        on_epoch: Callable[[EpochRecord], bool | None] | None,
    ) -> _StageOutcome:
        """One stage of ``train_final_recipe``: epochs under ``weights`` until the member has
        trained ``until`` epochs in all, patience runs out or (stage one) the rate dropped enough."""
        st = self._states[k]
        train_g, valid_g = graphs
        with self._loss_weights(*weights):
            best = self._errors(k, valid_g)["loss"]
            out = _StageOutcome(best_loss=best, snapshot=self._snapshot(k), train_loss=math.nan)
            scheduler = ReduceLROnPlateau(st.optimizer, mode="min", factor=recipe.lr_factor,
                                          patience=recipe.plateau_patience)
            since = drops = 0
            while st.epochs < until:
                lr = float(st.optimizer.param_groups[0]["lr"])
                train_loss = self._epoch(k, train_g)
                errors = self._errors(k, valid_g)
                improved = self._better(errors["loss"], out.best_loss)
                if improved:
                    out.best_loss, out.snapshot, out.train_loss, out.improved = (
                        errors["loss"], self._snapshot(k), train_loss, True)
                    since = 0
                else:
                    since += 1
                scheduler.step(errors["loss"])
                drops += int(float(st.optimizer.param_groups[0]["lr"]) < lr)
                record = EpochRecord(
                    member=k, epoch=st.epochs, stage=stage, lr=lr, energy_weight=weights[0],
                    forces_weight=weights[1], stress_weight=weights[2], train_loss=float(train_loss),
                    valid_loss=errors["loss"], valid_force_mae=errors["force_mae"],
                    valid_energy_mae_per_atom=errors["energy_mae_per_atom"], valid_stress_mae=errors["stress_mae"],
                    improved=improved,
                )
                curve.append(record)
                if on_epoch is not None and on_epoch(record):
                    out.reason, out.stopped = "stopped", True
                    break
                if since >= recipe.patience:
                    out.reason = "patience"
                    break
                if stage == 1 and drops >= recipe.lr_drops_to_switch:
                    out.reason = "lr_drops"
                    break
        return out

    @contextlib.contextmanager
    def _loss_weights(self, energy: float, forces: float, stress: float) -> Iterator[None]:
        """Train and validate with other loss weights inside the block (a recipe's stage two);
        the trainer's own weights are back afterwards, errors included."""
        saved = (self.cfg, self.stress_weight, self.loss_fn, self.stress_loss_fn)
        self.cfg = self.cfg.model_copy(update={"energy_weight": energy, "forces_weight": forces,
                                               "stress_weight": stress})
        self.stress_weight = float(stress)
        self.loss_fn = MaskedEnergyForcesLoss(energy, forces)
        self.stress_loss_fn = MaskedEnergyForcesStressLoss(energy, forces, stress)
        for loss in (self.loss_fn, self.stress_loss_fn):
            loss.to(device=self.ensemble.device, dtype=self.ensemble.dtype)
        try:
            yield
        finally:
            self.cfg, self.stress_weight, self.loss_fn, self.stress_loss_fn = saved

    def best_member(self) -> int:
        """Index of the member with the lowest latest validation loss (0 if none validated)."""
        losses = [st.last.valid_loss if st.last else math.inf for st in self._states]
        return min(range(len(losses)), key=losses.__getitem__)

    def evaluate(self, member: int, frames: Sequence[Atoms]) -> dict[str, float]:
        """Loss, force MAE/RMSE (eV/A) and energy MAE per atom (eV/atom) with the live weights."""
        if not frames:
            raise ValueError("evaluate needs at least one frame")
        self._use_ema(member)
        return self._errors(member, self.ensemble.graphs.graphs(frames))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimisers, EMAs, RNGs, counters."""
        members = []
        for k, st in enumerate(self._states):
            members.append({
                "model": self.ensemble.members[k].state_dict(),
                "optimizer": st.optimizer.state_dict(),
                "ema": st.ema.state_dict() if st.ema is not None else None,
                "generator": st.generator.get_state(),
                "raw": st.raw,
                "best_loss": st.best_loss,
                "since_best": st.since_best,
                "epochs": st.epochs,
                "last": asdict(st.last) if st.last is not None else None,
            })
        return copy.deepcopy({"version": 1, "members": members})

    def weights_match(self, state: dict[str, Any]) -> bool:
        """Whether ``state`` (a ``state_dict``) was saved with the ensemble's current weights.

        A trainer state belongs to the weights it was saved with: its optimiser moments, EMA
        shadow and validation history describe them. Loading it over other weights (member files
        written after it) would silently replace those weights and misreport the members.
        """
        members = state["members"]
        if len(members) != len(self._states):
            return False
        for model, saved in zip(self.ensemble.members, members, strict=True):
            current = model.state_dict()
            if current.keys() != saved["model"].keys():
                return False
            for key, tensor in current.items():
                other = saved["model"][key]
                if tensor.shape != other.shape or not torch.equal(
                    tensor.detach().cpu(), other.detach().to(device="cpu", dtype=tensor.dtype)
                ):
                    return False
        return True

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict`` (also loads the member weights into the ensemble)."""
        members = copy.deepcopy(state["members"])  # the caller's dict must stay untouched
        if len(members) != len(self._states):
            raise ValueError(f"state has {len(members)} members, ensemble has {len(self._states)}")
        for k, (st, saved) in enumerate(zip(self._states, members, strict=True)):
            self.ensemble.members[k].load_state_dict(saved["model"])
            st.optimizer.load_state_dict(saved["optimizer"])
            if st.ema is not None and saved["ema"] is not None:
                st.ema.load_state_dict(saved["ema"])
            st.generator.set_state(saved["generator"])
            st.raw = _to_params_like(saved["raw"], self._params(k))
            st.best_loss, st.since_best, st.epochs = saved["best_loss"], saved["since_best"], saved["epochs"]
            st.last = MemberMetrics(**saved["last"]) if saved["last"] is not None else None

    # ------------------------------------------------------------------ one member's round

    def _round(self, k: int, train: Sequence[Atoms], valid: Sequence[Atoms], epochs: int) -> MemberMetrics:
        train_g, valid_g = self._graphs(train, valid)
        train_loss = math.nan
        for _ in range(epochs):
            train_loss = self._epoch(k, train_g)
        return self._end_round(k, valid_g, train_loss, epochs)

    def _end_round(self, k: int, valid_g: list, train_loss: float, epochs: int) -> MemberMetrics:
        """A member's round after its epochs (sequential or batched): validate, track the best,
        reset a stalled optimiser."""
        st = self._states[k]
        errors = self._errors(k, valid_g)
        improved = self._better(errors["loss"], st.best_loss)
        if improved:
            st.best_loss, st.since_best = errors["loss"], 0
        else:
            st.since_best += epochs
        reset = not improved and self.reset_after is not None and st.since_best >= self.reset_after
        if reset:
            st.optimizer, st.since_best = self._new_optimizer(k), 0
        st.last = self._metrics(k, train_loss, errors, improved, reset)
        return st.last

    def _use_batched(self, member_data: Sequence[FrameSplit]) -> bool:
        """Whether ``train_round`` trains all members together (``models.member_stack``).

        The constructor's ``batched`` wins; else ``batched_members``: "auto" is on for more than
        one member on a GPU, where one small member at a time leaves the device idle. Rounds whose training
        frames carry weighted stress labels stay sequential: the batched step has no stress.
        """
        wanted = self.batched
        if wanted is None:
            mode = self.cfg.batched_members
            wanted = mode == "on" or (mode == "auto" and self.ensemble.device.type == "cuda"
                                      and len(self._states) > 1)
        if not wanted:
            return False
        if self.stress_weight > 0:
            for train, _ in member_data:
                if any(bool((g.stress_weight > 0).any()) for g in self.ensemble.graphs.graphs(train)):
                    return False
        return True

    def _batched_round(self, member_data: Sequence[FrameSplit], epochs: int) -> list[MemberMetrics]:
        """``train_round`` with every member's epochs run in lock-step by ``member_stack``.

        Each member sees the same batches, optimiser, clip and EMA updates as in ``_epoch``, and
        the validation that follows is ``_round``'s, member by member, so the result equals the
        sequential round to round-off.
        """
        from aimspax_like.models import member_stack

        if self._stack_template is None:
            try:
                self._stack_template = member_stack.eager_template(self.ensemble.members[0])
            except ValueError:  # a model mace cannot rebuild without TorchScript: train sequentially
                self.batched = False
                return [self._round(k, train, valid, epochs) for k, (train, valid) in enumerate(member_data)]
        graphs = [self._graphs(train, valid) for train, valid in member_data]
        # The first batched round on a machine is a trial: should the batched step fail there (a
        # device or library it was never run on), everything is put back as it was and the
        # committee trains one member after another from then on, instead of the campaign dying.
        before = None if self._batched_proven else self.state_dict()
        members = range(len(self._states))
        for k in members:
            self._use_raw(k)
        stack = member_stack.MemberStack(self.ensemble.members, [st.optimizer for st in self._states],
                                         [st.ema for st in self._states])
        try:
            losses = member_stack.train_epochs(
                stack, self._stack_template, [train_g for train_g, _ in graphs],
                [st.generator for st in self._states], epochs, self.cfg.batch_size,
                (float(self.cfg.energy_weight), float(self.cfg.forces_weight)), self.cfg.clip_grad,
                self.ensemble.r_max)
        except CampaignInterrupted:
            stack.write_back()  # an interrupted round leaves the raw weights live, as ``_epoch`` does
            raise
        except Exception as exc:
            if before is None:
                stack.write_back()
                raise
            self.load_state_dict(before)
            self.batched = False
            _log.warning("batched training failed on this machine (%s: %s); training the members one "
                         "after another", type(exc).__name__, exc)
            return [self._round(k, train, valid, epochs) for k, (train, valid) in enumerate(member_data)]
        stack.write_back()
        self._batched_proven = True
        for k in members:
            self._states[k].epochs += epochs
            self._use_ema(k)
        return [self._end_round(k, graphs[k][1], losses[k], epochs) for k in members]

    def _graphs(self, train: Sequence[Atoms], valid: Sequence[Atoms]) -> tuple[list, list]:
        if not train:
            raise ValueError("a member needs at least one training frame")
        train_g = self.ensemble.graphs.graphs(train)
        return train_g, (self.ensemble.graphs.graphs(valid) if valid else train_g)

    def _epoch(self, k: int, graphs: list) -> float:
        """One shuffled pass with the raw weights; leaves the EMA weights live afterwards."""
        st, model = self._states[k], self.ensemble.members[k]
        params = self._params(k)
        self._use_raw(k)
        total, count = 0.0, 0
        for batch in loader(graphs, self.cfg.batch_size, shuffle=True, generator=st.generator):
            signum = stop_requested()
            if signum:  # an epoch of a large model takes minutes: a signal must not wait for it
                raise CampaignInterrupted(signum)
            batch = batch.to(self.ensemble.device)
            st.optimizer.zero_grad(set_to_none=True)
            with_stress = self._with_stress(batch)
            out = model(batch.to_dict(), training=True, compute_force=True, compute_stress=with_stress)
            loss = (self.stress_loss_fn if with_stress else self.loss_fn)(batch, out, ddp=False)
            loss.backward()
            if self.cfg.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, max_norm=self.cfg.clip_grad)
            st.optimizer.step()
            if st.ema is not None:
                st.ema.update(params)
            total += float(loss.detach()) * batch.num_graphs
            count += batch.num_graphs
        st.epochs += 1
        self._use_ema(k)
        return total / count

    def _errors(self, k: int, graphs: list) -> dict[str, float]:
        """Whole-set loss and MAEs; frames lacking a label (weight 0) drop out of its terms."""
        model = self.ensemble.members[k]
        e_sq = e_abs = e_n = f_sq = f_abs = f_n = s_sq = s_abs = s_n = 0.0
        for batch in loader(graphs, self.cfg.valid_batch_size):
            batch = batch.to(self.ensemble.device)
            stress = self._has_stress(batch)
            out = model(batch.to_dict(), training=False, compute_force=True, compute_stress=stress)
            n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).to(out["energy"].dtype)
            e_w = batch.weight * batch.energy_weight
            e_err = (out["energy"].detach() - batch.energy) / n_atoms
            f_w = node_force_weights(batch)
            f_err = out["forces"].detach() - batch.forces
            e_sq += float((e_w * e_err**2).sum())
            e_abs += float((e_w * e_err.abs()).sum())
            e_n += float((e_w > 0).sum())
            f_sq += float((f_w * f_err**2).sum())
            f_abs += float((f_w * f_err.abs()).sum())
            f_n += float((f_w > 0).sum()) * 3
            if stress:
                s_w = (batch.weight * batch.stress_weight).view(-1, 1, 1)
                s_err = out["stress"].detach() - batch.stress
                s_sq += float((s_w * s_err**2).sum())
                s_abs += float((s_w * s_err.abs()).sum())
                s_n += float((s_w > 0).sum()) * 9
        e_mse, f_mse, s_mse = _ratio(e_sq, e_n), _ratio(f_sq, f_n), _ratio(s_sq, s_n)
        loss = self.cfg.energy_weight * _or_zero(e_mse) + self.cfg.forces_weight * _or_zero(f_mse)
        loss += self.stress_weight * _or_zero(s_mse)
        return {
            "loss": loss,
            "force_mae": _ratio(f_abs, f_n),
            "force_rmse": math.sqrt(f_mse),
            "energy_mae_per_atom": _ratio(e_abs, e_n),
            "stress_mae": _ratio(s_abs, s_n),
            "n_frames": float(len(graphs)),
        }

    def _metrics(self, k: int, train_loss: float, errors: dict, improved: bool, reset: bool) -> MemberMetrics:
        return MemberMetrics(
            member=k,
            epoch=self._states[k].epochs,
            train_loss=float(train_loss),
            valid_loss=errors["loss"],
            valid_force_mae=errors["force_mae"],
            valid_energy_mae_per_atom=errors["energy_mae_per_atom"],
            improved=improved,
            optimizer_reset=reset,
            valid_stress_mae=errors["stress_mae"],
        )

    @staticmethod
    def _has_stress(batch: Any) -> bool:
        """Whether any frame of the batch carries a stress label (only periodic frames can)."""
        return bool((batch.stress_weight > 0).any())

    def _with_stress(self, batch: Any) -> bool:
        """Stress enters training when it is weighted and labelled (a stress pass costs a second
        derivative; molecules without a cell never get one)."""
        return self.stress_weight > 0 and self._has_stress(batch)

    def _better(self, loss: float, best: float) -> bool:
        return math.isinf(best) or loss < best * (1.0 - self.min_rel_improvement)

    # ------------------------------------------------------------------ weights, EMA, optimiser

    def _params(self, k: int) -> list[torch.nn.Parameter]:
        return list(self.ensemble.members[k].parameters())

    def _new_state(self, k: int) -> _MemberState:
        generator = torch.Generator()
        generator.manual_seed(int(self.ensemble.seeds[k]))
        ema = None
        if self.cfg.ema_decay is not None:
            ema = ExponentialMovingAverage(self._params(k), decay=self.cfg.ema_decay)
        return _MemberState(optimizer=self._new_optimizer(k), ema=ema, generator=generator)

    def _new_optimizer(self, k: int) -> torch.optim.Optimizer:
        groups = param_groups(self.ensemble.members[k], self.cfg.weight_decay)
        return torch.optim.Adam(groups, lr=self.cfg.lr, amsgrad=self.cfg.amsgrad)

    def _use_raw(self, k: int) -> None:
        """Put the optimised weights back into the live model (before optimisation steps)."""
        st = self._states[k]
        if st.raw is None:
            return
        with torch.no_grad():
            for p, raw in zip(self._params(k), st.raw, strict=True):
                p.copy_(raw)
        st.raw = None

    def _use_ema(self, k: int) -> None:
        """Park the raw weights and make the EMA weights live (for evaluation and prediction)."""
        st = self._states[k]
        if st.ema is None or st.raw is not None:
            return
        params = self._params(k)
        st.raw = [p.detach().clone() for p in params]
        st.ema.copy_to(params)

    def _snapshot(self, k: int) -> dict[str, Any]:
        st = self._states[k]
        return {
            "live": [p.detach().clone() for p in self._params(k)],
            "raw": [r.clone() for r in st.raw] if st.raw is not None else None,
            "ema": copy.deepcopy(st.ema.state_dict()) if st.ema is not None else None,
            "optimizer": copy.deepcopy(st.optimizer.state_dict()),
        }

    def _restore(self, k: int, snapshot: dict[str, Any]) -> None:
        st = self._states[k]
        with torch.no_grad():
            for p, live in zip(self._params(k), snapshot["live"], strict=True):
                p.copy_(live)
        st.raw = snapshot["raw"]
        if st.ema is not None:
            st.ema.load_state_dict(snapshot["ema"])
        st.optimizer.load_state_dict(snapshot["optimizer"])


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _or_zero(value: float) -> float:
    """A loss term without any labelled data contributes nothing (its MAE stays NaN)."""
    return 0.0 if math.isnan(value) else value


def _to_params_like(tensors: list[torch.Tensor] | None, params: list[torch.nn.Parameter]) -> list | None:
    """Saved raw weights onto the live parameters' device and dtype (a resume may move both)."""
    if tensors is None:
        return None
    return [t.to(device=p.device, dtype=p.dtype) for t, p in zip(tensors, params, strict=True)]
