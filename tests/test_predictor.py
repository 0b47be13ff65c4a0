import copy
import json
import pickle

import keras
import numpy as np
import pytest

from keras_smartfrz import FreezingCallback
from keras_smartfrz import policies
from keras_smartfrz import predictor as predictor_lib
from keras_smartfrz.predictor import FreezePredictor
from keras_smartfrz.predictor import PredictorPolicy
from keras_smartfrz.predictor import load_predictor
from keras_smartfrz.predictor import normalize_window
from keras_smartfrz.predictor import predictor_inputs
from keras_smartfrz.predictor import save_predictor
from keras_smartfrz.predictor import window_features

TINY = dict(
    window_size=4,
    sample_size=8,
    hidden_units=8,
    embedding_units=4,
    classifier_units=4,
    dropout=0.2,
)


def _trajectory(seed=0, units=3, steps=30, size=16):
    rng = np.random.default_rng(seed)
    start = rng.normal(size=(units, 1, size))
    moves = rng.normal(size=(units, steps - 1, size))
    path = np.concatenate(
        [np.zeros((units, 1, size)), np.cumsum(moves, axis=1)], axis=1
    )
    return start, path


def _inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "window": rng.random((batch, 4, 8)).astype("float32"),
        "features": rng.random((batch, predictor_lib.NUM_FEATURES)).astype(
            "float32"
        ),
    }


def _tiny_predictor(bias=None):
    predictor = FreezePredictor(**TINY)
    if bias is not None:
        head = predictor.classifier.layers[-1]
        head.kernel.assign(np.zeros(head.kernel.shape, "float32"))
        head.bias.assign(np.full(head.bias.shape, bias, "float32"))
        wide = predictor.feature_logit
        wide.kernel.assign(np.zeros(wide.kernel.shape, "float32"))
        wide.bias.assign(np.zeros(wide.bias.shape, "float32"))
    return predictor


def _stage(window, epoch=0):
    return policies.FreezeStage(
        epoch=epoch,
        epochs=10,
        unit_names=[f"unit_{i}" for i in range(len(window))],
        num_units=len(window) + 1,
        num_frozen=0,
        window=window,
    )


# --------------------------------------------------------- normalisation
def test_normalize_keeps_shape_and_zeroes_first_snapshot():
    start, path = _trajectory()
    out = normalize_window(start + 0.01 * path)
    assert out.shape == (3, 30, 16) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0], 0.0)


def test_normalize_two_dims_is_one_unit():
    start, path = _trajectory()
    window = start + 0.01 * path
    np.testing.assert_allclose(
        normalize_window(window[1]), normalize_window(window)[1]
    )


def test_normalize_is_scale_and_offset_invariant():
    start, path = _trajectory(1)
    window = start + 0.01 * path
    offset = np.random.default_rng(2).normal(size=(1, 1, 16))
    np.testing.assert_allclose(
        normalize_window(250.0 * window + offset),
        normalize_window(window),
        rtol=1e-4,
        atol=1e-4,
    )


def test_normalize_ignores_the_learning_rate_scale():
    start, path = _trajectory(3)
    slow = normalize_window(start + 1e-4 * path)
    fast = normalize_window(start + 1e-1 * path)
    np.testing.assert_allclose(slow, fast, rtol=1e-3, atol=1e-3)


def test_normalize_units_are_independent():
    start, path = _trajectory(4)
    window = start + 0.01 * path
    scaled = window.copy()
    scaled[0] *= 1000.0  # one layer with a far larger weight scale
    np.testing.assert_allclose(
        normalize_window(scaled)[1:], normalize_window(window)[1:]
    )
    np.testing.assert_allclose(
        normalize_window(scaled)[0], normalize_window(window)[0], rtol=1e-4,
        atol=1e-4,
    )


def test_normalize_separates_drift_from_noise():
    steps, size = 30, 64
    rng = np.random.default_rng(5)
    drift = np.linspace(0, 1, steps)[:, None] * rng.normal(size=(1, size))
    noise = 0.05 * rng.normal(size=(steps, size))

    def last_rms(window):
        return np.sqrt(np.mean(normalize_window(window)[-1] ** 2))

    assert last_rms(drift) == pytest.approx(steps - 1, rel=1e-5)
    assert last_rms(noise) < 2.0  # iid noise around a point: about 1


