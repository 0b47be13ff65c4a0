"""Activation caching: train the layers after a frozen prefix on its cached outputs.

Once the front of a network is frozen, its output for a given input never
changes (if nothing in it is random and its BatchNormalization layers use
their moving statistics). `ActivationCache` computes that output once per
training example, keeps it, and from then on trains only the rest of the
network on it: a step skips the frozen prefix's forward pass as well as its
backward pass.

How it stays correct:

- **Where it cuts.** The cut is one tensor of the model's Functional graph
  (Sequential and Functional models; a subclassed model has no graph to cut)
  that every path from the inputs to the outputs goes through, and whose
  every upstream layer has no trainable weights, no randomness (Dropout or
  noise at a rate above 0, random augmentation layers, anything else
  holding a seed generator; `keras.ops` calls in the graph are fine), no
  activity regularizer, and is a BatchNormalization only if that is frozen in
  inference mode. The deepest such tensor is used. A nested Functional
  model called once (a keras-hub backbone inside its task model) is searched
  too, when what feeds it is safe and its single output is itself such a
  cut of the outer graph: the cut may then sit inside the backbone (a
  BERT-style backbone, with a padding mask reaching every layer and a dict
  of outputs, has none inside; with `dropout=0.0` its task model is cut
  after it). The layers after the cut
  are the model's own layers, with the same weights and the same optimizer:
  the model the user holds is unchanged, and validation and `predict` run
  the whole model as always.
- **What it looks up.** The cache is content-addressed: each example's
  inputs are hashed (a 64-bit multiply-add hash of their bit patterns, exact
  integer arithmetic, so the same example always gets the same key in any
  batch; inputs whose length is only known from the data, such as token
  ids, are hashed in chunks with their length folded in), and a batch uses
  cached activations only when every one of its examples is found.
  Shuffling is therefore fine. An input pipeline that changes the examples
  from epoch to epoch (random augmentation before the model) misses; after
  a full epoch that mostly misses, caching turns itself off with a warning
  that says so. Two different examples share a key with a probability of
  about 2**-64 per pair.
- **When it fills.** The epoch after the first freeze computes the prefix
  as usual and stores each example's output; the following epochs read it.
  A later freeze that moves the cut deeper derives the new cache from the
  old one at the freezing stage: the layers between the two cuts run once
  over the cached values (forward only, in batches, no fill epoch), under
  the same keys. Where that cannot be done (the old cache still filling,
  both caches together over the budget, or a path to the new cut that
  bypasses the old one), the next epoch fills the new cache from the inputs.
- **Bounded memory.** The cache holds one epoch's examples. If that would
  exceed `budget_bytes`, caching stays off for that cut and says why (there
  is no spilling to disk: reading activations back from disk is slower than
  the prefix it saves on the small models that fit this machine).

The train step with the cache is the Keras TensorFlow trainer's step with
`suffix(cached)` in place of `model(x)`; a model that overrides
`train_step`, runs under a `tf.distribute` strategy, or whose epoch length
is unknown is not cached (the reason is given). The step is the model's
only while `fit` runs: `on_train_end` takes it off. An exception that stops
`fit` skips `on_train_end`; the next `fit` with a freezing callback then
starts from the model's own step, and so does any `fit` after `compile()`
(a stale cached step traced for a recompiled model hands over to the
model's own). Until one of those, the stopped `fit`'s step stays; it is
correct as long as nobody changes the frozen prefix's weights (it serves
the outputs it cached), and it holds the cache's memory.
"""

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

_RANDOM_LAYER_TYPES = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)
_INT64_MAX = np.iinfo(np.int64).max
_CHUNK = 1024  # multipliers per chunk when the input width is unknown


class CacheRefused(Exception):
    """Activation caching cannot be used; the message says why."""


def _functional_graph(model):
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, keras.src.models.functional.Functional):
        return model
    return None


def _is_random(layer):
    if isinstance(layer, _RANDOM_LAYER_TYPES):
        # Keras' noise layers draw nothing at rate 0 / stddev 0 (their
        # `call` returns the inputs unless `training and rate > 0`), as in
        # a model built with `dropout=0.0`.
        return float(getattr(layer, "rate", getattr(layer, "stddev", 1))) > 0
    return any(
        isinstance(value, keras.random.SeedGenerator)
        for value in vars(layer).values()
    )


