import logging

import keras
import numpy as np
import pytest

from keras_smartfrz.sampling import WeightSampler
from keras_smartfrz.sampling import draw_sample_positions
from keras_smartfrz.sampling import split_positions
from keras_smartfrz.units import find_units
from conftest import mlp


def test_large_unit_gets_distinct_sorted_positions():
    positions = draw_sample_positions(10_000, 256, seed=3, unit_index=1)
    assert positions.shape == (256,)
    assert len(np.unique(positions)) == 256
    assert np.all(np.diff(positions) > 0)
    assert positions.min() >= 0 and positions.max() < 10_000


def test_small_unit_is_covered_then_padded():
    positions = draw_sample_positions(10, 64, seed=0, unit_index=0)
    assert positions.shape == (64,)
    assert set(positions.tolist()) == set(range(10))
    assert np.all(np.diff(positions) >= 0)


def test_positions_are_fixed_by_seed_and_unit():
    a = draw_sample_positions(5000, 100, seed=7, unit_index=2)
    assert np.array_equal(a, draw_sample_positions(5000, 100, 7, 2))
    assert not np.array_equal(a, draw_sample_positions(5000, 100, 8, 2))
    assert not np.array_equal(a, draw_sample_positions(5000, 100, 7, 3))


def test_unit_without_weights_is_rejected():
    with pytest.raises(ValueError, match="0"):
        draw_sample_positions(0, 8, 0, 0)


def test_split_positions_maps_to_variables():
    pieces = split_positions(np.array([0, 2, 3, 7, 9]), [3, 4, 5])
    assert [(i, local.tolist()) for i, local in pieces] == [
        (0, [0, 2]), (1, [0]), (2, [0, 2])]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampler_reads_exactly_the_sampled_weights(dtype):
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(40, dtype=dtype),
         keras.layers.BatchNormalization(dtype=dtype),
         keras.layers.Dense(3, dtype=dtype)]
    )
    units = find_units(model)
    positions = [
        draw_sample_positions(u.num_params, 64, seed=0, unit_index=i)
        for i, u in enumerate(units)
    ]
    snapshot = WeightSampler(units, positions)()
    assert snapshot.shape == (2, 64) and snapshot.dtype == np.float32
    for row, unit, pos in zip(snapshot, units, positions):
        flat = np.concatenate([
            keras.ops.convert_to_numpy(keras.ops.cast(v, "float32")).ravel()
            for v in unit.trainable_weights
        ])
        np.testing.assert_array_equal(row, flat[pos])


def test_sampler_follows_weight_changes():
    model = mlp()
    units = find_units(model)
    positions = [draw_sample_positions(u.num_params, 32, 0, i)
                 for i, u in enumerate(units)]
    sampler = WeightSampler(units, positions)
    before = sampler()
    kernel = units[1].layers[0].kernel
    kernel.assign(kernel + 1.0)
    after = sampler()
    np.testing.assert_array_equal(before[0], after[0])
    assert np.all(after[1][before[1] != after[1]] != 0)
    assert not np.array_equal(before[1], after[1])


def test_many_samplers_warn_of_no_retracing(caplog):
    """Each sampler traces its gather once. TensorFlow's retracing warning
    counts traces per function code: samplers made one after another (a
    fit replaces its sampler; every fit makes one) must not add up."""
    model = mlp()
    units = find_units(model)
    positions = [draw_sample_positions(u.num_params, 16, 0, i)
                 for i, u in enumerate(units)]
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for _ in range(8):
            WeightSampler(units, positions)()
    assert "retracing" not in caplog.text