def test_normalize_constant_window_is_finite_zero():
    for window in (np.full((2, 30, 8), 0.37), np.zeros((30, 8))):
        out = normalize_window(window)
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out, 0.0)


def test_normalize_rounding_noise_is_not_amplified():
    jitter = np.random.default_rng(6).normal(size=(30, 8))
    window = np.ones((30, 8)) + 1e-9 * jitter
    assert np.abs(normalize_window(window)).max() < 0.1


def test_normalize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="T >= 2"):
        normalize_window(np.zeros((3, 1, 8)))
    with pytest.raises(ValueError, match="\\(units, T, S\\)"):
        normalize_window(np.zeros(8))


def test_float32_windows_are_worked_in_float32_to_the_same_result():
    # What the callback samples is float32; it is worked in float32, and
    # gives what float64 arithmetic gives, down to steps of 1e-6 of the
    # weights' size (where float32 subtraction is still exact).
    rng = np.random.default_rng(3)
    base = rng.normal(size=(4, 1, 64))
    steps = np.array([1e-1, 1e-3, 1e-5, 1e-6])[:, None, None]
    window64 = base + np.cumsum(
        steps * rng.normal(size=(4, 12, 64)), axis=1
    )
    window32 = window64.astype(np.float32)
    # The reference: the same float32 numbers, worked in float64.
    exact = window32.astype(np.float64)
    assert predictor_lib._work_dtype(window32) == np.float32
    assert predictor_lib._work_dtype(exact) == np.float64
    np.testing.assert_allclose(
        normalize_window(window32), normalize_window(exact),
        rtol=1e-4, atol=1e-4,
    )
    np.testing.assert_allclose(
        window_features(window32, [0, 1, 2, 3], 5),
        window_features(exact, [0, 1, 2, 3], 5),
        rtol=1e-5, atol=1e-5,
    )
    assert normalize_window(window32).dtype == np.float32
    assert window_features(window32, [0, 1, 2, 3], 5).dtype == np.float32


# -------------------------------------------------------------- features
def _feature(window, name, unit_index=0, num_units=2):
    column = predictor_lib.FEATURE_NAMES.index(name)
    return window_features(window, unit_index, num_units)[:, column]


def test_features_shape_and_names():
    start, path = _trajectory(10)
    out = window_features(start + 0.01 * path, [0, 1, 2], 4)
    assert out.shape == (3, predictor_lib.NUM_FEATURES)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    np.testing.assert_allclose(
        out[:, predictor_lib.FEATURE_NAMES.index("depth")], [0, 1 / 3, 2 / 3]
    )


def test_features_are_scale_free_but_see_relative_speed():
    start, path = _trajectory(11)
    window = start + 0.01 * path
    np.testing.assert_allclose(
        window_features(250.0 * window, 0, 2),
        window_features(window, 0, 2),
        rtol=1e-5, atol=1e-6,
    )
    # Ten times faster relative to the weights: log10 step size up by 1/4.
    faster = start + 0.1 * path
    step = _feature(faster, "log_step_size") - _feature(window, "log_step_size")
    assert np.all(step > 0.2)


def test_features_separate_drift_from_wandering():
    steps, size = 30, 64
    rng = np.random.default_rng(12)
    base = rng.normal(size=(1, 1, size))
    drift = base + np.linspace(0, 1, steps)[None, :, None] * rng.normal(
        size=(1, 1, size)
    )
    wander = base + 0.05 * rng.normal(size=(1, steps, size))
    assert _feature(drift, "straightness")[0] == pytest.approx(1.0, rel=1e-6)
    assert _feature(wander, "straightness")[0] < 0.1


def test_features_see_deceleration():
    steps = np.concatenate([np.full(15, 1.0), np.full(14, 0.01)])
    window = np.concatenate([[0.0], np.cumsum(steps)])[None, :, None]
    window = 5.0 + window * np.ones((1, 1, 8))
    assert _feature(window, "deceleration")[0] < -0.9


