import inspect
import json
import os
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.compat.proto import summary_pb2

import keras_smartfrz
from keras_smartfrz import FreezeDecision
from keras_smartfrz import FreezingCallback
from keras_smartfrz import summaries
from keras_smartfrz.policies import FreezePolicy
from keras_smartfrz.tensorboard_plugin import metadata
from conftest import mlp
from conftest import toy_data

# Trainable parameters of conftest.mlp(): d0 6*16+16, d1 and d2 16*16+16,
# head 16*2+2.
PARAMS = [112, 272, 272, 34]


class GradedPolicy(FreezePolicy):
    """Scores candidate i at epoch e as (e + 1) / (i + 4); freezes by plan."""

    needs_history = False

    def __init__(self, plan):
        self.plan = plan

    def decide(self, stage):
        scores = (stage.epoch + 1) / (stage.positions() + 4.0)
        wanted = self.plan.get(stage.epoch, ())
        freeze = np.array(
            [n.rsplit("/", 1)[-1] in wanted for n in stage.unit_names]
        )
        return scores.astype(np.float32), freeze


def read_run(path):
    accumulator = plugin_event_accumulator.EventAccumulator(
        str(path), size_guidance={plugin_event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    return accumulator


def scalars(run, tag):
    return [
        (event.step, float(tf.make_ndarray(event.tensor_proto)))
        for event in run.Tensors(tag)
    ]


def texts(run, tag):
    return {
        event.step: tf.make_ndarray(event.tensor_proto).item().decode()
        for event in run.Tensors(tag)
    }


def states(run):
    return [
        json.loads(tf.make_ndarray(event.tensor_proto).item())
        for event in run.Tensors(metadata.STATE_TAG)
    ]


def fit(model, callbacks, epochs=4, **kwargs):
    x, y = toy_data(128)
    return model.fit(x, y, batch_size=16, epochs=epochs,
                     callbacks=callbacks, verbose=0, **kwargs)


def test_step_compute_saved_counts_two_shares_behind_a_frozen_prefix():
    costs = [1.0, 1.0, 2.0, 4.0]
    assert summaries.step_compute_saved(costs, [0, 0, 0, 0]) == 0.0
    # A frozen prefix skips weight and input gradients: 2 of 3 shares.
    assert summaries.step_compute_saved(costs, [1, 1, 0, 0]) == pytest.approx(
        2 * 2.0 / 24.0)
    # Behind a trainable unit, a frozen unit skips its weight gradient only.
    assert summaries.step_compute_saved(costs, [1, 0, 1, 0]) == pytest.approx(
        (2 * 1.0 + 1 * 2.0) / 24.0)
    assert summaries.step_compute_saved([], []) == 0.0


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    """LinearFreezing(freeze_start=0.25) over 4 epochs: (callback, log_dir)."""
    keras.utils.set_random_seed(0)
    log_dir = tmp_path_factory.mktemp("linear")
    freezer = keras_smartfrz.LinearFreezing(freeze_start=0.25,
                                            log_dir=log_dir)
    fit(mlp(), [freezer], epochs=4)
    keras.backend.clear_session()
    return freezer, log_dir


def test_linear_freezing_writes_every_stage(linear_run):
    freezer, log_dir = linear_run
    assert freezer.frozen_units == ["mlp/d0", "mlp/d1", "mlp/d2"]
    assert sorted(os.listdir(log_dir)) == ["smartfrz"]
    run = read_run(log_dir / "smartfrz")

    assert scalars(run, "smartfrz/frozen_fraction") == [
        (0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75)]
    frozen_params = np.cumsum([0] + PARAMS[:3]) / sum(PARAMS)
    np.testing.assert_allclose(
        [v for _, v in scalars(run, "smartfrz/frozen_param_fraction")],
        frozen_params, rtol=1e-6)
    # LinearFreezing scores its proposals 1, the rest 0; a frozen unit is
    # no longer scored and the head never is.
    assert scalars(run, "smartfrz/score/mlp/d0") == [(0, 0.0), (1, 1.0)]
    assert scalars(run, "smartfrz/score/mlp/d2") == [
        (0, 0.0), (1, 0.0), (2, 0.0), (3, 1.0)]
    assert "smartfrz/score/mlp/head" not in run.Tags()["tensors"]

    table = texts(run, "smartfrz/decisions")[2]
    assert "| `mlp/d0` | 112 |  | frozen since epoch 2 |" in table
    assert "| `mlp/d1` | 272 | 1.000 | **froze** (end of epoch 3) |" in table
    assert "| `mlp/head` | 34 |  | trains (the head never freezes) |" in table

    last = states(run)[-1]
    assert last["units"] == ["mlp/d0", "mlp/d1", "mlp/d2", "mlp/head"]
    assert last["num_params"] == PARAMS
    assert last["frozen_epoch"] == [1, 2, 3, None]
    assert last["frozen_now"] == [False, False, True, False]
    assert last["score"] == [None, None, 1.0, None]
    content = run.SummaryMetadata(metadata.STATE_TAG)
    assert content.plugin_data.plugin_name == "smartfrz"
    assert content.data_class == summary_pb2.DATA_CLASS_TENSOR


def test_compute_saved_follows_the_parameter_cost_model(linear_run):
    freezer, log_dir = linear_run
    run = read_run(log_dir / "smartfrz")
    step_cost = 3.0 * sum(PARAMS)
    # After stages 0..3 the frozen prefix is d0, d0-d1, d0-d2.
    rates = [0.0] + [2.0 * sum(PARAMS[:k]) / step_cost for k in (1, 2, 3)]
    np.testing.assert_allclose(
        [v for _, v in scalars(run, "smartfrz/step_compute_saved")], rates,
        rtol=1e-6)
    # Epoch e runs at the rate set by the stage at the end of epoch e - 1.
    so_far = [sum(rates[:e]) / (e + 1) for e in range(4)]
    np.testing.assert_allclose(
        [v for _, v in scalars(run, "smartfrz/compute_saved")], so_far,
        rtol=1e-6)
    assert freezer._summaries is None  # closed at train end


def test_any_mode_gap_saves_the_weight_gradient_only(tmp_path):
    freezer = FreezingCallback(GradedPolicy({0: ["d1"]}), mode="any",
                               log_dir=tmp_path)
    fit(mlp(), [freezer], epochs=2)
    run = read_run(tmp_path / "smartfrz")
    assert freezer.frozen_units == ["mlp/d1"]
    assert scalars(run, "smartfrz/step_compute_saved")[-1][1] == (
        pytest.approx(272 / (3.0 * sum(PARAMS))))
    # Scores are the policy's, per unit and stage.
    assert scalars(run, "smartfrz/score/mlp/d2") == [
        (0, pytest.approx(1 / 6)), (1, pytest.approx(2 / 6))]


def test_summaries_only_at_freezing_stages(tmp_path):
    freezer = keras_smartfrz.LinearFreezing(
        freeze_start=0.25, min_epochs=2, freeze_every=2, log_dir=tmp_path)
    fit(mlp(), [freezer], epochs=4)
    run = read_run(tmp_path / "smartfrz")
    for tag in run.Tags()["tensors"]:
        steps = [e.step for e in run.Tensors(tag)]
        if tag.startswith("smartfrz/score/"):
            assert set(steps) <= {1, 3}, tag  # frozen units stop being scored
        else:
            assert steps == [1, 3], tag


def test_fit_with_initial_epoch_counts_its_own_epochs(tmp_path):
    freezer = FreezingCallback(GradedPolicy({2: ["d0"]}), log_dir=tmp_path)
    fit(mlp(), [freezer], epochs=4, initial_epoch=2)
    run = read_run(tmp_path / "smartfrz")
    saved = scalars(run, "smartfrz/compute_saved")
    assert [step for step, _ in saved] == [2, 3]
    # One of the two epochs of this fit ran with d0 frozen.
    assert saved[-1][1] == pytest.approx(2 * 112 / (3.0 * sum(PARAMS)) / 2)


def test_beside_keras_tensorboard_in_one_directory(tmp_path):
    freezer = keras_smartfrz.LinearFreezing(freeze_start=0.25,
                                            log_dir=str(tmp_path))
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path), update_freq=3)
    # The freezer first, so that TensorBoard also logs its frozen_fraction.
    fit(mlp(), [freezer, board], epochs=4, validation_split=0.25)
    assert sorted(os.listdir(tmp_path)) == ["smartfrz", "train", "validation"]
    train = read_run(tmp_path / "train")
    assert [s for s, _ in scalars(train, "epoch_loss")] == [0, 1, 2, 3]
    assert [v for _, v in scalars(train, "epoch_frozen_fraction")] == [
        0.0, 0.25, 0.5, 0.75]
    assert "batch_loss" in train.Tags()["tensors"]
    ours = read_run(tmp_path / "smartfrz")
    assert [s for s, _ in scalars(ours, "smartfrz/frozen_fraction")] == [
        0, 1, 2, 3]
    assert not any(t.startswith("smartfrz/") for t in train.Tags()["tensors"])


