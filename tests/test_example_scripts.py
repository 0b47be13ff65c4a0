"""Smoke tests of the keras-hub, keras-cv, MiniLM and custom-training examples.

Each runs its example's `main` with tiny arguments and a tiny untrained
predictor saved in `tmp_path`, so they need no shipped predictor; what the
predictor decides is random, so the tests check the plumbing, not accuracy.
(`tests/test_examples.py` covers the quickstart.)
"""


import keras
import pytest

from conftest import load_script


def _load_example(name):
    return load_script("examples", name)


@pytest.fixture
def predictor(tiny_predictor):
    """A tiny untrained predictor on disk (window 4, sample 16)."""
    return tiny_predictor


def _check_common(results, min_units):
    assert len(results["units"]) >= min_units
    assert 0.0 <= results["frozen_fraction"] < 1.0  # the head never freezes
    assert set(results["frozen_units"]) <= set(results["units"])
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert results["seconds"] > 0.0


def test_keras_hub_vit_example(predictor, capsys):
    vit = _load_example("keras_hub_vit")
    results = vit.main(
        ["--epochs", "2", "--train-size", "256", "--test-size", "100",
         "--batch-size", "32", "--num-layers", "2", "--predictor", predictor]
    )
    _check_common(results, min_units=10)
    # Units are found inside the encoder blocks, not just the two
    # top-level layers of the backbone.
    assert any("transformer_block" in u for u in results["units"])
    assert "Test accuracy" in capsys.readouterr().out


def test_keras_cv_example(predictor, capsys):
    pytest.importorskip("keras_cv")
    cv = _load_example("keras_cv_model")
    results = cv.main(
        ["--epochs", "2", "--train-size", "256", "--test-size", "100",
         "--batch-size", "32", "--predictor", predictor]
    )
    _check_common(results, min_units=5)
    # Each convolution freezes with the BatchNormalization after it.
    assert any(len(layers) == 2 and layers[1].endswith("_bn")
               for layers in results["unit_layers"])
    assert "keras-cv" in capsys.readouterr().out


def test_finetune_minilm_example(predictor, capsys):
    minilm = _load_example("finetune_minilm")
    results = minilm.main(
        ["--epochs", "2", "--train-size", "32", "--test-size", "16",
         "--batch-size", "8", "--sequence-length", "16",
         "--predictor", predictor]
    )
    _check_common(results, min_units=50)
    assert results["units"][0] == "token_embedding"
    assert len(results["history"]["loss"]) == 2
    assert "SmartFRZ froze" in capsys.readouterr().out


def test_custom_training_example(predictor):
    custom = _load_example("custom_training")
    results = custom.main(
        ["--epochs", "2", "--steps-per-epoch", "4", "--batch-size", "16",
         "--test-size", "100", "--predictor", predictor]
    )
    _check_common(results, min_units=5)
    assert results["jit_compile"] is True
    assert results["compute_dtype"] == "bfloat16"
    assert len(results["gradient_norm"]) == 2
    assert all(norm > 0.0 for norm in results["gradient_norm"])
    # The global dtype policy is restored afterwards.
    assert keras.mixed_precision.dtype_policy().name == "float32"


@pytest.mark.slow
def test_custom_training_example_mixed_float16(predictor):
    custom = _load_example("custom_training")
    results = custom.main(
        ["--epochs", "2", "--steps-per-epoch", "4", "--batch-size", "16",
         "--test-size", "100", "--precision", "mixed_float16",
         "--predictor", predictor]
    )
    assert results["optimizer"] == "LossScaleOptimizer"
    assert results["compute_dtype"] == "float16"
    assert all(norm > 0.0 for norm in results["gradient_norm"])