def test_features_of_a_still_unit_are_finite():
    out = window_features(np.full((2, 30, 8), 0.37), [0, 1], 3)
    assert np.all(np.isfinite(out))
    assert np.all(out[:, 0] == -3.0)  # the floor, 1e-12, over 4


def test_features_reject_bad_input():
    with pytest.raises(ValueError, match="T >= 3"):
        window_features(np.zeros((2, 2, 8)), 0, 2)
    with pytest.raises(ValueError, match="num_units=0"):
        window_features(np.zeros((2, 5, 8)), 0, 0)
    with pytest.raises(ValueError, match="unit_index=5"):
        window_features(np.zeros((2, 5, 8)), 5, 3)


def test_stage_positions_default_to_the_units_before_the_head():
    stage = policies.FreezeStage(
        epoch=0, epochs=3, unit_names=["c", "d"], num_units=5, num_frozen=2
    )
    assert stage.positions().tolist() == [2, 3]
    stage.unit_indices = [0, 3]
    assert stage.positions().tolist() == [0, 3]


# ------------------------------------------------------------- predictor
def test_predictor_refuses_inputs_without_features():
    with pytest.raises(ValueError, match="'window' and 'features'"):
        _tiny_predictor()(np.random.rand(2, 4, 8).astype("float32"))


def test_default_predictor_has_about_a_million_parameters():
    predictor = FreezePredictor()
    assert 0.9e6 < predictor.count_params() < 1.2e6
    def widths(mlp):
        return [layer.units for layer in mlp.layers if hasattr(layer, "units")]

    assert widths(predictor.query_encoder) == [256, 256, 64]
    assert widths(predictor.classifier) == [32, 32, 1]


def test_predictor_outputs_probabilities_per_window():
    predictor = _tiny_predictor()
    x = _inputs(5)
    out = keras.ops.convert_to_numpy(predictor(x))
    assert out.shape == (5, 1)
    assert np.all((out > 0) & (out < 1))
    weights = keras.ops.convert_to_numpy(
        predictor.attention_weights(_inputs(5, seed=1))
    )
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)


def test_inputs_come_sorted_and_the_model_reads_any_order_alike():
    # predictor_inputs sorts each snapshot (NumPy); the model sorts what is
    # not sorted yet, so shuffled, sorted and reversed windows score alike.
    start, path = _trajectory(seed=4, units=5, steps=4, size=8)
    inputs = predictor_inputs(start + path, np.arange(5), 6)
    window = inputs["window"]
    assert np.all(np.diff(window, axis=-1) >= 0)
    np.testing.assert_array_equal(
        window, np.sort(normalize_window(start + path), axis=-1))
    predictor = _tiny_predictor()
    want = keras.ops.convert_to_numpy(predictor(inputs))
    rng = np.random.default_rng(0)
    for other in (window[..., ::-1], rng.permuted(window, axis=-1)):
        got = predictor({"window": np.ascontiguousarray(other),
                         "features": inputs["features"]})
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(got), want, rtol=1e-6, atol=1e-7)


def test_predictor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="window_size=2"):
        FreezePredictor(window_size=2)
    with pytest.raises(ValueError, match="dropout=1.0"):
        FreezePredictor(dropout=1.0)
    with pytest.raises(ValueError, match="sample_size"):
        FreezePredictor(sample_size=0)


def test_predictor_keras_saving_round_trip(tmp_path):
    predictor = _tiny_predictor()
    x = _inputs(3)
    path = tmp_path / "predictor.keras"
    predictor.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, FreezePredictor)
    assert restored.get_config()["hidden_units"] == 8
    np.testing.assert_allclose(restored(x), predictor(x), rtol=1e-6)
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(predictor)
    )
    assert clone.count_params() == predictor.count_params()


# ------------------------------------------------------------ file format
def test_save_and_load_predictor(tmp_path):
    predictor = _tiny_predictor()
    weights_file, card_file = save_predictor(
        predictor, tmp_path, {"training": {"runs": ["a"]}}
    )
    assert weights_file.name == "predictor.weights.h5"
    assert card_file.name == "predictor_card.json"
    loaded = load_predictor(tmp_path)
    x = _inputs(2)
    np.testing.assert_allclose(loaded(x), predictor(x), rtol=1e-6)
    assert loaded.card["training"] == {"runs": ["a"]}
    assert loaded.card["format_version"] == predictor_lib.FORMAT_VERSION
    assert loaded.card["config"]["window_size"] == 4


