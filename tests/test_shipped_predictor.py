"""The predictor shipped inside the package: it loads, and it decides sensibly.

These tests read `keras_smartfrz/assets/`; they fail (not skip) when the
package ships no predictor, since `SmartFRZ()` must work with no argument.
"""

import keras
import numpy as np
import pytest

import keras_smartfrz
from keras_smartfrz import policies
from keras_smartfrz import predictor as predictor_lib


@pytest.fixture(scope="module")
def shipped():
    return keras_smartfrz.load_predictor()


def test_shipped_files_exist_and_are_small():
    weights_file, card_file = predictor_lib.predictor_files()
    assert weights_file.is_file() and card_file.is_file()
    assert weights_file.stat().st_size < 8 * 2**20


def test_shipped_predictor_loads_with_its_card(shipped):
    assert isinstance(shipped, keras_smartfrz.FreezePredictor)
    assert (shipped.window_size, shipped.sample_size) == (30, 1024)
    card = shipped.card
    assert card["normalization"] == predictor_lib.NORMALIZATION
    training = card["training"]
    assert training["runs"] and training["train_archs"]
    held_out = card["metrics"]["held_out_pooled"]
    for key in ("precision", "recall", "auc"):
        assert 0.0 <= held_out[key] <= 1.0


def _stage(window, num_units):
    return policies.FreezeStage(
        epoch=3,
        epochs=10,
        unit_names=[f"unit_{i}" for i in range(len(window))],
        num_units=num_units,
        num_frozen=0,
        window=window,
    )


def _trajectories(seed=0, steps=30, size=1024):
    """A converged unit and a still-learning one, raw sampled weights.

    Both start from the same weights (RMS 0.05, a typical initialisation).
    The converged one wanders around that point by steps of 1e-5 of its
    size, with no direction; the learning one drifts steadily by 1% of its
    size per snapshot, in a consistent direction, with some noise.
    """
    rng = np.random.default_rng(seed)
    start = 0.05 * rng.normal(size=(1, size))
    wander = start + 5e-7 * rng.normal(size=(steps, size))
    direction = rng.normal(size=(1, size))
    drift = (
        start
        + 5e-4 * np.arange(steps)[:, None] * direction
        + 1e-4 * rng.normal(size=(steps, size))
    )
    return np.stack([wander, drift])


def test_shipped_predictor_tells_converged_from_learning(shipped):
    policy = predictor_lib.PredictorPolicy(shipped)
    scores, freeze = policy.decide(_stage(_trajectories(), num_units=4))
    assert scores[0] > scores[1]
    assert freeze.tolist() == [True, False]


def test_smartfrz_default_freezes_the_converged_unit_only(shipped):
    """Through the callback: the first unit's history is converged, the
    second's is learning; a stage freezes the first and keeps the second."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(64, activation="relu", name="first"),
            keras.layers.Dense(64, activation="relu", name="second"),
            keras.layers.Dense(1, name="head"),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    callback = keras_smartfrz.SmartFRZ()
    callback.set_model(model)
    callback.set_params({"epochs": 10, "steps": 30, "verbose": 0})
    callback.on_train_begin()
    synthetic = _trajectories(seed=1)
    head = synthetic[1:]  # the head is never a candidate
    for snapshot in np.concatenate([synthetic, head]).transpose(1, 0, 2):
        callback._history.append(snapshot)
    callback._run_stage(epoch=3)
    assert callback.frozen_units == [model.get_layer("first").path]
    assert not model.get_layer("first").trainable
    assert model.get_layer("second").trainable
    decisions = {d.layer.split("/")[-1]: d for d in callback.decisions}
    assert decisions["first"].frozen and not decisions["second"].frozen
