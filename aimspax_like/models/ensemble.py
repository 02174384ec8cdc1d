"""A committee of MACE models evaluated together on one batched graph.

Active learning asks the committee for forces on every running trajectory at every check, so
``MACEEnsemble.predict`` puts all structures into one mace ``Batch`` (a disjoint union of their
graphs) and runs each member once on it: the cost is one forward/backward pass per member, not
per member and structure. Members are plain ``mace.modules.ScaleShiftMACE`` modules, so a saved
member is an ordinary MACE model file that ``MACECalculator``, LAMMPS tooling or a later
fine-tune can read.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mace  # noqa: F401  (first: sets the torch.load switch e3nn needs under torch >= 2.6)
import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from mace import modules
from mace.tools import AtomicNumberTable

from aimspax_like.config import ModelConfig
from aimspax_like.models.graphs import GraphBuilder
from aimspax_like.models.stats import atomic_energies_from_data, average_neighbors, force_scale
from aimspax_like.models.torch_utils import (
    StageTimer,
    default_dtype,
    no_timer,
    quiet_torchscript,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "EnsembleCalculator",
    "EnsemblePrediction",
    "MACEEnsemble",
    "atomic_energies_from_data",
    "average_neighbors",
    "force_scale",
]


@dataclass
class EnsemblePrediction:
    """Committee output for a list of structures.

    Shapes (M members, S systems, N atoms of all systems concatenated in input order):

    - ``energies``: ``[M, S]`` total energies in eV;
    - ``forces``: ``[M, N, 3]`` in eV/A;
    - ``system_idx``: ``[N]`` int, the system each atom belongs to (0..S-1, non-decreasing).
    """

    energies: np.ndarray
    forces: np.ndarray
    system_idx: np.ndarray

    @property
    def n_members(self) -> int:
        return int(self.energies.shape[0])

    @property
    def n_systems(self) -> int:
        return int(self.energies.shape[1])

    @property
    def mean_forces(self) -> np.ndarray:
        """Committee-mean forces ``[N, 3]``: what propagates the MD."""
        return self.forces.mean(axis=0)

    @property
    def mean_energies(self) -> np.ndarray:
        """Committee-mean energies ``[S]``."""
        return self.energies.mean(axis=0)

    def forces_of(self, system: int) -> np.ndarray:
        """All members' forces on one system, ``[M, n_atoms(system), 3]``."""
        if not 0 <= system < self.n_systems:
            raise IndexError(f"system {system} out of range for {self.n_systems} systems")
        start, stop = np.searchsorted(self.system_idx, [system, system + 1])  # atoms are in system order
        return self.forces[:, start:stop, :]


def hidden_irreps(channels: int, max_L: int) -> str:
    """mace_run_train's rule: ``channels`` copies of every irrep up to ``max_L`` (e.g. 8x0e+8x1o)."""
    from e3nn import o3

    irreps = (channels * o3.Irreps.spherical_harmonics(max_L)).sort().irreps.simplify()
    return str(irreps)


def build_member(
    model_cfg: ModelConfig,
    seed: int,
    z_table: AtomicNumberTable,
    atomic_energies: dict[int, float],
    avg_num_neighbors: float,
    scale: float,
    shift: float,
) -> torch.nn.Module:
    """One ScaleShiftMACE with mace_run_train's defaults for ``--model MACE``.

    The seed is applied inside a forked RNG so that building an ensemble does not disturb the
    caller's global torch random state.
    """
    from e3nn import o3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return modules.ScaleShiftMACE(
            r_max=float(model_cfg.r_max),
            num_bessel=model_cfg.num_radial_basis,
            num_polynomial_cutoff=model_cfg.num_cutoff_basis,
            max_ell=model_cfg.max_ell,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=model_cfg.num_interactions,
            num_elements=len(z_table),
            hidden_irreps=o3.Irreps(hidden_irreps(model_cfg.channels, model_cfg.max_L)),
            MLP_irreps=o3.Irreps(model_cfg.mlp_irreps),
            atomic_energies=np.array([atomic_energies.get(z, 0.0) for z in z_table.zs], dtype=float),
            avg_num_neighbors=float(avg_num_neighbors),
            atomic_numbers=list(z_table.zs),
            correlation=model_cfg.correlation,
            gate=modules.gate_dict["silu"],
            radial_MLP=list(model_cfg.radial_mlp),
            atomic_inter_scale=float(scale),
            atomic_inter_shift=float(shift),
            pair_repulsion=model_cfg.pair_repulsion,
        )