def test_weights_file_path_finds_its_card(tmp_path):
    save_predictor(_tiny_predictor(), tmp_path / "mine.weights.h5")
    assert (tmp_path / "mine_card.json").is_file()
    assert load_predictor(tmp_path / "mine.weights.h5").sample_size == 8
    with pytest.raises(ValueError, match="notes.txt"):
        load_predictor(tmp_path / "notes.txt")


def test_missing_predictor_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="predictor_card.json"):
        load_predictor(tmp_path / "nowhere")


def test_missing_shipped_predictor_names_the_asset(tmp_path, monkeypatch):
    monkeypatch.setattr(predictor_lib, "ASSETS_DIR", tmp_path / "assets")
    with pytest.raises(FileNotFoundError, match="assets.*train_predictor"):
        load_predictor()
    with pytest.raises(FileNotFoundError):
        PredictorPolicy()


def test_missing_weights_names_the_file(tmp_path):
    save_predictor(_tiny_predictor(), tmp_path)
    (tmp_path / "predictor.weights.h5").unlink()
    with pytest.raises(FileNotFoundError, match="predictor.weights.h5"):
        load_predictor(tmp_path)


def test_truncated_weights_name_the_file(tmp_path):
    weights_file, _ = save_predictor(_tiny_predictor(), tmp_path)
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="predictor.weights.h5"):
        load_predictor(tmp_path)


def test_truncated_card_names_the_file(tmp_path):
    _, card_file = save_predictor(_tiny_predictor(), tmp_path)
    card_file.write_text(card_file.read_text()[:20])
    with pytest.raises(ValueError, match="predictor_card.json.*not valid JSON"):
        load_predictor(tmp_path)


def _edit_card(card_file, **changes):
    card = json.loads(card_file.read_text())
    card.update(changes)
    card_file.write_text(json.dumps(card))


def test_other_format_version_is_refused(tmp_path):
    _, card_file = save_predictor(_tiny_predictor(), tmp_path)
    _edit_card(card_file, format_version=99)
    with pytest.raises(ValueError, match="card.json.*format_version 99"):
        load_predictor(tmp_path)


def test_other_normalization_is_refused(tmp_path):
    _, card_file = save_predictor(_tiny_predictor(), tmp_path)
    _edit_card(card_file, normalization="raw")
    with pytest.raises(ValueError, match="predictor_card.json.*'raw'"):
        load_predictor(tmp_path)


def test_config_not_matching_the_weights_is_refused(tmp_path):
    _, card_file = save_predictor(_tiny_predictor(), tmp_path)
    _edit_card(card_file, config={**TINY, "hidden_units": 16})
    with pytest.raises(ValueError, match="predictor.weights.h5"):
        load_predictor(tmp_path)


def test_unknown_config_key_is_refused(tmp_path):
    _, card_file = save_predictor(_tiny_predictor(), tmp_path)
    _edit_card(card_file, config={**TINY, "dropout": 0.1, "heads": 2})
    with pytest.raises(ValueError, match="predictor_card.json.*config"):
        load_predictor(tmp_path)


def test_card_without_use_progress_loads_as_without_progress(tmp_path):
    # Cards written before `use_progress` existed (the shipped one of
    # format 2 among them) mean a predictor without the progress input.
    _, card_file = save_predictor(_tiny_predictor(), tmp_path)
    card = json.loads(card_file.read_text())
    del card["config"]["use_progress"]
    card_file.write_text(json.dumps(card))
    loaded = load_predictor(tmp_path)
    assert loaded.use_progress is False and loaded.num_features == 5


