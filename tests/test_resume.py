"""Never lose the freeze state: BackupAndRestore, model.save, ModelCheckpoint."""

import os
import warnings

import keras
import numpy as np
import pytest

import keras_smartfrz
from keras_smartfrz import FreezingCallback
from keras_smartfrz.freezing_callback import BACKUP_FILENAME
from conftest import mlp
from conftest import toy_data

EPOCHS = 5
STOP_AT = 3  # the interrupted fit dies at the start of this epoch


class Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == STOP_AT:
            raise RuntimeError("Interrupting!")


def freezer(backup_dir):
    # AutoFreeze keeps state between stages (the previous update norms) and
    # reads the sampled history, so both must come back for the same
    # decisions; "any" mode lets it freeze early.
    return keras_smartfrz.AutoFreeze(
        percentile=30.0, mode="any", window_size=4, sample_size=8,
        backup_dir=backup_dir,
    )


def deep():
    return mlp(hidden=(16,) * 5, batchnorm=True)


def run(model, callbacks, epochs=EPOCHS):
    x, y = toy_data(96)
    # shuffle=False: a resumed fit cannot replay the shuffling RNG of the
    # epochs it skipped, and the runs are to be compared bit for bit.
    return model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False,
                     callbacks=callbacks, verbose=0)


def weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.weights]


@pytest.mark.parametrize("freezer_first", [True, False])
def test_resumed_fit_matches_an_uninterrupted_one(tmp_path, freezer_first):
    def order(freeze, backup, *rest):
        return [freeze, backup, *rest] if freezer_first else [
            backup, freeze, *rest]

    keras.utils.set_random_seed(0)
    reference_model = deep()
    reference = freezer(str(tmp_path / "ref"))
    run(reference_model, order(
        reference,
        keras.callbacks.BackupAndRestore(str(tmp_path / "ref_backup"))))

    keras.utils.set_random_seed(0)
    backup_dir = str(tmp_path / "backup")  # shared by both callbacks
    interrupted = freezer(backup_dir)
    with pytest.raises(RuntimeError, match="Interrupting"):
        run(deep(), order(
            interrupted, keras.callbacks.BackupAndRestore(backup_dir),
            Interrupt()))
    assert interrupted.frozen_units  # something froze before the crash
    assert os.path.exists(os.path.join(backup_dir, BACKUP_FILENAME))

    keras.utils.set_random_seed(1)  # other initial weights: all restored
    model = deep()
    resumed = freezer(backup_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # state matches
        history = run(model, order(
            resumed, keras.callbacks.BackupAndRestore(backup_dir)))
    assert len(history.history["loss"]) == EPOCHS - STOP_AT
    assert resumed.frozen_units == reference.frozen_units
    assert resumed.frozen_layers == reference.frozen_layers
    assert resumed.decisions == reference.decisions
    # Stages after the resume decided, and froze more.
    assert len(resumed.frozen_units) > len(interrupted.frozen_units)
    np.testing.assert_array_equal(resumed._sample_rows,
                                  reference._sample_rows)
    np.testing.assert_array_equal(resumed._history.window(),
                                  reference._history.window())
    assert vars(resumed._cadence) == vars(reference._cadence)
    assert resumed._step == reference._step
    for got, want in zip(weights(model), weights(reference_model)):
        np.testing.assert_array_equal(got, want)
    assert [v.path for v in model.trainable_weights] == [
        v.path for v in reference_model.trainable_weights]
    assert int(model.optimizer.iterations) == EPOCHS * 6
    # fit finished: the state is gone (with BackupAndRestore's files).
    assert not os.path.exists(os.path.join(backup_dir, BACKUP_FILENAME))


def test_state_file_is_deleted_when_fit_finishes(tmp_path):
    backup_dir = tmp_path / "own"
    callback = freezer(backup_dir)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(os.path.exists(backup_dir / BACKUP_FILENAME))

    run(mlp(), [callback, Spy()], epochs=2)
    assert seen == [True, True]
    assert not (backup_dir / BACKUP_FILENAME).exists()


def test_a_state_for_another_epoch_is_ignored_with_a_warning(tmp_path):
    backup_dir = str(tmp_path)
    with pytest.raises(RuntimeError):
        run(mlp(), [freezer(backup_dir), Interrupt()])
    fresh = freezer(backup_dir)
    with pytest.warns(UserWarning, match="starts at epoch 0"):
        run(mlp(), [fresh], epochs=1)  # no BackupAndRestore: epoch 0
    assert fresh.decisions == [] or fresh.decisions[0].epoch == 0


def test_a_state_for_other_arguments_is_ignored_with_a_warning(tmp_path):
    backup_dir = str(tmp_path)
    with pytest.raises(RuntimeError):
        run(mlp(), [freezer(backup_dir), Interrupt(),
                    keras.callbacks.BackupAndRestore(backup_dir)])
    other = keras_smartfrz.AutoFreeze(window_size=5, sample_size=8,
                                      backup_dir=backup_dir)
    with pytest.warns(UserWarning, match="other arguments"):
        run(mlp(), [other, keras.callbacks.BackupAndRestore(backup_dir)])
    assert all(d.epoch >= STOP_AT for d in other.decisions)


def test_a_truncated_state_file_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / BACKUP_FILENAME
    path.write_bytes(b"PK\x03\x04 not a whole npz")
    callback = freezer(str(tmp_path))
    with pytest.warns(UserWarning, match="cannot read the freezing state"):
        run(mlp(), [callback], epochs=2)
    assert not path.exists()  # replaced by good states, then deleted


@pytest.mark.parametrize("bad", ["", 3, b"dir"])
def test_backup_dir_must_be_a_path(bad):
    with pytest.raises(ValueError, match="backup_dir"):
        FreezingCallback(keras_smartfrz.policies.LinearPolicy(),
                         backup_dir=bad)


def test_backup_dir_is_in_the_config(tmp_path):
    callback = keras_smartfrz.LinearFreezing(backup_dir=tmp_path)
    config = callback.get_config()
    assert config["backup_dir"] == str(tmp_path)
    assert keras_smartfrz.LinearFreezing.from_config(config).backup_dir == (
        str(tmp_path))
    # Not set: not in the config (SmartFRZ round-trips its config as is).
    assert "backup_dir" not in keras_smartfrz.LinearFreezing().get_config()


def test_policy_state_round_trips_through_json():
    import json

    policy = keras_smartfrz.policies.AutoFreezePolicy()
    policy._previous_norms = {"a": np.float32(0.1), "b": np.float32(2.5)}
    restored = keras_smartfrz.policies.AutoFreezePolicy()
    restored.set_state(json.loads(json.dumps(policy.get_state())))
    assert restored._previous_norms == {
        "a": float(np.float32(0.1)), "b": 2.5}


# ------------------------------------------------------- model.save and load
def short(variables):
    return ["/".join(v.path.split("/")[-2:]) for v in variables]


def freeze_two(model, frozen_batchnorm):
    callback = keras_smartfrz.LinearFreezing(
        freeze_start=0.0, freeze_level=0.7,
        frozen_batchnorm=frozen_batchnorm)
    x, y = toy_data(64)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback], verbose=0)
    assert callback.frozen_units == ["mlp/d0", "mlp/d1"]
    return callback