def test_writes_even_when_a_recording_condition_is_off(tmp_path):
    # keras.callbacks.TensorBoard(update_freq=N) leaves such a condition on.
    writer = summaries.StageSummaryWriter(tmp_path, ["d0", "head"], [10, 2])
    with tf.summary.record_if(False):
        writer.write_stage(0, [FreezeDecision(0, "d0", 0.75, True)])
    writer.close()
    run = read_run(tmp_path / "smartfrz")
    assert scalars(run, "smartfrz/score/d0") == [(0, 0.75)]
    assert states(run)[0]["frozen_epoch"] == [0, None]


def test_second_fit_starts_a_fresh_record(tmp_path):
    freezer = FreezingCallback(GradedPolicy({0: ["d0"]}), log_dir=tmp_path)
    fit(mlp(name="first"), [freezer], epochs=1)
    fit(mlp(name="second"), [freezer], epochs=1)
    files = os.listdir(tmp_path / "smartfrz")
    assert len(files) == 2
    run = read_run(tmp_path / "smartfrz")
    assert [s["units"][0] for s in states(run)] == ["first/d0", "second/d0"]
    assert [s["frozen_epoch"][0] for s in states(run)] == [0, 0]


def test_no_log_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    freezer = keras_smartfrz.LinearFreezing(freeze_start=0.25)
    fit(mlp(), [freezer], epochs=2)
    assert freezer._summaries is None
    assert os.listdir(tmp_path) == []


