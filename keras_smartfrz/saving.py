"""Loading a `.keras` model saved after keras-smartfrz froze some of its layers.

`keras.saving.load_model` loses part of the training state of such a model:

- Keras saves each layer's `trainable` flag but not a variable's own one. With
  `frozen_batchnorm="batch_statistics"` (the default of `freeze_layers` and of
  the freezing callbacks) a frozen `BatchNormalization` keeps
  `trainable=True` and only its `gamma` and `beta` are made non-trainable, so
  they load trainable again.
- When compiling a loaded model, Keras builds the optimizer on the trainable
  weights only (`Trainer.compile_from_config`). The saved optimizer was built
  before the freeze, on more weights, so its variable count differs, and
  `Optimizer.load_own_variables` then skips loading *every* optimizer
  variable (iteration count, learning rate and all moments) with a warning.

`load_model` here restores both.
"""

import contextlib
import os
import warnings
import zipfile

import keras
import numpy as np

from keras_smartfrz.optimizer_state import _release
from keras_smartfrz.optimizer_state import _slot_owners
from keras_smartfrz.units import find_units

_FROZEN_BATCHNORM_MODES = ("batch_statistics", "inference", None)
_WEIGHTS_H5 = "model.weights.h5"
_WEIGHTS_NPZ = "model.weights.npz"
_OPTIMIZER_PATH = "optimizer"
_SKIP_WARNING = "Skipping variable loading for optimizer"
# Steps of the search over subsets of the frozen layers, run when neither
# "the trainable weights" nor "every weight" matches the saved optimizer (see
# `_find_built_on`).
_MAX_SEARCH = 100_000


def load_model(
    filepath,
    custom_objects=None,
    compile=True,
    safe_mode=True,
    frozen_batchnorm="batch_statistics",
):
    """Loads a `.keras` model and keeps its frozen layers and optimizer state.

    A drop-in replacement for `keras.saving.load_model` for models saved
    (`model.save()`, `keras.callbacks.ModelCheckpoint`) after keras-smartfrz
    froze some of their layers:

    - **Frozen layers stay frozen.** Layers saved with `trainable=False` load
      frozen (Keras saves that flag). With
      `frozen_batchnorm="batch_statistics"`, a `BatchNormalization` frozen
      that way kept `trainable=True` and only had its `gamma` and `beta` made
      non-trainable, which Keras does not save. They are frozen again by this
      rule: the model's units are listed as `keras_smartfrz.find_units` does
      (a layer owning weights plus the `BatchNormalization` that follows it),
      and a `BatchNormalization` whose unit's other layers are all frozen
      gets its `gamma` and `beta` frozen. This is a heuristic: the file does
      not say which BatchNormalization was frozen. It re-freezes the BN of a
      layer you froze yourself while leaving its BN trainable, and it cannot
      find a BN that was a unit of its own (one that follows no layer with
      weights) and was frozen. Pass `frozen_batchnorm=None` to turn it off
      (and re-freeze with `keras_smartfrz.freeze_layers` yourself);
      `"inference"` also turns it off, since a BN frozen in that mode is
      saved with `trainable=False` and loads frozen.
    - **The optimizer state is restored**, whether or not it was released
      with `keras_smartfrz.release_optimizer_state` before saving. The saved
      optimizer's variables are compared (count, shapes, dtypes) with what
      the optimizer holds when built on (1) the trainable weights, then (2)
      every weight of the model that can train, in the order Keras built it
      on, then (3) the trainable weights plus some of the frozen layers (a
      bounded search). The first match is built and loaded from the archive,
      through Keras' own loading code, so that the loaded optimizer holds the
      saved variables, in the saved order, bit for bit. If none matches, or
      (3) finds more than one, the optimizer starts afresh with a warning,
      as with `keras.saving.load_model`.

    Training the loaded model continues as training the saved model would
    have continued (tested bit for bit on CPU).

    Limitations: a `.keras` zip file only (not a legacy `.h5` file, a
    directory or a remote path). A subclassed model that does not serialise
    its layers in its config loses their `trainable` flags, as in Keras.

    Args:
        filepath: path of a `.keras` file (str or `os.PathLike`).
        custom_objects: as in `keras.saving.load_model`.
        compile: as in `keras.saving.load_model`; with `False` the model is
            not compiled and no optimizer is loaded.
        safe_mode: as in `keras.saving.load_model`.
        frozen_batchnorm: `"batch_statistics"` (default) re-freezes the
            `gamma` and `beta` of a `BatchNormalization` that follows frozen
            layers (see above); `"inference"` or `None` leave every
            `BatchNormalization` as Keras loads it.

    Returns:
        The loaded Keras model.

    Raises:
        ValueError: if `filepath` does not exist, is not a `.keras` file or is
            not a zip archive, or `frozen_batchnorm` is not one of the modes.

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, name="hidden"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(1, name="head"),
    ])
    model.compile(optimizer="adam", loss="mse")
    x, y = np.random.rand(64, 8), np.random.rand(64, 1)
    model.fit(x, y, batch_size=32, verbose=0)
    keras_smartfrz.freeze_layers(model, ["hidden", "bn"])
    model.save("model.keras")

    loaded = keras_smartfrz.load_model("model.keras")
    assert len(loaded.trainable_weights) == 2  # the head's kernel and bias
    assert not loaded.get_layer("bn").gamma.trainable
    assert int(loaded.optimizer.iterations) == 2  # and all of Adam's moments
    loaded.fit(x, y, batch_size=32, verbose=0)
    ```
    """
    if frozen_batchnorm not in _FROZEN_BATCHNORM_MODES:
        raise ValueError(
            f"`frozen_batchnorm` must be one of {_FROZEN_BATCHNORM_MODES}; "
            f"received frozen_batchnorm={frozen_batchnorm!r}."
        )
    path = _check_filepath(filepath)
    with warnings.catch_warnings():
        # The optimizer is loaded below when Keras cannot do it.
        warnings.filterwarnings("ignore", message=_SKIP_WARNING)
        model = keras.saving.load_model(
            path,
            custom_objects=custom_objects,
            compile=compile,
            safe_mode=safe_mode,
        )
    trainable_before = {id(v) for v in model.trainable_variables}
    with _all_trainable(model):
        # Every weight that can train, in the order Keras lists (and builds
        # the optimizer on) the trainable weights; and the units.
        trainable_all = list(model.trainable_variables)
        units = (
            [
                [(layer, list(layer.trainable_weights)) for layer in u.layers]
                for u in find_units(model)
            ]
            if frozen_batchnorm == "batch_statistics"
            else []
        )
    for unit in units:
        others = [
            weights
            for layer, weights in unit
            if not isinstance(layer, keras.layers.BatchNormalization)
        ]
        if not others or any(
            id(v) in trainable_before for weights in others for v in weights
        ):
            continue
        for layer, weights in unit:
            if isinstance(layer, keras.layers.BatchNormalization):
                for variable in weights:
                    variable.trainable = False
    _restore_optimizer(model, path, trainable_all, custom_objects, safe_mode)
    return model