# -------------------------------------------------------- progress input
def test_progress_is_appended_as_the_last_feature():
    window = np.random.default_rng(3).normal(size=(3, 4, 8))
    plain = predictor_inputs(window, [0, 1, 2], 4)
    with_it = predictor_inputs(window, [0, 1, 2], 4, progress=0.25)
    assert with_it["features"].shape == (3, predictor_lib.NUM_FEATURES + 1)
    np.testing.assert_array_equal(with_it["features"][:, :-1], plain["features"])
    np.testing.assert_array_equal(with_it["features"][:, -1], [0.25] * 3)
    np.testing.assert_array_equal(with_it["window"], plain["window"])
    per_unit = predictor_lib.with_progress(plain["features"], [0.1, 0.5, 1.0])
    np.testing.assert_allclose(per_unit[:, -1], [0.1, 0.5, 1.0])
    for bad in (-0.1, 1.5, np.nan):
        with pytest.raises(ValueError, match="progress"):
            predictor_inputs(window, [0, 1, 2], 4, progress=bad)


def test_progress_predictor_reads_six_features_and_round_trips(tmp_path):
    predictor = FreezePredictor(**TINY, use_progress=True)
    assert predictor.num_features == predictor_lib.NUM_FEATURES + 1
    window = np.random.default_rng(4).normal(size=(2, 4, 8))
    inputs = predictor_inputs(window, [0, 1], 3, progress=0.5)
    assert predictor(inputs).shape == (2, 1)
    with pytest.raises(ValueError, match="reads 6 features.*received 5"):
        predictor(predictor_inputs(window, [0, 1], 3))
    with pytest.raises(ValueError, match="reads 5 features.*received 6"):
        _tiny_predictor()(inputs)
    with pytest.raises(ValueError, match="use_progress='yes'"):
        FreezePredictor(**TINY, use_progress="yes")
    assert predictor.get_config()["use_progress"] is True
    save_predictor(predictor, tmp_path)
    loaded = load_predictor(tmp_path)
    assert loaded.use_progress is True
    assert loaded.card["config"]["use_progress"] is True
    np.testing.assert_allclose(loaded(inputs), predictor(inputs), rtol=1e-6)


def _progress_only_predictor():
    """Scores sigmoid(8 * progress - 4): only the progress input counts."""
    predictor = FreezePredictor(**TINY, use_progress=True)
    head = predictor.classifier.layers[-1]
    head.kernel.assign(np.zeros(head.kernel.shape, "float32"))
    head.bias.assign(np.zeros(head.bias.shape, "float32"))
    kernel = np.zeros(predictor.feature_logit.kernel.shape, "float32")
    kernel[-1, 0] = 8.0
    predictor.feature_logit.kernel.assign(kernel)
    predictor.feature_logit.bias.assign(np.array([-4.0], "float32"))
    return predictor


def test_policy_passes_the_stage_progress_to_a_progress_predictor():
    policy = PredictorPolicy(_progress_only_predictor())
    window = np.random.default_rng(5).normal(size=(3, 4, 8))
    early, early_freeze = policy.decide(_stage(window, epoch=1))  # 0.2
    late, late_freeze = policy.decide(_stage(window, epoch=8))  # 0.9
    np.testing.assert_allclose(early, 1 / (1 + np.exp(-(8 * 0.2 - 4))),
                               rtol=1e-5)
    np.testing.assert_allclose(late, 1 / (1 + np.exp(-(8 * 0.9 - 4))),
                               rtol=1e-5)
    assert not early_freeze.any() and late_freeze.all()


# ---------------------------------------------------------------- policy
def test_policy_freezes_at_or_above_threshold():
    window = np.random.default_rng(7).normal(size=(3, 4, 8))
    sure = PredictorPolicy(_tiny_predictor(bias=10.0))
    scores, freeze = sure.decide(_stage(window))
    assert scores.shape == (3,) and np.all(scores > 0.99)
    assert freeze.tolist() == [True, True, True]
    unsure = PredictorPolicy(_tiny_predictor(bias=-10.0))
    scores, freeze = unsure.decide(_stage(window))
    assert np.all(scores < 0.01) and not freeze.any()


def test_policy_scores_are_the_predictor_on_normalised_windows():
    predictor = _tiny_predictor()
    window = np.random.default_rng(8).normal(size=(3, 4, 8))
    scores, freeze = PredictorPolicy(predictor, freeze_threshold=0.5).decide(
        _stage(window)
    )
    expected = keras.ops.convert_to_numpy(
        predictor(predictor_inputs(window, [0, 1, 2], 4))
    ).reshape(-1)
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    np.testing.assert_array_equal(freeze, expected >= 0.5)


