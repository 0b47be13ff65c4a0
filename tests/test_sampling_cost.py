"""benchmarks/sampling_cost.py: its in-step sampler and its arithmetic."""

import numpy as np
import pytest

from keras_smartfrz.sampling import draw_sample_positions
from keras_smartfrz.units import find_units
from conftest import load_script
from conftest import mlp
from conftest import toy_data

sampling_cost = load_script("benchmarks", "sampling_cost")


@pytest.mark.parametrize("jit_compile", [False, True])
def test_in_step_sampler_reads_what_the_host_sampler_reads(jit_compile):
    # The variant the benchmark times must take the same snapshot: the
    # weights right after the step it was requested for.
    model = mlp(jit_compile=jit_compile)
    units = find_units(model)
    positions = [draw_sample_positions(u.num_params, 16, 0, i)
                 for i, u in enumerate(units)]
    sampler = sampling_cost.InStepSampler(units, positions)
    sampler.stage(2)
    model.train_step = sampler.wrap_train_step(
        model.train_step, jit_compile=jit_compile)
    x, y = toy_data(32)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # builds, traces
    assert sampler.flush().shape == (0, 4 * 16)  # nothing requested
    sampler.request()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    after_step = sampler()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # not requested
    staged = sampler.flush()
    assert staged.shape == (1, 4 * 16)
    np.testing.assert_array_equal(staged[0].reshape(4, 16), after_step)
    assert not np.array_equal(staged[0].reshape(4, 16), sampler())


def test_epoch_shares_from_the_medians():
    row = {
        "steps_per_epoch": 120,
        "median_ms": {
            "plain_step": 40.0, "host_gather": 2.0, "wrapped_step": 41.0,
            "request": 0.2, "wrapped_step_snapshot": 41.5,
            "flush_per_snapshot": 0.1, "decide_model_sort": 96.0,
            "decide_numpy_sort": 48.0,
        },
    }
    row["median_cpu_ms"] = dict(row["median_ms"])
    out = sampling_cost.derived(row)
    epoch = 120 * 40.0
    assert out["per_snapshot_ms"] == {
        "between_steps": 2.0, "in_step": pytest.approx(0.8)}
    assert out["wrapper_ms_per_step_without_snapshot"] == 1.0
    share = out["epoch_share"]
    assert share["before"] == pytest.approx((30 * 2.0 + 96.0) / epoch)
    assert share["now"] == pytest.approx((30 * 2.0 + 48.0) / epoch)
    assert share["in_step_numpy_sort"] == pytest.approx(
        (30 * 0.8 + 90 * 1.0 + 48.0) / epoch)
