import warnings

import keras
import numpy as np
import pytest

import keras_smartfrz
from keras_smartfrz import policies
from keras_smartfrz import release_optimizer_state


class FreezeFirstUnits(policies.FreezePolicy):
    """Freezes the first `count` candidate units at the stage of `epoch`."""

    needs_history = False

    def __init__(self, epoch=0, count=1):
        self.epoch, self.count = epoch, count

    def decide(self, stage):
        freeze = np.zeros(len(stage.unit_names), dtype=bool)
        if stage.epoch == self.epoch:
            freeze[: self.count] = True
        return freeze.astype(np.float32), freeze

    def get_config(self):
        return {"epoch": self.epoch, "count": self.count}


def cnn(optimizer=None):
    """Functional Conv-BN-ReLU x2, a Dense and a head (4 units)."""
    inputs = keras.Input((8, 8, 1))
    h = inputs
    for i in range(2):
        h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False,
                                name=f"c{i}")(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(8, activation="relu", name="dense")(h)
    outputs = keras.layers.Dense(2, name="head")(h)
    model = keras.Model(inputs, outputs, name="cnn")
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def mlp(inputs=6):
    model = keras.Sequential(
        [keras.Input((inputs,))]
        + [keras.layers.Dense(16, activation="relu", name=f"d{i}")
           for i in range(3)]
        + [keras.layers.Dense(2, name="head")],
        name="mlp",
    )
    return model


def compile_mlp(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def images(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > 0).astype("int32")
    return x, y


def vectors(n=64, width=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, width)).astype("float32")
    return x, (x[:, 0] + x[:, 1] > 0).astype("int32")


def values(variables):
    return [keras.ops.convert_to_numpy(v) for v in variables]


def key(variable):
    # A loaded Sequential's paths lose the model's name: layer/variable.
    return "/".join(variable.path.split("/")[-2:])


def assert_same_state(loaded, model):
    """Same trainable flags, weights and optimizer variables, bit for bit."""
    assert [key(v) for v in loaded.trainable_weights] == [
        key(v) for v in model.trainable_weights
    ]
    for layer in model.layers:
        if not layer.weights:  # (input layers' names differ)
            continue
        other = loaded.get_layer(layer.name)
        assert other.trainable == layer.trainable, layer.name
        assert [v.trainable for v in other.weights] == [
            v.trainable for v in layer.weights
        ], layer.name
    for a, b in zip(values(loaded.weights), values(model.weights)):
        np.testing.assert_array_equal(a, b)
    saved = model.optimizer.variables
    restored = loaded.optimizer.variables
    assert len(restored) == len(saved)
    for a, b in zip(restored, saved):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))


def continue_both(loaded, model, x, y, epochs=1):
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    assert_same_state(loaded, model)


def frozen_unit_weights(freezer):
    return [
        v
        for unit in freezer.units
        if unit.name in freezer.frozen_units
        for layer in unit.layers
        for v in layer.weights
    ]


@pytest.mark.parametrize("release", [False, True])
@pytest.mark.parametrize("mode", ["batch_statistics", "inference"])
def test_load_model_after_freezing_callback(tmp_path, mode, release):
    model = cnn()
    x, y = images()
    freezer = keras_smartfrz.FreezingCallback(
        FreezeFirstUnits(epoch=0, count=1), frozen_batchnorm=mode)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
              callbacks=[freezer])
    assert freezer.frozen_layers == ["c0", "bn0"]
    if release:
        assert release_optimizer_state(
            model.optimizer, frozen_unit_weights(freezer)) > 0
    model.save(tmp_path / "model.keras")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = keras_smartfrz.load_model(
            tmp_path / "model.keras", frozen_batchnorm=mode)
    assert not loaded.get_layer("c0").trainable
    bn = loaded.get_layer("bn0")
    if mode == "batch_statistics":
        assert bn.trainable  # normalises with batch statistics
        assert [v.trainable for v in bn.weights] == [False] * 4
    else:
        assert not bn.trainable
    assert loaded.get_layer("bn1").gamma.trainable
    assert int(loaded.optimizer.iterations) == 8
    assert_same_state(loaded, model)
    continue_both(loaded, model, x, y)


def test_plain_keras_load_loses_the_freeze_state(tmp_path):
    """The two problems `keras_smartfrz.load_model` solves."""
    model = cnn()
    x, y = images()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    keras_smartfrz.freeze_layers(model, ["c0", "bn0"])
    model.save(tmp_path / "model.keras")
    with pytest.warns(UserWarning, match="Skipping variable loading"):
        loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert not loaded.get_layer("c0").trainable
    assert loaded.get_layer("bn0").gamma.trainable  # no longer frozen
    assert int(loaded.optimizer.iterations) == 0  # every moment lost

    loaded = keras_smartfrz.load_model(tmp_path / "model.keras")
    assert not loaded.get_layer("bn0").gamma.trainable
    assert int(loaded.optimizer.iterations) == 4


def test_load_model_from_a_mid_fit_checkpoint(tmp_path):
    model = cnn()
    x, y = images()
    freezer = keras_smartfrz.FreezingCallback(FreezeFirstUnits(epoch=0))
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "epoch{epoch}.keras"))
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
              callbacks=[freezer, checkpoint])
    loaded = keras_smartfrz.load_model(tmp_path / "epoch2.keras")
    assert int(loaded.optimizer.iterations) == 8
    assert [key(v) for v in loaded.trainable_weights] == [
        key(v) for v in model.trainable_weights
    ]
    # Epoch 3 of the original fit, and one epoch of the loaded model.
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_same_state(loaded, model)


