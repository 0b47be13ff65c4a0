"""Freezing under tf.distribute.MirroredStrategy and mixed precision."""

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from keras_smartfrz import FreezingCallback
from keras_smartfrz.policies import FreezePolicy
from conftest import REPO
from conftest import toy_data


class ScriptedPolicy(FreezePolicy):
    """Proposes the candidates named in `plan[epoch]`; reads the history."""

    def __init__(self, plan):
        self.plan = plan
        self.windows = []

    def decide(self, stage):
        self.windows.append(stage.window)
        wanted = self.plan.get(stage.epoch, ())
        freeze = np.array([n.split("/")[-1] in wanted
                           for n in stage.unit_names])
        return freeze.astype(np.float32), freeze


# Two logical CPUs must be set up before TensorFlow initialises its devices,
# so the strategy runs in a fresh interpreter and leaves this one alone.
MIRRORED = textwrap.dedent("""
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    sys.path.insert(0, "tests")
    import keras_smartfrz
    from test_distribution import ScriptedPolicy

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu", name="d0"),
            keras.layers.BatchNormalization(name="bn0"),
            keras.layers.Dense(16, activation="relu", name="d1"),
            keras.layers.Dense(2, name="head"),
        ])
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
    freezer = keras_smartfrz.FreezingCallback(
        ScriptedPolicy({0: ["d0"]}), window_size=4, sample_size=8)
    snapshots = []

    class Recorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append([np.array(v.numpy()) for v in model.weights])

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model.fit(x, y, batch_size=16, epochs=3, verbose=0,
              callbacks=[freezer, Recorder()])
    names = [v.path for v in model.weights]
    frozen = [n for n in names if n.split("/")[1] == "d0"
              or n.split("/")[-1] in ("gamma", "beta")]
    unchanged = {n: all(np.array_equal(snapshots[0][i], s[i])
                        for s in snapshots[1:])
                 for i, n in enumerate(names)}
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "frozen_units": freezer.frozen_units,
        "trainable": [v.path for v in model.trainable_weights],
        "frozen_unchanged": all(unchanged[n] for n in frozen),
        "head_changed": not unchanged["sequential/head/kernel"],
        "window_finite": bool(np.isfinite(freezer.policy.windows[0]).all()),
    }))
""")


def test_mirrored_strategy_on_two_logical_cpus():
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED], cwd=REPO, capture_output=True,
        text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert report["frozen_units"] == ["sequential/d0"]
    assert report["trainable"] == [
        "sequential/d1/kernel", "sequential/d1/bias",
        "sequential/head/kernel", "sequential/head/bias"]
    assert report["frozen_unchanged"]
    assert report["head_changed"]
    assert report["window_finite"]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_samples_and_freezes(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = keras.Sequential([
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu", name="d0"),
            keras.layers.BatchNormalization(name="bn0"),
            keras.layers.Dense(16, activation="relu", name="d1"),
            keras.layers.Dense(2, name="head", dtype="float32"),
        ], name="mp")
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(
                          from_logits=True))
        scripted = ScriptedPolicy({0: ["d0"], 1: ["d1"]})
        freezer = FreezingCallback(scripted, window_size=4, sample_size=8)
        x, y = toy_data(64)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                  callbacks=[freezer])
        frozen = {v.path: keras.ops.convert_to_numpy(v)
                  for v in model.weights if v.path.startswith("mp/d0/")}
        head = keras.ops.convert_to_numpy(model.get_layer("head").kernel)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                            callbacks=[freezer])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # The sampled history holds the float32 master weights, and moves.
    window = scripted.windows[-1]
    assert window.dtype == np.float32 and np.isfinite(window).all()
    assert not np.array_equal(window[:, 0], window[:, -1])
    assert np.isfinite(history.history["loss"]).all()
    for v in model.weights:
        if v.path in frozen:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(v),
                                          frozen[v.path])
    assert not np.array_equal(
        head, keras.ops.convert_to_numpy(model.get_layer("head").kernel))
