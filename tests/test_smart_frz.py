import keras
import numpy as np
import pytest

from keras_smartfrz import FreezePredictor
from keras_smartfrz import SmartFRZ
from keras_smartfrz.predictor import save_predictor
from conftest import mlp
from conftest import toy_data


def constant_predictor(probability, window_size=4, sample_size=16):
    """A tiny predictor whose output is `probability` whatever it reads."""
    predictor = FreezePredictor(window_size=window_size, sample_size=sample_size,
                                hidden_units=8, embedding_units=4,
                                classifier_units=4)
    last = predictor.classifier.layers[-1]
    last.kernel.assign(np.zeros(last.kernel.shape, "float32"))
    logit = np.log(probability / (1.0 - probability))
    last.bias.assign(np.full(last.bias.shape, logit, "float32"))
    wide = predictor.feature_logit
    wide.kernel.assign(np.zeros(wide.kernel.shape, "float32"))
    wide.bias.assign(np.zeros(wide.bias.shape, "float32"))
    return predictor


def fit(model, callbacks, epochs=3):
    x, y = toy_data(128)
    return model.fit(x, y, batch_size=16, epochs=epochs, callbacks=callbacks,
                     verbose=0)


def test_takes_window_and_sample_size_from_the_predictor():
    freezer = SmartFRZ(constant_predictor(0.9, window_size=5, sample_size=12))
    assert (freezer.window_size, freezer.sample_size) == (5, 12)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_confident_predictor_freezes_every_unit_but_the_head(jit_compile):
    freezer = SmartFRZ(constant_predictor(0.9), min_epochs=1)
    model = mlp(jit_compile=jit_compile)
    history = fit(model, [freezer], epochs=2)
    assert freezer.frozen_units == ["mlp/d0", "mlp/d1", "mlp/d2"]
    assert model.get_layer("head").trainable
    assert [len(model.get_layer(n).trainable_weights)
            for n in ("d0", "d1", "d2", "head")] == [0, 0, 0, 2]
    assert history.history["frozen_fraction"] == [0.75, 0.75]
    assert all(d.score == pytest.approx(0.9, abs=1e-5)
               for d in freezer.decisions)


def test_default_warm_up_is_a_share_of_the_epochs():
    freezer = SmartFRZ(constant_predictor(0.9))
    assert freezer.min_epochs == "auto"
    history = fit(mlp(), [freezer], epochs=4)  # ceil(0.3 * 4) = 2
    assert {d.epoch for d in freezer.decisions} == {1}
    assert history.history["frozen_fraction"] == [0.0, 0.75, 0.75, 0.75]
    assert SmartFRZ.from_config(SmartFRZ().get_config()).min_epochs == "auto"


def test_threshold_above_the_score_freezes_nothing():
    freezer = SmartFRZ(constant_predictor(0.4), freeze_threshold=0.5)
    fit(mlp(), [freezer], epochs=3)
    assert freezer.frozen_units == []
    assert len(freezer.decisions) == 3 * 3


def test_no_decision_until_a_full_window():
    # 8 steps per epoch and a 16-snapshot window: the first stage that sees
    # a full window is the end of epoch 2.
    freezer = SmartFRZ(constant_predictor(0.9, window_size=16))
    fit(mlp(), [freezer], epochs=2)
    assert [d.epoch for d in freezer.decisions if d.frozen] == [1, 1, 1]
    assert all(d.score == 0.0 for d in freezer.decisions if d.epoch == 0)


def test_serializes_by_predictor_path(tmp_path):
    path = tmp_path / "tiny"
    save_predictor(constant_predictor(0.9), path)
    freezer = SmartFRZ(str(path), freeze_threshold=0.7, mode="any")
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(freezer))
    assert isinstance(restored, SmartFRZ)
    assert restored.get_config() == freezer.get_config()
    assert restored.get_config()["predictor"] == str(path)
    model = mlp()
    fit(model, [restored], epochs=1)
    # The restored callback loaded the saved predictor (score 0.9 >= 0.7).
    assert restored.frozen_units == ["mlp/d0", "mlp/d1", "mlp/d2"]


def test_in_memory_predictor_cannot_serialize():
    with pytest.raises(ValueError, match="save_predictor"):
        SmartFRZ(constant_predictor(0.9)).get_config()


def test_missing_predictor_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SmartFRZ(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("kwargs, shown", [
    ({"freeze_threshold": 1.5}, "1.5"),
    ({"freeze_threshold": "high"}, "'high'"),
    ({"mode": "all"}, "'all'"),
    ({"predictor": 3}, "3"),
])
def test_invalid_arguments_name_the_value(kwargs, shown):
    kwargs.setdefault("predictor", constant_predictor(0.9))
    with pytest.raises(ValueError, match=shown):
        SmartFRZ(**kwargs)


def test_backup_dir_is_passed_and_serialized(tmp_path):
    freezer = SmartFRZ(backup_dir=str(tmp_path))
    assert freezer.backup_dir == str(tmp_path)
    restored = SmartFRZ.from_config(freezer.get_config())
    assert restored.backup_dir == str(tmp_path)
    with pytest.raises(ValueError, match="backup_dir=42"):
        SmartFRZ(backup_dir=42)