def restore_optimizer_state(model, filepath, custom_objects=None):
    """Loads a saved optimizer state into a model with frozen layers.

    The optimizer part of `keras_smartfrz.load_model`, for a model you
    already have: for instance one that `model.load_weights()` (or
    `keras.callbacks.BackupAndRestore`) gave its weights but not its
    optimizer state, because Keras skips loading every optimizer variable
    when their count differs from the saved one (after a freeze, with or
    without `keras_smartfrz.release_optimizer_state`). Freeze the model's
    layers as they were when the file was saved first. The saved optimizer
    variables are then matched (count, shapes, dtypes) with the optimizer
    built on the trainable weights, on every weight that can train, or on
    the trainable weights plus some frozen layers, and loaded, bit for bit;
    `model.optimizer` is replaced by a new optimizer of the same
    configuration when it was built on other weights.

    Args:
        model: a compiled Keras model.
        filepath: a `.keras` file (`model.save()`) or a `.weights.h5` file
            (`model.save_weights()`, `keras.callbacks.BackupAndRestore`).
        custom_objects: as in `keras.saving.load_model`, to recreate a custom
            optimizer.

    Returns:
        `True` if the optimizer state was loaded; `False` if not: with a
        warning saying why when the saved variables match no set of the
        model's weights, silently when the file holds no optimizer state
        (saved before the optimizer was built, or without an optimizer).

    Raises:
        ValueError: if `filepath` does not exist or is neither a `.keras`
            nor a `.weights.h5` file, or `model` has no optimizer.

    Example:

    ```python
    def make():
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(16, name="hidden"),
            keras.layers.Dense(1, name="head"),
        ])
        model.compile(optimizer="adam", loss="mse")
        return model

    model = make()
    x, y = np.random.rand(64, 8), np.random.rand(64, 1)
    model.fit(x, y, batch_size=32, verbose=0)
    frozen = keras_smartfrz.freeze_layers(model, ["hidden"])
    keras_smartfrz.release_optimizer_state(model.optimizer, frozen[0].weights)
    model.save_weights("model.weights.h5")

    other = make()
    other.optimizer.build(other.trainable_variables)
    other.load_weights("model.weights.h5")  # warns: optimizer not loaded
    keras_smartfrz.freeze_layers(other, ["hidden"])
    assert keras_smartfrz.saving.restore_optimizer_state(
        other, "model.weights.h5")
    assert int(other.optimizer.iterations) == 2
    ```
    """
    path = _check_filepath(filepath, (".keras", ".weights.h5"))
    if not isinstance(
        getattr(model, "optimizer", None), keras.optimizers.Optimizer
    ):
        raise ValueError(
            "`model` must be compiled with an optimizer; received a model "
            f"'{getattr(model, 'name', model)}' without one."
        )
    with _all_trainable(model):
        trainable_all = list(model.trainable_variables)
    return _restore_optimizer(
        model, path, trainable_all, custom_objects, safe_mode=True
    )


