"""Layer tailoring: a fixed-size sample of each unit's weights, read in one gather.

Each unit is represented by `sample_size` of its trainable scalars. The positions
are drawn once per unit from the callback's seed and kept for the whole run, so
that successive snapshots follow the same weights (a real trajectory).
"""

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
                # reads only the sampled elements (ResourceGatherNd).
                index = np.stack(
                    np.unravel_index(local, shapes[var_index]), axis=-1
                ) if shapes[var_index] else np.zeros((len(local), 0))
                pieces.append(tf.constant(index, dtype=tf.int64))
        self._variables = variables
        self._indices = pieces
        # One traced graph (one call reads every unit), without autograph
        # (plain Python, nothing to convert; it halves the trace). Not XLA:
        # on the quickstart CNN an XLA gather's first call took 377 ms
        # against 69 ms as a plain graph, and later calls cost about the
        # same (0.42 vs 0.44 ms), so XLA only added start-up time.
        self._gather = tf.function(
            self._gather_all, jit_compile=False, autograph=False
        )

    def _gather_all(self, xla=False):
        # XLA has no kernel for the gather from a variable handle
        # (ResourceGatherNd); there it gathers from the variable's value,
        # which XLA reads in place.
        values = [
            tf.cast(
                tf.gather_nd(
                    tf.convert_to_tensor(_resource(v)) if xla
                    else _resource(v),
                    idx,
                ),
                tf.float32,
            )
            for v, idx in zip(self._variables, self._indices)
        ]
        return tf.concat(values, axis=0)

    def __call__(self):
        if not self.units:
            return np.zeros((0, self.sample_size), np.float32)
        flat = self._gather().numpy()
        return flat.reshape(len(self.units), self.sample_size)

    # ------------------------------------------------- inside the train step
    # Called from Python between two steps, the gather costs 1.5-2.5 ms per
    # snapshot on the suite's models (2 CPU cores), against 0.7-1 ms for the
    # same gather in a loop: its dispatch and the weights' trip back into the
    # cache after a step. Run inside the train step, right after the
    # optimizer's update, it costs a fraction of a millisecond
    # (`benchmarks/results/sampling_cost.md`): the step writes the sample
    # into a staging buffer on the device, and Python reads the buffer once
    # per stage.
    def stage(self, capacity):
        """Creates the staging buffer for `capacity` snapshots taken inside
        the train step (see `wrap_train_step`).

        Args:
            capacity: snapshots the buffer holds between two `flush` calls.
        """
        import tensorflow as tf

        if capacity < 1:
            raise ValueError(f"`capacity` must be >= 1; received {capacity}.")
        self.capacity = int(capacity)
        width = len(self.units) * self.sample_size
        # Plain TensorFlow variables: not the model's, never saved with it.
        self._staged = tf.Variable(
            tf.zeros((self.capacity, width), tf.float32), trainable=False,
            name="smartfrz_staged_snapshots",
        )
        # Row of the buffer the next train step writes, -1 for none.
        self._slot = tf.Variable(
            -1, dtype=tf.int32, trainable=False, name="smartfrz_slot"
        )
        self.pending = 0

    def wrap_train_step(self, train_step, jit_compile=False):
        """`train_step` followed by the in-step snapshot, when one is due.

        The returned function runs `train_step(data)`, then, if `request`
        named a row, gathers the sample (after the step's weight update:
        TensorFlow orders the reads after the writes of the same variables)
        into that row and clears the request. A step with no request only
        reads one integer. Pass the model's `jit_compile`: an XLA step
        gathers differently.
        """
        import tensorflow as tf

        def train_step_with_sampling(data):
            logs = train_step(data)

            def write():
                self._staged.scatter_nd_update(
                    tf.reshape(self._slot.read_value(), (1, 1)),
                    self._gather_all(xla=bool(jit_compile))[None],
                )
                self._slot.assign(-1)
                return tf.constant(True)

            tf.cond(
                self._slot.read_value() >= 0, write,
                lambda: tf.constant(False),
            )
            return logs

        return train_step_with_sampling

    def request(self):
        """Asks the next train step for a snapshot; `flush` first when the
        buffer is full (`pending == capacity`)."""
        if self.pending >= self.capacity:
            raise RuntimeError(
                "The staging buffer is full: flush it before requesting."
            )
        self._slot.assign(self.pending)
        self.pending += 1

    def flush(self):
        """The snapshots written since the last flush, oldest first, as a
        float32 array `(count, len(units), sample_size)`; empties the buffer.

        A request whose step never ran (an epoch of unknown length ends
        when the input runs out, after the last `on_train_batch_begin`) is
        dropped.
        """
        count = self.pending
        if count and int(self._slot.numpy()) >= 0:
            count -= 1  # the last request was never served
            self._slot.assign(-1)
        self.pending = 0
        if not count:
            return np.zeros(
                (0, len(self.units), self.sample_size), np.float32
            )
        rows = self._staged[:count].numpy()
        return rows.reshape(count, len(self.units), self.sample_size)


def _resource(variable):
    """The backend variable under a Keras variable, read by the gather
    itself (the Keras variable's `value` outside of an autocast scope)."""
    return getattr(variable, "value", variable)
