"""Layer tailoring: a fixed-size sample of each unit's weights, read in one gather.

Each unit is represented by `sample_size` of its trainable scalars. The positions
are drawn once per unit from the callback's seed and kept for the whole run, so
that successive snapshots follow the same weights (a real trajectory).
"""

import functools

import numpy as np
import tensorflow as tf


def draw_sample_positions(num_params, sample_size, seed, unit_index):
    """Draws the fixed flat positions sampled from one unit.

    Args:
        num_params: number of trainable scalars in the unit (its variables
            flattened and concatenated in order).
        sample_size: how many positions to draw.
        seed: the run's seed.
        unit_index: the unit's index in forward order; with `seed` it fixes the
            positions, so the same model and seed always sample the same weights.

    Returns:
        A sorted int64 array of `sample_size` positions in `[0, num_params)`
        (sorted, so each variable is read by one gather in memory order). A
        unit with at least `sample_size` scalars gets distinct positions; a
        smaller unit gets each of its scalars once plus random repeats to fill
        the sample.
    """
    if num_params <= 0:
        raise ValueError(f"A unit needs trainable weights, got {num_params}.")
    rng = np.random.default_rng([int(seed), int(unit_index)])
    if num_params >= sample_size:
        positions = rng.choice(num_params, size=sample_size, replace=False)
    else:
        extra = rng.integers(0, num_params, size=sample_size - num_params)
        positions = np.concatenate([np.arange(num_params), extra])
    return np.sort(positions).astype(np.int64)


def split_positions(positions, variable_sizes):
    """Maps flat unit positions to `(variable index, local positions)` pairs.

    `positions` must be sorted: each variable then forms one run, and
    concatenating the per-variable gathers restores the order of `positions`.
    """
    bounds = np.cumsum([0] + list(variable_sizes))
    owner = np.searchsorted(bounds, positions, side="right") - 1
    return [
        (int(i), positions[owner == i] - bounds[i]) for i in np.unique(owner)
    ]


class WeightSampler:
    """Reads the sampled weights of several units with one compiled gather.

    Args:
        units: the `FreezeUnit`s to sample, in order.
        positions: one array of flat positions per unit (see
            `draw_sample_positions`).

    Calling the sampler returns a float32 array of shape
    `(len(units), sample_size)`.
    """

    def __init__(self, units, positions):
        if len(units) != len(positions):
            raise ValueError("One position array is needed per unit.")
        self.units = list(units)
        self.sample_size = len(positions[0]) if positions else 0
        variables = []
        pieces = []
        for unit, unit_positions in zip(self.units, positions):
            unit_vars = unit.trainable_weights
            shapes = [tuple(int(d) for d in v.shape) for v in unit_vars]
            sizes = [int(np.prod(shape)) for shape in shapes]
            for var_index, local in split_positions(unit_positions, sizes):
                variables.append(unit_vars[var_index])
                # Multi-dimensional indices: a gather_nd on the variable
                # reads only the sampled elements (ResourceGatherNd). Kept
                # as NumPy arrays, so that they become constants of the
                # traced graph rather than tensors captured as inputs of
                # every call: 0.70 against 0.80 ms per call for the suite's
                # ViT (72 variables), 0.38 against 0.45 ms for its ResNet
                # (24), in a loop on 2 CPU cores.
                index = np.stack(
                    np.unravel_index(local, shapes[var_index]), axis=-1
                ) if shapes[var_index] else np.zeros((len(local), 0))
                pieces.append(index.astype(np.int64))
        self._variables = variables
        self._indices = pieces
        # One traced graph (one call reads every unit), without autograph
        # (plain Python, nothing to convert; it halves the trace). Not XLA:
        # on the quickstart CNN an XLA gather's first call took 377 ms
        # against 69 ms as a plain graph, and later calls cost about the
        # same (0.42 vs 0.44 ms), so XLA only added start-up time.
        # A partial, not the bound method: TensorFlow's "triggered
        # tf.function retracing" warning counts the traces of every function
        # of one `__code__` together, so the fifth sampler of a process
        # (samplers are replaced within a fit, and every fit makes its own)
        # warned of a retrace that never happened; a partial is counted
        # on its own.
        self._gather = tf.function(
            functools.partial(_gather_all, self._variables, self._indices),
            jit_compile=False, autograph=False,
        )
        self._call = None

    def __call__(self):
        if not self.units:
            return np.zeros((0, self.sample_size), np.float32)
        if self._call is None:
            self._call = self._compile()
        flat = self._call()[0].numpy()
        return flat.reshape(len(self.units), self.sample_size)

    def _compile(self):
        """Traces the gather (at the first snapshot) and returns a call of
        its graph that skips both the `tf.function` dispatch and Grappler.

        The graph is run by a `PartitionedCall` op, given the variables the
        trace captured, with Grappler's meta-optimizer switched off for this
        graph alone (`config_proto`; every other function keeps the
        session's options). A graph of reads has nothing for Grappler to
        improve, and its first call cost most of the time: for the suite's
        35 ViT units (72 variables, in a loop on 2 CPU cores) the first call
        took 17 against 49 ms, and later calls 0.32 against 0.51 ms (the
        concrete function's own call) with the same values. Grappler runs
        when a graph is first instantiated with given options, so the
        options must be the same at every call (changing them after the
        first call instantiates and optimises the graph again).
        """
        concrete = self._gather.get_concrete_function()
        return functools.partial(
            tf.raw_ops.PartitionedCall,
            args=list(concrete.captured_inputs),
            Tout=[tf.float32],
            f=concrete,
            config_proto=_NO_GRAPPLER,
        )


def _no_grappler_config():
    """A serialized `ConfigProto` with Grappler's meta-optimizer off."""
    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.disable_meta_optimizer = True
    return config.SerializeToString(deterministic=True)


_NO_GRAPPLER = _no_grappler_config()


def _gather_all(variables, indices):
    values = []
    for variable, index in zip(variables, indices):
        value = tf.gather_nd(_resource(variable), tf.constant(index))
        values.append(
            value if value.dtype == tf.float32 else tf.cast(value, tf.float32)
        )
    return tf.concat(values, axis=0)


def _resource(variable):
    """The backend variable under a Keras variable, read by the gather
    itself (the Keras variable's `value` outside of an autocast scope)."""
    return getattr(variable, "value", variable)
