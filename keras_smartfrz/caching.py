"""Activation caching: train the layers after a frozen prefix on its cached outputs.

Once the front of a network is frozen, its output for a given input never
changes (if nothing in it is random and its BatchNormalization layers use
their moving statistics). `ActivationCache` computes that output once per
training example, keeps it, and from then on trains only the rest of the
network on it: a step skips the frozen prefix's forward pass as well as its
backward pass.

How it stays correct:

- **Where it cuts.** The model's Functional graph (Sequential and
  Functional models; a subclassed model has no graph to cut) is cut at a
  place in its topological order: the cut is the set of tensors that cross
  from the nodes before that place to the nodes after it. Every node before
  it must be safe: no trainable weights, no randomness (Dropout or noise at
  a rate above 0, random augmentation layers, anything else holding a seed
  generator; `keras.ops` calls in the graph are fine), no activity
  regularizer, and a BatchNormalization only if that is frozen in inference
  mode. The deepest cut that one computed tensor crosses (beside model
  inputs read as they are, such as a padding mask) is used; where there is
  none, the deepest cut at all, every tensor of which is cached. A nested
  Functional model called once (a keras-hub backbone inside its task model)
  is searched too, when what feeds it is safe and the rest of the outer
  graph reads only its outputs: the cut may then sit inside the backbone.
  In a BERT-style backbone (built with `dropout=0.0`) it sits after the
  deepest frozen encoder layer and holds that layer's hidden states and
  the padding mask every later layer reads. The layers after the cut
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
  exceed `budget_bytes`, caching stays off for that cut and says why. A cut
  whose shape the model leaves open (a text model built for any sequence
  length) is sized when its step is first traced, from the data's static
  shapes; batches of varying length leave it unknown, and caching turns
  off after the epoch with that reason (there
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
import functools
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
    # A node made over an existing tensor (an input of the model passed on
    # as an input of the sub-model) re-points that tensor's history at it.
    histories = [(t, t._keras_history) for l in layers
                 for node in l._inbound_nodes for t in node.output_tensors
                 if getattr(t, "_keras_history", None) is not None]
    try:
        yield
    finally:
        for layer, (inbound, outbound) in zip(layers, sizes):
            del layer._inbound_nodes[inbound:]
            del layer._outbound_nodes[outbound:]
        for tensor, history in histories:
            tensor._keras_history = history


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


def _nodes_in_order(graph):
    """`graph`'s nodes (one per call of an operation), inputs first: every
    node comes after the nodes that produce its inputs."""
    by_depth = graph._nodes_by_depth
    return [node for depth in sorted(by_depth, reverse=True)
            for node in by_depth[depth]]


def _frontier(nodes, index, outputs):
    """The tensors a cut after `nodes[index]` holds: produced by an input
    or by `nodes[:index + 1]`, and read by a later node or an output."""
    produced, order = {}, []
    for position, node in enumerate(nodes):
        if position <= index or isinstance(node.operation,
                                           keras.layers.InputLayer):
            for tensor in node.output_tensors:
                if id(tensor) not in produced:
                    produced[id(tensor)] = tensor
                    order.append(id(tensor))
    needed = set(outputs)
    for node in nodes[index + 1:]:
        needed.update(id(t) for t in keras.tree.flatten(node.input_tensors))
    return [produced[i] for i in order if i in needed]


def _is_input(tensor):
    return isinstance(tensor._keras_history.operation, keras.layers.InputLayer)


def _cuts_in(model, graph, wrap_prefix, wrap_suffix, most=None):
    """Cuts inside `graph`, deepest first, as `(layer, tensors, prefix,
    suffix)`, then `(None, reason)` for a place refused on the way.

    A cut is the set of tensors that cross from the nodes before a place in
    `graph`'s topological order to the nodes after it (one tensor in a
    plain chain; the hidden states and the padding mask in a BERT-style
    encoder), where every node before it is safe. `wrap_prefix` and
    `wrap_suffix` turn a prefix starting at `graph`'s inputs and a suffix
    ending at its outputs into ones starting and ending at the model's (the
    identity for the model's own graph; see `_nested_cuts`). With `most`,
    only cuts of at most that many tensors besides the graph's inputs.
    """
    nodes = _nodes_in_order(graph)
    outputs = [id(t) for t in keras.tree.flatten(graph.outputs)]
    first_unsafe, reason = len(nodes), None
    for position, node in enumerate(nodes):
        reason = _unsafe_reason(node.operation)
        if reason is not None:
            first_unsafe = position
            break
    if reason is not None:
        yield None, reason
    if first_unsafe < len(nodes) and _is_functional(
        nodes[first_unsafe].operation
    ):
        # A nested model (a keras-hub backbone in its task model), frozen
        # only in part: the cut may be inside it.
        yield from _nested_cuts(model, graph, nodes, first_unsafe,
                                wrap_prefix, wrap_suffix, most)
    seen = set()
    for index in range(first_unsafe - 1, -1, -1):
        node = nodes[index]
        if isinstance(node.operation, keras.layers.InputLayer):
            continue
        tensors = _frontier(nodes, index, outputs)
        key = tuple(id(t) for t in tensors)
        if key in seen:
            continue
        seen.add(key)
        if not any(getattr(n.operation, "weights", None)
                   for n in nodes[:index + 1]):
            return  # only weightless layers before: nothing worth caching
        if all(id(t) in outputs for t in tensors) or not all(
            isinstance(t, keras.KerasTensor) for t in tensors
        ):
            continue  # nothing after the cut
        inner = sum(not _is_input(t) for t in tensors)
        if inner == 0:
            continue  # the inputs themselves
        if most is not None and inner > most:
            continue
        starts = tensors[0] if len(tensors) == 1 else tensors
        suffix = _submodel(model, starts, _output_structure(graph),
                           "smartfrz_suffix")
        if suffix is None:
            continue
        prefix = _submodel(model, graph.input, starts, "smartfrz_prefix")
        if prefix is None:
            continue
        yield (node.operation, tensors, wrap_prefix(prefix),
               wrap_suffix(suffix))


def _nested_cuts(model, graph, nodes, index, wrap_prefix, wrap_suffix,
                 most):
    """Cuts inside the nested Functional model called at `nodes[index]`
    of `graph`: only when what feeds it is safe and every tensor that
    crosses that node to the rest of `graph` is one of its outputs."""
    node = nodes[index]
    layer = node.operation
    if len(layer._inbound_nodes) != 1:
        return  # a model called twice: its layers are shared
    if _unsafe_upstream(node.input_tensors)[0] is not None:
        return
    outer = _frontier(nodes, index, [id(t) for t in
                                     keras.tree.flatten(graph.outputs)])
    produced = [id(t) for t in node.output_tensors]
    if not outer or any(id(t) not in produced for t in outer):
        return  # a path to the outputs bypasses the nested model
    picks = [produced.index(id(t)) for t in outer]
    outer_suffix = _submodel(model, outer[0] if len(outer) == 1 else outer,
                             _output_structure(graph))
    if outer_suffix is None:
        return
    feeds = node.arguments.args[0]
    graph_inputs = {id(t) for t in keras.tree.flatten(graph.inputs)}
    if all(id(t) in graph_inputs for t in keras.tree.flatten(feeds)):
        outer_prefix = None  # the nested model reads the inputs as they are
    else:
        outer_prefix = _submodel(model, graph.input, feeds)
        if outer_prefix is None:
            return

    def prefix_from_graph(prefix):
        if outer_prefix is not None:
            with _graph_untouched(model):
                prefix = keras.Model(outer_prefix.input,
                                     prefix(outer_prefix.output),
                                     name="smartfrz_prefix")
        return wrap_prefix(prefix)

    def suffix_to_graph(suffix):
        # `suffix` ends at the nested model's outputs; the outer graph reads
        # those of them at `picks`.
        starts = [keras.Input(t.shape[1:], dtype=t.dtype)
                  for t in keras.tree.flatten(suffix.inputs)]
        starts = starts[0] if len(starts) == 1 else starts
        with _graph_untouched(model):
            ends = keras.tree.flatten(suffix(starts))
            ends = [ends[i] for i in picks]
            suffix = keras.Model(
                starts, outer_suffix(ends[0] if len(ends) == 1 else ends),
                name="smartfrz_suffix")
        return wrap_suffix(suffix)

    yield from _cuts_in(model, layer, prefix_from_graph, suffix_to_graph,
                        most)


def find_cut(model):
    """The deepest place a frozen, deterministic prefix can be cut off.

    Looks inside a nested Functional model too (a keras-hub backbone inside
    its task model) when what the rest of the model reads from it are its
    outputs.

    The deepest cut that one computed tensor crosses (beside inputs the rest
    of the model reads as they are, such as a padding mask) is preferred;
    where there is none, the deepest cut that several tensors cross (each
    is cached; a deeper cut across a side branch would cache that branch's
    tensor too for the sake of a few cheap layers).

    Returns `(layer, tensors, prefix, suffix)`: `tensors` (a list) cross the
    cut, `layer` is the last operation before it, `prefix` maps the model's
    inputs to `tensors` and `suffix` maps `tensors` (one tensor, or a list)
    to the model's outputs (both Functional models over the model's own
    layers); or raises `CacheRefused`.
    """
    graph = _functional_graph(model)
    if graph is None:
        raise CacheRefused(static_refusal(model))
    first_reason = None
    for most in (1, None):
        for found in _cuts_in(model, graph, lambda p: p, lambda s: s, most):
            if found[0] is None:
                first_reason = first_reason or found[1]
                continue
            return found
    raise CacheRefused(
        "no frozen, deterministic front of the model can be cut off"
        + (f" ({first_reason})" if first_reason else "")
    )


def between(model, start, end):
    """A Functional model from the cut `start` (a list of tensors) to the
    deeper cut `end`, over the model's own layers; None when `end` also
    depends on the inputs by a path that bypasses `start`."""
    return _submodel(model, start[0] if len(start) == 1 else start,
                     end[0] if len(end) == 1 else end,
                     name="smartfrz_between")


def leftover_step(model):
    """The `ActivationCache` whose step `model` still carries, or None.

    `fit` skips `on_train_end` when an exception stops it, so the step a
    cache installed can outlive the training it was made for.
    """
    step = vars(model).get("train_step")
    owner = getattr(step, "__self__", None)
    return owner if isinstance(owner, ActivationCache) else None


def remove_leftover_step(model):
    """Takes a leftover cache step off `model` and drops the cache's values;
    True if there was one. The caller rebuilds the train function."""
    cache = leftover_step(model)
    if cache is None:
        return False
    del model.train_step
    cache.release()
    return True


def example_bytes(tensors, shapes=None):
    """Bytes one example takes at a cut (its `tensors`, or `shapes` of
    their dtypes); None when a shape is not known yet."""
    tensors = keras.tree.flatten(tensors)
    shapes = shapes or [tuple(t.shape[1:]) for t in tensors]
    if any(None in shape for shape in shapes):
        return None
    return sum(int(np.prod(shape)) * np.dtype(t.dtype).itemsize
               for t, shape in zip(tensors, shapes))


def _derive_batch(middle, sources, source, target, count, batch_size,
                  start):
    """One batch of `ActivationCache.derive`: `middle` over cached values;
    `sources[i]` names the cached tensor the new cut's tensor i copies, or
    is None where `middle` computes it."""
    slots = tf.range(start, tf.minimum(start + batch_size, count))
    inputs = [tf.gather(v, slots) for v in source]
    computed = iter(keras.tree.flatten(middle(
        inputs[0] if len(inputs) == 1 else inputs, training=True)))
    values = [inputs[i] if i is not None else next(computed)
              for i in sources]
    for variable, value in zip(target, values):
        variable.scatter_update(
            tf.IndexedSlices(tf.cast(value, variable.dtype), slots))


class ActivationCache:
    """The cached prefix outputs of one cut, and the train step that reads them.

    Made by `FreezingCallback(cache_activations=True)`; see the module
    docstring for what it does and when it refuses.

    A cut's tensors whose shape is not known from the model alone (the
    hidden states of a text model built for any sequence length) get their
    storage when the train step is first traced: the data's static shapes
    tell their size then. If that is over `budget_bytes`, or still unknown
    (batches of varying length), the step runs the prefix as usual and
    `end_epoch` returns the reason.

    Args:
        model: the model being trained.
        cut: `(layer, tensors, prefix, suffix)` from `find_cut`.
        capacity: examples per epoch (the cache holds one epoch's worth).
        seed: seed of the input hash.
        budget_bytes: the most the cached values may take, or None.
        shapes: the cut's per-example shapes where the tensors leave some
            unknown (known from a cache it is derived from), or None.
    """

    def __init__(self, model, cut, capacity, seed=0, budget_bytes=None,
                 shapes=None):
        self.model = model
        self.layer, tensors, self.prefix, self.suffix = cut
        self.tensors = list(keras.tree.flatten(tensors))
        self.capacity = int(capacity)
        self.seed = seed
        self.budget_bytes = budget_bytes
        self.derived_from = None
        self.filling = True
        self.released = False
        self.refusal = None
        self._compiled_tracker = None  # set by `install`
        self.hits = []
        self.misses = []
        self.nbytes = None
        self._values = None
        shapes = shapes or [tuple(t.shape[1:]) for t in self.tensors]
        if example_bytes(self.tensors, shapes) is not None:
            self._allocate(shapes)
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

    def _allocate(self, shapes):
        """Creates the storage for per-example `shapes` (eagerly, also when
        called while the train step is traced), unless over the budget."""
        self.shapes = [tuple(int(d) for d in shape) for shape in shapes]
        self.nbytes = self.capacity * example_bytes(self.tensors, self.shapes)
        if self.budget_bytes is not None and self.nbytes > self.budget_bytes:
            self.refusal = (
                f"caching the output of '{self.layer.name}' for "
                f"{self.capacity} examples needs {self.nbytes} bytes, over "
                f"cache_budget_bytes={self.budget_bytes}"
            )
            return
        with tf.init_scope():
            self._values = [
                tf.Variable(tf.zeros((self.capacity,) + shape, t.dtype),
                            trainable=False, name="cache")
                for t, shape in zip(self.tensors, self.shapes)
            ]

    def _allocate_for(self, x):
        """At trace time: storage sized by the static shapes of `x`."""
        spec = keras.tree.map_structure(
            lambda t: keras.KerasTensor(t.shape, t.dtype), x)
        outputs = keras.tree.flatten(self.prefix.compute_output_spec(spec))
        shapes = [tuple(t.shape[1:]) for t in outputs]
        if any(None in shape for shape in shapes):
            self.refusal = (
                f"the output of '{self.layer.name}' has an unknown shape "
                f"{[t.shape for t in outputs]} in the data (batches of "
                "varying length?)"
            )
            return
        self._allocate(shapes)

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
            for variable, value in zip(self._values, values):
                variable.scatter_update(tf.IndexedSlices(value, slots))
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
            remove_leftover_step(model)
            return model.train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self._values is None and self.refusal is None:
            self._allocate_for(x)

        def computed():
            return [tf.cast(t, v.dtype) for t, v in zip(
                keras.tree.flatten(self.prefix(x, training=True)),
                self.tensors)]

        if self._values is None:
            # No storage (see `refusal`): the prefix runs at every step, and
            # `end_epoch` turns the cache off.
            cut = computed()
            batch = tf.shape(keras.tree.flatten(x)[0])[0]
        else:
            keys = self._keys(x)
            batch = tf.shape(keys)[0]
            filling = self._is_filling.read_value()
            found, slots = self._lookup(keys)
            hit = tf.logical_and(tf.logical_not(filling), found)
            cut = tf.nest.flatten(tf.cond(
                hit,
                lambda: tuple(tf.gather(v, slots) for v in self._values),
                lambda: tuple(computed()),
            ))
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
        cut = [tf.stop_gradient(t) for t in cut]
        with tf.GradientTape() as tape:
            y_pred = self.suffix(cut[0] if len(cut) == 1 else cut,
                                 training=True)
            loss = model._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                training=True,
            )
            model._loss_tracker.update_state(loss, sample_weight=batch)
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
            and self._compiled_tracker is not None
            and model._loss_tracker is self._compiled_tracker
        )

    # ------------------------------------------------------------- deriving
    def derive(self, cut, budget_bytes=None, batch_size=256):
        """A complete cache for the deeper `cut`, computed from this one.

        The layers between this cache's cut and `cut` run over the cached
        values (forward only, `training=True` as in the train step, frozen
        and deterministic like the rest of the prefix), `batch_size` examples
        per call of one compiled function; the keys and their order are
        shared. Returns None when `cut` does not go through this cache's cut,
        this cache is still filling or released, or the new cache would
        take more than `budget_bytes`.
        """
        if self.filling or self.released or self._values is None:
            return None
        # Tensors of both cuts (a padding mask every layer reads) are copied;
        # Keras cannot build a model that passes an input through as an
        # output when its other inputs are intermediate tensors.
        here = {id(t): i for i, t in enumerate(self.tensors)}
        computed = [t for t in cut[1] if id(t) not in here]
        middle = between(self.model, self.tensors, computed)
        if middle is None:
            return None
        specs = [keras.KerasTensor((None,) + shape, t.dtype)
                 for t, shape in zip(self.tensors, self.shapes)]
        outputs = iter(keras.tree.flatten(middle.compute_output_spec(
            specs[0] if len(specs) == 1 else specs)))
        shapes = [self.shapes[here[id(t)]] if id(t) in here
                  else tuple(next(outputs).shape[1:]) for t in cut[1]]
        sources = [here.get(id(t)) for t in cut[1]]
        child = ActivationCache(self.model, cut, self.capacity,
                                seed=self.seed, budget_bytes=budget_bytes,
                                shapes=shapes)
        if child._values is None:
            return None  # over the budget
        count = int(self._count.numpy())
        # A partial, not a closure: TensorFlow's retracing warning counts
        # the traces of all functions of one `__code__` together.
        compute = tf.function(
            functools.partial(_derive_batch, middle, sources, self._values,
                              child._values, count, batch_size),
            autograph=False, reduce_retracing=True)
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
        if self.refusal is not None:
            return self.refusal
        if self._values is None:
            return None  # no step ran since the cache was made
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