def _unsafe_reason(layer):
    """Why `layer` cannot sit in the cached prefix, or None."""
    if not isinstance(layer, keras.layers.Layer):
        # A `keras.ops` call in a functional graph (`x[:, 0]`, `ops.mean`):
        # a deterministic function of its inputs, with no weights.
        return None
    for sub in layer._flatten_layers(include_self=True, recursive=True):
        if sub.trainable_weights:
            return f"layer '{sub.name}' is still trainable"
        if _is_random(sub):
            return (
                f"layer '{sub.name}' ({type(sub).__name__}) draws random "
                "numbers in training"
            )
        if getattr(sub, "activity_regularizer", None) is not None:
            return f"layer '{sub.name}' has an activity regularizer"
        if isinstance(sub, keras.layers.BatchNormalization) and sub.trainable:
            return (
                f"BatchNormalization '{sub.name}' normalises with batch "
                "statistics (caching needs frozen_batchnorm='inference')"
            )
    return None


def _upstream_layers(tensor):
    """The layers that `tensor` is computed from (InputLayers excluded)."""
    seen, layers, stack = set(), [], [tensor]
    while stack:
        history = getattr(stack.pop(), "_keras_history", None)
        if history is None:
            continue
        operation = history.operation
        node = operation._inbound_nodes[history.node_index]
        key = (id(operation), history.node_index)
        if key in seen:
            continue
        seen.add(key)
        if not isinstance(operation, keras.layers.InputLayer):
            layers.append(operation)
        stack.extend(node.input_tensors)
    return layers


def static_refusal(model):
    """Why `model` can never be cached, or None."""
    if _functional_graph(model) is None:
        return (
            f"model '{model.name}' is a subclassed model ("
            f"{type(model).__name__}); only Sequential and Functional models "
            "have a graph to cut"
        )
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    if getattr(type(model), "train_step", None) is not (
        TensorFlowTrainer.train_step
    ):
        return f"{type(model).__name__} overrides train_step"
    if tf.distribute.has_strategy() or (
        getattr(model, "_distribute_strategy", None) is not None
    ):
        return "the model runs under a tf.distribute strategy"
    return None


@contextlib.contextmanager
def _graph_untouched(model):
    """Undoes the nodes that building a sub-model adds to the model's layers.

    A Functional model made from an intermediate tensor clones the graph
    after it, which appends nodes to those layers; the sub-models run on
    their own node lists, so the user's layers are put back as they were
    (`layer.output` keeps working, the saved config is unchanged).
    """
    found = {id(l): l for l in
             model._flatten_layers(include_self=True, recursive=True)}
    for layer in list(found.values()):
        graph = _functional_graph(layer)
        if graph is None:
            continue
        found.setdefault(id(graph), graph)
        # `keras.ops` calls in the graph are operations, not layers.
        for operation in graph.operations:
            found.setdefault(id(operation), operation)
    layers = list(found.values())
    sizes = [(len(l._inbound_nodes), len(l._outbound_nodes)) for l in layers]
    try:
        yield
    finally:
        for layer, (inbound, outbound) in zip(layers, sizes):
            del layer._inbound_nodes[inbound:]
            del layer._outbound_nodes[outbound:]


def _unsafe_upstream(tensors):
    """Why some layer that `tensors` are computed from cannot be cached."""
    layers = [l for t in keras.tree.flatten(tensors)
              for l in _upstream_layers(t)]
    return next(
        (r for r in map(_unsafe_reason, layers) if r is not None), None
    ), layers


def _is_functional(layer):
    """Whether `layer` is a Functional model (with a graph to look in)."""
    return isinstance(layer, keras.src.models.functional.Functional)


def _output_structure(graph):
    """`graph`'s outputs as it returns them (a single tensor, not a list of
    one), so a suffix returns what the model returns."""
    return getattr(graph, "_outputs_struct", graph.outputs)


