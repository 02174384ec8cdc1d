"""The batched member step (``models.member_stack``) must train exactly like the sequential one.

Members get different frames, so the batched step pads their batches to common sizes and masks
the loss; a slip in the padding, the loss denominators, Adam's per-group decay, the per-member
clip or the EMA warm-up would show here as a mismatch far above float64 round-off.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT

from aimspax_like.config import ModelConfig, TrainingConfig
from aimspax_like.models import member_stack
from aimspax_like.models.ensemble import (
    MACEEnsemble,
    atomic_energies_from_data,
    average_neighbors,
    force_scale,
)
from aimspax_like.models.training import EnsembleTrainer

TINY = ModelConfig(channels=8, max_L=1, r_max=4.5, num_interactions=2, correlation=2, radial_mlp=[8],
                   max_ell=2, ensemble_size=4, device="cpu", dtype="float64")
ZS = [29, 79]
SEEDS = (0, 1, 2, 3)
# Clip low enough to bite on a fresh model, decay high enough to matter, a short EMA warm-up.
CFG = TrainingConfig(lr=0.01, weight_decay=1e-2, ema_decay=0.9, clip_grad=5.0, batch_size=3)
RTOL = 1e-10


def _cluster(n_cu: int, rng: np.random.Generator) -> Atoms:
    """A rattled Cu/Au cluster on a jittered fcc-like grid (EMT-labelled below)."""
    grid = np.array([[i, j, k] for i in range(3) for j in range(3) for k in range(2)], dtype=float)[: n_cu + 2]
    atoms = Atoms(f"Cu{n_cu}Au2", positions=grid * 2.55)
    atoms.positions += rng.normal(scale=0.12, size=atoms.positions.shape)
    atoms.calc = EMT()
    atoms.info["REF_energy"] = atoms.get_potential_energy()
    atoms.arrays["REF_forces"] = atoms.get_forces()
    atoms.calc = None
    return atoms


@pytest.fixture(scope="module")
def frames() -> list[Atoms]:
    rng = np.random.default_rng(7)
    return [_cluster(int(n), rng) for n in rng.integers(3, 7, size=26)]  # 5 to 8 atoms


def _member_data(frames: list[Atoms]) -> list[tuple[list[Atoms], list[Atoms]]]:
    """Different subsets of different sizes: 3, 2, 3 and 1 batches of 3 per epoch."""
    return [(frames[0:7], frames[20:23]), (frames[7:11], frames[23:26]),
            (frames[11:19], frames[20:26]), (frames[19:20], [])]


@pytest.fixture(scope="module")
def initial(frames) -> MACEEnsemble:
    """Built once (seconds); every trainer starts from its own copy of these weights."""
    return MACEEnsemble.build(TINY, list(SEEDS), ZS, atomic_energies_from_data(frames, ZS),
                              average_neighbors(frames, TINY.r_max), force_scale(frames))


def _trainer(initial: MACEEnsemble, batched: bool | None) -> EnsembleTrainer:
    return EnsembleTrainer(copy.deepcopy(initial), CFG, reset_after=50, batched=batched)


def _assert_same(a: object, b: object, where: str = "state") -> None:
    """Nested equality, tensors and floats to RTOL of their own magnitude."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        if a.is_floating_point():
            scale = float(b.abs().max()) if b.numel() else 0.0
            error = float((a - b).abs().max()) if b.numel() else 0.0
            assert error <= RTOL * scale, f"{where}: |diff| {error:.3g} vs scale {scale:.3g}"
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) and math.isnan(b)):
        assert a == pytest.approx(b, rel=RTOL, abs=0.0), where
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def _max_rel_error(a: dict, b: dict) -> float:
    """Largest tensor mismatch of two trainer states, relative to each tensor's magnitude."""
    worst = 0.0

    def walk(x: object, y: object) -> None:
        nonlocal worst
        if isinstance(x, dict):
            for key in x:
                walk(x[key], y[key])
        elif isinstance(x, list | tuple):
            for u, v in zip(x, y, strict=True):
                walk(u, v)
        elif isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            scale = float(y.abs().max())
            if scale > 0:
                worst = max(worst, float((x - y).abs().max()) / scale)

    walk(a, b)
    return worst


