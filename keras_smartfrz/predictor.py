"""The SmartFRZ predictor: reads a unit's weight history, says if it can freeze.

Li et al., "SmartFRZ: An Efficient Training Framework using Attention-Based
Layer Freezing", ICLR 2023. The predictor is a small attention network trained
once, offline (`tools/train_predictor.py`), and shipped inside the package.

- `normalize_window`: raw sampled weights -> what the predictor reads.
- `FreezePredictor`: the network (query/key/value attention over time).
- `save_predictor` / `load_predictor`: the on-disk format (weights + card).
- `PredictorPolicy`: the `FreezePolicy` that asks the predictor.

On-disk format (`FORMAT_VERSION` 2): a predictor is two files side by side,

- `<stem>.weights.h5`: the weights, as written by `Model.save_weights`;
- `<stem>_card.json`: the model card, a JSON object with `format_version`,
  `class_name` ("FreezePredictor"), `config` (the `FreezePredictor`
  constructor arguments), `normalization` (the `NORMALIZATION` tag of the
  `normalize_window` the weights were trained with), and free-form
  `training` (what it was trained on) and `metrics` (held-out results).

Loading builds `FreezePredictor(**card["config"])` and loads the weights into
it. The shipped predictor is `keras_smartfrz/assets/predictor.weights.h5`
with `keras_smartfrz/assets/predictor_card.json` (stem `predictor`).
"""

import json
import os
import pathlib

import keras
import numpy as np

from keras_smartfrz import policies

FORMAT_VERSION = 2
NORMALIZATION = "displacement-from-oldest/step-rms/v1+features/v1"
ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
DEFAULT_STEM = "predictor"
_WEIGHTS_SUFFIX = ".weights.h5"
_CARD_SUFFIX = "_card.json"
# Steps below this fraction of the weights' RMS (about 16 float32 ulps) are
# rounding noise, not movement: they are not blown up to a full-size pattern.
_RESOLUTION = 1e-6


def _work_dtype(window):
    """The float type the window's arithmetic runs in.

    float32 windows (what the callback samples from float32 weights) are
    worked in float32: a difference of two nearby float32 numbers is exact
    (Sterbenz), so displacements and steps carry no new rounding error, and
    the sums and ratios after them lose far less than the features' own
    resolution. That halves the memory traffic of the decision. Anything
    else (float64, float16, bfloat16, integers) is worked in float64.
    """
    if window.dtype == np.float32:
        return np.float32
    return np.float64


def normalize_window(window):
    """Turns raw sampled weights into the predictor's input.

    For each unit, with `w_t` the sampled weights at snapshot `t` (oldest
    first, `t = 0 .. T-1`):

        out_t = (w_t - w_0) / max(step_rms, 1e-6 * rms(w_{T-1}))
        step_rms = sqrt(mean over t, s of (w_{t+1} - w_t)[s] ** 2)

    i.e. each snapshot's displacement from the start of the window, measured
    in units of the unit's typical step between two snapshots.

    Why this form:

    - Subtracting `w_0` removes where the weights are (their initialisation
      and scale); only the movement remains. The reference is the *oldest*
      snapshot, not the latest, so the latest row (the predictor's query) is
      the net displacement over the window; with the latest as reference the
      query input would always be zero.
    - Dividing by the step size removes the speed of the movement, which is
      set by the learning rate, the optimizer and the layer's fan-in, none of
      which transfers from the reference models to a user's model. What
      remains is the *shape* of the trajectory, and it carries the signal:
      a layer still learning drifts in a consistent direction (the latest
      row's RMS approaches `T - 1`), a converged one wanders around a point
      (it stays near 1 for iid noise, about `sqrt(T)` for a random walk).
    - The result is invariant to `w -> c * w + b` for any `c > 0` and any
      per-weight offset `b`, and bounded: each row's RMS is at most `T - 1`.
    - The floor `1e-6 * rms(latest weights)` only matters when the weights
      have (nearly) stopped: then the output shrinks to zero instead of
      amplifying rounding noise, and a window that never moves gives zeros
      (finite, never NaN).

    Args:
        window: array `(units, T, S)` or `(T, S)` of raw sampled weights,
            oldest snapshot first, `T >= 2`.

    Returns:
        A float32 array of the same shape. The first row of each unit is 0.
        NaN or inf in a unit's window gives non-finite output for that unit.

    Example:

    ```python
    drift = np.linspace(0.0, 1.0, 30)[:, None] * np.ones((30, 8))
    normalize_window(drift)[-1]          # all 29.0: straight drift
    normalize_window(5.0 + 0.01 * drift)  # the same: scale and offset free
    ```
    """
    window = np.asarray(window)
    if window.ndim not in (2, 3):
        raise ValueError(
            "`window` must have shape (units, T, S) or (T, S); received "
            f"shape {window.shape}."
        )
    if window.shape[-2] < 2:
        raise ValueError(
            "`window` needs at least 2 snapshots (T >= 2) to measure "
            f"movement; received shape {window.shape}."
        )
    weights = window.astype(_work_dtype(window), copy=False)
    displacement = weights - weights[..., :1, :]
    steps = np.diff(weights, axis=-2)
    step_rms = np.sqrt(np.mean(steps**2, axis=(-2, -1), keepdims=True))
    weight_rms = np.sqrt(
        np.mean(weights[..., -1:, :] ** 2, axis=-1, keepdims=True)
    )
    scale = np.maximum(step_rms, _RESOLUTION * weight_rms)
    # scale == 0 only when nothing moved: then displacement is 0 as well.
    safe_scale = np.where(scale > 0.0, scale, 1.0)
    return (displacement / safe_scale).astype(np.float32)


