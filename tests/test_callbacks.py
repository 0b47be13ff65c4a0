import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_smartfrz
from keras_smartfrz import FreezingCallback
from keras_smartfrz.policies import FreezePolicy
from conftest import mlp
from conftest import toy_data


class ScriptedPolicy(FreezePolicy):
    """Proposes the candidates named in `plan[epoch]`; records its stages."""

    def __init__(self, plan, needs_history=True):
        self.plan = plan
        self.needs_history = needs_history
        self.stages = []

    def reset(self):
        self.stages = []

    def decide(self, stage):
        self.stages.append(stage)
        wanted = self.plan.get(stage.epoch, ())
        freeze = np.array([any(n.endswith("/" + w) for w in wanted)
                           for n in stage.unit_names])
        return freeze.astype(np.float32) * 0.9, freeze


class WeightRecorder(keras.callbacks.Callback):
    """Every layer's weights at each epoch end (runs after the freezer)."""

    def on_train_begin(self, logs=None):
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({
            l.name: [keras.ops.convert_to_numpy(v).copy() for v in l.weights]
            for l in self.model.layers})


def fit(model, callbacks, epochs=4, n=128, batch_size=16, **kwargs):
    x, y = toy_data(n)
    return model.fit(x, y, batch_size=batch_size, epochs=epochs,
                     callbacks=callbacks, verbose=0, **kwargs)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_frozen_units_stay_bit_identical_while_others_train(jit_compile):
    model = mlp(batchnorm=True, jit_compile=jit_compile)
    freezer = FreezingCallback(ScriptedPolicy({0: ["d0"], 1: ["d1"]}),
                               window_size=4)
    recorder = WeightRecorder()
    history = fit(model, [freezer, recorder], epochs=4)
    assert freezer.frozen_units == ["mlp/d0", "mlp/d1"]
    assert freezer.frozen_layers == ["mlp/d0", "mlp/bn0", "mlp/d1", "mlp/bn1"]
    weights = recorder.epochs
    for name, since in (("d0", 0), ("bn0", 0), ("d1", 1), ("bn1", 1)):
        for later in weights[since + 1:]:
            # kernel, bias / gamma, beta; BN's moving statistics are not
            # trained weights and, with frozen_batchnorm="batch_statistics",
            # keep tracking the batches.
            for a, b in list(zip(weights[since][name], later[name]))[:2]:
                np.testing.assert_array_equal(a, b)
    assert not np.array_equal(weights[0]["bn0"][2], weights[3]["bn0"][2])
    for name in ("d2", "head"):
        assert not np.array_equal(weights[1][name][0], weights[3][name][0])
    assert history.history["frozen_fraction"] == [0.25, 0.5, 0.5, 0.5]
    assert "accuracy" in history.history and "loss" in history.history
    assert int(model.optimizer.iterations) == 4 * 8


def test_prefix_mode_waits_for_the_front_and_any_mode_does_not():
    plan = {0: ["d1"], 1: ["d0", "d2"]}
    prefix = FreezingCallback(ScriptedPolicy(plan), window_size=4)
    fit(mlp(), [prefix], epochs=2)
    assert prefix.frozen_units == ["mlp/d0"]  # d1 waits for d0, d2 for d1
    anywhere = FreezingCallback(ScriptedPolicy(plan), mode="any", window_size=4)
    fit(mlp(), [anywhere], epochs=2)
    assert anywhere.frozen_units == ["mlp/d1", "mlp/d0", "mlp/d2"]


def test_head_is_never_offered_or_frozen():
    policy = ScriptedPolicy({e: ["d0", "d1", "d2", "head"] for e in range(3)})
    freezer = FreezingCallback(policy, mode="any", window_size=4)
    model = mlp()
    fit(model, [freezer], epochs=3)
    assert all("mlp/head" not in s.unit_names for s in policy.stages)
    assert model.get_layer("head").trainable
    assert "mlp/head" not in freezer.frozen_layers


def test_min_epochs_and_freeze_every_set_the_stages():
    policy = ScriptedPolicy({})
    fit(mlp(), [FreezingCallback(policy, min_epochs=2, freeze_every=2,
                                 window_size=4)], epochs=6)
    assert [s.epoch for s in policy.stages] == [1, 3, 5]