def test_batched_round_equals_the_sequential_round(frames, initial):
    data = _member_data(frames)
    sequential, batched = _trainer(initial, batched=False), _trainer(initial, batched=True)
    expected = sequential.train_round(data, epochs=2)
    got = batched.train_round(data, epochs=2)
    _assert_same([vars(m) for m in got], [vars(m) for m in expected], "metrics")
    state, reference = batched.state_dict(), sequential.state_dict()
    _assert_same(state, reference)
    assert [m["ema"]["num_updates"] for m in state["members"]] == [6, 4, 6, 2]
    assert all(m["optimizer"]["state"][0]["step"] == n for m, n in zip(state["members"], [6, 4, 6, 2], strict=True))
    print(f"batched vs sequential, max relative difference: {_max_rel_error(state, reference):.2e}")


def test_batched_and_sequential_rounds_alternate_and_resume(frames, initial):
    data = _member_data(frames)
    reference = _trainer(initial, batched=False)
    mixed = _trainer(initial, batched=True)
    for batched in (True, False, True):  # batched after sequential and the other way round
        mixed.batched = batched
        _assert_same([vars(m) for m in mixed.train_round(data, epochs=1)],
                     [vars(m) for m in reference.train_round(data, epochs=1)], "metrics")
    _assert_same(mixed.state_dict(), reference.state_dict())
    # A checkpoint written after batched rounds resumes (sequentially or batched) as if never stopped.
    resumed = _trainer(initial, batched=True)
    resumed.load_state_dict(mixed.state_dict())
    _assert_same([vars(m) for m in resumed.train_round(data, epochs=1)],
                 [vars(m) for m in reference.train_round(data, epochs=1)], "metrics")
    _assert_same(resumed.state_dict(), reference.state_dict())


def test_the_comparison_notices_a_wrong_clip(frames, initial, monkeypatch):
    """The equality above is not vacuous: without the per-member clip the states differ."""
    data = _member_data(frames)
    sequential, batched = _trainer(initial, batched=False), _trainer(initial, batched=True)
    monkeypatch.setattr(member_stack, "_clip_per_member", lambda grads, max_norm: grads)
    sequential.train_round(data, epochs=1)
    batched.train_round(data, epochs=1)
    assert _max_rel_error(batched.state_dict(), sequential.state_dict()) > 1e-3


def test_batched_mode_is_chosen_by_config_device_and_stress(frames, initial):
    data = _member_data(frames)
    trainer = _trainer(initial, batched=None)
    assert trainer.cfg.batched_members == "auto" and not trainer._use_batched(data)  # CPU
    trainer.cfg = trainer.cfg.model_copy(update={"batched_members": "on"})
    assert trainer._use_batched(data)
    stressed = frames[0].copy()
    stressed.set_cell(np.eye(3) * 20.0)
    stressed.pbc = True
    stressed.info["REF_stress"] = np.zeros(6)
    assert not trainer._use_batched([([stressed], []), *data[1:]])  # stress rounds stay sequential
    trainer.batched = False
    assert not trainer._use_batched(data)


def test_patches_are_scoped():
    import mace.modules.models
    import mace.modules.utils
    from e3nn.o3 import _spherical_harmonics as sh_module

    before = (mace.modules.models.prepare_graph, mace.modules.utils.scatter_sum, sh_module._spherical_harmonics)
    with pytest.raises(RuntimeError), member_stack.vmappable_mace():
        assert mace.modules.models.prepare_graph is not before[0]
        raise RuntimeError("leave the block")
    assert (mace.modules.models.prepare_graph, mace.modules.utils.scatter_sum,
            sh_module._spherical_harmonics) == before


