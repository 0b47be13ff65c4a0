import keras
import numpy as np
import pytest

import keras_smartfrz
from keras_smartfrz import freeze_layers
from conftest import mlp
from conftest import toy_data


def weights_of(layer):
    return [keras.ops.convert_to_numpy(v).copy() for v in layer.weights]


class FreezeAfterBatch(keras.callbacks.Callback):
    """Freezes `names` with `freeze_layers` after `at_batch` of epoch 0 and
    records every layer's weights at each later batch end."""

    def __init__(self, names, at_batch, **kwargs):
        super().__init__()
        self.names, self.at_batch, self.kwargs = names, at_batch, kwargs
        self.after = []
        self.frozen = False

    def on_train_batch_end(self, batch, logs=None):
        if self.frozen:
            self.after.append({l.name: weights_of(l) for l in self.model.layers})
        elif batch == self.at_batch:
            freeze_layers(self.model, self.names, **self.kwargs)
            self.frozen = True
            self.at_freeze = {l.name: weights_of(l) for l in self.model.layers}
            self.slots_at_freeze = optimizer_slots(self.model, self.names)


def optimizer_slots(model, layer_names):
    """Adam moments of the named layers' variables, by variable path."""
    optimizer = model.optimizer
    slots = {}
    for name in layer_names:
        for v in model.get_layer(name).weights:
            if v.path.split("/")[-1].startswith("moving_"):
                continue  # not trained by the optimizer
            index = optimizer._get_variable_index(v)
            slots[v.path] = (
                keras.ops.convert_to_numpy(optimizer._momentums[index]),
                keras.ops.convert_to_numpy(optimizer._velocities[index]),
            )
    return slots


@pytest.mark.parametrize("jit_compile", [False, True])
def test_mid_fit_freeze_is_bit_identical_and_keeps_optimizer_state(jit_compile):
    model = mlp(jit_compile=jit_compile)
    x, y = toy_data(128)
    recorder = FreezeAfterBatch(["d0", "d1"], at_batch=3)
    history = model.fit(x, y, batch_size=16, epochs=2, callbacks=[recorder],
                        verbose=0)
    assert len(recorder.after) == 8 + 4  # rest of epoch 0, all of epoch 1
    for snapshot in recorder.after:
        for name in ("d0", "d1"):
            for now, then in zip(snapshot[name], recorder.at_freeze[name]):
                np.testing.assert_array_equal(now, then)
    for name in ("d2", "head"):
        final = recorder.after[-1][name][0]
        assert not np.array_equal(final, recorder.at_freeze[name][0])
    # The optimizer kept counting and kept the moments of frozen weights.
    assert int(model.optimizer.iterations) == 16
    now = optimizer_slots(model, ["d0", "d1"])
    for path, (m, v) in recorder.slots_at_freeze.items():
        np.testing.assert_array_equal(now[path][0], m)
        np.testing.assert_array_equal(now[path][1], v)
        assert np.any(m != 0)  # they had been training before the freeze
    assert np.isfinite(history.history["loss"]).all()
    assert 0.0 <= history.history["accuracy"][-1] <= 1.0
    assert len(model.trainable_weights) == 4


def test_without_rebuild_a_frozen_layer_would_still_update():
    """The reason freeze_layers rebuilds: the old step keeps its variables."""
    model = mlp()
    x, y = toy_data(64)

    class FreezeNoRebuild(FreezeAfterBatch):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                freeze_layers(self.model, ["d0"], rebuild=False)
                self.at_freeze = weights_of(self.model.get_layer("d0"))

    cb = FreezeNoRebuild(["d0"], 0)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
    assert not np.array_equal(weights_of(model.get_layer("d0"))[0],
                              cb.at_freeze[0])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_frozen_batchnorm_modes(jit_compile):
    x, y = toy_data(128)
    results = {}
    for mode in ("inference", "batch_statistics"):
        keras.utils.set_random_seed(0)
        model = mlp(batchnorm=True, jit_compile=jit_compile)
        cb = FreezeAfterBatch(["d0", "bn0"], at_batch=1, frozen_batchnorm=mode)
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[cb], verbose=0)
        bn = model.get_layer("bn0")
        gamma, beta, moving_mean, _ = weights_of(bn)
        then = cb.at_freeze["bn0"]
        np.testing.assert_array_equal(gamma, then[0])
        np.testing.assert_array_equal(beta, then[1])
        np.testing.assert_array_equal(weights_of(model.get_layer("d0"))[0],
                                      cb.at_freeze["d0"][0])
        results[mode] = (bn.trainable, not np.array_equal(moving_mean, then[2]))
    # Keras convention: a frozen BN stops updating its moving statistics.
    assert results["inference"] == (False, False)
    # batch_statistics: the layer still normalises with (and tracks) batch stats.
    assert results["batch_statistics"] == (True, True)


def test_freeze_layers_outside_fit_accepts_paths_names_and_layers():
    model = mlp()
    frozen = freeze_layers(model, ["mlp/d0", "d1", model.get_layer("d2")])
    assert [l.name for l in frozen] == ["d0", "d1", "d2"]
    assert [v.path for v in model.trainable_weights] == [
        "mlp/head/kernel", "mlp/head/bias"]


def test_freeze_layers_outside_fit_leaves_no_recompile_warning(recwarn):
    model = mlp()
    x, y = toy_data(32)
    model.fit(x, y, epochs=1, verbose=0)
    freeze_layers(model, ["d0"])
    model.fit(x, y, epochs=1, verbose=0)
    assert not [w for w in recwarn if "recompile" in str(w.message)]


def test_freeze_layers_rejects_unknown_names_and_types():
    model = mlp()
    with pytest.raises(ValueError, match="'nope'"):
        freeze_layers(model, ["nope"])
    with pytest.raises(ValueError, match="42"):
        freeze_layers(model, [42])
    with pytest.raises(ValueError, match="'train'"):
        freeze_layers(model, ["d0"], frozen_batchnorm="train")


def test_other_backends_get_a_clear_error(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="'jax'"):
        freeze_layers(mlp(), ["d0"])
    with pytest.raises(RuntimeError, match="'jax'"):
        keras_smartfrz.LinearFreezing()
