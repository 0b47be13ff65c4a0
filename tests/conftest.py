import importlib.util
import os
import pathlib
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


REPO = pathlib.Path(__file__).resolve().parents[1]


def load_script(folder, name):
    """Imports `<repo>/<folder>/<name>.py` (an example or a benchmark)."""
    directory = REPO / folder
    if str(directory) not in sys.path:  # for the script's own imports
        sys.path.insert(0, str(directory))
    spec = importlib.util.spec_from_file_location(
        f"{folder}_{name}", directory / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_predictor(tmp_path):
    """A tiny untrained predictor on disk (window 4, sample 16): its path."""
    import keras_smartfrz

    path = tmp_path / "predictor"
    keras_smartfrz.save_predictor(
        keras_smartfrz.FreezePredictor(
            window_size=4, sample_size=16, hidden_units=8,
            embedding_units=4, classifier_units=4,
        ),
        path,
    )
    return str(path)


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