def test_a_first_batched_round_that_fails_falls_back_to_the_sequential_round(frames, initial, monkeypatch, caplog):
    """On a machine the batched step was never run on, its failure must not end a campaign: the
    first round is put back as it was and trained one member after another instead."""
    data = _member_data(frames)
    expected = _trainer(initial, batched=False)
    expected.train_round(data, epochs=2)
    calls = []

    def broken(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after one real step: the trial must undo it
            raise RuntimeError("no kernel for this device")
        return original(self, *args, **kwargs)

    original = member_stack.MemberStack.gradients
    monkeypatch.setattr(member_stack.MemberStack, "gradients", broken)
    trainer = _trainer(initial, batched=True)
    with caplog.at_level("WARNING"):
        got = trainer.train_round(data, epochs=2)
    assert len(calls) == 2 and trainer.batched is False
    assert "batched training failed" in caplog.text
    _assert_same(trainer.state_dict(), expected.state_dict())
    _assert_same([vars(m) for m in got], [vars(m) for m in expected.last_metrics], "metrics")


def test_once_a_batched_round_has_run_its_failures_are_raised(frames, initial, monkeypatch):
    data = _member_data(frames)
    trainer = _trainer(initial, batched=True)
    trainer.train_round(data, epochs=1)

    def broken(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(member_stack.MemberStack, "gradients", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.train_round(data, epochs=1)


def _as_pieces(frames: list[Atoms], buffer_forces: float | None) -> list[Atoms]:
    """Every other frame as a substructure (through ``LabelledFrame``, the campaign's path): its
    first two atoms are the core; ``buffer_forces`` replaces the buffer atoms' reference forces."""
    from aimspax_like.data import LabelledFrame

    out = []
    for k, atoms in enumerate(frames):
        if k % 2:
            out.append(atoms)
            continue
        forces = atoms.arrays["REF_forces"].copy()
        mask = np.arange(len(atoms)) < 2
        if buffer_forces is not None:
            forces[~mask] = buffer_forces
        frame = LabelledFrame.from_atoms(atoms, atoms.info["REF_energy"], forces, split="train", origin="al",
                                         trajectory=0, md_step=k, piece=0, force_mask=mask,
                                         parent_index=np.arange(len(atoms)) + 100)
        out.append(frame.to_atoms())
    return out


def _piece_data(frames: list[Atoms], buffer_forces: float | None) -> list[tuple[list[Atoms], list[Atoms]]]:
    return [(_as_pieces(train, buffer_forces), _as_pieces(valid, buffer_forces))
            for train, valid in _member_data(frames)]


@pytest.mark.parametrize("batched", [False, True], ids=["sequential", "batched"])
def test_buffer_atoms_forces_do_not_enter_the_loss(frames, initial, batched):
    """Substructures whose buffer atoms carry absurd reference forces train exactly like the same
    substructures with the true ones: only core forces are labels (and no piece energy is)."""
    true_buffer = _trainer(initial, batched=batched)
    absurd_buffer = _trainer(initial, batched=batched)
    expected = true_buffer.train_round(_piece_data(frames, None), epochs=2)
    got = absurd_buffer.train_round(_piece_data(frames, 1.0e3), epochs=2)
    _assert_same([vars(m) for m in got], [vars(m) for m in expected], "metrics")
    _assert_same(absurd_buffer.state_dict(), true_buffer.state_dict())
    # Not vacuous: the same absurd forces on whole frames change training by far more than round-off.
    whole = [(list(train), list(valid)) for train, valid in _member_data(frames)]
    spoiled = [([_with_forces(a, 1.0e3, k) for k, a in enumerate(train)], valid) for train, valid in whole]
    clean, dirty = _trainer(initial, batched=batched), _trainer(initial, batched=batched)
    clean.train_round(whole, epochs=2)
    dirty.train_round(spoiled, epochs=2)
    assert _max_rel_error(dirty.state_dict(), clean.state_dict()) > 1e-3


def _with_forces(atoms: Atoms, value: float, k: int) -> Atoms:
    """A whole frame whose atoms past the first two carry ``value`` as reference force (even k)."""
    atoms = atoms.copy()
    if k % 2 == 0:
        atoms.arrays["REF_forces"][2:] = value
    return atoms


def test_batched_round_equals_the_sequential_round_with_substructures(frames, initial):
    data = _piece_data(frames, None)
    sequential, batched = _trainer(initial, batched=False), _trainer(initial, batched=True)
    expected = sequential.train_round(data, epochs=2)
    got = batched.train_round(data, epochs=2)
    _assert_same([vars(m) for m in got], [vars(m) for m in expected], "metrics")
    _assert_same(batched.state_dict(), sequential.state_dict())


def test_the_masked_force_term_counts_core_atoms_like_whole_frame_atoms(frames, initial):
    """The force mean divides by labelled atoms: a piece whose core is all its atoms is a whole frame."""
    from aimspax_like.models.losses import masked_mean_squared_error_forces

    graphs = initial.graphs
    whole = [frames[0], frames[1]]
    pieces = _as_pieces(whole, None)
    batch = graphs.batch(pieces, initial.device)
    pred = {"forces": torch.zeros_like(batch.forces)}
    squared = batch.forces.square().sum(dim=1)
    core = batch.force_mask.bool()
    assert core.sum() == 2 + len(frames[1])
    assert torch.isclose(masked_mean_squared_error_forces(batch, pred), squared[core].mean() / 3)
    unmasked = graphs.batch(whole, initial.device)
    assert torch.isclose(masked_mean_squared_error_forces(unmasked, pred), unmasked.forces.square().mean())