FEATURE_NAMES = (
    "log_step_size",
    "log_net_displacement",
    "straightness",
    "deceleration",
    "depth",
)
NUM_FEATURES = len(FEATURE_NAMES)
_LOG_FLOOR = -12.0


def window_features(window, unit_index, num_units):
    """The scale-aware summary the predictor reads beside the window.

    `normalize_window` deliberately removes how fast a unit moves compared
    with its own weights; but that relative speed is the strongest single
    sign of convergence across architectures (a held-out logistic regression
    on these features reached AUC 0.94 on ResNet runs where the window alone
    reached 0.42). So the predictor gets it back, as a handful of
    dimensionless numbers, for each unit (with `w_t` its sampled weights,
    oldest first, `t = 0 .. T-1`, and `rms` the root mean square over the
    sampled weights):

    - `log_step_size`: `log10(step_rms / rms(w_{T-1})) / 4`, the typical step
      between two snapshots relative to the weights' size;
    - `log_net_displacement`: `log10(rms(w_{T-1} - w_0) / rms(w_{T-1})) / 4`,
      how far the window moved the unit, relative to its size;
    - `straightness`: `|w_{T-1} - w_0| / sum_t |w_{t+1} - w_t|`, in [0, 1]:
      1 for a straight drift, near 0 for a unit wandering around a point;
    - `deceleration`: `log10` of the step RMS over the window's second half
      divided by that over its first half, clipped to [-2, 2], over 2;
    - `depth`: `unit_index / (num_units - 1)`, where the unit sits in the
      forward order (0 first, 1 the head).

    The logarithms are floored at 1e-12 (a unit that did not move at all
    reads -3). The features are invariant to `w -> c * w` (`c > 0`) and to
    the order of the sampled weights.

    Args:
        window: array `(units, T, S)` of raw sampled weights, `T >= 3`.
        unit_index: int or array `(units,)`: each unit's position among
            the model's units.
        num_units: the model's number of units (the head included).

    Returns:
        A float32 array `(units, NUM_FEATURES)`, in `FEATURE_NAMES` order.

    Example:

    ```python
    raw = np.cumsum(np.random.randn(3, 30, 64), axis=1)
    window_features(raw, unit_index=[0, 1, 2], num_units=4).shape  # (3, 5)
    ```
    """
    window = np.asarray(window)
    window = window.astype(_work_dtype(window), copy=False)
    if window.ndim != 3 or window.shape[1] < 3:
        raise ValueError(
            "`window` must have shape (units, T, S) with T >= 3; received "
            f"shape {window.shape}."
        )
    if isinstance(num_units, bool) or not isinstance(
        num_units, (int, np.integer)
    ) or num_units < 1:
        raise ValueError(
            f"`num_units` must be a positive integer; received "
            f"num_units={num_units!r}."
        )
    index = np.broadcast_to(
        np.asarray(unit_index, dtype=np.float64), window.shape[:1]
    )
    if np.any(index < 0) or np.any(index >= num_units):
        raise ValueError(
            f"`unit_index` must lie in [0, {num_units}); received "
            f"unit_index={unit_index!r}."
        )
    tiny = 1e-30

    def log10(ratio):
        return np.maximum(np.log10(np.maximum(ratio, tiny)), _LOG_FLOOR)

    steps = np.diff(window, axis=1)
    step_norms = np.sqrt(np.sum(steps**2, axis=2))  # (units, T-1)
    size = np.sqrt(np.mean(window[:, -1] ** 2, axis=1)) + tiny
    step_rms = np.sqrt(np.mean(steps**2, axis=(1, 2)))
    net = window[:, -1] - window[:, 0]
    net_rms = np.sqrt(np.mean(net**2, axis=1))
    straightness = np.sqrt(np.sum(net**2, axis=1)) / np.maximum(
        step_norms.sum(axis=1), tiny
    )
    half = step_norms.shape[1] // 2
    first = np.sqrt(np.mean(step_norms[:, :half] ** 2, axis=1))
    second = np.sqrt(np.mean(step_norms[:, -half:] ** 2, axis=1))
    deceleration = np.where(
        (first > 0) & (second > 0),
        np.clip(np.log10(np.maximum(second, tiny) / np.maximum(first, tiny)),
                -2.0, 2.0),
        0.0,
    )
    features = np.stack(
        [
            log10(step_rms / size) / 4.0,
            log10(net_rms / size) / 4.0,
            np.clip(straightness, 0.0, 1.0),
            deceleration / 2.0,
            index / max(1, num_units - 1),
        ],
        axis=1,
    )
    return features.astype(np.float32)