def test_saved_model_keeps_frozen_layers_frozen_in_inference_mode(tmp_path):
    model = mlp(batchnorm=True)
    freeze_two(model, "inference")
    path = str(tmp_path / "model.keras")
    model.save(path)
    # Keras builds the loaded optimizer over the trainable variables only,
    # so the saved optimizer slots (built over all of them) are skipped
    # with a warning: the weights and the frozen flags load, the
    # optimizer's moments do not (a Keras limitation; BackupAndRestore and
    # save_weights keep them).
    with pytest.warns(UserWarning, match="Skipping variable loading"):
        loaded = keras.saving.load_model(path)
    frozen = {l.name for l in loaded.layers if not l.trainable}
    assert frozen == {"d0", "bn0", "d1", "bn1"}
    assert short(loaded.trainable_weights) == short(model.trainable_weights)
    x, y = toy_data(32)
    before = weights(loaded)
    loaded.fit(x, y, epochs=1, verbose=0)  # trains, frozen layers unchanged
    after = weights(loaded)
    checked = 0
    for v, a, b in zip(loaded.weights, before, after):
        if v.path.split("/")[-2] in ("d0", "d1"):
            np.testing.assert_array_equal(a, b)
            checked += 1
    assert checked == 4


def test_saved_model_in_batch_statistics_mode_needs_the_freeze_reapplied(
    tmp_path,
):
    # Keras saves `layer.trainable`, not a variable's own `trainable`: with
    # frozen_batchnorm="batch_statistics" the Dense layers load frozen but
    # BN gamma/beta load trainable. `freeze_layers(model, frozen_layers)`
    # restores the exact frozen set (documented limitation).
    model = mlp(batchnorm=True)
    callback = freeze_two(model, "batch_statistics")
    path = str(tmp_path / "model.keras")
    model.save(path)
    # Keras builds the loaded optimizer over the trainable variables only,
    # so the saved optimizer slots (built over all of them) are skipped
    # with a warning: the weights and the frozen flags load, the
    # optimizer's moments do not (a Keras limitation; BackupAndRestore and
    # save_weights keep them).
    with pytest.warns(UserWarning, match="Skipping variable loading"):
        loaded = keras.saving.load_model(path)
    assert not loaded.get_layer("d0").trainable
    assert loaded.get_layer("bn0").gamma.trainable  # the limitation
    # A loaded model's layer paths lose the model prefix: reapply by name.
    keras_smartfrz.freeze_layers(
        loaded, [p.split("/")[-1] for p in callback.frozen_layers])
    assert short(loaded.trainable_weights) == short(model.trainable_weights)


def test_model_checkpoint_after_freezing(tmp_path):
    model = mlp()
    callback = keras_smartfrz.LinearFreezing(
        freeze_start=0.0, frozen_batchnorm="inference")
    path = str(tmp_path / "epoch{epoch}.keras")
    weights_path = str(tmp_path / "epoch{epoch}.weights.h5")
    x, y = toy_data(64)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[
        callback,
        keras.callbacks.ModelCheckpoint(path),
        keras.callbacks.ModelCheckpoint(weights_path, save_weights_only=True),
    ])
    second = keras.saving.load_model(str(tmp_path / "epoch2.keras"))
    assert [l.name for l in second.layers if not l.trainable] == ["d0", "d1"]
    fresh = mlp()
    fresh.load_weights(str(tmp_path / "epoch3.weights.h5"))
    for a, b in zip(weights(fresh), weights(model)):
        np.testing.assert_array_equal(a, b)