def test_auto_min_epochs_is_a_share_of_the_planned_epochs():
    from keras_smartfrz.freezing_callback import auto_min_epochs

    assert [auto_min_epochs(e) for e in (None, 1, 3, 4, 6, 10, 20)] == [
        1, 1, 1, 2, 2, 3, 6]
    policy = ScriptedPolicy({})
    callback = FreezingCallback(policy, min_epochs="auto", window_size=4)
    fit(mlp(), [callback], epochs=7)  # ceil(0.3 * 7) = 3
    assert [s.epoch for s in policy.stages] == [2, 3, 4, 5, 6]
    assert callback.get_config()["min_epochs"] == "auto"


class WindowPolicy(FreezePolicy):
    """Freezes nothing; keeps a copy of every window it is given."""

    def __init__(self):
        self.windows = []

    def reset(self):
        self.windows = []

    def decide(self, stage):
        self.windows.append((stage.epoch, np.array(stage.window)))
        count = len(stage.unit_names)
        return np.zeros(count, np.float32), np.zeros(count, bool)


@pytest.mark.parametrize("steps, window_size", [(8, 4), (3, 4)])
def test_epochs_that_feed_no_window_are_not_sampled(monkeypatch, steps,
                                                    window_size):
    """Warm-up epochs and the epochs after the last stage are not sampled,
    and the stages see the very windows they would with every epoch
    sampled (8 steps/epoch: one epoch fills a window; 3: two do)."""
    def run(skip):
        if not skip:
            monkeypatch.setattr(FreezingCallback, "_epoch_feeds_stage",
                                lambda self, epoch: True)
        policy = WindowPolicy()
        callback = FreezingCallback(policy, min_epochs=4, freeze_every=2,
                                    window_size=window_size, sample_size=8)
        counts = []

        class Count(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                counts.append(callback._history._count)

        keras.utils.set_random_seed(0)
        fit(mlp(), [callback, Count()], epochs=7, n=16 * steps,
            shuffle=False)
        monkeypatch.undo()
        return policy.windows, counts

    skipped, skipped_counts = run(True)
    every, every_counts = run(False)
    assert every_counts[-1] > skipped_counts[-1]
    # Stages at epochs 4 and 6 (1-based); epoch 7 ends no stage.
    assert [e for e, _ in skipped] == [e for e, _ in every] == [3, 5]
    for (_, a), (_, b) in zip(skipped, every):
        np.testing.assert_array_equal(a, b)
    if steps == 8:
        # A stage every 2 epochs, 4 snapshots a stage: 2 per epoch in the
        # epochs of the stages' windows, 3-4 and 5-6; none in the warm-up
        # or after the last stage.
        assert np.diff([0] + skipped_counts).tolist() == [
            0, 0, 2, 2, 2, 2, 0]


def test_policy_sees_a_full_window_of_the_candidates():
    policy = ScriptedPolicy({})
    fit(mlp(), [FreezingCallback(policy, window_size=4, sample_size=8)],
        epochs=2)
    window = policy.stages[0].window
    assert window.shape == (3, 4, 8)
    assert not np.array_equal(window[:, 0], window[:, -1])  # it moved


def test_sampling_cadence_and_one_rebuild_per_stage(monkeypatch):
    model = mlp()
    rebuilds = []
    original = model.make_train_function
    monkeypatch.setattr(model, "make_train_function",
                        lambda force=False: (rebuilds.append(force),
                                             original(force))[1])
    policy = ScriptedPolicy({0: ["d0", "d1"]})
    freezer = FreezingCallback(policy, window_size=4)
    snapshots = []

    class Count(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append(freezer._history._count)

    fit(model, [freezer, Count()], epochs=2)  # 8 steps/epoch, 4 snapshots
    assert snapshots == [4, 8]
    assert rebuilds.count(True) == 1  # two units frozen, one rebuild


def test_unknown_steps_per_epoch_still_samples_and_decides():
    x, y = toy_data(128)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).filter(
        lambda a, b: True).batch(16)  # filter hides the cardinality
    assert dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY
    policy = ScriptedPolicy({1: ["d0"]})
    freezer = FreezingCallback(policy, window_size=4)
    model = mlp()
    model.fit(dataset, epochs=3, callbacks=[freezer], verbose=0)
    assert [s.window.shape[1] for s in policy.stages] == [4, 4, 4]
    assert freezer.frozen_units == ["mlp/d0"]
    assert freezer._cadence.interval == 2


def test_steps_per_execution_and_infinite_dataset():
    x, y = toy_data(64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(16)
    model = mlp()
    model.compile(optimizer="adam", loss=model.loss, steps_per_execution=3)
    policy = ScriptedPolicy({1: ["d0"]})
    freezer = FreezingCallback(policy, window_size=3)
    model.fit(dataset, epochs=2, steps_per_epoch=9, callbacks=[freezer],
              verbose=0)
    assert policy.stages[0].window.shape[1] == 3
    assert freezer.frozen_units == ["mlp/d0"]


def test_decisions_record_every_candidate_verdict():
    freezer = FreezingCallback(ScriptedPolicy({1: ["d0"]}), window_size=4)
    fit(mlp(), [freezer], epochs=2)
    assert [(d.epoch, d.layer, d.frozen) for d in freezer.decisions] == [
        (0, "mlp/d0", False), (0, "mlp/d1", False), (0, "mlp/d2", False),
        (1, "mlp/d0", True), (1, "mlp/d1", False), (1, "mlp/d2", False)]
    assert freezer.decisions[3].score == pytest.approx(0.9)


def test_one_instance_serves_two_fits():
    freezer = keras_smartfrz.LinearFreezing(freeze_start=0.0)
    fit(mlp(name="first"), [freezer], epochs=4)
    first = list(freezer.frozen_layers)
    fit(mlp(name="second"), [freezer], epochs=4)
    assert first and all(p.startswith("first/") for p in first)
    assert freezer.frozen_layers == [p.replace("first", "second") for p in first]


def test_model_with_nothing_to_freeze_warns_and_trains():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    freezer = keras_smartfrz.AutoFreeze(window_size=4)
    x, y = toy_data(32)
    with pytest.warns(UserWarning, match="nothing will be frozen"):
        history = model.fit(x, np.eye(2)[y], epochs=2, callbacks=[freezer],
                            verbose=0)
    assert freezer.frozen_layers == []
    assert history.history["frozen_fraction"] == [0.0, 0.0]


def test_nan_weights_block_that_unit_only():
    class Poison(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            kernel = self.model.get_layer("d1").kernel
            kernel.assign(kernel * np.nan)

    freezer = FreezingCallback(ScriptedPolicy({0: ["d0", "d1", "d2"]}),
                               mode="any", window_size=4)
    with pytest.warns(UserWarning, match="mlp/d1.*NaN or inf"):
        fit(mlp(), [Poison(), freezer], epochs=2)
    assert freezer.frozen_units == ["mlp/d0", "mlp/d2"]


def test_nan_weights_of_a_unit_not_proposed_are_not_read(monkeypatch):
    # Only the units a stage proposes are checked for NaN: a poisoned unit
    # that no stage proposes raises no warning and trains on, and a stage
    # that proposes nothing reads no weights at all.
    class Poison(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            kernel = self.model.get_layer("d1").kernel
            kernel.assign(kernel * np.nan)

    checked = []
    isfinite = keras.ops.isfinite

    def counting_isfinite(x):
        checked.append(tuple(x.shape))
        return isfinite(x)

    monkeypatch.setattr(keras.ops, "isfinite", counting_isfinite)
    freezer = FreezingCallback(ScriptedPolicy({0: ["d0"]}), mode="any",
                               window_size=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*NaN or inf.*")
        fit(mlp(), [Poison(), freezer], epochs=3)
    assert freezer.frozen_units == ["mlp/d0"]
    d0 = freezer.model.get_layer("d0")
    assert checked == [tuple(v.shape) for v in d0.weights]


def test_verbose_prints_the_freeze(capsys):
    freezer = FreezingCallback(ScriptedPolicy({0: ["d0"]}), window_size=4,
                               verbose=1)
    fit(mlp(), [freezer], epochs=1)
    assert "Epoch 1: FreezingCallback froze mlp/d0 (1/4 units frozen)." in (
        capsys.readouterr().out)


def test_linear_freezing_follows_its_schedule():
    freezer = keras_smartfrz.LinearFreezing(freeze_start=0.25)
    history = fit(mlp(), [freezer], epochs=4)
    # 3 non-head units; progress 0.25, 0.5, 0.75, 1.0 -> 0, 1, 2, 3 frozen
    assert history.history["frozen_fraction"] == [0.0, 0.25, 0.5, 0.75]
    assert freezer._sampler is None  # a schedule needs no samples


def test_autofreeze_freezes_a_converged_front_and_keeps_the_rest():
    keras.utils.set_random_seed(1)
    model = mlp(hidden=(16, 16, 16))
    model.optimizer.learning_rate = 1e-3
    freezer = keras_smartfrz.AutoFreeze(window_size=8)
    fit(model, [freezer], epochs=5)
    assert freezer.frozen_units, "AutoFreeze froze nothing"
    assert freezer.frozen_units == [u.name for u in freezer.units][
        :len(freezer.frozen_units)]  # a prefix
    assert "mlp/head" not in freezer.frozen_units
    first = min(d.epoch for d in freezer.decisions if d.frozen)
    assert first >= 1  # the first stage only measures


@pytest.mark.parametrize("cls", [keras_smartfrz.LinearFreezing,
                                 keras_smartfrz.AutoFreeze])
def test_callbacks_serialize_round_trip(cls):
    callback = cls(mode="any", min_epochs=3, verbose=1)
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(callback))
    assert type(restored) is cls
    assert restored.get_config() == callback.get_config()


def test_base_callback_serializes_its_policy():
    callback = FreezingCallback(keras_smartfrz.policies.AutoFreezePolicy(30))
    restored = FreezingCallback.from_config(callback.get_config())
    assert restored.policy.percentile == 30


@pytest.mark.parametrize("kwargs, shown", [
    ({"mode": "middle"}, "'middle'"),
    ({"min_epochs": -1}, "-1"),
    ({"min_epochs": "later"}, "'later'"),
    ({"min_epochs": 1.5}, "1.5"),
    ({"freeze_every": 0}, "0"),
    ({"freeze_every": 1.5}, "1.5"),
    ({"window_size": 1}, "1"),
    ({"sample_size": "big"}, "'big'"),
    ({"seed": -3}, "-3"),
    ({"frozen_batchnorm": "off"}, "'off'"),
    ({"verbose": 3}, "3"),
])
def test_invalid_arguments_name_the_value(kwargs, shown):
    with pytest.raises(ValueError, match=shown):
        keras_smartfrz.AutoFreeze(**kwargs)


def test_policy_must_be_a_freeze_policy():
    with pytest.raises(ValueError, match="'greedy'"):
        FreezingCallback("greedy")


def test_overhead_seconds_are_measured_and_reset():
    policy = ScriptedPolicy({0: ["d0"]})
    callback = FreezingCallback(policy, window_size=4, sample_size=8)
    fit(mlp(), [callback], epochs=2)
    overhead = callback.overhead_seconds
    assert set(overhead) == {"sampling", "decision", "freezing", "caching"}
    assert overhead["sampling"] > 0.0 and overhead["decision"] > 0.0
    assert 0.0 < overhead["freezing"] <= overhead["decision"]
    assert overhead["caching"] == 0.0  # caching is off by default
    callback.on_train_begin()
    assert all(v == 0.0 for v in callback.overhead_seconds.values())


def test_stage_gives_each_candidate_its_position():
    policy = ScriptedPolicy({0: ["d0"]})
    callback = FreezingCallback(policy, window_size=4, sample_size=8)
    fit(mlp(), [callback], epochs=2)
    first, second = policy.stages
    assert first.unit_indices.tolist() == [0, 1, 2]
    assert second.unit_indices.tolist() == [1, 2]
    assert second.num_units == 4


def test_sampler_kept_until_half_its_units_are_frozen(monkeypatch):
    import keras_smartfrz.freezing_callback as engine

    built = []
    original = engine.WeightSampler

    def counting(*args, **kwargs):
        built.append(len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "WeightSampler", counting)
    policy = ScriptedPolicy({0: ["d0"], 1: ["d1"], 2: ["d2"]})
    freezer = FreezingCallback(policy, window_size=4, sample_size=8)
    fit(mlp(hidden=(16, 16, 16, 16, 16)), [freezer], epochs=2)
    # One gather over all 6 units; after two freezes it still reads the
    # frozen units (4 of 6 active, their rows dropped).
    assert built == [6]
    assert freezer._sample_rows.tolist() == [2, 3, 4, 5]
    window = freezer._history.window()
    assert window.shape == (4, 4, 8)
    np.testing.assert_array_equal(
        window[:, -1], freezer._sampler()[[2, 3, 4, 5]])
    # Once it reads at least twice the active units, a gather of the
    # active ones replaces it, and the history goes on from the same
    # sampled positions.
    built.clear()
    fit(mlp(hidden=(16, 16, 16, 16, 16)), [freezer], epochs=3)
    assert built == [6, 3]  # 3 of 6 units active after the second stage
    assert freezer._sample_rows.tolist() == [0, 1, 2]
    assert [u.name for u in freezer._sampler.units] == [
        "mlp/d3", "mlp/d4", "mlp/head"]
    window = freezer._history.window()
    assert window.shape == (3, 4, 8)
    np.testing.assert_array_equal(window[:, -1], freezer._sampler())
