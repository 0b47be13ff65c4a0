import gc
import re
import warnings
import weakref

import keras
import numpy as np
import pytest

import keras_smartfrz
from keras_smartfrz import freeze_layers
from keras_smartfrz import release_optimizer_state
from conftest import toy_data


def mlp(optimizer=None, jit_compile=False, batchnorm=False):
    """Dense(16) x3 (+BN) and a 2-class head, compiled with `optimizer`."""
    layers = [keras.Input((6,))]
    for i in range(3):
        layers.append(keras.layers.Dense(16, activation="relu", name=f"d{i}"))
        if batchnorm:
            layers.append(keras.layers.BatchNormalization(name=f"bn{i}"))
    layers.append(keras.layers.Dense(2, name="head"))
    model = keras.Sequential(layers, name="mlp")
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def numpy(variables):
    return [keras.ops.convert_to_numpy(v).copy() for v in variables]


def frozen_weights(model, names):
    return [v for name in names for v in model.get_layer(name).weights]


class FreezeAt(keras.callbacks.Callback):
    """Freezes `names` after batch `at_batch` of epoch 0, optionally releasing
    their optimizer state, and records every weight at each later batch."""

    def __init__(self, names, at_batch, release):
        super().__init__()
        self.names, self.at_batch, self.release = names, at_batch, release
        self.trajectory, self.released, self.done = [], None, False

    def on_train_batch_end(self, batch, logs=None):
        if self.done:
            self.trajectory.append(numpy(self.model.weights))
        elif batch == self.at_batch:
            layers = freeze_layers(self.model, self.names)
            if self.release:
                self.released = release_optimizer_state(
                    self.model.optimizer,
                    [v for layer in layers for v in layer.weights],
                )
            self.done = True


def train(optimizer_fn, release, jit_compile=False, epochs=2):
    keras.utils.set_random_seed(0)
    model = mlp(optimizer_fn(), jit_compile=jit_compile)
    x, y = toy_data(96)
    callback = FreezeAt(["d0", "d1"], at_batch=2, release=release)
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[callback])
    return model, callback


OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.05),
    "sgd_momentum": lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-3, momentum=0.5,
                                                centered=True),
}


def test_release_keeps_trajectory_bit_identical_jit():
    with_release, cb_r = train(OPTIMIZERS["adam"], True, jit_compile=True)
    without, cb_n = train(OPTIMIZERS["adam"], False, jit_compile=True)
    assert cb_r.released > 0
    assert len(cb_r.trajectory) == len(cb_n.trajectory) == 3 + 6
    for a, b in zip(cb_r.trajectory, cb_n.trajectory):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_release_keeps_trajectory_bit_identical(name):
    with_release, cb_r = train(OPTIMIZERS[name], True)
    without, cb_n = train(OPTIMIZERS[name], False)
    assert len(cb_r.trajectory) == len(cb_n.trajectory) == 3 + 6
    for a, b in zip(cb_r.trajectory, cb_n.trajectory):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    # The weights that still train did move, and the remaining slots are
    # the same values in both runs.
    assert not np.array_equal(cb_r.trajectory[0][-2], cb_r.trajectory[-1][-2])
    assert int(with_release.optimizer.iterations) == 12
    assert int(without.optimizer.iterations) == 12
    opt_r, opt_n = with_release.optimizer, without.optimizer
    for v in with_release.trainable_variables:
        w = without.get_layer(v.path.split("/")[1]).weights[
            0 if v.path.endswith("kernel") else 1
        ]
        for attr, slots in vars(opt_r).items():
            if attr == "_trainable_variables" or not isinstance(slots, list):
                continue
            if len(slots) != len(opt_r._trainable_variables) or not slots:
                continue
            mine = slots[opt_r._get_variable_index(v)]
            theirs = getattr(opt_n, attr)[opt_n._get_variable_index(w)]
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(mine),
                keras.ops.convert_to_numpy(theirs),
            )


STRUCTURE_OPTIMIZERS = {
    **OPTIMIZERS,
    "adam_amsgrad_ema": lambda: keras.optimizers.Adam(
        1e-2, amsgrad=True, use_ema=True),
    "adam_accumulation": lambda: keras.optimizers.Adam(
        1e-2, gradient_accumulation_steps=2),
    "adagrad": lambda: keras.optimizers.Adagrad(1e-2),
    "nadam": lambda: keras.optimizers.Nadam(1e-2),
    "lion": lambda: keras.optimizers.Lion(1e-3),
    "adafactor": lambda: keras.optimizers.Adafactor(1e-2),
    "ftrl": lambda: keras.optimizers.Ftrl(1e-2),
    "loss_scale_adam": lambda: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(1e-2)),
    "sgd_plain": lambda: keras.optimizers.SGD(1e-2),
}


