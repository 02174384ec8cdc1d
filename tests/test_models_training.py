"""Continual training of the committee on real (EMT-labelled) frames."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT

from aimspax_like.config import ModelConfig, TrainingConfig
from aimspax_like.models.ensemble import (
    MACEEnsemble,
    atomic_energies_from_data,
    average_neighbors,
    force_scale,
)
from aimspax_like.models.training import EnsembleTrainer, MemberMetrics

TINY = ModelConfig(channels=8, max_L=0, r_max=4.5, num_interactions=2, correlation=2, radial_mlp=[8],
                   max_ell=2, ensemble_size=2, device="cpu")
ZS = [29, 79]


def bipyramid() -> Atoms:
    """Cu5Au2 pentagonal bipyramid with 2.55 A bonds."""
    r = 2.55 / (2 * math.sin(math.pi / 5))
    h = math.sqrt(2.55**2 - r**2)
    ring = [[r * math.cos(2 * math.pi * i / 5), r * math.sin(2 * math.pi * i / 5), 0.0] for i in range(5)]
    return Atoms("Cu5Au2", positions=[*ring, [0, 0, h], [0, 0, -h]])


def emt_frames(n: int, seed: int, stdev: float = 0.15) -> list[Atoms]:
    """Rattled clusters labelled with EMT under the engine's REF_* keys."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bipyramid()
        atoms.positions += rng.normal(scale=stdev, size=atoms.positions.shape)
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def data() -> tuple[list[Atoms], list[Atoms]]:
    frames = emt_frames(32, seed=0)
    return frames[:24], frames[24:]


def fresh_ensemble(train: list[Atoms], seeds: tuple[int, ...] = (0, 1)) -> MACEEnsemble:
    return MACEEnsemble.build(
        TINY, list(seeds), ZS, atomic_energies_from_data(train, ZS),
        average_neighbors(train, TINY.r_max), force_scale(train),
    )


def test_continual_rounds_lower_the_validation_force_error(data):
    train, valid = data
    ensemble = fresh_ensemble(train)
    trainer = EnsembleTrainer(ensemble, TrainingConfig(), reset_after=50)
    before = [trainer.evaluate(k, valid)["force_mae"] for k in range(2)]
    history = [trainer.train_round([(train, valid), (train[:16], valid)], epochs=5) for _ in range(3)]
    after = [m.valid_force_mae for m in history[-1]]
    for k in range(2):
        assert after[k] < 0.7 * before[k], (before, after)
        assert [h[k].epoch for h in history] == [5, 10, 15]  # weights and counters carry over
        assert after[k] == pytest.approx(trainer.evaluate(k, valid)["force_mae"], rel=1e-12)
    assert all(isinstance(m, MemberMetrics) and m.member == k for k, m in enumerate(history[0]))
    assert trainer.best_member() == int(np.argmin([m.valid_loss for m in history[-1]]))


