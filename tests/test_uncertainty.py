"""Eq. 1 and Eq. 2 against numbers worked out by hand."""

import math

import numpy as np
import pytest

from aimspax_like.uncertainty import (
    MovingAverageThreshold,
    atomic_force_std,
    max_atomic_uncertainty,
    max_atomic_uncertainty_per_system,
)


def test_eq1_two_members_by_hand():
    # Atom 0: members disagree by +-1 on x only -> sum of squares 2, / (3*2) -> sqrt(1/3).
    # Atom 1: members disagree by +-2 on y and +-1 on z -> (8 + 2) / 6 -> sqrt(10/6).
    forces = np.array(
        [
            [[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]],
            [[-1.0, 0.0, 0.0], [0.0, -2.0, -1.0]],
        ]
    )
    np.testing.assert_allclose(atomic_force_std(forces), [math.sqrt(1 / 3), math.sqrt(10 / 6)])
    assert max_atomic_uncertainty(forces) == pytest.approx(math.sqrt(10 / 6))


def test_eq1_uses_population_normalisation_and_ignores_common_offset():
    # Four members, one atom, x components 1, 2, 3, 6 (mean 3): squares 4+1+0+9 = 14 -> 14 / 12.
    forces = np.zeros((4, 1, 3))
    forces[:, 0, 0] = [1.0, 2.0, 3.0, 6.0]
    assert max_atomic_uncertainty(forces) == pytest.approx(math.sqrt(14 / 12))
    assert max_atomic_uncertainty(forces + 17.0) == pytest.approx(math.sqrt(14 / 12))


def test_eq1_agreeing_committee_is_certain():
    forces = np.tile(np.random.default_rng(0).normal(size=(1, 5, 3)), (4, 1, 1))
    assert max_atomic_uncertainty(forces) == 0.0


def test_eq1_rejects_wrong_shape():
    with pytest.raises(ValueError, match="n_members, n_atoms, 3"):
        max_atomic_uncertainty(np.zeros((4, 5)))


def test_eq1_per_system_matches_one_by_one():
    rng = np.random.default_rng(1)
    forces = rng.normal(size=(3, 7, 3))
    system_idx = np.array([0, 0, 0, 1, 1, 2, 2])
    batched = max_atomic_uncertainty_per_system(forces, system_idx, 3)
    singles = [max_atomic_uncertainty(forces[:, system_idx == s]) for s in range(3)]
    np.testing.assert_allclose(batched, singles)


def test_eq2_infinite_during_warmup_then_mean():
    threshold = MovingAverageThreshold(window=400, c_x=0.0, warmup=3)
    assert threshold.update(1.0) == math.inf
    assert threshold.update(2.0) == math.inf
    assert threshold.update(6.0) == pytest.approx(3.0)
    assert not threshold.exceeded(3.0)
    assert threshold.exceeded(3.01)


def test_eq2_window_drops_oldest_and_cx_scales():
    threshold = MovingAverageThreshold(window=3, c_x=0.5, warmup=1)
    threshold.update([10.0, 1.0, 2.0, 3.0])  # 10 falls out of the window of 3
    assert threshold.value == pytest.approx(1.5 * 2.0)
    tight = MovingAverageThreshold(window=3, c_x=-0.1, warmup=1)
    tight.update([1.0, 2.0, 3.0])
    assert tight.value == pytest.approx(0.9 * 2.0)


def test_eq2_freeze_keeps_value_and_state_round_trips():
    threshold = MovingAverageThreshold(window=2, c_x=0.0, warmup=1)
    threshold.freeze()  # not finite yet: freezing waits
    assert not threshold.frozen
    threshold.update([4.0, 6.0])
    threshold.freeze()
    threshold.update([100.0, 100.0])
    assert threshold.value == pytest.approx(5.0)
    restored = MovingAverageThreshold.from_state_dict(threshold.state_dict())
    assert restored.value == pytest.approx(5.0)
    assert restored.n_seen == 4


def test_eq2_ignores_non_finite_uncertainties():
    threshold = MovingAverageThreshold(window=5, warmup=1)
    threshold.update([float("nan"), 2.0, float("inf")])
    assert threshold.value == pytest.approx(2.0)
    assert threshold.n_seen == 1


@pytest.mark.parametrize("window", [0, -4])
def test_eq2_rejects_non_positive_window(window):
    with pytest.raises(ValueError, match="window"):
        MovingAverageThreshold(window=window)