class CountingPredictor(FreezePredictor):
    """Counts the Python runs of its `call`: one per eager call, one per
    trace when it runs inside a `tf.function`."""

    calls = 0

    def call(self, inputs, training=None):
        CountingPredictor.calls += 1
        return super().call(inputs, training=training)


def test_policy_predicts_all_units_in_one_call():
    policy = PredictorPolicy(CountingPredictor(**TINY))
    batches = []
    predict = policy._predict
    policy._predict = lambda inputs: (
        batches.append(len(inputs["window"])) or predict(inputs)
    )
    CountingPredictor.calls = 0
    policy.decide(_stage(np.random.rand(5, 4, 8)))
    assert batches == [5] and CountingPredictor.calls == 1


def _model_scores(predictor, stage, progress=None):
    return keras.ops.convert_to_numpy(
        predictor(
            predictor_inputs(stage.window, stage.positions(),
                             stage.num_units, progress),
            training=False,
        )
    ).reshape(-1)


@pytest.mark.parametrize("use_progress", [False, True])
def test_policy_numpy_call_matches_the_model_without_calling_it(
    use_progress, monkeypatch
):
    predictor = FreezePredictor(**TINY, use_progress=use_progress)
    rng = np.random.default_rng(10)
    # Non-zero biases everywhere, so a bias left out would show.
    for weight in predictor.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    policy = PredictorPolicy(predictor)
    calls = []
    keras_call = FreezePredictor.call
    monkeypatch.setattr(
        FreezePredictor, "call",
        lambda self, *a, **k: calls.append(1) or keras_call(self, *a, **k),
    )
    for units in (5, 1, 17):
        stage = _stage(rng.normal(size=(units, 4, 8)), epoch=units % 10)
        scores, _ = policy.decide(stage)
        assert not calls  # worked in NumPy: the Keras model never ran
        expected = _model_scores(
            predictor, stage,
            min(1.0, stage.progress) if use_progress else None,
        )
        calls.clear()
        assert scores.shape == (units,) and scores.dtype == np.float32
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
        assert len(np.unique(np.round(scores, 4))) > 1 or units == 1


def test_numpy_call_sorts_unsorted_windows_as_the_model_does():
    predictor = FreezePredictor(**TINY)
    rng = np.random.default_rng(13)
    for weight in predictor.weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32"))
    inputs = {
        "window": rng.normal(size=(6, 4, 8)).astype("float32"),
        "features": rng.normal(size=(6, predictor.num_features)).astype(
            "float32"
        ),
    }
    np.testing.assert_allclose(
        predictor._numpy_call(inputs),
        keras.ops.convert_to_numpy(predictor(inputs, training=False)),
        rtol=0, atol=1e-6,
    )
    with pytest.raises(ValueError, match="reads 5 features"):
        predictor._numpy_call(
            {"window": inputs["window"], "features": np.zeros((6, 6))}
        )


def test_policy_calls_a_predictor_it_cannot_mirror():
    # A subclass with its own `call`, a layer activation the NumPy path
    # does not know, and a quantized layer: all are run as Keras models.
    counting = CountingPredictor(**TINY)
    other = FreezePredictor(**TINY)
    other.classifier.layers[1].activation = keras.activations.tanh
    quantized = FreezePredictor(**TINY)
    quantized.key_encoder.layers[0].quantize("int8")
    window = np.random.default_rng(14).normal(size=(3, 4, 8))
    for predictor in (counting, other, quantized):
        assert predictor._numpy_call(
            predictor_inputs(window, [0, 1, 2], 4)
        ) is None
        CountingPredictor.calls = 0
        scores, _ = PredictorPolicy(predictor).decide(_stage(window))
        assert CountingPredictor.calls == (predictor is counting)
        np.testing.assert_allclose(
            scores, _model_scores(predictor, _stage(window)), rtol=0,
            atol=1e-6,
        )