def predictor_inputs(window, unit_index, num_units, progress=None):
    """What `FreezePredictor` reads for raw windows of some units.

    The normalised window comes with each snapshot's values already sorted
    (the predictor reads them sorted, see `FreezePredictor`): NumPy sorts
    them here in a few milliseconds, where the sort inside the model costs
    more than the rest of its call (65 against 48 ms for 35 units of
    1024 samples, on 2 CPU cores); the model skips its own sort for input
    that is already sorted.

    Args:
        window: array `(units, T, S)` of raw sampled weights, oldest first.
        unit_index: each unit's position among the model's units.
        num_units: the model's number of units.
        progress: `None` (default), or the fraction of the planned
            training done when the window ends, in `[0, 1]`
            (`FreezeStage.progress`: `(epoch + 1) / epochs`), for a
            predictor built with `use_progress=True`; it becomes a last
            feature column.

    Returns:
        `{"window": np.sort(normalize_window(window), axis=-1), "features":
        window_features(window, unit_index, num_units)}`, the features with
        a `progress` column appended when `progress` is given.
    """
    features = window_features(window, unit_index, num_units)
    if progress is not None:
        features = with_progress(features, progress)
    return {
        "window": np.sort(normalize_window(window), axis=-1),
        "features": features,
    }


def with_progress(features, progress):
    """`features` `(units, F)` with a training-progress column appended.

    Args:
        features: array `(units, F)`, typically from `window_features`.
        progress: a number or an array `(units,)` in `[0, 1]`: the fraction
            of the planned training done when each window ends.

    Returns:
        A float32 array `(units, F + 1)`.
    """
    features = np.asarray(features, np.float32)
    progress = np.asarray(progress, np.float64)
    if not np.all(np.isfinite(progress)) or np.any(
        (progress < 0.0) | (progress > 1.0)
    ):
        raise ValueError(
            "`progress` must lie in [0, 1]; received "
            f"progress={progress.tolist()!r}."
        )
    column = np.broadcast_to(progress, features.shape[:1]).astype(np.float32)
    return np.concatenate([features, column[:, None]], axis=1)


def _check_int(name, value, minimum):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}; received "
            f"{name}={value!r}."
        )


def _encoder(hidden_units, embedding_units, name):
    return keras.Sequential(
        [
            keras.layers.Dense(hidden_units, activation="relu"),
            keras.layers.Dense(hidden_units, activation="relu"),
            keras.layers.Dense(embedding_units),
        ],
        name=name,
    )