def _check_filepath(filepath, suffixes=(".keras",)):
    if not isinstance(filepath, (str, os.PathLike)):
        raise ValueError(
            "`filepath` must be the path of a `.keras` file (str or "
            f"os.PathLike); received filepath={filepath!r}."
        )
    path = os.fspath(filepath)
    expected = " or ".join(f"`{suffix}`" for suffix in suffixes)
    if not os.path.exists(path):
        raise ValueError(
            f"File not found: filepath='{path}'. Expected a {expected} file "
            "saved by Keras."
        )
    if not path.endswith(suffixes) or not os.path.isfile(path):
        raise ValueError(
            f"Expected a {expected} file saved by Keras; received "
            f"filepath='{path}'. keras_smartfrz reads `.keras` zip files "
            "(and `.weights.h5` files for restore_optimizer_state); for a "
            "legacy `.h5` file or a directory, use keras.saving.load_model."
        )
    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise ValueError(
            f"The file '{path}' is not a `.keras` archive (not a zip file)."
        )
    return path


class _all_trainable:
    """Makes every layer and weight of `model` trainable, then restores the
    exact flags (each layer's, then each variable's) on exit.

    Setting `layer.trainable` sets the flag of the layer's own weights and
    sublayers, but (on the TensorFlow backend) does nothing at all when the
    layer already has that value: every layer is set to `False` first, so
    that `model.trainable = True` then reaches every layer and weight.
    """

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        layers = self.model._flatten_layers(include_self=True)
        self.layers = [(layer, layer.trainable) for layer in layers]
        self.variables = [(v, v.trainable) for v in self.model.variables]
        try:
            for layer in layers:
                layer.trainable = False
            self.model.trainable = True
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for layer, trainable in self.layers:
            layer.trainable = trainable
        for variable, trainable in self.variables:
            variable.trainable = trainable
        return False


# ------------------------------------------------------------------ optimizer
def _open_weights(path, stack):
    """Keras' variable store of a `.keras` archive or a `.weights.h5` file."""
    from keras.src.saving import saving_lib

    if not path.endswith(".keras"):
        return saving_lib.H5IOStore(path, mode="r")
    archive = stack.enter_context(zipfile.ZipFile(path, "r"))
    names = archive.namelist()
    if _WEIGHTS_H5 in names:
        return saving_lib.H5IOStore(_WEIGHTS_H5, archive=archive, mode="r")
    if _WEIGHTS_NPZ in names:
        return saving_lib.NpzIOStore(_WEIGHTS_NPZ, archive=archive, mode="r")
    return None


def _restore_optimizer(model, path, trainable_all, custom_objects, safe_mode):
    """Loads the optimizer variables saved in `path`; whether it did."""
    optimizer = getattr(model, "optimizer", None)
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        return False
    from keras.src.saving import saving_lib

    with contextlib.ExitStack() as stack:
        store = _open_weights(path, stack)
        if store is None:
            return False
        stack.callback(store.close)
        entry = store.get(_OPTIMIZER_PATH)
        saved = [
            _signature(entry[key]) for key in sorted(entry.keys(), key=int)
        ]
        if not saved:
            return False
        chosen = _choose_optimizer(
            model, optimizer, saved, trainable_all, custom_objects, safe_mode
        )
        if chosen is None:
            return False
        failed, errors = set(), {}
        saving_lib._load_state(
            chosen,
            weights_store=store,
            assets_store=None,
            inner_path=_OPTIMIZER_PATH,
            visited_saveables=set(),
            failed_saveables=failed,
            error_msgs=errors,
        )
        if failed:
            saving_lib._raise_loading_failure(errors)
    if chosen is not optimizer:
        _replace_optimizer(model, optimizer, chosen)
    return True


def _signature(value):
    value = np.asarray(value)
    return tuple(int(d) for d in value.shape), str(value.dtype)


def _variable_signature(variable):
    return (
        tuple(int(d) for d in variable.shape),
        keras.backend.standardize_dtype(variable.dtype),
    )


