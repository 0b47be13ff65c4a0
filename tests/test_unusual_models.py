"""Freezing during `fit` on unusual models and `fit` calls."""

import keras
import numpy as np
import pytest

import keras_smartfrz
from conftest import mlp
from conftest import toy_data


class Snapshots(keras.callbacks.Callback):
    """Every trained variable at each epoch end (listed after the freezer)."""

    def on_train_begin(self, logs=None):
        self.trained = [v for v in self.model.trainable_weights]
        self.epochs = {}

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[epoch] = [keras.ops.convert_to_numpy(v).copy()
                              for v in self.trained]


def check_freezing(model, x, y, epochs=3, **fit_kwargs):
    """Fits with a linear schedule; frozen weights stay put, the head trains."""
    freezer = keras_smartfrz.LinearFreezing(freeze_start=0.0,
                                            freeze_level=0.7)
    snaps = Snapshots()
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0,
              callbacks=[freezer, snaps], **fit_kwargs)
    assert freezer.frozen_units, f"nothing froze: {freezer.decisions}"
    frozen_at = {d.layer: d.epoch for d in freezer.decisions if d.frozen}
    last = max(snaps.epochs)
    for unit in freezer.units:
        variables = {id(v) for l in unit.layers for v in l.weights}
        for i, v in enumerate(snaps.trained):
            if id(v) not in variables:
                continue
            if unit.name in frozen_at:
                np.testing.assert_array_equal(
                    snaps.epochs[frozen_at[unit.name]][i],
                    snaps.epochs[last][i])
    head = freezer.units[-1]
    assert head.name not in freezer.frozen_units
    return freezer


def test_nested_model_freezes_inner_layers():
    inner = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="relu", name="a"),
        keras.layers.Dense(8, activation="relu", name="b"),
    ], name="inner")
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(2, name="head")(
        keras.layers.Dense(8, name="c")(inner(inputs)))
    model = keras.Model(inputs, outputs, name="outer")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    freezer = check_freezing(model, *toy_data(64))
    assert freezer.frozen_units[0].endswith("a")


def test_shared_layer_is_one_unit_and_freezes_once():
    shared = keras.layers.Dense(6, activation="tanh", name="shared")
    inputs = keras.Input((6,))
    hidden = shared(shared(inputs))
    hidden = keras.layers.Dense(8, name="mid")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    freezer = check_freezing(model, *toy_data(64))
    names = [u.name for u in freezer.units]
    assert len(names) == len(set(names)) == 3
    assert not shared.trainable


class ListsAndDicts(keras.Model):
    def __init__(self):
        super().__init__(name="lists_and_dicts")
        self.blocks = [keras.layers.Dense(8, activation="relu")
                       for _ in range(2)]
        self.extra = {"mid": keras.layers.Dense(8, activation="relu")}
        self.head = keras.layers.Dense(2)

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.extra["mid"](x))


def test_unbuilt_subclassed_model_with_layers_in_lists_and_dicts():
    model = ListsAndDicts()  # not built: fit builds it before any callback
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    freezer = check_freezing(model, *toy_data(64))
    assert len(freezer.units) == 4
    assert not model.blocks[0].trainable and model.head.trainable


def test_embedding_model():
    inputs = keras.Input((5,), dtype="int32")
    hidden = keras.layers.Embedding(20, 8, name="embed")(inputs)
    hidden = keras.layers.GlobalAveragePooling1D()(hidden)  # no weights
    hidden = keras.layers.Dense(8, activation="relu", name="dense")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=(64, 5)).astype("int32")
    y = (x[:, 0] > 9).astype("int32")
    freezer = check_freezing(model, x, y)
    assert [u.name.split("/")[-1] for u in freezer.units] == [
        "embed", "dense", "head"]
    assert freezer.frozen_units[0].endswith("embed")


def test_layers_frozen_by_the_user_stay_frozen_and_are_not_units():
    model = mlp()
    model.get_layer("d1").trainable = False
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    before = [keras.ops.convert_to_numpy(v)
              for v in model.get_layer("d1").weights]
    freezer = check_freezing(model, *toy_data(64))
    assert "mlp/d1" not in [u.name for u in freezer.units]
    assert not model.get_layer("d1").trainable
    for a, v in zip(before, model.get_layer("d1").weights):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(v))


def test_a_model_whose_head_is_its_only_unit_trains_and_warns():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    freezer = keras_smartfrz.LinearFreezing(freeze_start=0.0)
    with pytest.warns(UserWarning, match="never freezes"):
        model.fit(*toy_data(32), epochs=2, verbose=0, callbacks=[freezer])
    assert freezer.frozen_units == [] and model.layers[0].trainable


def test_initial_epoch_with_validation_then_without_and_a_second_fit():
    model = mlp()
    x, y = toy_data(64)
    freezer = keras_smartfrz.LinearFreezing(freeze_start=0.0)
    history = model.fit(x, y, epochs=4, initial_epoch=2, verbose=0,
                        validation_data=toy_data(32, seed=1),
                        callbacks=[freezer])
    assert len(history.history["val_loss"]) == 2
    # Epoch 2 of 4 ends at progress 3/4: floor(0.75 * 3) = 2 units.
    assert [d.epoch for d in freezer.decisions if d.frozen] == [2, 2, 3]
    assert freezer.frozen_units == ["mlp/d0", "mlp/d1", "mlp/d2"]
    # Called again: the frozen layers stay frozen; only the head is left.
    with pytest.warns(UserWarning, match="1 trainable unit"):
        model.fit(x, y, epochs=1, verbose=0, validation_split=0.25,
                  callbacks=[freezer])
    assert [v.path for v in model.trainable_weights] == [
        "mlp/head/kernel", "mlp/head/bias"]