def _submodel(model, inputs, outputs, name=None):
    """`keras.Model(inputs, outputs)` over `model`'s layers, leaving their
    graph as it was; None when some output does not depend on `inputs`
    alone."""
    with _graph_untouched(model):
        try:
            return keras.Model(inputs, outputs, name=name)
        except ValueError:
            return None


def _cuts_in(model, graph, wrap_prefix, wrap_suffix):
    """Cuts inside `graph`, deepest first, as `(layer, tensor, prefix,
    suffix)`, then `(None, reason)` for each tensor refused on the way.

    A cut is computed by safe layers only, and every path from `graph`'s
    inputs to its outputs goes through it. `wrap_prefix` and `wrap_suffix`
    turn a prefix starting at `graph`'s inputs and a suffix ending at its
    outputs into ones starting and ending at the model's (the identity for
    the model's own graph; see `_nested_cuts`).
    """
    outputs = {id(t) for t in keras.tree.flatten(graph.outputs)}
    # Operations, not only layers: a cut may be a `keras.ops` call's output.
    for layer in reversed(graph.operations):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if len(layer._inbound_nodes) != 1:
            continue  # a shared layer: its outputs are not one tensor
        # The node's tensor, in this graph (a nested model's `output` is
        # the one of its own graph).
        tensors = layer._inbound_nodes[0].output_tensors
        if len(tensors) != 1 or not isinstance(tensors[0], keras.KerasTensor):
            continue
        tensor = tensors[0]
        if id(tensor) in outputs:
            continue
        reason, upstream = _unsafe_upstream(tensor)
        if reason is not None:
            yield None, reason
            if _is_functional(layer):
                # A nested model (a keras-hub backbone in its task model),
                # called once with one output (checked above), frozen only
                # in part: the cut may be inside it.
                yield from _nested_cuts(model, graph, layer, wrap_prefix,
                                        wrap_suffix)
            continue
        if not any(getattr(sub, "weights", None) for sub in upstream):
            return  # only weightless layers before: nothing worth caching
        if any(d is None for d in tensor.shape[1:]):
            yield None, (f"the output of '{layer.name}' has an unknown "
                         f"shape {tensor.shape}")
            continue
        suffix = _submodel(model, tensor, _output_structure(graph),
                           "smartfrz_suffix")
        if suffix is None:
            continue  # another path from the inputs bypasses this tensor
        prefix = _submodel(model, graph.input, tensor, "smartfrz_prefix")
        yield layer, tensor, wrap_prefix(prefix), wrap_suffix(suffix)


def _nested_cuts(model, graph, layer, wrap_prefix, wrap_suffix):
    """Cuts inside the nested Functional model `layer` of `graph`: only
    when what feeds it is safe and its output is a cut of `graph`."""
    node = layer._inbound_nodes[0]
    if _unsafe_upstream(node.input_tensors)[0] is not None:
        return
    outer_suffix = _submodel(model, node.output_tensors[0],
                             _output_structure(graph))
    if outer_suffix is None:
        return  # a path to the outputs bypasses the nested model
    feeds = node.arguments.args[0]
    graph_inputs = {id(t) for t in keras.tree.flatten(graph.inputs)}
    if all(id(t) in graph_inputs for t in keras.tree.flatten(feeds)):
        outer_prefix = None  # the nested model reads the inputs as they are
    else:
        outer_prefix = _submodel(model, graph.input, feeds)

    def prefix_from_graph(prefix):
        if outer_prefix is not None:
            with _graph_untouched(model):
                prefix = keras.Model(outer_prefix.input,
                                     prefix(outer_prefix.output),
                                     name="smartfrz_prefix")
        return wrap_prefix(prefix)

    def suffix_to_graph(suffix):
        start = keras.Input(suffix.input.shape[1:], dtype=suffix.input.dtype)
        with _graph_untouched(model):
            suffix = keras.Model(start, outer_suffix(suffix(start)),
                                 name="smartfrz_suffix")
        return wrap_suffix(suffix)

    yield from _cuts_in(model, layer, prefix_from_graph, suffix_to_graph)


