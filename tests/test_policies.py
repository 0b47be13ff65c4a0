import numpy as np
import pytest

from keras_smartfrz.policies import AutoFreezePolicy
from keras_smartfrz.policies import FreezeStage
from keras_smartfrz.policies import LinearPolicy
from keras_smartfrz.policies import relative_update_norm
from keras_smartfrz.policies import select_units


def stage(epoch, epochs=10, candidates=4, num_units=5, num_frozen=0, window=None):
    return FreezeStage(
        epoch=epoch, epochs=epochs,
        unit_names=[f"u{i}" for i in range(num_frozen, num_frozen + candidates)],
        num_units=num_units, num_frozen=num_frozen, window=window,
    )


def test_linear_schedule_grows_from_start_to_level():
    policy = LinearPolicy(freeze_start=0.5, freeze_level=1.0)
    assert policy.target_fraction(0.5) == 0.0
    assert policy.target_fraction(0.75) == pytest.approx(0.5)
    assert policy.target_fraction(1.0) == 1.0
    scores, freeze = policy.decide(stage(epoch=4))  # progress 0.5
    assert not freeze.any()
    scores, freeze = policy.decide(stage(epoch=7))  # progress 0.8 -> 0.6 of 4
    assert freeze.tolist() == [True, True, False, False]
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0]
    # Two of four already frozen at progress 0.8: nothing more to freeze.
    _, freeze = policy.decide(stage(epoch=7, candidates=2, num_frozen=2))
    assert not freeze.any()


@pytest.mark.parametrize(
    "kwargs", [{"freeze_start": 1.0}, {"freeze_start": -0.1},
               {"freeze_level": 0.0}, {"freeze_level": 1.5}])
def test_linear_rejects_bad_arguments(kwargs):
    (value,) = kwargs.values()
    with pytest.raises(ValueError, match=repr(value)):
        LinearPolicy(**kwargs)


def trajectory(step_sizes, steps=5, size=8, seed=0):
    """Units moving by `step_sizes[i]` per snapshot, starting at norm ~1."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(len(step_sizes), 1, size))
    base /= np.linalg.norm(base, axis=2, keepdims=True)
    direction = rng.normal(size=(len(step_sizes), 1, size))
    direction /= np.linalg.norm(direction, axis=2, keepdims=True)
    t = np.arange(steps)[None, :, None]
    return base + direction * t * np.asarray(step_sizes)[:, None, None]


def test_relative_update_norm_measures_movement():
    norms = relative_update_norm(trajectory([0.0, 0.01, 0.1]))
    assert norms[0] == 0.0 and norms[1] < norms[2]


def test_autofreeze_needs_two_stages_then_freezes_the_settled_units():
    policy = AutoFreezePolicy(percentile=50)
    _, freeze = policy.decide(stage(0, window=trajectory([0.1, 0.1, 0.1, 0.1])))
    assert not freeze.any()  # first stage only records the update norms
    # Units 0 and 1 keep their update norm; units 2 and 3 change a lot.
    scores, freeze = policy.decide(
        stage(1, window=trajectory([0.1, 0.1, 0.5, 0.02])))
    assert freeze.tolist() == [True, True, False, False]
    assert scores[0] > scores[2]
    policy.reset()
    _, freeze = policy.decide(stage(2, window=trajectory([0.1] * 4)))
    assert not freeze.any()


def test_autofreeze_rejects_bad_percentile():
    with pytest.raises(ValueError, match="150"):
        AutoFreezePolicy(percentile=150)


def test_select_units_prefix_and_any():
    proposal = [True, True, False, True]
    assert select_units(proposal, "prefix").tolist() == [0, 1]
    assert select_units(proposal, "any").tolist() == [0, 1, 3]
    assert select_units([False, True], "prefix").tolist() == []
    assert select_units([True, True], "prefix").tolist() == [0, 1]