@keras.saving.register_keras_serializable(package="keras_smartfrz")
class FreezePredictor(keras.Model):
    """SmartFRZ's attention-based freeze predictor.

    Reads one unit's normalised weight history, a `(window_size,
    sample_size)` window (see `normalize_window`), with a few scale-aware
    features of it (see `window_features`), and returns the probability that
    the unit has converged and can be frozen. Three MLP encoders
    (`sample_size -> hidden_units -> hidden_units -> embedding_units`, ReLU
    between, linear output) map the latest snapshot to a query and every
    snapshot to a key and a value; scaled dot-product attention over time
    (softmax of `q.k / sqrt(embedding_units)`) pools the values into a
    context vector. The classifier MLP (`embedding_units + NUM_FEATURES ->
    classifier_units -> classifier_units -> 1`, ReLU, dropout) scores the
    context vector joined with the features; a linear map of the features
    is added to its logit, and a sigmoid gives the probability. With the
    defaults it has about 1.04M parameters.

    The paper's predictor reads the window alone. Ours also reads the
    features because the window is normalised to be scale-free, which
    throws away the unit's speed relative to its weights, and that speed is
    what transferred best to architectures the predictor never saw (see the
    model card of the shipped predictor for the held-out numbers).

    Most users never build one: `load_predictor()` returns the trained one
    shipped with the package, and `PredictorPolicy` uses it.

    Args:
        window_size: snapshots per window, `T` (default 30).
        sample_size: sampled weights per snapshot, `S` (default 1024).
        hidden_units: width of the encoders' hidden layers (default 256).
        embedding_units: width of queries, keys, values and the context
            (default 64).
        classifier_units: width of the classifier's hidden layers
            (default 32).
        dropout: dropout rate before each classifier layer, in `[0, 1)`
            (default 0.2; only active in training).
        use_progress: whether the predictor also reads how far training
            has got, `(epoch + 1) / epochs` of `fit` at the freezing stage,
            as a last feature column (default `False`). The callback reads
            `epochs` from `fit`: a training split into several `fit` calls
            reads each call's end as the end of training.

    Input: a dict with `"window"`, a float32 array `(batch, window_size,
    sample_size)` already normalised, and `"features"`, `(batch,
    num_features)` (`NUM_FEATURES`, plus one with `use_progress`);
    `predictor_inputs` makes both from raw sampled weights.
    Output: `(batch, 1)` probabilities.

    Example:

    ```python
    from keras_smartfrz.predictor import predictor_inputs

    predictor = keras_smartfrz.FreezePredictor(window_size=30, sample_size=1024)
    raw = np.random.rand(5, 30, 1024)  # 5 units' sampled weights
    inputs = predictor_inputs(raw, unit_index=np.arange(5), num_units=6)
    probabilities = predictor(inputs)  # shape (5, 1)
    ```
    """

    def __init__(
        self,
        window_size=30,
        sample_size=1024,
        hidden_units=256,
        embedding_units=64,
        classifier_units=32,
        dropout=0.2,
        use_progress=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_int("window_size", window_size, 3)
        _check_int("sample_size", sample_size, 1)
        _check_int("hidden_units", hidden_units, 1)
        _check_int("embedding_units", embedding_units, 1)
        _check_int("classifier_units", classifier_units, 1)
        if isinstance(dropout, bool) or not isinstance(
            dropout, (int, float, np.floating)
        ) or not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"`dropout` must be a number in [0, 1); received "
                f"dropout={dropout!r}."
            )
        self.window_size = int(window_size)
        self.sample_size = int(sample_size)
        self.hidden_units = int(hidden_units)
        self.embedding_units = int(embedding_units)
        self.classifier_units = int(classifier_units)
        if not isinstance(use_progress, (bool, np.bool_)):
            raise ValueError(
                "`use_progress` must be True or False; received "
                f"use_progress={use_progress!r}."
            )
        self.dropout = float(dropout)
        self.use_progress = bool(use_progress)
        self.query_encoder = _encoder(
            hidden_units, embedding_units, "query_encoder"
        )
        self.key_encoder = _encoder(
            hidden_units, embedding_units, "key_encoder"
        )
        self.value_encoder = _encoder(
            hidden_units, embedding_units, "value_encoder"
        )
        self.classifier = keras.Sequential(
            [
                keras.layers.Dropout(self.dropout),
                keras.layers.Dense(classifier_units, activation="relu"),
                keras.layers.Dropout(self.dropout),
                keras.layers.Dense(classifier_units, activation="relu"),
                keras.layers.Dense(1),
            ],
            name="classifier",
        )
        # A linear path from the features straight to the logit ("wide and
        # deep"): the few thousand reference windows train it in a few
        # epochs, and the attention path only has to learn what it adds.
        self.feature_logit = keras.layers.Dense(1, name="feature_logit")
        self.build(
            {
                "window": (None, self.window_size, self.sample_size),
                "features": (None, self.num_features),
            }
        )

    @property
    def num_features(self):
        """Width of the `"features"` input: `NUM_FEATURES` (+1 for progress)."""
        return NUM_FEATURES + int(self.use_progress)

    def build(self, input_shape):
        snapshot_shape = (None, self.sample_size)
        self.query_encoder.build(snapshot_shape)
        self.key_encoder.build(snapshot_shape)
        self.value_encoder.build(snapshot_shape)
        self.classifier.build(
            (None, self.embedding_units + self.num_features)
        )
        self.feature_logit.build((None, self.num_features))
        self.built = True

    def _check_inputs(self, inputs):
        if not isinstance(inputs, dict) or set(inputs) != {
            "window", "features"
        }:
            raise ValueError(
                "FreezePredictor takes a dict with keys 'window' and "
                "'features' (see `predictor_inputs`); received "
                f"{type(inputs).__name__}"
                + (f" with keys {sorted(inputs)}" if isinstance(inputs, dict)
                   else "")
                + "."
            )
        features = inputs["features"]
        shape = getattr(features, "shape", None)
        shape = np.shape(features) if shape is None else shape
        width = shape[-1] if len(shape) else None
        if width is not None and width != self.num_features:
            raise ValueError(
                f"This FreezePredictor reads {self.num_features} features "
                f"(use_progress={self.use_progress}); received "
                f"{width}. Pass `progress` to `predictor_inputs` exactly "
                "when the predictor was built with `use_progress=True`."
            )

    def _unpack(self, inputs):
        self._check_inputs(inputs)
        window = keras.ops.cast(inputs["window"], "float32")
        features = keras.ops.cast(inputs["features"], "float32")
        # Each snapshot's values are sorted: the sampled positions are a
        # random draw whose order means nothing, so the encoders read each
        # snapshot's distribution of displacements (its quantiles), which
        # means the same thing for every unit of every model. Normalised
        # windows reach `window_size - 1` in magnitude; scaled to about
        # [-1, 1] so the encoders' ReLUs do not saturate.
        # Input that is already sorted (`predictor_inputs` sorts with NumPy)
        # skips the sort: checking costs one comparison per value.
        is_sorted = keras.ops.all(window[..., 1:] >= window[..., :-1])
        window = keras.ops.cond(
            is_sorted, lambda: window, lambda: keras.ops.sort(window, axis=-1)
        )
        return window / float(self.window_size - 1), features

    def _encode_snapshots(self, encoder, window):
        # The encoders are per-snapshot MLPs: fold time into the batch.
        shape = keras.ops.shape(window)
        flat = keras.ops.reshape(window, (-1, self.sample_size))
        return keras.ops.reshape(
            encoder(flat), (shape[0], shape[1], self.embedding_units)
        )

    def _attention(self, window):
        query = self.query_encoder(window[:, -1, :])
        keys = self._encode_snapshots(self.key_encoder, window)
        scores = keras.ops.einsum("be,bte->bt", query, keys)
        return keras.ops.softmax(
            scores / np.sqrt(self.embedding_units).astype("float32"), axis=-1
        )

    def attention_weights(self, inputs):
        """How much each snapshot of the window counts, `(batch, T)`."""
        window, _ = self._unpack(inputs)
        return self._attention(window)

    def call(self, inputs, training=None):
        # `_numpy_call` works this same network in NumPy for inference: a
        # change here needs the same change there.
        window, features = self._unpack(inputs)
        weights = self._attention(window)
        values = self._encode_snapshots(self.value_encoder, window)
        context = keras.ops.einsum("bt,bte->be", weights, values)
        joined = keras.ops.concatenate([context, features], axis=-1)
        logit = self.classifier(joined, training=training)
        return keras.ops.sigmoid(logit + self.feature_logit(features))

    def _numpy_call(self, inputs):
        """`call(inputs, training=False)` worked in NumPy, or `None`.

        The same network, layer by layer, on the current weights: what
        `PredictorPolicy` runs at each freezing stage. NumPy needs no trace
        (a traced `tf.function` paid 100-250 ms at its first call on 2 CPU
        cores) and runs alike on every backend, where an eager Keras call
        pays Keras' per-layer dispatch every time (measurements in
        `PredictorPolicy._predict`). Returns `None` when the model
        is not the network this mirrors (a subclass with its own `call`, a
        quantized layer, or layers other than `Dense` with ReLU or no
        activation); the caller
        then calls the model. `tests/test_predictor.py` checks both agree.
        """
        if type(self).call is not FreezePredictor.call:
            return None
        mlps = (self.query_encoder, self.key_encoder, self.value_encoder,
                self.classifier)
        stacks = [_numpy_dense_stack(mlp.layers) for mlp in mlps]
        wide = _numpy_dense_stack([self.feature_logit])
        if any(stack is None for stack in stacks) or wide is None:
            return None
        query_mlp, key_mlp, value_mlp, classifier = stacks
        self._check_inputs(inputs)
        window = np.asarray(inputs["window"], np.float32)
        features = np.asarray(inputs["features"], np.float32)
        if not np.all(window[..., 1:] >= window[..., :-1]):
            window = np.sort(window, axis=-1)
        window = window / np.float32(self.window_size - 1)
        batch, steps = window.shape[:2]
        flat = window.reshape(batch * steps, self.sample_size)
        query = _numpy_mlp(window[:, -1, :], query_mlp)
        keys = _numpy_mlp(flat, key_mlp).reshape(batch, steps, -1)
        values = _numpy_mlp(flat, value_mlp).reshape(batch, steps, -1)
        scores = np.einsum("be,bte->bt", query, keys) / np.sqrt(
            np.float32(self.embedding_units)
        )
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights = scores / scores.sum(axis=-1, keepdims=True)
        context = np.einsum("bt,bte->be", weights, values)
        joined = np.concatenate([context, features], axis=-1)
        logit = _numpy_mlp(joined, classifier) + _numpy_mlp(features, wide)
        # A sigmoid that cannot overflow: exp of a non-positive number.
        positive = np.exp(-np.abs(logit))
        return np.where(
            logit >= 0, 1.0 / (1.0 + positive), positive / (1.0 + positive)
        ).astype(np.float32)

    def get_config(self):
        config = super().get_config()
        config.update({key: getattr(self, key) for key in _CONFIG_KEYS})
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# ------------------------------------------------------------- file format
_CONFIG_KEYS = (
    "window_size",
    "sample_size",
    "hidden_units",
    "embedding_units",
    "classifier_units",
    "dropout",
    "use_progress",
)
# Keys a card may leave out (written before they existed), with the value
# such a card means.
_CONFIG_DEFAULTS = {"use_progress": False}


