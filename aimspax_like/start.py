"""How a campaign begins: imported data stored first, members fresh or from existing weights.

Two ways to start stronger than from nothing, alone or together:

- ``import_data``: labelled frames from earlier work are stored (origin ``import``) before IDG,
  dealt to the members like IDG frames, and trained on from the first round. IDG then adds to
  them, or is switched off and the committee trains on the imported frames alone.
- ``model.start_from``: the members start from MACE weights, one file for all (fine-tuning a
  foundation model or an earlier model) or one per member (an earlier ensemble). The files'
  architecture is used as it is; their per-element energies (E0) are refitted to the campaign's
  data, because a model trained at another level of theory (or MACE-MP's PBE+U) puts the zero of
  energy elsewhere, which costs nothing in forces but every energy. Members that start from one
  and the same file get a small seeded perturbation of their readout weights and train on
  disjoint subsets, so that they disagree where the data say nothing and Eq. 1 means something.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from aimspax_like.config import CampaignConfig
from aimspax_like.data import LabelledFrame
from aimspax_like.errors import ConfigError

KEY = "model.start_from"
READOUT_NOISE = 0.01  # relative spread of the readout perturbation of members sharing one start file


def store_imports(ctx: Any, frames: list[LabelledFrame]) -> int:
    """Store the imported frames not stored yet (one write); returns how many were new.

    Their identity (``import``, source number, index in the file) makes a resumed campaign skip
    what it stored before. One ``data_imported`` event per source.
    """
    new = ctx.store_frames(frames)
    for number, source in enumerate(ctx.config.import_data):
        mine = [f for f in frames if f.trajectory == number]
        ctx.events.emit(
            "data_imported", source=str(source.path), frames=len(mine),
            new=sum(f.trajectory == number for f in new), train=sum(f.split == "train" for f in mine),
            valid=sum(f.split == "valid" for f in mine), reference=mine[0].reference if mine else "",
            has_stress=sum(f.stress is not None for f in mine),
        )
    return len(new)


def elements(ctx: Any, frames: list[LabelledFrame]) -> list[int]:
    """Every element of the start structures and of the frames the committee starts with."""
    numbers = {int(z) for atoms in ctx.structures for z in atoms.numbers}
    numbers |= {int(z) for frame in frames for z in frame.numbers}
    return sorted(numbers)


def initial_committee(ctx: Any, frames: list[LabelledFrame]) -> Any:
    """The committee IDG (or the import-only start) trains: fresh members or ``start_from``."""
    from aimspax_like.committee import Committee

    config: CampaignConfig = ctx.config
    numbers = elements(ctx, frames)
    if not config.model.start_from:
        return Committee.from_data(config, frames, numbers)
    members = load_start_members(config, numbers)
    committee = Committee.from_members(config, members, frames)
    train = [f.to_atoms() for f in frames if f.split in ("train", "valid")]
    from aimspax_like.models.calibration import refit_atomic_energies

    for k in range(committee.n_members):
        shifts = refit_atomic_energies(committee.ensemble, k, train)
        ctx.events.emit("e0_refit", member=k, shifts=shifts, converged=False)
    ctx.events.emit("start_models", files=list(config.model.start_from), members=committee.n_members,
                    perturbed=len(config.model.start_from) == 1 and committee.n_members > 1)
    return committee


def load_start_members(config: CampaignConfig, numbers: list[int] | None = None) -> list[Any]:
    """One torch module per member from ``model.start_from``; checks elements and cutoffs.

    Also what ``campaign.check_inputs`` calls, before anything is written, to refuse a missing,
    foreign or incompatible file in one line.
    """
    names = list(config.model.start_from or [])
    loaded = [_load(name) for name in names]
    for name, module in zip(names, loaded, strict=True):
        known = {int(z) for z in getattr(module, "atomic_numbers", [])}
        missing = sorted(set(numbers or []) - known)
        if missing:
            from ase.data import chemical_symbols

            symbols = ", ".join(chemical_symbols[z] for z in missing)
            raise ConfigError(KEY, f"{name} knows no {symbols}: a model cannot be fine-tuned to elements it has "
                              "no embedding for")
    cutoffs = {float(m.r_max) for m in loaded}
    tables = {tuple(int(z) for z in m.atomic_numbers) for m in loaded}
    if len(cutoffs) > 1 or len(tables) > 1:
        raise ConfigError(KEY, f"the files disagree on cutoff {sorted(cutoffs)} or elements: members of one "
                          "committee must share both")
    if len(loaded) == 1 and config.model.ensemble_size > 1:
        members = []
        for k, seed in enumerate(config.member_seeds()):
            module = copy.deepcopy(loaded[0])
            if k:  # member 0 keeps the file's weights exactly
                _perturb_readouts(module, seed)
            members.append(module)
        return members
    return loaded


def _load(name: str) -> Any:
    import torch

    from aimspax_like.models.torch_utils import quiet_torchscript

    if name.startswith("mace-mp"):
        from aimspax_like.models.foundation import MACE_MP_NAMES, _mace_mp

        if name not in MACE_MP_NAMES:
            raise ConfigError(KEY, f"unknown foundation model {name!r}; use one of {', '.join(MACE_MP_NAMES)}")
        try:
            return _mace_mp(name, "cpu", "float64").models[0]
        except ConfigError as exc:
            raise ConfigError(KEY, exc.message) from None
    path = Path(name)
    if not path.is_file():
        raise ConfigError(KEY, f"model file not found: {path}")
    try:
        with quiet_torchscript():
            module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt or foreign file
        raise ConfigError(KEY, f"{path}: not a MACE model file ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:120]})") from None
    if not isinstance(module, torch.nn.Module) or not hasattr(module, "atomic_energies_fn"):
        raise ConfigError(KEY, f"{path}: not a MACE model file (a {type(module).__name__})")
    return module


def _perturb_readouts(module: Any, seed: int) -> None:
    """Multiply the readout weights by (1 + N(0, READOUT_NOISE)), seeded per member."""
    import torch

    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "readouts" in name and param.dtype.is_floating_point:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
                param.mul_(1 + READOUT_NOISE * noise.to(param.dtype))