def test_prediction_uses_the_ema_weights_and_training_the_raw_ones(data):
    train, valid = data
    ensemble = fresh_ensemble(train, seeds=(5,))
    trainer = EnsembleTrainer(ensemble, TrainingConfig(ema_decay=0.9), reset_after=50)
    trainer.train_round([(train[:10], valid)], epochs=2)
    member = trainer.state_dict()["members"][0]
    live = list(ensemble.members[0].parameters())
    for p, shadow in zip(live, member["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(p.detach(), shadow, rtol=0, atol=0)
    assert any((p.detach() - r).abs().max() > 0 for p, r in zip(live, member["raw"], strict=True))


def test_empty_validation_set_falls_back_to_the_train_frames(data):
    train, _ = data
    ensemble = fresh_ensemble(train, seeds=(2,))
    trainer = EnsembleTrainer(ensemble, TrainingConfig(), reset_after=50)
    (metrics,) = trainer.train_round([(train[:8], [])], epochs=1)
    assert metrics.valid_force_mae == pytest.approx(trainer.evaluate(0, train[:8])["force_mae"], rel=1e-12)


def test_stalled_member_gets_its_optimizer_reset(data):
    train, valid = data
    ensemble = fresh_ensemble(train, seeds=(3,))
    trainer = EnsembleTrainer(ensemble, TrainingConfig(lr=1e-12), reset_after=2)
    rounds = [trainer.train_round([(train[:6], valid)], epochs=1)[0] for _ in range(5)]
    assert [m.improved for m in rounds] == [True, False, False, False, False]
    assert [m.optimizer_reset for m in rounds] == [False, False, True, False, True]


def test_convergence_stops_on_patience_and_restores_the_best(data):
    train, valid = data
    ensemble = fresh_ensemble(train, seeds=(4,))
    trainer = EnsembleTrainer(ensemble, TrainingConfig(lr=0.02), reset_after=50)
    trainer.train_round([(train, valid)], epochs=6)
    start = trainer.evaluate(0, valid)["loss"]
    # Poisoned training labels (forces reversed) can only make the true validation loss worse.
    poisoned = [a.copy() for a in train]
    for atoms in poisoned:
        atoms.arrays["REF_forces"] = -atoms.arrays["REF_forces"]
    seen: list[MemberMetrics] = []
    result = trainer.train_to_convergence(0, poisoned, valid, patience=3, max_epochs=40, on_epoch=seen.append)
    assert 3 <= len(seen) < 40 and not any(m.improved for m in seen[-3:])
    best = min([start] + [m.valid_loss for m in seen])
    assert seen[-1].valid_loss > 1.5 * best  # the last weights were much worse ...
    assert trainer.evaluate(0, valid)["loss"] == pytest.approx(best, rel=1e-12)  # ... and are gone
    assert result.valid_loss == pytest.approx(best, rel=1e-12) and result.epoch == 6 + len(seen)
    # Whatever convergence goes through, it keeps the best model it saw, entry state included.
    seen.clear()
    entry = trainer.evaluate(0, valid)["loss"]
    result = trainer.train_to_convergence(0, train, valid, patience=2, max_epochs=6, on_epoch=seen.append)
    best = min([entry] + [m.valid_loss for m in seen])
    assert result.valid_loss == pytest.approx(best, rel=1e-12)
    assert trainer.evaluate(0, valid)["loss"] == pytest.approx(best, rel=1e-12)


def test_state_dict_round_trip_continues_identically(data, tmp_path):
    train, valid = data
    splits = [(train[:12], valid), (train[12:], valid)]
    first = EnsembleTrainer(fresh_ensemble(train), TrainingConfig(), reset_after=1)
    first.train_round(splits, epochs=2)
    state = first.state_dict()
    second = EnsembleTrainer(fresh_ensemble(train, seeds=(7, 8)), TrainingConfig(), reset_after=1)
    second.load_state_dict(state)
    assert second.last_metrics == first.last_metrics
    a = first.train_round(splits, epochs=1)
    b = second.train_round(splits, epochs=1)
    assert a == b
    forces = [t.ensemble.predict(valid[:2]).forces for t in (first, second)]
    np.testing.assert_array_equal(*forces)
    # The snapshot is a copy (training after taking it did not change it), and it survives a
    # checkpoint file that is read back with torch's safe loader.
    torch.save(state, tmp_path / "trainer.pt")
    third = EnsembleTrainer(fresh_ensemble(train), TrainingConfig(), reset_after=1)
    third.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True))
    assert third.train_round(splits, epochs=1) == a


def test_bad_inputs_are_rejected(data):
    train, valid = data
    trainer = EnsembleTrainer(fresh_ensemble(train), TrainingConfig(), reset_after=5)
    with pytest.raises(ValueError, match="2 members"):
        trainer.train_round([(train, valid)], epochs=1)
    with pytest.raises(ValueError, match="training frame"):
        trainer.train_round([([], valid), (train, valid)], epochs=1)