def find_cut(model):
    """The deepest tensor a frozen, deterministic prefix ends at.

    Looks inside a nested Functional model too (a keras-hub backbone inside
    its task model) when the nested model's output is itself a cut.

    Returns `(layer, tensor, prefix, suffix)`, where `prefix` maps the model's
    inputs to `tensor` and `suffix` maps `tensor` to the model's outputs (both
    Functional models over the model's own layers), or raises `CacheRefused`.
    """
    graph = _functional_graph(model)
    if graph is None:
        raise CacheRefused(static_refusal(model))
    first_reason = None
    for found in _cuts_in(model, graph, lambda p: p, lambda s: s):
        if found[0] is None:
            first_reason = first_reason or found[1]
            continue
        return found
    raise CacheRefused(
        "no frozen prefix of the model ends at a single tensor that every "
        "path to the outputs goes through"
        + (f" ({first_reason})" if first_reason else "")
    )


def between(model, start, end):
    """A Functional model from cut tensor `start` to the deeper cut `end`.

    Built over the model's own layers; None when `end` also depends on the
    inputs by a path that bypasses `start`.
    """
    return _submodel(model, start, end, name="smartfrz_between")


def leftover_step(model):
    """The `ActivationCache` whose step `model` still carries, or None.

    `fit` skips `on_train_end` when an exception stops it, so the step a
    cache installed can outlive the training it was made for.
    """
    step = vars(model).get("train_step")
    owner = getattr(step, "__self__", None)
    return owner if isinstance(owner, ActivationCache) else None


def remove_leftover_step(model, reset_train_function=True):
    """Takes a leftover cache step off `model`; True if there was one.

    The cache's values are dropped and, with `reset_train_function`, the
    model's train function too (the next `make_train_function` builds the
    model's own step).
    """
    cache = leftover_step(model)
    if cache is None:
        return False
    del model.train_step
    cache.release()
    if reset_train_function:
        model.train_function = None
    return True


def example_bytes(tensor):
    return int(np.prod(tensor.shape[1:])) * np.dtype(tensor.dtype).itemsize