def signature(optimizer, names=True):
    # The name without its scope (Adafactor creates its placeholders in the
    # optimizer's name scope when `fit` builds it, outside it when called)
    # nor a uniquifying suffix (Nadam's `variable`, `variable_1`, ...).
    return [
        (
            re.sub(r"_[0-9]+$", "", v.path.split("/")[-1]) if names else "",
            tuple(v.shape),
            str(v.dtype),
        )
        for v in optimizer.variables
    ]


@pytest.mark.parametrize("name", sorted(STRUCTURE_OPTIMIZERS))
def test_release_looks_like_a_build_on_the_remaining_weights(name):
    make = STRUCTURE_OPTIMIZERS[name]
    model = mlp(make())
    x, y = toy_data(64)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    optimizer = model.optimizer
    before = list(optimizer.variables)
    values = {id(v): keras.ops.convert_to_numpy(v).copy() for v in before}
    iterations = int(optimizer.iterations)
    freeze_layers(model, ["d0", "d1"])
    released = release_optimizer_state(
        optimizer, frozen_weights(model, ["d0", "d1"]))

    after = list(optimizer.variables)
    gone = [v for v in before if id(v) not in {id(w) for w in after}]
    assert released == sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in gone
    )
    if name != "adafactor":  # its factored slots are named "kernel"...
        assert all("_d0_" in v.path or "_d1_" in v.path for v in gone)
    if name != "sgd_plain":
        assert released > 0
    # The kept variables are the same objects with the same values.
    for v in after:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v),
                                      values[id(v)])
    assert int(optimizer.iterations) == iterations
    # Same variables, names and order as a fresh build on what still trains.
    # (Same config, so the same name, which prefixes the variables' paths.)
    fresh = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    fresh.build(model.trainable_variables)
    assert signature(optimizer) == signature(fresh)
    assert [id(v) for v in optimizer._trainable_variables] == [
        id(v) for v in model.trainable_variables
    ]
    assert optimizer._trainable_variables_indices == {
        optimizer._var_key(v): i
        for i, v in enumerate(model.trainable_variables)
    }
    # Training goes on with the released optimizer.
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(optimizer.iterations) > iterations


def test_released_bytes_of_adam():
    model = mlp()
    x, y = toy_data(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    freeze_layers(model, ["d0"])
    released = release_optimizer_state(
        model.optimizer, model.get_layer("d0").weights)
    assert released == 2 * (6 * 16 + 16) * 4  # momentum and velocity
    assert len(model.optimizer.variables) == 2 + 2 * 6


def watch(slots):
    """Weak references to Keras variables, their tf.Variables and the
    tf.Variables' resource handles (a handle keeps the buffer alive)."""
    refs = [weakref.ref(v) for v in slots]
    refs += [weakref.ref(v.value) for v in slots]
    refs += [weakref.ref(v.value.handle) for v in slots]
    return refs


@pytest.mark.parametrize("jit_compile", [False, True])
def test_released_variables_are_garbage_collected(jit_compile):
    model = mlp(jit_compile=jit_compile)
    x, y = toy_data(64)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    frozen = freeze_layers(model, ["d0", "d1"], rebuild=False)
    slots = [v for v in model.optimizer.variables
             if "_d0_" in v.path or "_d1_" in v.path]
    assert len(slots) == 8
    refs = watch(slots)
    del slots
    release_optimizer_state(
        model.optimizer, [v for layer in frozen for v in layer.weights])
    gc.collect()
    # The train step traced before the release still captures them...
    assert any(r() is not None for r in refs)
    keras_smartfrz.rebuild_train_step(model)
    gc.collect()
    # ...and once it is rebuilt nothing holds them: not the optimizer, not
    # its TensorFlow checkpoint dependencies, not Keras' variable tracker,
    # not TensorFlow's gradient registry (which pins every traced train
    # step): the resource handles die, and with them the buffers.
    assert all(r() is None for r in refs)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 8


def test_tensorflow_pins_traced_train_steps(monkeypatch):
    """Why the release also cleans TensorFlow's gradient registry: without
    it, the released tf.Variables die but their resource handles (and so
    their buffers) stay alive, held by the graph of the train step traced
    before the release, which the registry keeps."""
    from keras_smartfrz import optimizer_state

    monkeypatch.setattr(optimizer_state, "_forget_train_graphs",
                        lambda slots: 0)
    model = mlp()
    x, y = toy_data(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    frozen = freeze_layers(model, ["d0"])
    slots = [v for v in model.optimizer.variables if "_d0_" in v.path]
    refs = watch(slots)
    del slots
    release_optimizer_state(
        model.optimizer, [v for layer in frozen for v in layer.weights])
    gc.collect()
    assert all(r() is None for r in refs[:8])  # Keras and tf.Variables
    assert all(r() is not None for r in refs[8:])  # their handles


class ReleaseAndWatch(keras.callbacks.Callback):
    """As a freezing callback would: freeze, release, rebuild, mid-fit; then
    watch the released slots (Keras and TensorFlow variables) with weakrefs."""

    refs = None

    def on_train_batch_end(self, batch, logs=None):
        if batch != 1 or self.refs is not None:
            return
        frozen = freeze_layers(self.model, ["d0"], rebuild=False)
        slots = [v for v in self.model.optimizer.variables if "_d0_" in v.path]
        self.refs = watch(slots)
        del slots
        release_optimizer_state(
            self.model.optimizer, [v for layer in frozen for v in layer.weights])
        keras_smartfrz.rebuild_train_step(self.model)


def test_released_variables_are_garbage_collected_during_fit():
    model = mlp()
    x, y = toy_data(96)
    watcher = ReleaseAndWatch()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[watcher])
    gc.collect()
    assert len(watcher.refs) == 3 * 4
    assert all(r() is None for r in watcher.refs)


def test_save_load_round_trip_restores_the_remaining_moments(tmp_path):
    model = mlp()
    x, y = toy_data(64)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    frozen = freeze_layers(model, ["d0"])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)

    # Without release, Keras skips loading every optimizer variable: it
    # builds the loaded optimizer on the trainable weights only.
    model.save(tmp_path / "kept.keras")
    with pytest.warns(UserWarning, match="Skipping variable loading"):
        loaded = keras.saving.load_model(tmp_path / "kept.keras")
    assert int(loaded.optimizer.iterations) == 0

    release_optimizer_state(
        model.optimizer, [v for layer in frozen for v in layer.weights])
    model.save(tmp_path / "released.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = keras.saving.load_model(tmp_path / "released.keras")
    assert int(loaded.optimizer.iterations) == 8
    # (A loaded Sequential's weight paths lose the model's name, and so do
    # the names of the slots.)
    assert signature(loaded.optimizer, names=False) == signature(
        model.optimizer, names=False)
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))