def predictor_files(path=None):
    """The `(weights file, card file)` pair a predictor path designates.

    Args:
        path: `None` for the predictor shipped with the package; a directory
            (its `predictor.weights.h5` and `predictor_card.json`); or a
            `<stem>.weights.h5` file (its card is `<stem>_card.json` next
            to it).
    """
    if path is None:
        path = ASSETS_DIR
    path = pathlib.Path(os.fspath(path))
    if path.name.endswith(_WEIGHTS_SUFFIX):
        stem = path.name[: -len(_WEIGHTS_SUFFIX)]
        directory = path.parent
    elif path.suffix:
        raise ValueError(
            "A predictor path is a directory or a `<name>.weights.h5` file; "
            f"received '{path}'."
        )
    else:
        stem, directory = DEFAULT_STEM, path
    return (
        directory / f"{stem}{_WEIGHTS_SUFFIX}",
        directory / f"{stem}{_CARD_SUFFIX}",
    )


def save_predictor(predictor, path, card=None):
    """Writes `predictor` as a weights file and its model card.

    Args:
        predictor: a `FreezePredictor`.
        path: a directory (created if needed) or a `<stem>.weights.h5` path;
            see `predictor_files`.
        card: optional dict of extra card fields, typically `training` (what
            the predictor was trained on) and `metrics` (held-out results).
            `format_version`, `class_name`, `config` and `normalization` are
            always set by this function.

    Returns:
        The `(weights file, card file)` paths written.
    """
    if not isinstance(predictor, FreezePredictor):
        raise ValueError(
            "`predictor` must be a FreezePredictor; received "
            f"{type(predictor).__name__}."
        )
    weights_file, card_file = predictor_files(path)
    weights_file.parent.mkdir(parents=True, exist_ok=True)
    full_card = dict(card or {})
    full_card.update(
        {
            "format_version": FORMAT_VERSION,
            "class_name": "FreezePredictor",
            "config": {key: getattr(predictor, key) for key in _CONFIG_KEYS},
            "normalization": NORMALIZATION,
        }
    )
    # A fresh copy holds the weights alone: a predictor trained with `fit`
    # would also write its optimizer's state (twice its size again).
    clean = FreezePredictor(
        **{key: getattr(predictor, key) for key in _CONFIG_KEYS}
    )
    clean.set_weights(predictor.get_weights())
    clean.save_weights(str(weights_file))
    card_file.write_text(json.dumps(full_card, indent=2, sort_keys=True))
    return weights_file, card_file