def test_policy_reads_the_current_weights():
    predictor = _tiny_predictor(bias=-10.0)
    policy = PredictorPolicy(predictor)
    window = np.random.default_rng(11).normal(size=(3, 4, 8))
    assert np.all(policy.decide(_stage(window))[0] < 0.01)
    head = predictor.classifier.layers[-1]
    head.bias.assign(np.full(head.bias.shape, 10.0, "float32"))
    assert np.all(policy.decide(_stage(window))[0] > 0.99)
    keras.backend.clear_session()  # what a new `fit` may follow
    assert np.all(policy.decide(_stage(window))[0] > 0.99)
    policy.predictor = _tiny_predictor(bias=-10.0)
    assert np.all(policy.decide(_stage(window))[0] < 0.01)


@pytest.mark.parametrize(
    "duplicate",
    [copy.deepcopy, copy.copy, lambda p: pickle.loads(pickle.dumps(p))],
    ids=["deepcopy", "copy", "pickle"],
)
def test_policy_copies_after_a_decision(duplicate):
    policy = PredictorPolicy(_tiny_predictor())
    window = np.random.default_rng(12).normal(size=(3, 4, 8))
    scores = policy.decide(_stage(window))[0]
    twin = duplicate(policy)
    assert twin.freeze_threshold == policy.freeze_threshold
    np.testing.assert_allclose(twin.decide(_stage(window))[0], scores,
                               rtol=0, atol=1e-6)


def test_policy_waits_for_a_full_window():
    policy = PredictorPolicy(_tiny_predictor(bias=10.0))
    scores, freeze = policy.decide(_stage(np.random.rand(2, 3, 8)))
    assert not freeze.any() and np.all(scores == 0.0)


def test_policy_never_freezes_non_finite_units():
    window = np.random.default_rng(9).normal(size=(2, 4, 8))
    window[1, 2, 3] = np.nan
    policy = PredictorPolicy(_tiny_predictor(bias=10.0), freeze_threshold=0.0)
    scores, freeze = policy.decide(_stage(window))
    assert freeze.tolist() == [True, False]
    assert scores[1] == 0.0 and np.all(np.isfinite(scores))


def test_policy_rejects_mismatched_windows():
    policy = PredictorPolicy(_tiny_predictor())
    with pytest.raises(ValueError, match="8 sampled weights.*holds 16"):
        policy.decide(_stage(np.random.rand(2, 4, 16)))
    with pytest.raises(ValueError, match="windows of 4 snapshots.*received 6"):
        policy.decide(_stage(np.random.rand(2, 6, 8)))


def test_policy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="freeze_threshold"):
        PredictorPolicy(_tiny_predictor(), freeze_threshold=1.5)
    with pytest.raises(ValueError, match="predictor"):
        PredictorPolicy(predictor=42)


def test_policy_serializes_by_path(tmp_path):
    predictor = _tiny_predictor()
    save_predictor(predictor, tmp_path)
    policy = PredictorPolicy(str(tmp_path), freeze_threshold=0.3)
    config = keras.saving.serialize_keras_object(policy)
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, PredictorPolicy)
    assert restored.freeze_threshold == 0.3
    window = np.random.rand(2, 4, 8)
    np.testing.assert_allclose(
        restored.decide(_stage(window))[0], policy.decide(_stage(window))[0]
    )


def test_policy_with_shipped_predictor_serializes_as_none(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(predictor_lib, "ASSETS_DIR", tmp_path)
    save_predictor(_tiny_predictor(), tmp_path)
    assert PredictorPolicy().get_config() == {
        "predictor": None,
        "freeze_threshold": 0.5,
    }


def test_policy_with_in_memory_predictor_refuses_to_serialize():
    with pytest.raises(ValueError, match="save_predictor"):
        PredictorPolicy(_tiny_predictor()).get_config()


def test_policy_drives_the_freezing_callback():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    callback = FreezingCallback(
        PredictorPolicy(_tiny_predictor(bias=10.0)),
        window_size=4,
        sample_size=8,
        min_epochs=1,
    )
    x, y = np.random.rand(64, 6), np.random.rand(64, 1)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[callback], verbose=0)
    assert callback.frozen_units == [model.layers[0].path, model.layers[1].path]
    assert model.layers[2].trainable