def test_frozen_batchnorm_none_leaves_batchnorm_as_keras_loads_it(tmp_path):
    model = cnn()
    x, y = images()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    keras_smartfrz.freeze_layers(model, ["c0", "bn0"])
    model.save(tmp_path / "model.keras")
    loaded = keras_smartfrz.load_model(
        tmp_path / "model.keras", frozen_batchnorm=None)
    assert loaded.get_layer("bn0").gamma.trainable
    assert not loaded.get_layer("c0").trainable
    # The optimizer still gets every saved variable (built on all weights).
    for a, b in zip(values(loaded.optimizer.variables),
                    values(model.optimizer.variables)):
        np.testing.assert_array_equal(a, b)
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_load_model_with_layers_frozen_before_the_optimizer_was_built(
        tmp_path):
    """Some frozen layers were in the saved optimizer, some never were: the
    one set that matches the saved variables is found."""
    model = mlp()
    model.get_layer("d0").trainable = False  # before compile and fit
    compile_mlp(model)
    x, y = vectors()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    keras_smartfrz.freeze_layers(model, ["d1"])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = keras_smartfrz.load_model(tmp_path / "model.keras")
    assert_same_state(loaded, model)
    continue_both(loaded, model, x, y)


def test_ambiguous_optimizer_state_starts_afresh_with_a_warning(tmp_path):
    model = mlp(inputs=16)  # d0 and d1 have the same shapes
    model.get_layer("d0").trainable = False
    compile_mlp(model)
    x, y = vectors(width=16)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    keras_smartfrz.freeze_layers(model, ["d1"])
    model.save(tmp_path / "model.keras")
    with pytest.warns(UserWarning, match="several sets of frozen layers"):
        loaded = keras_smartfrz.load_model(tmp_path / "model.keras")
    assert int(loaded.optimizer.iterations) == 0
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_load_model_with_a_loss_scale_optimizer(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = compile_mlp(mlp())
        assert isinstance(model.optimizer,
                          keras.optimizers.LossScaleOptimizer)
        x, y = vectors()
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        keras_smartfrz.freeze_layers(model, ["d0"])
        model.save(tmp_path / "model.keras")
        loaded = keras_smartfrz.load_model(tmp_path / "model.keras")
        assert isinstance(loaded.optimizer,
                          keras.optimizers.LossScaleOptimizer)
        assert_same_state(loaded, model)
        continue_both(loaded, model, x, y)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_load_model_without_compiling_or_before_training(tmp_path):
    model = cnn()
    model.save(tmp_path / "untrained.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = keras_smartfrz.load_model(tmp_path / "untrained.keras")
    assert loaded.optimizer is not None
    assert int(loaded.optimizer.iterations) == 0

    x, y = images()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    keras_smartfrz.freeze_layers(model, ["c0", "bn0"])
    model.save(tmp_path / "model.keras")
    loaded = keras_smartfrz.load_model(tmp_path / "model.keras",
                                       compile=False)
    assert not loaded.compiled
    assert not loaded.get_layer("c0").trainable
    assert not loaded.get_layer("bn0").gamma.trainable
    assert [key(v) for v in loaded.trainable_weights] == [
        key(v) for v in model.trainable_weights
    ]


@pytest.mark.parametrize("release", [False, True])
def test_restore_optimizer_state_from_a_weights_file(tmp_path, release):
    """As after `BackupAndRestore`: the weights load, the optimizer state
    does not (Keras skips it), `restore_optimizer_state` loads it."""
    model = cnn()
    x, y = images()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    frozen = keras_smartfrz.freeze_layers(model, ["c0", "bn0"])
    if release:
        release_optimizer_state(
            model.optimizer, [v for layer in frozen for v in layer.weights])
    model.save_weights(tmp_path / "model.weights.h5")

    other = cnn()
    other.optimizer.build(other.trainable_variables)  # as BackupAndRestore
    if release:  # fewer saved optimizer variables: Keras loads none
        with pytest.warns(UserWarning, match="Skipping variable loading"):
            other.load_weights(tmp_path / "model.weights.h5")
    else:
        other.load_weights(tmp_path / "model.weights.h5")
    keras_smartfrz.freeze_layers(other, ["c0", "bn0"])
    assert keras_smartfrz.saving.restore_optimizer_state(
        other, tmp_path / "model.weights.h5")
    assert_same_state(other, model)
    continue_both(other, model, x, y)
    with pytest.raises(ValueError, match="without one"):
        keras_smartfrz.saving.restore_optimizer_state(
            mlp(), tmp_path / "model.weights.h5")
    with pytest.raises(ValueError, match=r"`.keras` or `.weights.h5`"):
        keras_smartfrz.saving.restore_optimizer_state(
            other, tmp_path / "missing.weights.h5")


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="File not found.*missing.keras"):
        keras_smartfrz.load_model(tmp_path / "missing.keras")
    (tmp_path / "model.h5").write_bytes(b"not a keras file")
    with pytest.raises(ValueError, match="Expected a `.keras` file.*model.h5"):
        keras_smartfrz.load_model(tmp_path / "model.h5")
    (tmp_path / "broken.keras").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="broken.keras' is not a `.keras`"):
        keras_smartfrz.load_model(str(tmp_path / "broken.keras"))
    (tmp_path / "folder.keras").mkdir()
    with pytest.raises(ValueError, match="folder.keras"):
        keras_smartfrz.load_model(tmp_path / "folder.keras")
    with pytest.raises(ValueError, match="received filepath=3"):
        keras_smartfrz.load_model(3)
    with pytest.raises(ValueError, match="frozen_batchnorm='batch'"):
        keras_smartfrz.load_model(tmp_path / "missing.keras",
                                  frozen_batchnorm="batch")
