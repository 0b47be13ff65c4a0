"""Releasing the optimizer state (slot variables) of frozen weights.

`freeze_layers` keeps the optimizer as it is: its moments for the frozen
weights stay allocated (Adam holds two float32 copies of every weight it was
built on, three with `amsgrad`), although nothing will read them again.
`release_optimizer_state` drops them, so that the optimizer looks as if it had
been built on the weights that still train.

How Keras 3 lays out an optimizer's state (keras/src/optimizers/
base_optimizer.py and the per-optimizer `build` methods), which this module
relies on:

- `optimizer._trainable_variables` is the list the optimizer was built on, and
  `optimizer._trainable_variables_indices` maps `optimizer._var_key(v)` to the
  position of `v` in it. `update_step` finds a weight's slots by that
  position (`self._momentums[self._get_variable_index(variable)]`).
- Every per-weight slot list (`_momentums`, `_velocities`, `_velocity_hats`,
  `momentums`, `_accumulators`, `_r`/`_c`/`_v`, the gradient accumulators
  `_accumulated_gradients`, the EMA averages `_model_variables_moving_average`,
  ...) is aligned with `_trainable_variables`: same length, one entry (a
  variable or `None`) per weight.
- `optimizer._variables` (what `optimizer.variables`, `save_own_variables` and
  `load_own_variables` use) holds the iteration count and the learning rate,
  then the slots in creation order. Filtering it keeps the order a build on the
  remaining weights would give.
- On the TensorFlow backend the optimizer is also a TensorFlow `AutoTrackable`:
  assigning a list attribute stores a TensorFlow `ListWrapper` as a checkpoint
  dependency, which is not always the list object Keras keeps as the attribute
  (Keras wraps it again in its own `TrackedList`). Both hold the slot
  variables, so both are replaced here, or the slots would never be freed.
- A traced train step outlives its `tf.function` (TensorFlow 2.21): the
  optimizer sums the gradients with `ReplicaContext.all_reduce`, which uses
  `tf.custom_gradient`, and in graph mode every `tf.custom_gradient` call
  registers its gradient function, whose closure holds tensors of the traced
  graph, in TensorFlow's global gradient registry for good. That keeps the
  graph, and every variable handle it captured, alive: the released slots'
  Python objects die, but their buffers are never freed. So the release also
  drops the registry entries of the graphs that captured a released slot (see
  `_forget_train_graphs`); those graphs are finished traces that nothing
  differentiates again.
"""

import keras
import numpy as np

_NOT_ALIGNED = ("_variables",)


def _variable_types():
    types = [keras.Variable]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        types.append(tf.Variable)
    return tuple(types)


def _num_bytes(variable):
    dtype = keras.backend.standardize_dtype(variable.dtype)
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:  # bfloat16, float8: registered by ml_dtypes
        import ml_dtypes

        itemsize = np.dtype(getattr(ml_dtypes, dtype)).itemsize
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size * itemsize


def _child_optimizers(optimizer):
    """Optimizers wrapped by `optimizer` (LossScaleOptimizer, MultiOptimizer)."""
    children = []
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        children.append(inner)
    children.extend(getattr(optimizer, "_inner_optimizers", None) or [])
    return [c for c in children if c is not optimizer]


