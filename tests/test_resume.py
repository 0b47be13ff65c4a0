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


def freezer(backup_dir, **kwargs):
    # AutoFreeze keeps state between stages (the previous update norms) and
    # reads the sampled history, so both must come back for the same
    # decisions; "any" mode lets it freeze early.
    return keras_smartfrz.AutoFreeze(
        percentile=30.0, mode="any", window_size=4, sample_size=8,
        backup_dir=backup_dir, **kwargs,
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
    assert [u.name for u in resumed._sampler.units] == [
        u.name for u in reference._sampler.units]
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


# --------------------------------------------------- backups inside an epoch
# BackupAndRestore(save_freq=N) saves the weights every N batches and, on
# resume, restarts the epoch it saved in from its first batch with those
# weights (Keras 3.15 restores the epoch, not the batch): the batches of
# that epoch done before the backup train twice, so no resumed run equals
# an uninterrupted one. The freezing state saved after the same batch is
# restored with them, and the epoch's steps count again.
SAVE_FREQ = 4  # 6 steps an epoch: backups after steps 4, 8, 12, 16, ...


class InterruptAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("Interrupting!")


def mid_epoch_freezer(backup_dir):
    return freezer(backup_dir, backup_freq=SAVE_FREQ)


def snapshot(callback, model):
    """The callback's resumable state and the model's weights, now."""
    return {
        "step": callback._step,
        "frozen_units": list(callback.frozen_units),
        "frozen_layers": list(callback.frozen_layers),
        "decisions": list(callback.decisions),
        "window": callback._history.window().copy(),
        "sample_rows": callback._sample_rows.copy(),
        "cadence": dict(vars(callback._cadence)),
        "policy": callback.policy.get_state(),
        "trainable": [v.path for v in model.trainable_weights],
        "weights": weights(model),
    }


def assert_same(got, want):
    assert got.keys() == want.keys()
    for key in want:
        if key == "weights":
            for a, b in zip(got[key], want[key]):
                np.testing.assert_array_equal(a, b)
        elif isinstance(want[key], np.ndarray):
            np.testing.assert_array_equal(got[key], want[key])
        else:
            assert got[key] == want[key], key


class Recorder(keras.callbacks.Callback):
    """Snapshots `callback` after every batch, by its step counter."""

    def __init__(self, callback):
        super().__init__()
        self.callback = callback
        self.seen = {}
        self.first = None

    def on_train_batch_begin(self, batch, logs=None):
        if self.first is None:  # after the restore, before any step
            self.first = snapshot(self.callback, self.model)

    def on_train_batch_end(self, batch, logs=None):
        self.seen[self.callback._step] = snapshot(self.callback, self.model)


def test_resume_inside_an_epoch_restores_the_state_of_that_batch(tmp_path):
    backup_dir = str(tmp_path)  # shared by both callbacks

    def callbacks(freeze, *rest):
        # BackupAndRestore first: a stop between the two saves of a batch
        # end loses that backup, never matches a state to other weights.
        return [keras.callbacks.BackupAndRestore(
            backup_dir, save_freq=SAVE_FREQ), freeze, *rest]

    interrupted = mid_epoch_freezer(backup_dir)
    before = Recorder(interrupted)
    with pytest.raises(RuntimeError, match="Interrupting"):
        run(mlp(batchnorm=True), callbacks(interrupted, before,
                                           InterruptAt(2, 4)))
    saved = before.seen[16]  # the last backups: after batch 3 of epoch 2
    assert saved["frozen_units"]

    keras.utils.set_random_seed(1)  # other initial weights: all restored
    model = mlp(batchnorm=True)
    resumed = mid_epoch_freezer(backup_dir)
    after = Recorder(resumed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # state matches
        history = run(model, callbacks(resumed, after))
    # Keras restarts epoch 2 from its first batch with the weights of step
    # 16, and the callback with its state of step 16: frozen layers frozen
    # before the first step, same history, schedule, decisions, policy.
    assert len(history.history["loss"]) == EPOCHS - 2
    assert_same(after.first, saved)
    # Epoch 2's first 4 batches trained twice: 4 steps more than
    # uninterrupted, counted by the callback as by the optimizer.
    assert resumed._step == int(model.optimizer.iterations) == EPOCHS * 6 + 4
    assert len(resumed.decisions) > len(saved["decisions"])
    frozen = {l.split("/")[1] for l in saved["frozen_layers"]}
    for variable, want, got in zip(model.weights, saved["weights"],
                                   weights(model)):
        # (frozen BatchNormalization's moving statistics still move in
        # the default frozen_batchnorm="batch_statistics")
        layer, name = variable.path.split("/")[1:]
        if layer in frozen and "moving" not in name:
            np.testing.assert_array_equal(got, want)
    assert not os.path.exists(os.path.join(backup_dir, BACKUP_FILENAME))


def test_keras_restarting_at_epoch_0_restores_the_state_with_a_warning(
    tmp_path,
):
    # Keras 3.15's BackupAndRestore counts epochs from 0 in every fit: a
    # backup taken inside the first epoch of a resumed fit is recorded for
    # epoch 0, and the next resume starts over at epoch 0 with its weights.
    backup_dir = str(tmp_path)

    def fit(callback, *rest):
        return run(mlp(), [callback, keras.callbacks.BackupAndRestore(
            backup_dir, save_freq=SAVE_FREQ), *rest], epochs=2)

    with pytest.raises(RuntimeError):
        fit(mid_epoch_freezer(backup_dir), InterruptAt(1, 2))  # saved: 4, 8
    second = mid_epoch_freezer(backup_dir)
    recorder = Recorder(second)
    with pytest.raises(RuntimeError):  # resumed at epoch 1 from step 8
        fit(second, recorder, InterruptAt(1, 4))  # saved after its batch 3
    saved = recorder.seen[12]
    third = mid_epoch_freezer(backup_dir)
    recorder = Recorder(third)
    with pytest.warns(UserWarning, match="records epoch 0"):
        history = fit(third, recorder)
    assert len(history.history["loss"]) == 2  # Keras starts over
    assert_same(recorder.first, saved)


def test_backups_at_other_batches_than_keras_are_ignored_with_a_warning(
    tmp_path,
):
    backup_dir = str(tmp_path)
    with pytest.raises(RuntimeError):
        # The freezing state is saved at epoch ends only (step 6), Keras'
        # weights after steps 4 and 8.
        run(mlp(), [freezer(backup_dir), keras.callbacks.BackupAndRestore(
            backup_dir, save_freq=SAVE_FREQ), InterruptAt(1, 4)])
    fresh = freezer(backup_dir)
    with pytest.warns(UserWarning, match="`backup_freq=N`"):
        run(mlp(), [fresh, keras.callbacks.BackupAndRestore(
            backup_dir, save_freq=SAVE_FREQ)], epochs=2)
    assert all(d.epoch == 1 for d in fresh.decisions)  # started afresh


def test_backups_are_due_after_the_same_batches_as_keras():
    callback = FreezingCallback(keras_smartfrz.policies.LinearPolicy())
    for save_freq in (1, 3, 4, 7):
        for steps_per_execution in (1, 2, 3):
            keras_backup = keras.callbacks.BackupAndRestore(
                "unused", save_freq=save_freq)
            callback._backup_freq = save_freq
            callback._reset_backup_schedule()
            steps = 7
            for epoch in range(3):
                callback._begin_backup_epoch(epoch)
                for begin in range(0, steps, steps_per_execution):
                    end = min(begin + steps_per_execution, steps) - 1
                    assert callback._backup_due(end) == (
                        keras_backup._should_save_on_batch(end)), (
                        save_freq, steps_per_execution, epoch, end)
                keras_backup.on_epoch_end(epoch)


def test_backup_freq_must_be_epoch_or_a_positive_integer():
    for bad in (0, -2, 1.5, "batch", True):
        with pytest.raises(ValueError, match=f"backup_freq={bad!r}"):
            FreezingCallback(keras_smartfrz.policies.LinearPolicy(),
                             backup_freq=bad)
    callback = FreezingCallback(keras_smartfrz.policies.LinearPolicy(),
                                backup_freq=5)
    assert callback.get_config()["backup_freq"] == 5
    assert FreezingCallback.from_config(
        callback.get_config())._backup_freq == 5


# ------------------------------------------------ workers other than chief
def test_a_worker_other_than_the_chief_writes_its_own_directory(tmp_path):
    # As under MultiWorkerMirroredStrategy for worker 3 (a real two-worker
    # run is in test_distribution.py, marked slow).
    def worker(callback):
        callback._worker_role = lambda: (False, "workertemp_3")
        callback._gather_from_workers = lambda row: np.array([row, row])
        return callback

    backup_dir = str(tmp_path)
    files = []

    class Files(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            files.append(sorted(
                os.path.relpath(os.path.join(root, name), backup_dir)
                for root, _, names in os.walk(backup_dir)
                for name in names if name.startswith("smartfrz")))

    interrupted = worker(freezer(backup_dir))
    with pytest.raises(RuntimeError):
        run(mlp(), [interrupted, keras.callbacks.BackupAndRestore(
            os.path.join(backup_dir, "keras")), Files(), InterruptAt(2, 0)])
    mine = os.path.join("workertemp_3", BACKUP_FILENAME)
    assert files == [[mine], [mine, mine + ".bkp"]]
    # The chief's state is not there (another filesystem, say): the
    # worker resumes from its own copy.
    resumed = worker(freezer(backup_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run(mlp(), [resumed, keras.callbacks.BackupAndRestore(
            os.path.join(backup_dir, "keras"))], epochs=3)
    assert resumed.decisions[:len(interrupted.decisions)] == (
        interrupted.decisions)
    assert not os.path.exists(os.path.join(backup_dir, "workertemp_3"))


def test_workers_restoring_different_states_stop_with_an_error():
    callback = freezer("unused")
    callback._worker_role = lambda: (True, "workertemp_0")
    callback._gather_from_workers = lambda row: np.array([row, row])
    meta = {"next_epoch": 2, "step": 12, "frozen_units": ["mlp/d0"]}
    callback._check_workers_agree(meta)  # all the same: fine
    callback._gather_from_workers = lambda row: np.array([row, [0, -1, -1, 0]])
    with pytest.raises(RuntimeError, match="restored different freezing"):
        callback._check_workers_agree(meta)


class FreezeFrontHalf(keras_smartfrz.policies.FreezePolicy):
    """Proposes the first three candidates at the first stage."""

    def decide(self, stage):
        propose = np.array([i < 3 for i in range(len(stage.unit_names))])
        propose &= stage.num_frozen == 0
        return propose.astype(np.float32), propose


def test_a_resume_after_the_sampler_was_replaced_samples_the_same_units(
    tmp_path,
):
    # Half the units freeze at the first stage: the callback replaces its
    # sampler by one of the active units (see `_freeze`); a resumed fit
    # must sample those units in those rows too.
    def callback(backup_dir):
        return FreezingCallback(FreezeFrontHalf(), window_size=4,
                                sample_size=8, backup_dir=backup_dir)

    keras.utils.set_random_seed(0)
    reference = callback(str(tmp_path / "ref"))
    run(deep(), [reference])
    assert [u.name for u in reference._sampler.units] == [
        "mlp/d3", "mlp/d4", "mlp/head"]

    keras.utils.set_random_seed(0)
    backup_dir = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="Interrupting"):
        run(deep(), [callback(backup_dir),
                     keras.callbacks.BackupAndRestore(backup_dir),
                     Interrupt()])
    resumed = callback(backup_dir)
    run(deep(), [resumed, keras.callbacks.BackupAndRestore(backup_dir)])
    assert [u.name for u in resumed._sampler.units] == [
        "mlp/d3", "mlp/d4", "mlp/head"]
    np.testing.assert_array_equal(resumed._sample_rows,
                                  reference._sample_rows)
    np.testing.assert_array_equal(resumed._history.window(),
                                  reference._history.window())
    assert resumed.frozen_units == reference.frozen_units
