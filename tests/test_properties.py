"""Property test: over random small models and freeze sequences, frozen
weights never change, trainable ones can, and the head never freezes."""

import keras
import numpy as np
from hypothesis import HealthCheck
from hypothesis import Phase
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from keras_smartfrz import FreezingCallback
from keras_smartfrz.policies import FreezePolicy
from conftest import toy_data

EPOCHS = 3


class RandomPolicy(FreezePolicy):
    """Proposes, at each stage, the candidates whose model position is set
    in `plan[epoch]` (drawn by hypothesis)."""

    def __init__(self, plan, needs_history):
        self.plan = plan
        self.needs_history = needs_history

    def decide(self, stage):
        wanted = self.plan[stage.epoch]
        freeze = np.array([bool(wanted[i % len(wanted)])
                           for i in stage.positions()], dtype=bool)
        # Proposals may include every candidate; the head is never one.
        return freeze.astype(np.float32), freeze


class Recorder(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.epochs = [self.snapshot()]

    def snapshot(self):
        return {l.path: [keras.ops.convert_to_numpy(v).copy()
                         for v in l.weights[:2]]  # kernel/bias, gamma/beta
                for l in self.model.layers}

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(self.snapshot())


architectures = st.lists(
    st.tuples(st.integers(2, 6), st.booleans()),  # width, BatchNorm after
    min_size=1, max_size=3,
)
plans = st.lists(st.lists(st.booleans(), min_size=4, max_size=4),
                 min_size=EPOCHS, max_size=EPOCHS)


@settings(max_examples=6, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate],  # no slow shrinking
          suppress_health_check=[HealthCheck.too_slow])
@given(architecture=architectures, plan=plans,
       mode=st.sampled_from(["prefix", "any"]),
       frozen_batchnorm=st.sampled_from(["batch_statistics", "inference"]),
       needs_history=st.booleans())
def test_frozen_weights_never_change_and_the_head_never_freezes(
    architecture, plan, mode, frozen_batchnorm, needs_history
):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    layers = [keras.Input((6,))]
    for i, (width, batchnorm) in enumerate(architecture):
        layers.append(keras.layers.Dense(width, activation="tanh",
                                         name=f"d{i}"))
        if batchnorm:
            layers.append(keras.layers.BatchNormalization(name=f"bn{i}"))
    layers.append(keras.layers.Dense(2, name="head"))
    model = keras.Sequential(layers, name="prop")
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    freezer = FreezingCallback(
        RandomPolicy(plan, needs_history), mode=mode, window_size=2,
        sample_size=4, frozen_batchnorm=frozen_batchnorm)
    recorder = Recorder()
    x, y = toy_data(32)
    model.fit(x, y, batch_size=16, epochs=EPOCHS, verbose=0,
              callbacks=[freezer, recorder])

    head = freezer.units[-1]
    assert head.name == "prop/head"
    assert head.name not in freezer.frozen_units
    assert model.get_layer("head").trainable
    frozen_at = {d.layer: d.epoch for d in freezer.decisions if d.frozen}
    assert sorted(frozen_at) == sorted(freezer.frozen_units)
    for unit in freezer.units:
        paths = unit.layer_paths
        if unit.name in frozen_at:
            since = frozen_at[unit.name] + 1  # snapshot after that epoch
            for later in recorder.epochs[since + 1:]:
                for path in paths:
                    for a, b in zip(recorder.epochs[since][path],
                                    later[path]):
                        np.testing.assert_array_equal(a, b)
            assert not any(v.trainable for l in unit.layers
                           for v in l.trainable_weights)
        else:
            assert unit.trainable_weights  # still trains
    # Trainable weights do train: the head moved in the last epoch.
    first, last = recorder.epochs[-2]["prop/head"], recorder.epochs[-1][
        "prop/head"]
    assert not np.array_equal(first[0], last[0])
    if mode == "prefix":
        order = [u.name for u in freezer.units]
        assert freezer.frozen_units == order[:len(freezer.frozen_units)]