def read_card(path=None):
    """Reads and checks the model card of the predictor at `path`.

    Raises `FileNotFoundError` if the card is missing and `ValueError` if it
    is not valid JSON or does not describe a predictor this version of
    keras-smartfrz can load (other `format_version`, class, normalisation or
    config keys). Every message names the file.
    """
    _, card_file = predictor_files(path)
    if not card_file.is_file():
        raise FileNotFoundError(
            f"Predictor model card not found: '{card_file}'."
            + _shipped_hint(path)
        )
    try:
        card = json.loads(card_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"Predictor model card '{card_file}' is not valid JSON (truncated "
            f"or corrupt?): {error}."
        ) from error
    if not isinstance(card, dict):
        raise ValueError(
            f"Predictor model card '{card_file}' must hold a JSON object; "
            f"found {type(card).__name__}."
        )
    version = card.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"Predictor model card '{card_file}' has format_version "
            f"{version!r}; this version of keras-smartfrz reads format "
            f"version {FORMAT_VERSION}."
        )
    if card.get("class_name") != "FreezePredictor":
        raise ValueError(
            f"Predictor model card '{card_file}' describes a "
            f"{card.get('class_name')!r}, not a 'FreezePredictor'."
        )
    if card.get("normalization") != NORMALIZATION:
        raise ValueError(
            f"Predictor model card '{card_file}' was trained on windows "
            f"normalised as {card.get('normalization')!r}; this version of "
            f"keras-smartfrz normalises them as {NORMALIZATION!r}."
        )
    config = card.get("config")
    required = set(_CONFIG_KEYS) - set(_CONFIG_DEFAULTS)
    if (
        not isinstance(config, dict)
        or not required <= set(config)
        or not set(config) <= set(_CONFIG_KEYS)
    ):
        raise ValueError(
            f"Predictor model card '{card_file}' must have a `config` with "
            f"the keys {sorted(required)} (and optionally "
            f"{sorted(_CONFIG_DEFAULTS)}); found "
            f"{sorted(config) if isinstance(config, dict) else config!r}."
        )
    card["config"] = dict(_CONFIG_DEFAULTS, **config)
    return card


