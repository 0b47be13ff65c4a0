"""Applying freeze decisions: `trainable=False`, then one rebuild of the train step.

This module never decides what to freeze; it only applies a decision so that it
truly takes effect in a running `fit`.
"""

import keras

from keras_smartfrz.units import layer_path

FROZEN_BATCHNORM_MODES = ("inference", "batch_statistics")


def require_tensorflow_backend():
    """Raises unless Keras runs on the TensorFlow backend.

    A mid-fit freeze on JAX needs the optimizer swapped as well as the train
    step rebuilt (`make_train_function(force=True)` alone fails there), and on
    PyTorch it is untested; both are refused rather than risked.
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            "keras-smartfrz freezes layers during `fit` on the TensorFlow "
            f"backend only; the active Keras backend is '{backend}'. Set "
            "KERAS_BACKEND=tensorflow before importing keras."
        )


def _resolve_layers(model, layers):
    by_key = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        by_key.setdefault(layer_path(layer), layer)
        by_key.setdefault(layer.name, layer)
    resolved = []
    for item in layers:
        if isinstance(item, keras.layers.Layer):
            resolved.append(item)
        elif isinstance(item, str):
            if item not in by_key:
                raise ValueError(
                    f"No layer with path or name '{item}' in model "
                    f"'{model.name}'."
                )
            resolved.append(by_key[item])
        else:
            raise ValueError(
                "Expected Keras layers or layer paths (str) to freeze; "
                f"received {item!r} of type {type(item).__name__}."
            )
    return resolved


def rebuild_train_step(model):
    """Rebuilds `model`'s train step so it sees the current trainable weights.

    `fit` reads `model.train_function` at every step, so the rebuilt step is
    used from the next batch on. The compiled trainable state is refreshed so
    Keras does not ask for a recompile: `compile()` is not needed (and inside
    `fit` it would break the running loop).
    """
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)
    if getattr(model, "compiled", False):
        model._compiled_trainable_state = {
            layer: layer.trainable for layer in model._flatten_layers()
        }


def freeze_layers(
    model, layers, frozen_batchnorm="batch_statistics", rebuild=True
):
    """Freezes layers of a model, during `fit` or outside it.

    Sets `trainable=False` on each layer, then rebuilds the train step once so
    that frozen weights are neither differentiated nor updated from the next
    step on. The optimizer keeps its iteration count and its moments. Never
    calls `compile()`.

    Args:
        model: a compiled or uncompiled Keras model (TensorFlow backend).
        layers: layers of `model`, as layer objects or as `layer.path` /
            `layer.name` strings.
        frozen_batchnorm: how a `BatchNormalization` freezes.
            `"batch_statistics"` (default) freezes its `gamma` and `beta`
            only: the layer keeps normalising with batch statistics (and
            keeps tracking its moving statistics, which are not trained
            weights), so its output does not jump at the freeze.
            `"inference"` is the Keras convention (`trainable=False`): it
            then normalises with its moving statistics, which mid-training
            still lag behind the weights; on Fashion-MNIST this cost about
            7 points of test accuracy (benchmarks/results/batchnorm_freeze.md).
            Activation caching needs `"inference"`.
        rebuild: rebuild the train step (default `True`). Pass `False` only to
            batch several calls, then call `rebuild_train_step(model)` once.

    Returns:
        The list of layers that were frozen.

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, name="hidden"),
        keras.layers.Dense(1, name="head"),
    ])
    model.compile(optimizer="adam", loss="mse")
    keras_smartfrz.freeze_layers(model, ["hidden"])
    assert [w.path for w in model.trainable_weights] == [
        "sequential/head/kernel", "sequential/head/bias"]
    ```
    """
    require_tensorflow_backend()
    if frozen_batchnorm not in FROZEN_BATCHNORM_MODES:
        raise ValueError(
            f"`frozen_batchnorm` must be one of {FROZEN_BATCHNORM_MODES}; "
            f"received frozen_batchnorm={frozen_batchnorm!r}."
        )
    resolved = _resolve_layers(model, layers)
    for layer in resolved:
        if frozen_batchnorm == "batch_statistics" and isinstance(
            layer, keras.layers.BatchNormalization
        ):
            for variable in layer.trainable_weights:
                variable.trainable = False
        else:
            layer.trainable = False
    if rebuild:
        rebuild_train_step(model)
    return resolved