def test_decisions_table_keeps_names_literal():
    table = summaries.decisions_table(
        0, ["a_b|c", "x`y", "head"], [1, 2, 3], {"a_b|c": 0}, {"x`y": 0.5})
    assert "| `a_b|c` | 1 |  | **froze** (end of epoch 1) |" in table
    assert "| `x'y` | 2 | 0.500 | trains |" in table


@pytest.mark.parametrize("log_dir, shown", [
    (3, "3"), ("", "''"), (b"logs", "b'logs'"), (["logs"], r"\['logs'\]")])
def test_invalid_log_dir_names_the_value(log_dir, shown):
    with pytest.raises(ValueError, match=f"log_dir={shown}"):
        keras_smartfrz.LinearFreezing(log_dir=log_dir)


@pytest.mark.parametrize("cls", [keras_smartfrz.LinearFreezing,
                                 keras_smartfrz.AutoFreeze])
def test_log_dir_is_in_the_config(cls, tmp_path):
    callback = cls(log_dir=pathlib.Path(tmp_path))
    assert callback.get_config()["log_dir"] == str(tmp_path)
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(callback))
    assert restored.log_dir == str(tmp_path)
    assert restored.get_config() == callback.get_config()
    assert cls().get_config()["log_dir"] is None


def test_every_freezing_callback_takes_log_dir():
    for cls in (keras_smartfrz.FreezingCallback, keras_smartfrz.LinearFreezing,
                keras_smartfrz.AutoFreeze, keras_smartfrz.SmartFRZ):
        parameter = inspect.signature(cls).parameters["log_dir"]
        assert parameter.default is None, cls