def _shipped_hint(path):
    if path is not None:
        return ""
    return (
        " This installation ships no trained predictor: train and export "
        "one with `python tools/train_predictor.py`, or pass the path of a "
        "saved predictor."
    )


def load_predictor(path=None):
    """Loads a trained `FreezePredictor` from its weights file and card.

    Args:
        path: `None` (default) for the predictor shipped with the package
            (`keras_smartfrz/assets/predictor.weights.h5` and
            `predictor_card.json`); a directory holding
            `predictor.weights.h5` and `predictor_card.json`; or a
            `<stem>.weights.h5` file with `<stem>_card.json` next to it.
            See the module docstring for the format.

    Returns:
        The `FreezePredictor`, built and loaded; its model card (a dict) is
        in its `card` attribute.

    Raises:
        FileNotFoundError: the weights file or the card is missing.
        ValueError: a file is truncated or corrupt, or was written for
            another format version, normalisation or configuration.

    Example:

    ```python
    predictor = keras_smartfrz.load_predictor()
    print(predictor.card["metrics"])
    ```
    """
    weights_file, card_file = predictor_files(path)
    card = read_card(path)
    if not weights_file.is_file():
        raise FileNotFoundError(
            f"Predictor weights not found: '{weights_file}' (its model card "
            f"'{card_file}' exists)." + _shipped_hint(path)
        )
    try:
        predictor = FreezePredictor(**card["config"])
    except ValueError as error:
        raise ValueError(
            f"Predictor model card '{card_file}' has an invalid config: "
            f"{error}"
        ) from error
    try:
        predictor.load_weights(str(weights_file))
    except Exception as error:  # h5py and Keras raise many types here.
        raise ValueError(
            f"Cannot load predictor weights '{weights_file}' (truncated, "
            "corrupt, or written for another config than its card "
            f"'{card_file}'): {type(error).__name__}: {error}"
        ) from error
    predictor.card = card
    return predictor


def _numpy_dense_stack(layers):
    """`(kernel, bias, relu)` per `Dense` layer of `layers`, or `None`.

    `Dropout` is skipped (inference); any other layer, a quantized `Dense`,
    or an activation other than ReLU or none, gives `None`: not a stack
    `_numpy_mlp` can run.
    """
    stack = []
    for layer in layers:
        if isinstance(layer, keras.layers.Dropout):
            continue
        if (
            type(layer) is not keras.layers.Dense
            or not layer.use_bias
            or getattr(layer, "quantization_mode", None) is not None
        ):
            return None
        if layer.activation is keras.activations.relu:
            relu = True
        elif layer.activation is keras.activations.linear:
            relu = False
        else:
            return None
        stack.append((_to_numpy(layer.kernel), _to_numpy(layer.bias), relu))
    return stack


def _to_numpy(value):
    """A variable's value (or a tensor, as a LoRA-enabled `Dense.kernel`)
    as a NumPy array. `Variable.numpy()` reads the 26 weights of the
    shipped predictor in 1.3 ms, `keras.ops.convert_to_numpy` in 4.7 ms
    (TensorFlow backend, 2 CPU cores), once per freezing stage."""
    if isinstance(value, keras.Variable):
        return value.numpy()
    return keras.ops.convert_to_numpy(value)


def _numpy_mlp(x, stack):
    for kernel, bias, relu in stack:
        x = x @ kernel + bias
        if relu:
            x = np.maximum(x, 0.0)
    return x