def _is_tf_structure(value):
    """Whether `value` is a TensorFlow trackable data structure (ListWrapper)."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return isinstance(value, tf.__internal__.tracking.Trackable)


def _is_aligned(optimizer, name, value, count):
    """Whether attribute `name` holds one entry per weight the optimizer was
    built on (a variable or `None` each): a slot list, or the weights."""
    if name in _NOT_ALIGNED or name.startswith("_self_"):
        return False
    if not isinstance(value, (list, tuple)) or len(value) != count:
        return False
    types = _variable_types()
    protected = (
        getattr(optimizer, "_iterations", None),
        getattr(optimizer, "_learning_rate", None),
    )
    return all(
        e is None or (isinstance(e, types) and all(e is not p for p in protected))
        for e in value
    )


def _slot_owners(optimizer, owners=None):
    """Maps the id of each per-weight optimizer variable (a slot) to the id
    of the weight it belongs to, through wrapped optimizers too."""
    owners = {} if owners is None else owners
    for child in _child_optimizers(optimizer):
        _slot_owners(child, owners)
    if not getattr(optimizer, "built", False):
        return owners
    built_on = list(optimizer._trainable_variables)
    own = {id(v) for v in built_on}
    for name, value in vars(optimizer).items():
        if _is_aligned(optimizer, name, value, len(built_on)):
            for element, variable in zip(value, built_on):
                if element is not None and id(element) not in own:
                    owners.setdefault(id(element), id(variable))
    return owners


def release_optimizer_state(optimizer, variables):
    """Frees the optimizer state of weights that no longer train.

    After `keras_smartfrz.freeze_layers`, the optimizer still holds the slot
    variables of the frozen weights (Adam's moments, SGD's momentums, ...),
    which nothing reads any more. This removes them, and every per-weight
    entry of the optimizer, so that the optimizer looks exactly as if it had
    been built on the remaining trainable weights:

    - the remaining weights keep their slot variables (the same objects, with
      their values untouched), in the same order, and the iteration count and
      learning rate are kept, so training continues exactly as before;
    - `optimizer.variables` lists what a fresh `optimizer.build()` on the
      remaining weights would list, in the same order; so `model.save()`
      followed by `keras.saving.load_model()` restores them (Keras builds the
      loaded optimizer on the trainable weights only, and skips loading the
      optimizer when the variable counts differ);
    - the released variables are freed once the train step that used them is
      gone: call this after `freeze_layers` (which rebuilds the train step),
      or rebuild it with `keras_smartfrz.rebuild_train_step(model)`.

    The optimizer is handled generically: every list attribute aligned with
    the list of weights the optimizer was built on (one entry per weight) is
    filtered, which covers the slots of all Keras optimizers, gradient
    accumulation (`gradient_accumulation_steps`) and EMA (`use_ema`).
    `LossScaleOptimizer` and `MultiOptimizer` are released through the
    optimizers they wrap.

    Note that after a release the train step must not be given the released
    weights again: to unfreeze them, build a new optimizer.

    Args:
        optimizer: a Keras 3 optimizer, usually `model.optimizer`. An
            optimizer not built yet (or `None`) holds no state: nothing is
            released.
        variables: the weights that were frozen (Keras or TensorFlow
            variables), such as the `weights` of the layers just frozen.
            Variables the optimizer does not know (a BatchNormalization's
            moving statistics, weights frozen before the optimizer was built,
            weights already released) are ignored.

    Returns:
        The number of bytes of optimizer variables released (0 if none).

    Raises:
        ValueError: if one of `variables` is still trainable (its slots are
            still needed).

    Example:

    ```python
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(64, name="hidden"),
        keras.layers.Dense(1, name="head"),
    ])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((32, 8)), np.ones((32, 1)), verbose=0)
    frozen = keras_smartfrz.freeze_layers(model, ["hidden"])
    released = keras_smartfrz.release_optimizer_state(
        model.optimizer, [v for layer in frozen for v in layer.weights])
    assert released == 2 * (8 * 64 + 64) * 4  # Adam: momentum and velocity
    assert len(model.optimizer.variables) == 2 + 2 * 2  # head's moments
    ```
    """
    if optimizer is None:
        return 0
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "`optimizer` must be a Keras optimizer (such as "
            f"`model.optimizer`); received optimizer={optimizer!r}."
        )
    if isinstance(variables, _variable_types()):
        variables = [variables]
    variables = list(variables)
    types = _variable_types()
    for variable in variables:
        if not isinstance(variable, types):
            raise ValueError(
                "`variables` must be Keras or TensorFlow variables; received "
                f"an element {variable!r} of type {type(variable).__name__}."
            )
        if getattr(variable, "trainable", False):
            raise ValueError(
                "`variables` must no longer be trainable: their optimizer "
                "state is still needed. Freeze them first (for instance with "
                "keras_smartfrz.freeze_layers); received the trainable "
                f"variable '{getattr(variable, 'path', variable.name)}'."
            )
    released = {}
    _release(optimizer, variables, released)
    if released:
        _forget_train_graphs(released.values())
    return int(sum(_num_bytes(v) for v in released.values()))


def _release(optimizer, variables, released):
    for child in _child_optimizers(optimizer):
        _release(child, variables, released)
    if not getattr(optimizer, "built", False):
        return
    indices = optimizer._trainable_variables_indices
    drop_keys = set()
    for variable in variables:
        key = optimizer._var_key(variable)
        if key in indices:
            drop_keys.add(key)
    if not drop_keys:
        return
    built_on = list(optimizer._trainable_variables)
    keep = [optimizer._var_key(v) not in drop_keys for v in built_on]
    types = _variable_types()

    def aligned(name, value):
        return _is_aligned(optimizer, name, value, len(built_on))

    # 1. The slots: entries at the dropped positions of every aligned list
    # (the model variables of `_trainable_variables` themselves excepted).
    own_ids = {id(v) for v in built_on}
    attributes = dict(vars(optimizer))
    for name, value in attributes.items():
        if aligned(name, value):
            for element, kept in zip(value, keep):
                if not kept and element is not None and id(element) not in own_ids:
                    released[id(element)] = element
    for name, value in attributes.items():
        # Per-weight slots kept in a dict keyed by `_var_key` (none of the
        # Keras optimizers do, a custom one may).
        if isinstance(value, dict) and not name.startswith("_self_"):
            for key in drop_keys & set(value.keys()):
                if isinstance(value[key], types):
                    released[id(value[key])] = value[key]
    released_ids = set(released) | {
        id(v) for v, kept in zip(built_on, keep) if not kept
    }

    def filtered(name, value):
        if aligned(name, value):
            return [e for e, kept in zip(value, keep) if kept]
        return [e for e in value if id(e) not in released_ids]

    # 2. TensorFlow's checkpoint dependencies (ListWrappers of the slots).
    replaced = {}
    dependencies = getattr(
        optimizer, "_self_unconditional_checkpoint_dependencies", None
    )
    if dependencies:
        import tensorflow as tf

        for reference in list(dependencies):
            value = reference.ref
            if not isinstance(value, (list, tuple)):
                continue
            new = filtered(reference.name, value)
            if len(new) == len(value):
                continue
            replaced[id(value)] = (
                tf.__internal__.tracking.sticky_attribute_assignment(
                    trackable=optimizer, name=reference.name, value=new
                )
            )

    # 3. The attributes Keras uses.
    for name, value in attributes.items():
        if name.startswith("_self_"):  # TensorFlow's own bookkeeping
            continue
        if isinstance(value, (list, tuple)):
            if id(value) in replaced:
                object.__setattr__(optimizer, name, replaced[id(value)])
                continue
            new = filtered(name, value)
            if len(new) == len(value):
                continue
            if isinstance(value, tuple):
                object.__setattr__(optimizer, name, type(value)(new))
            elif _is_tf_structure(value):
                import tensorflow as tf

                object.__setattr__(
                    optimizer, name, tf.__internal__.tracking.wrap(new)
                )
            else:  # a Keras TrackedList or a plain list: keep its identity
                value[:] = new
        elif isinstance(value, dict) and value is not indices:
            stale = drop_keys & set(value.keys())
            if stale and not _is_tf_structure(value):
                for key in stale:
                    del value[key]

    # 4. The index of each remaining weight, and Keras' variable tracker.
    remaining = optimizer._trainable_variables
    indices.clear()
    for index, variable in enumerate(remaining):
        indices[optimizer._var_key(variable)] = index
    tracker = getattr(optimizer, "_tracker", None)
    if tracker is not None:
        for store_name, (predicate, store) in list(tracker.config.items()):
            if id(store) in replaced:
                tracker.config[store_name] = (predicate, replaced[id(store)])
            tracker.stored_ids[store_name] -= released_ids


def _closure_tensors(function, tensor_type, depth=3):
    """Graph tensors in the closure of `function` (and of the functions,
    lists and tuples it closes over, `depth` levels down)."""
    found = []
    stack = [(function, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, tensor_type):
            found.append(item)
        elif level < depth and isinstance(item, (list, tuple)):
            stack.extend((e, level + 1) for e in item)
        elif level < depth and callable(item):
            for cell in getattr(item, "__closure__", None) or ():
                try:
                    stack.append((cell.cell_contents, level + 1))
                except ValueError:  # an empty cell
                    pass
    return found


def _forget_train_graphs(slots):
    """Drops the TensorFlow gradient registry entries that pin traced graphs
    which captured one of `slots`, so that those graphs, and the slots'
    buffers, can be freed once nothing else uses them. Returns the number of
    entries dropped (0 off TensorFlow or if TensorFlow's internals differ).

    Each `tf.custom_gradient` call made while tracing registers a
    "CustomGradient-<n>" entry that TensorFlow never removes. The entries are
    only read to differentiate the traced graph itself; a traced train step
    is run, never differentiated. An entry is dropped only when the graph it
    belongs to (or a graph enclosing it) captured the handle of a released
    slot: such a graph is a train step traced before the release, which
    `freeze_layers` / `rebuild_train_step` replace.
    """
    if keras.backend.backend() != "tensorflow":
        return 0
    try:
        from tensorflow.python.framework import func_graph
        from tensorflow.python.framework import ops as tf_ops

        registry = tf_ops._gradient_registry._registry
        tensor_type = tf_ops.SymbolicTensor  # graph tensors, not eager ones
    except (ImportError, AttributeError):
        return 0
    handles = set()
    for slot in slots:
        value = getattr(slot, "value", slot)
        handle = getattr(value, "handle", None)
        if handle is not None:
            handles.add(id(handle))
    if not handles:
        return 0
    verdicts = {}

    def pins_a_slot(graph):
        chain = []
        while isinstance(graph, func_graph.FuncGraph):
            if id(graph) in verdicts:
                break
            chain.append(graph)
            graph = graph.outer_graph
        verdict = verdicts.get(id(graph), False)
        for g in reversed(chain):
            verdict = verdict or any(
                id(t) in handles for t in g.external_captures
            )
            verdicts[id(g)] = verdict
        return verdict

    dropped = 0
    for name in [n for n in list(registry) if n.startswith("CustomGradient-")]:
        entry = registry.get(name)
        function = entry.get("type") if isinstance(entry, dict) else None
        try:
            tensors = _closure_tensors(function, tensor_type)
            pinned = any(pins_a_slot(t.graph) for t in tensors[:4])
        except Exception:  # an entry of another shape: leave it alone
            continue
        if pinned:
            registry.pop(name, None)
            dropped += 1
    return dropped
