import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


def mlp(hidden=(16, 16, 16), batchnorm=False, name=None, jit_compile=False):
    """A small compiled classifier: Dense(+BN) blocks, then a 2-class head."""
    layers = [keras.Input((6,))]
    for i, width in enumerate(hidden):
        layers.append(keras.layers.Dense(width, activation="relu", name=f"d{i}"))
        if batchnorm:
            layers.append(keras.layers.BatchNormalization(name=f"bn{i}"))
    layers.append(keras.layers.Dense(2, name="head"))
    model = keras.Sequential(layers, name=name or "mlp")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model


def toy_data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    return x, y