# ------------------------------------------------------------------ policy
@keras.saving.register_keras_serializable(package="keras_smartfrz")
class PredictorPolicy(policies.FreezePolicy):
    """Freezes the units a `FreezePredictor` scores at or above a threshold.

    SmartFRZ's decision rule. At each freezing stage every candidate unit's
    window (the last `window_size` snapshots of its sampled weights) is
    normalised (`normalize_window`) and scored by the predictor in one
    batched call; the score is the predicted probability that the unit has
    converged, and a unit is proposed for freezing when its score is at least
    `freeze_threshold`. The predictor also reads each unit's position in the
    model (`FreezeStage.positions()`) and, if it was built with
    `use_progress=True`, how far training has got (`FreezeStage.progress`).
    Until the history holds a full window of
    `window_size` snapshots, and for a unit whose window holds NaN or inf,
    the score is 0 and nothing is proposed.

    Serialisation keeps the predictor by reference: `get_config()` stores
    the path it was loaded from (`None` for the shipped predictor), not its
    weights. A policy built around an in-memory predictor cannot be
    serialised; save the predictor with `save_predictor` and pass its path.

    Args:
        predictor: `None` (default) for the predictor shipped with the
            package, a path accepted by `load_predictor`, or a
            `FreezePredictor`.
        freeze_threshold: minimum score to propose freezing, in `[0, 1]`
            (default 0.5).

    Example:

    ```python
    policy = keras_smartfrz.PredictorPolicy(freeze_threshold=0.5)
    callback = keras_smartfrz.FreezingCallback(policy)
    model.fit(x, y, epochs=10, callbacks=[callback])
    ```
    """

    def __init__(self, predictor=None, freeze_threshold=0.5):
        if isinstance(freeze_threshold, bool) or not isinstance(
            freeze_threshold, (int, float, np.floating)
        ):
            raise ValueError(
                "`freeze_threshold` must be a number in [0, 1]; received "
                f"freeze_threshold={freeze_threshold!r}."
            )
        if not 0.0 <= freeze_threshold <= 1.0:
            raise ValueError(
                "`freeze_threshold` must be in [0, 1]; received "
                f"freeze_threshold={freeze_threshold!r}."
            )
        if isinstance(predictor, FreezePredictor):
            self._source = None
        elif predictor is None or isinstance(predictor, (str, os.PathLike)):
            self._source = {
                "path": None if predictor is None else os.fspath(predictor)
            }
            predictor = load_predictor(predictor)
        else:
            raise ValueError(
                "`predictor` must be None (the shipped predictor), a path, "
                f"or a FreezePredictor; received {predictor!r}."
            )
        self.predictor = predictor
        self.freeze_threshold = float(freeze_threshold)

    @property
    def window_size(self):
        """Snapshots the predictor reads per unit."""
        return self.predictor.window_size

    @property
    def sample_size(self):
        """Sampled weights per snapshot the predictor reads."""
        return self.predictor.sample_size

    def decide(self, stage):
        count = len(stage.unit_names)
        scores = np.zeros(count, np.float32)
        if stage.window is None or count == 0:
            return scores, scores > 0.0
        window = np.asarray(stage.window)
        if window.ndim != 3 or window.shape[0] != count:
            raise ValueError(
                "`stage.window` must have shape (len(unit_names), T, S) = "
                f"({count}, T, S); received shape {window.shape}."
            )
        if window.shape[2] != self.sample_size:
            raise ValueError(
                f"The predictor reads {self.sample_size} sampled weights per "
                f"snapshot but the window holds {window.shape[2]}; use the "
                "same `sample_size` for the callback and the predictor."
            )
        if window.shape[1] > self.window_size:
            raise ValueError(
                f"The predictor reads windows of {self.window_size} "
                f"snapshots but received {window.shape[1]}; use the same "
                "`window_size` for the callback and the predictor."
            )
        if window.shape[1] < self.window_size:
            return scores, scores > 0.0
        finite = np.isfinite(window).all(axis=(1, 2))
        if finite.any():
            inputs = predictor_inputs(
                window[finite],
                stage.positions()[finite],
                stage.num_units,
                min(1.0, stage.progress) if self.predictor.use_progress
                else None,
            )
            scores[finite] = self._predict(inputs).reshape(-1)
        return scores, finite & (scores >= self.freeze_threshold)

    def _predict(self, inputs):
        """The predictor's probabilities for `inputs`, a NumPy array.

        Worked in NumPy on the predictor's current weights
        (`FreezePredictor._numpy_call`), so no stage pays a trace and every
        backend runs the same code. Against the traced `tf.function` it
        replaced, on the calls of the suite's ViT fit (34 candidate units,
        then 16 down to 3; `benchmarks/predictor_call_cost.py`, fresh
        processes, 2 CPU cores): 74 against 187 ms in all, the first call
        29 against 136 ms (the trace), later calls 6.3 against 8.0 ms, and
        an eager Keras call 228 ms; scores within 9e-8. A predictor that is
        not the network `_numpy_call` mirrors is called as a Keras model.
        """
        scores = self.predictor._numpy_call(inputs)
        if scores is None:
            scores = keras.ops.convert_to_numpy(
                self.predictor(inputs, training=False)
            )
        return scores

    def get_config(self):
        if self._source is None:
            raise ValueError(
                "This PredictorPolicy holds an in-memory FreezePredictor, "
                "which cannot be serialised by config. Save it with "
                "`keras_smartfrz.predictor.save_predictor(predictor, path)` "
                "and build the policy with `PredictorPolicy(path)`."
            )
        return {
            "predictor": self._source["path"],
            "freeze_threshold": self.freeze_threshold,
        }