class ActivationCache:
    """The cached prefix outputs of one cut, and the train step that reads them.

    Made by `FreezingCallback(cache_activations=True)`; see the module
    docstring for what it does and when it refuses.

    Args:
        model: the model being trained.
        cut: `(layer, tensor, prefix, suffix)` from `find_cut`.
        capacity: examples per epoch (the cache holds one epoch's worth).
        seed: seed of the input hash.
    """

    def __init__(self, model, cut, capacity, seed=0):
        self.model = model
        self.layer, self.tensor, self.prefix, self.suffix = cut
        tensor = self.tensor
        self.capacity = int(capacity)
        self.seed = seed
        self.derived_from = None
        self.nbytes = self.capacity * example_bytes(tensor)
        self.filling = True
        self.released = False
        self.hits = []
        self.misses = []
        shape = (self.capacity,) + tuple(tensor.shape[1:])
        self._values = tf.Variable(
            tf.zeros(shape, tensor.dtype), trainable=False, name="cache"
        )
        self._fill_keys = tf.Variable(
            tf.zeros((self.capacity,), tf.int64), trainable=False
        )
        self._sorted_keys = tf.Variable(
            tf.fill((self.capacity,), tf.constant(_INT64_MAX, tf.int64)),
            trainable=False,
        )
        self._sorted_slots = tf.Variable(
            tf.zeros((self.capacity,), tf.int32), trainable=False
        )
        self._is_filling = tf.Variable(True, trainable=False)
        self._count = tf.Variable(0, dtype=tf.int32, trainable=False)
        self._overflow = tf.Variable(False, trainable=False)
        self._hits = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._misses = tf.Variable(0, dtype=tf.int64, trainable=False)
        rng = np.random.default_rng(seed)
        # One random odd multiplier per input element; when the width is
        # unknown until the data comes (token ids of any length), the
        # elements are taken in chunks of `_CHUNK` (see `_keys`).
        shapes = [t.shape[1:] for t in keras.tree.flatten(self.prefix.inputs)]
        self._fixed_width = all(None not in s for s in shapes)
        width = (sum(int(np.prod(s)) for s in shapes)
                 if self._fixed_width else _CHUNK)
        self._multipliers = tf.constant(
            rng.integers(-(2**62), 2**62, size=(2, width), dtype=np.int64) | 1
        )

    # ------------------------------------------------------------- in graph
    def _keys(self, x):
        columns = []
        for part in keras.tree.flatten(x):
            part = tf.convert_to_tensor(part)
            flat = tf.reshape(part, (tf.shape(part)[0], -1))
            if part.dtype.is_floating:
                flat = tf.bitcast(tf.cast(flat, tf.float32), tf.int32)
            columns.append(tf.cast(flat, tf.int64))
        bits = tf.concat(columns, axis=1)
        multipliers = self._multipliers
        if not self._fixed_width:
            # Width unknown when the cache was made: pad the elements to
            # whole chunks and weight chunk c by a distinct odd number
            # (2c + 1), and fold the width in, so that where an element
            # sits and how many there are both change the key.
            width = tf.shape(bits)[1]
            chunks = (width + _CHUNK - 1) // _CHUNK
            bits = tf.pad(bits, [[0, 0], [0, chunks * _CHUNK - width]])
            bits += tf.cast(width, tf.int64) * 0x9E3779B1
            weight = tf.cast(2 * tf.range(chunks) + 1, tf.int64)
            multipliers = tf.reshape(
                multipliers[:, None, :] * weight[None, :, None], (2, -1))
        # Integer arithmetic wraps modulo 2**64: exact, so the key does not
        # depend on the batch the example sits in or the reduction order.
        first = tf.reduce_sum(bits * multipliers[0], axis=1)
        second = tf.reduce_sum((bits ^ 0x5BD1E995) * multipliers[1], axis=1)
        return first ^ (second * 0x2545F4914F6CDD1D)

    def _lookup(self, keys):
        """Binary search of `keys` in the sorted keys: (all found, slots)."""
        low = tf.zeros_like(keys, tf.int32)
        high = tf.fill(tf.shape(keys), tf.constant(self.capacity, tf.int32))
        for _ in range(max(1, math.ceil(math.log2(self.capacity + 1)))):
            middle = (low + high) // 2
            probe = tf.gather(
                self._sorted_keys, tf.minimum(middle, self.capacity - 1)
            )
            right = tf.logical_and(probe < keys, middle < high)
            low = tf.where(right, middle + 1, low)
            high = tf.where(right, high, middle)
        index = tf.minimum(low, self.capacity - 1)
        found = tf.gather(self._sorted_keys, index) == keys
        return tf.reduce_all(found), tf.gather(self._sorted_slots, index)

    def _store(self, keys, values):
        count = tf.shape(keys)[0]
        start = self._count.read_value()

        def write():
            slots = start + tf.range(count)
            self._values.scatter_update(tf.IndexedSlices(values, slots))
            self._fill_keys.scatter_update(tf.IndexedSlices(keys, slots))
            self._count.assign_add(count)
            return tf.constant(True)

        def overflow():
            self._overflow.assign(True)
            return tf.constant(False)

        return tf.cond(start + count <= self.capacity, write, overflow)

    def train_step(self, data):
        """The model's train step, with the prefix read from the cache."""
        model = self.model
        if not self.installed_on(model):
            # Traced for a model this cache no longer serves: `fit` was
            # interrupted by an exception (its `on_train_end` never ran to
            # take this step off), then the model was compiled again. The
            # model gets its own step back.
            remove_leftover_step(model, reset_train_function=False)
            return model.train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        keys = self._keys(x)
        filling = self._is_filling.read_value()
        found, slots = self._lookup(keys)
        hit = tf.logical_and(tf.logical_not(filling), found)
        cut = tf.cond(
            hit,
            lambda: tf.gather(self._values, slots),
            lambda: tf.cast(self.prefix(x, training=True), self._values.dtype),
        )
        tf.cond(
            filling,
            lambda: self._store(keys, cut),
            lambda: tf.constant(False),
        )
        self._hits.assign_add(tf.cast(hit, tf.int64))
        self._misses.assign_add(
            tf.cast(tf.logical_and(tf.logical_not(filling),
                                   tf.logical_not(hit)), tf.int64)
        )
        cut = tf.stop_gradient(cut)
        with tf.GradientTape() as tape:
            y_pred = self.suffix(cut, training=True)
            loss = model._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                training=True,
            )
            model._loss_tracker.update_state(
                loss, sample_weight=tf.shape(keys)[0]
            )
            if model.optimizer is not None:
                loss = model.optimizer.scale_loss(loss)
        trainable_weights = model.trainable_weights
        if trainable_weights:
            gradients = tape.gradient(loss, trainable_weights)
            model.optimizer.apply_gradients(zip(gradients, trainable_weights))
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def install(self):
        """Makes this cache's step the model's train step (the caller
        rebuilds the train function)."""
        self.model.train_step = self.train_step
        # `compile()` makes a new loss tracker: a step traced after it
        # belongs to a new training set-up, not to this cache's `fit`.
        self._compiled_tracker = self.model._loss_tracker

    def installed_on(self, model):
        """Whether this cache is `model`'s step in the training it was
        installed for (not released, and `model` not compiled since)."""
        return (
            not self.released
            and model is self.model
            and getattr(self, "_compiled_tracker", None) is not None
            and model._loss_tracker is self._compiled_tracker
        )

    # ------------------------------------------------------------- deriving
    def derive(self, cut, batch_size=256):
        """A complete cache for the deeper `cut`, computed from this one.

        The layers between this cache's cut and `cut` run over the cached
        values (forward only, `training=True` as in the train step, frozen
        and deterministic like the rest of the prefix), `batch_size` examples
        per call of one compiled function; the keys and their order are
        shared. Returns None when `cut` does not go through this cache's cut
        or this cache is still filling or released.
        """
        if self.filling or self.released:
            return None
        middle = between(self.model, self.tensor, cut[1])
        if middle is None:
            return None
        child = ActivationCache(self.model, cut, self.capacity, seed=self.seed)
        count = int(self._count.numpy())
        source, target = self._values, child._values

        @tf.function(autograph=False, reduce_retracing=True)
        def compute(start):
            slots = tf.range(start, tf.minimum(start + batch_size, count))
            values = middle(tf.gather(source, slots), training=True)
            target.scatter_update(
                tf.IndexedSlices(tf.cast(values, target.dtype), slots)
            )

        for start in range(0, count, batch_size):
            compute(tf.constant(start, tf.int32))
        child._sorted_keys.assign(self._sorted_keys)
        child._sorted_slots.assign(self._sorted_slots)
        child._count.assign(count)
        child._is_filling.assign(False)
        child.filling = False
        child.derived_from = self.layer.name
        return child

    # ---------------------------------------------------------------- epochs
    def end_epoch(self):
        """Called at each epoch's end. Returns a reason to stop, or None."""
        if self.filling:
            count = int(self._count.numpy())
            if bool(self._overflow.numpy()):
                return (
                    "the epoch held more examples than the "
                    f"{self.capacity} counted in the epoch before"
                )
            keys = self._fill_keys.numpy()[:count]
            order = np.argsort(keys, kind="stable")
            sorted_keys = np.full(self.capacity, _INT64_MAX, np.int64)
            sorted_keys[:count] = keys[order]
            sorted_slots = np.zeros(self.capacity, np.int32)
            sorted_slots[:count] = order.astype(np.int32)
            self._sorted_keys.assign(sorted_keys)
            self._sorted_slots.assign(sorted_slots)
            self._fill_keys.assign(np.zeros(self.capacity, np.int64))
            self._is_filling.assign(False)
            self.filling = False
            return None
        hits, misses = int(self._hits.numpy()), int(self._misses.numpy())
        self._hits.assign(0)
        self._misses.assign(0)
        self.hits.append(hits)
        self.misses.append(misses)
        if misses > hits:
            return (
                f"{misses} of {hits + misses} batches of the last epoch held "
                "examples not seen in the epoch that filled the cache: the "
                "inputs change from epoch to epoch (random augmentation in "
                "the input pipeline?)"
            )
        return None

    def release(self):
        """Drops the cached values (the variables die with this object)."""
        for name in ("_values", "_fill_keys", "_sorted_keys", "_sorted_slots"):
            setattr(self, name, None)
        self.released = True
