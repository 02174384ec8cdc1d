"""The committee: the MACE ensemble, its continual-learning trainer and each member's data.

This is the one object the phases talk to for anything learned. It hides MACE behind three
verbs the scheduler needs (``committee_forces`` for a batch of structures, ``add`` a labelled
frame, ``train_round``), and keeps each member's training set: the member's own disjoint
IDG subset plus every frame shared by all members (active-learning points). Validation frames
are shared by all members, so their force MAEs compare like with like.

What it has learned beyond the weights (the trainer's optimisers, EMAs, generators and
per-member validation history) is ``state_dict``; ``save`` keeps it in the run directory's
``state/committee.pt`` and ``from_files`` brings it back, so a phase that starts in a new process
continues as it would have in the old one.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from aimspax_like.config import CampaignConfig, RoundsConfig
from aimspax_like.context import RunPaths
from aimspax_like.data import LabelledFrame
from aimspax_like.models.ensemble import (
    MACEEnsemble,
    atomic_energies_from_data,
    average_neighbors,
    force_scale,
)
from aimspax_like.models.training import EnsembleTrainer, MemberMetrics
from aimspax_like.state import COMMITTEE_STATE, load_checkpoint, save_checkpoint
from aimspax_like.training_rounds import RoundPlanner, member_force_errors


class Committee:
    def __init__(self, ensemble: MACEEnsemble, trainer: EnsembleTrainer) -> None:
        self.ensemble = ensemble
        self.trainer = trainer
        self.n_members = len(ensemble.members)
        self.member_train: list[list[Atoms]] = [[] for _ in range(self.n_members)]
        self.valid: list[Atoms] = []
        self.last_metrics: list[MemberMetrics] = []
        self.planner: RoundPlanner | None = None  # bounded rounds (al.rounds), set by bound_rounds
        self.last_round: dict[str, Any] = {}  # what the latest round trained: full_pass, round_frames

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_data(
        cls, config: CampaignConfig, frames: list[LabelledFrame], atomic_numbers: list[int]
    ) -> Committee:
        """New members whose E0s, neighbour count and force scale come from the data."""
        atoms = [f.to_atoms() for f in frames if f.split in ("train", "valid")]
        ensemble = MACEEnsemble.build(
            config.model,
            config.member_seeds(),
            atomic_numbers=sorted(atomic_numbers),
            atomic_energies=atomic_energies_from_data(atoms, sorted(atomic_numbers)),
            avg_num_neighbors=average_neighbors(atoms, config.model.r_max),
            scale=force_scale(atoms),
        )
        committee = cls(ensemble, EnsembleTrainer(ensemble, config.training, config.al.max_epochs_per_point))
        committee.add_all(frames)
        return committee

    @classmethod
    def from_members(cls, config: CampaignConfig, members: list[Any], frames: list[LabelledFrame]) -> Committee:
        """A committee of given MACE modules (``model.start_from``), in the config's device and dtype."""
        from mace.tools import AtomicNumberTable

        table = AtomicNumberTable([int(z) for z in members[0].atomic_numbers])
        ensemble = MACEEnsemble(members, table, float(members[0].r_max), config.model.device, config.model.dtype,
                                config.member_seeds())
        committee = cls(ensemble, EnsembleTrainer(ensemble, config.training, config.al.max_epochs_per_point))
        committee.add_all(frames)
        return committee

    @classmethod
    def from_files(
        cls, config: CampaignConfig, model_paths: list[Path], frames: list[LabelledFrame]
    ) -> Committee:
        """Members loaded from ``member_k.model`` files (a phase run on its own, or resumed).

        The files hold weights only. When they are a run directory's ``models/`` and its
        ``state/committee.pt`` was saved with these very weights, the committee's state is
        restored as well: the per-member validation history decides ``best_member``, so without
        it a convergence resumed after a kill would train member 0 whatever active learning found
        best, and the optimisers, EMAs and generators let the next phase train exactly as in a
        campaign that was never stopped. A state file saved with other weights (a kill between
        writing the members and it, or member files replaced by hand) is ignored: the trainer
        starts fresh, as it always did before the state file existed.
        """
        ensemble = MACEEnsemble.load(model_paths, device=config.model.device, dtype=config.model.dtype)
        committee = cls(ensemble, EnsembleTrainer(ensemble, config.training, config.al.max_epochs_per_point))
        committee.add_all(frames)
        folders = {Path(p).parent for p in model_paths}
        state_file = committee_state_file(folders.pop()) if len(folders) == 1 else None
        if state_file is not None and state_file.is_file():
            state = load_checkpoint(state_file)["committee"]
            if committee.trainer.weights_match(state["trainer"]):
                committee.load_state_dict(state)
        return committee

    # ------------------------------------------------------------------ data

    def add(self, frame: LabelledFrame) -> None:
        atoms = frame.to_atoms()
        if frame.split == "valid":
            self.valid.append(atoms)
        elif frame.split == "train":
            members = range(self.n_members) if frame.member < 0 else [frame.member % self.n_members]
            for k in members:
                self.member_train[k].append(atoms)

    def add_all(self, frames: list[LabelledFrame]) -> None:
        for frame in frames:
            self.add(frame)

    def member_data(self) -> list[tuple[list[Atoms], list[Atoms]]]:
        return [(train, self.valid) for train in self.member_train]

    @property
    def all_train(self) -> list[Atoms]:
        """Every distinct training frame (the IDG subsets together plus the shared frames)."""
        seen: dict[int, Atoms] = {}
        for train in self.member_train:
            for atoms in train:
                seen.setdefault(id(atoms), atoms)
        return list(seen.values())

    # ------------------------------------------------------------------ learning

    def bound_rounds(self, config: RoundsConfig, epochs_per_point: int, seed: int) -> None:
        """From now on, plan each round with ``config`` (``al.rounds``): active learning calls this
        when it starts, IDG rounds stay full passes. The frames held now count as trained."""
        self.planner = RoundPlanner(config, epochs_per_point, seed)
        self.planner.know(self.member_train)

    def train_round(self, epochs: int) -> list[MemberMetrics]:
        """``epochs`` epochs of every member on its round's frames (all of them unless rounds are
        bounded), then a validation on the whole validation set."""
        if self.planner is None:
            self.last_metrics = self.trainer.train_round(self.member_data(), epochs)
            self.last_round = {"full_pass": True, "round_frames": [len(t) for t in self.member_train]}
            return self.last_metrics
        plan = self.planner.plan(self.member_train)
        data = [([train[i] for i in chosen], self.valid)
                for train, chosen in zip(self.member_train, plan.indices, strict=True)]
        self.last_metrics = self.trainer.train_round(data, epochs)
        self.planner.trained(self.member_train, plan, epochs)
        if self.planner.wants_errors(plan):
            for k, train in enumerate(self.member_train):
                errors = member_force_errors(
                    lambda frames, k=k: self.ensemble.predict(frames, members=[k]).forces[0], train)
                self.planner.record_errors(k, train, errors)
        self.last_round = {"full_pass": plan.full, "round_frames": plan.sizes()}
        return self.last_metrics

    def refit_energies(self, max_frames: int | None = None) -> list[dict[int, float]]:
        """Refit every member's E0s to its training frames with an energy (the latest ``max_frames``).

        Training with the paper's weights (energy 1, forces 1000) lets each member's energy drift
        by a constant per atom that costs almost nothing in the loss; members then disagree on
        energy by that drift, not by what they learned, and their energies can sit far from the
        reference's. Continual learning outside a campaign's convergence (the on-the-fly
        calculator) calls this after each round; it leaves forces untouched.
        """
        from aimspax_like.models.calibration import refit_atomic_energies

        shifts = []
        for k, train in enumerate(self.member_train):
            # Substructures carry no energy: the latest frames with one set the E0s.
            train = [a for a in train if "REF_energy" in a.info]
            frames = train if max_frames is None else train[-max_frames:]
            shifts.append(refit_atomic_energies(self.ensemble, k, frames))
        return shifts

    def committee_forces(self, structures: list[Atoms]) -> list[np.ndarray]:
        """One ``[n_members, n_atoms, 3]`` array per structure, from one batched prediction."""
        prediction = self.ensemble.predict(structures)
        return [prediction.forces_of(s) for s in range(len(structures))]

    def committee_stresses(self, structures: list[Atoms]) -> list[np.ndarray]:
        """One ``[n_members, 3, 3]`` stress per structure (eV/A^3, ASE's sign), for NPT trajectories."""
        from aimspax_like.sampling.stress import member_stresses

        return member_stresses(self.ensemble, structures)

    def committee_energies(self, structures: list[Atoms]) -> np.ndarray:
        """Every member's total energy of every structure, ``[n_members, n_structures]`` (eV)."""
        return self.ensemble.predict(structures).energies

    def valid_force_mae(self) -> float:
        """Mean over members of the latest validation force MAE (inf before any training)."""
        if not self.last_metrics:
            return float("inf")
        return float(np.mean([m.valid_force_mae for m in self.last_metrics]))

    def best_member(self) -> int:
        return self.trainer.best_member()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The learned state: the trainer's (weights, optimisers, EMAs, generators, validation
        history) and the latest round's metrics (``valid_force_mae`` reads them). The frames are
        not in it: they are in the dataset, from which every committee is built."""
        state = {"trainer": self.trainer.state_dict(), "last_metrics": [asdict(m) for m in self.last_metrics]}
        if self.planner is not None:
            state["rounds"] = self.planner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict`` (also loads the member weights into the ensemble). The round
        planner's memory comes back when both the state and this committee have a planner."""
        self.trainer.load_state_dict(state["trainer"])
        self.last_metrics = [MemberMetrics(**m) for m in state["last_metrics"]]
        if self.planner is not None and state.get("rounds") is not None:
            self.planner.load_state_dict(state["rounds"])

    def save(self, models_dir: Path) -> list[Path]:
        """Write ``member_k.model`` files; in a run directory's ``models/`` also ``state/committee.pt``.

        Every phase saves the members when it ends; the state file saved with them is what lets
        ``from_files`` continue with the same validation history (hence the same best member),
        optimisers and EMAs in a new process. It is written after the members, so a kill in
        between leaves an older state file whose weights differ from the members': ``from_files``
        recognises and ignores it. Member files saved elsewhere (a benchmark's copy) get no state
        file: there they stay plain weights, loaded with a fresh trainer.
        """
        models_dir.mkdir(parents=True, exist_ok=True)
        self.ensemble.save(models_dir)
        state_file = committee_state_file(models_dir)
        if state_file is not None:
            save_checkpoint(state_file, {"committee": self.state_dict()})
        return sorted(models_dir.glob("member_*.model"))


def committee_state_file(models_dir: Path) -> Path | None:
    """``state/committee.pt`` of the run directory whose ``models/`` is ``models_dir``, else None.

    A run directory is recognised by its ``campaign.yaml`` (as the CLI's ``resume`` does), so
    saving members anywhere else never writes beside them.
    """
    paths = RunPaths(Path(models_dir).parent)
    if paths.models != Path(models_dir) or not paths.config.is_file():
        return None
    return paths.state / COMMITTEE_STATE