def _choose_optimizer(
    model, optimizer, saved, trainable_all, custom_objects, safe_mode
):
    """The optimizer to load the saved variables into, built to match them."""
    trainable = list(model.trainable_variables)
    ids = [id(v) for v in trainable]
    if (
        optimizer.built
        and [id(v) for v in optimizer._trainable_variables] == ids
        and [_variable_signature(v) for v in optimizer.variables] == saved
    ):
        return optimizer  # Keras built it on the right weights
    if not trainable_all:
        if len(saved) == len(optimizer.variables):
            return optimizer
        else:
            warnings.warn(
                "keras_smartfrz.load_model: the loaded model has no "
                "trainable weights (is it built?); the optimizer state saved "
                "in the file was not restored.",
                stacklevel=4,  # the caller of load_model / restore_optimizer_state
            )
        return None
    full = _fresh_optimizer(optimizer, custom_objects, safe_mode)
    if len(saved) == len(full.variables):
        # Saved before the optimizer was built: it holds no state yet (Keras
        # itself skips loading it then). Keep the optimizer Keras built.
        return None
    full.build(trainable_all)
    keep = _find_built_on(full, trainable_all, set(ids), saved)
    if keep is None:
        return None
    dropped = [v for v in trainable_all if id(v) not in keep]
    if dropped:
        _release(full, dropped, {})
    return full


def _fresh_optimizer(optimizer, custom_objects, safe_mode):
    config = keras.saving.serialize_keras_object(optimizer)
    return keras.saving.deserialize_keras_object(
        config, custom_objects=custom_objects, safe_mode=safe_mode
    )


def _find_built_on(full, trainable_all, trainable_ids, saved):
    """Which weights the saved optimizer was built on, as a set of ids.

    `full` is built on every weight (`trainable_all`). Building on a subset
    gives `full.variables` with the subset's slots only, in the same order
    (which is what `release_optimizer_state` leaves), so a subset is tested by
    filtering `full.variables`, without building anything.
    """
    owners = _slot_owners(full)
    variables = full.variables
    signatures = [_variable_signature(v) for v in variables]

    def expected(keep):
        return [
            s
            for v, s in zip(variables, signatures)
            if owners.get(id(v)) is None or owners[id(v)] in keep
        ]

    all_ids = {id(v) for v in trainable_all}
    for keep in (trainable_ids & all_ids, all_ids):
        if expected(keep) == saved:
            return keep
    # Some of the frozen weights were in the saved optimizer, some not
    # (frozen before it was built, or released): try subsets of the frozen
    # layers, grouped by the layer that owns them.
    groups = {}
    for v in trainable_all:
        if id(v) not in trainable_ids:
            layer = v.path.rsplit("/", 1)[0] if "/" in v.path else v.path
            groups.setdefault(layer, set()).add(id(v))
    groups = list(groups.values())
    slots = {}
    for owner in owners.values():
        slots[owner] = slots.get(owner, 0) + 1
    sizes = [sum(slots.get(i, 0) for i in g) for g in groups]
    remaining = [sum(sizes[i:]) for i in range(len(sizes) + 1)]
    base = trainable_ids & all_ids
    needed = len(saved) - len(expected(base))
    found, calls = [], 0

    def search(index, keep, missing):
        # Include-first depth-first search over the groups, pruned by the
        # number of variables still to account for.
        nonlocal calls
        calls += 1
        if len(found) > 1 or calls > _MAX_SEARCH:
            return
        if missing < 0 or missing > remaining[index]:
            return
        if missing == 0:  # every later group is left out
            if expected(keep) == saved:
                found.append(set(keep))
            return
        if index == len(groups):
            return
        search(index + 1, keep | groups[index], missing - sizes[index])
        search(index + 1, keep, missing)

    if len(groups) < 500:  # the search recurses once per group
        search(0, base, needed)
    exhausted = calls > _MAX_SEARCH or len(groups) >= 500
    if len(found) == 1 and not exhausted:
        return found[0]
    if len(found) > 1:
        reason = "several sets of frozen layers match its variables"
    elif exhausted:
        reason = (
            f"the search over the {len(groups)} frozen layers for the ones "
            "it was built on gave up"
        )
    else:
        reason = "no set of the model's weights matches its variables"
    warnings.warn(
        "keras_smartfrz.load_model: the optimizer state saved in the file "
        f"was not restored ({len(saved)} saved variables; {reason}). The "
        "optimizer starts afresh. Releasing the frozen weights' state with "
        "keras_smartfrz.release_optimizer_state before saving avoids this.",
        stacklevel=5,  # the caller of load_model / restore_optimizer_state
    )
    return None


def _replace_optimizer(model, old, new):
    model.optimizer = new
    compile_config = getattr(model, "_compile_config", None)
    config = getattr(compile_config, "config", None)
    if isinstance(config, dict):
        # `compile()` keeps the optimizer it was given (the one inside the
        # LossScaleOptimizer it adds for mixed precision); `model.save()`
        # serialises the optimizer from there.
        if config.get("optimizer") is old:
            config["optimizer"] = new
        elif config.get("optimizer") is getattr(old, "inner_optimizer", None):
            config["optimizer"] = getattr(new, "inner_optimizer", new)