def test_ema_needs_the_release_to_finish_fit():
    """With `use_ema`, Keras overwrites the trainable weights with their
    averages at the end of `fit`, and refuses when the optimizer holds
    averages of more weights than train."""
    x, y = toy_data(32)
    model = mlp(keras.optimizers.Adam(1e-2, use_ema=True))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    freeze_layers(model, ["d0"])
    with pytest.raises(ValueError, match="Shape mismatch|length of model"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)

    model = mlp(keras.optimizers.Adam(1e-2, use_ema=True))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    freeze_layers(model, ["d0"])
    release_optimizer_state(model.optimizer, model.get_layer("d0").weights)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_unbuilt_optimizer_releases_nothing():
    model = mlp()
    model.build((None, 6))
    freeze_layers(model, ["d0"])
    assert not model.optimizer.built
    assert release_optimizer_state(
        model.optimizer, model.get_layer("d0").weights) == 0
    assert len(model.optimizer.variables) == 2
    assert release_optimizer_state(None, model.get_layer("d0").weights) == 0
    x, y = toy_data(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert len(model.optimizer.variables) == 2 + 2 * 6  # built on the rest


def test_foreign_untracked_and_released_variables_are_ignored():
    model = mlp(batchnorm=True)
    x, y = toy_data(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    count = len(model.optimizer.variables)
    other = mlp()
    other.build((None, 6))
    other.get_layer("d0").trainable = False
    assert release_optimizer_state(
        model.optimizer, other.get_layer("d0").weights) == 0
    # A BatchNormalization's moving statistics have no optimizer state.
    bn = model.get_layer("bn0")
    moving = [v for v in bn.weights if not v.trainable]
    assert len(moving) == 2
    assert release_optimizer_state(model.optimizer, moving) == 0
    assert len(model.optimizer.variables) == count
    # frozen_batchnorm="batch_statistics": gamma and beta only.
    freeze_layers(model, ["d0", "bn0"])
    assert release_optimizer_state(model.optimizer, bn.weights) == 2 * 2 * 16 * 4
    assert release_optimizer_state(model.optimizer, bn.weights) == 0
    assert len(model.optimizer.variables) == count - 4
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_invalid_arguments():
    model = mlp()
    x, y = toy_data(32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="still trainable|trainable variable"):
        release_optimizer_state(model.optimizer, model.get_layer("d0").weights)
    with pytest.raises(ValueError, match="received optimizer='adam'"):
        release_optimizer_state("adam", [])
    with pytest.raises(ValueError, match="Keras or TensorFlow variables"):
        release_optimizer_state(model.optimizer, ["d0"])
    assert len(model.optimizer.variables) == 2 + 2 * 8