class MACEEnsemble:
    """The committee: M ScaleShiftMACE members sharing elements, cutoff, device and dtype.

    ``members`` hold the weights used for prediction. While an ``EnsembleTrainer`` with an EMA
    is attached those are the EMA-averaged weights (the trainer swaps raw weights in only for
    its own optimisation steps), so ``predict`` and ``save`` always see the smoothed model.
    """

    def __init__(
        self,
        members: Sequence[torch.nn.Module],
        z_table: AtomicNumberTable,
        r_max: float,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float64",
        seeds: Sequence[int] | None = None,
    ) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.members: list[torch.nn.Module] = [m.to(device=self.device, dtype=self.dtype) for m in members]
        self.z_table = z_table
        self.r_max = float(r_max)
        self.seeds = list(seeds) if seeds is not None else list(range(len(self.members)))
        if len(self.seeds) != len(self.members):
            raise ValueError(f"{len(self.seeds)} seeds for {len(self.members)} members")
        self.graphs = GraphBuilder(z_table, self.r_max, self.dtype)
        # Optional profiler of ``predict``: stages "graphs" (neighbour lists, batch, transfer)
        # and "members" (forward + force backward of every member, results back on the host).
        self.timer: StageTimer | None = None

    def __len__(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        model_cfg: ModelConfig,
        seeds: Sequence[int],
        atomic_numbers: Sequence[int],
        atomic_energies: dict[int, float],
        avg_num_neighbors: float,
        scale: float = 1.0,
        shift: float = 0.0,
    ) -> MACEEnsemble:
        """One freshly initialised member per seed (different seeds -> different weights)."""
        z_table = AtomicNumberTable(sorted({int(z) for z in atomic_numbers}))
        dtype = resolve_dtype(model_cfg.dtype)
        with default_dtype(dtype), quiet_torchscript():
            members = [
                build_member(model_cfg, s, z_table, atomic_energies, avg_num_neighbors, scale, shift)
                for s in seeds
            ]
        return cls(members, z_table, model_cfg.r_max, model_cfg.device, dtype, seeds)

    @classmethod
    def load(
        cls,
        paths: Sequence[Path | str],
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float64",
        seeds: Sequence[int] | None = None,
    ) -> MACEEnsemble:
        """Read member files written by ``save`` (or any MACE model files with equal cutoffs)."""
        target = resolve_device(device)
        with quiet_torchscript():
            members = [torch.load(Path(p), map_location=target, weights_only=False) for p in paths]
        r_maxs = {float(m.r_max) for m in members}
        tables = {tuple(int(z) for z in m.atomic_numbers) for m in members}
        if len(r_maxs) != 1 or len(tables) != 1:
            raise ValueError(f"members disagree on cutoff {sorted(r_maxs)} or elements {sorted(tables)}")
        z_table = AtomicNumberTable(list(tables.pop()))
        return cls(members, z_table, r_maxs.pop(), target, dtype, seeds)

    def save(self, directory: Path | str) -> list[Path]:
        """Write ``member_{k}.model`` (whole pickled module, CPU copy) as mace itself does."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, model in enumerate(self.members):
            path = directory / f"member_{k}.model"
            tmp = path.with_suffix(".model.tmp")
            with quiet_torchscript():  # deepcopy re-runs e3nn's TorchScript codegen
                torch.save(copy.deepcopy(model).cpu(), tmp)
            tmp.replace(path)
            paths.append(path)
        return paths

    # ------------------------------------------------------------------ evaluation

    def predict(
        self, atoms_list: Sequence[Atoms], members: Sequence[int] | None = None
    ) -> EnsemblePrediction:
        """Energies and forces of every member on every structure, from one batched graph.

        ``members`` restricts the evaluation to some members (rows in that order).
        """
        if not atoms_list:
            raise ValueError("predict needs at least one structure")
        chosen = list(range(len(self.members))) if members is None else list(members)
        timer = self.timer or no_timer
        with timer("graphs"):
            graph = self.graphs.md_batch(atoms_list, self.device)
        with timer("members"):
            # Results stay on the device until every member has run: one copy to the host at
            # the end, so a GPU is never idle waiting for a transfer between two members.
            outputs = [self.members[k](graph, training=False, compute_force=True) for k in chosen]
            energies = torch.stack([out["energy"].detach() for out in outputs]).cpu().numpy().astype(np.float64)
            forces = torch.stack([out["forces"].detach() for out in outputs]).cpu().numpy().astype(np.float64)
        system_idx = np.repeat(np.arange(len(atoms_list)), [len(a) for a in atoms_list])
        return EnsemblePrediction(energies, forces, system_idx)

    def to_calculator(self, member: int | None = None) -> EnsembleCalculator:
        """An ASE calculator of the committee mean (``member=None``) or of one member."""
        return EnsembleCalculator(self, member)


class EnsembleCalculator(Calculator):
    """ASE calculator over a ``MACEEnsemble``: committee-mean energy and forces.

    Besides ``energy``/``free_energy``/``forces`` it leaves ``member_forces`` ``[M, N, 3]`` and
    ``member_energies`` ``[M]`` in ``results``, so a sampler can read the disagreement without a
    second evaluation. It evaluates the live weights, so it follows further training.
    """

    implemented_properties = ("energy", "free_energy", "forces")

    def __init__(self, ensemble: MACEEnsemble, member: int | None = None) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.member = member

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        chosen = None if self.member is None else [self.member]
        pred = self.ensemble.predict([self.atoms], members=chosen)
        energy = float(pred.mean_energies[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": pred.mean_forces,
            "member_forces": pred.forces,
            "member_energies": pred.energies[:, 0],
        }
