import numpy as np
import pytest

from keras_smartfrz.cka import centered_gram
from keras_smartfrz.cka import cka_from_grams
from keras_smartfrz.cka import linear_cka


def _random(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def test_single_features_give_squared_correlation():
    # Centred: x = [-1, 0, 1], y = [-1, 1, 0]; y.x = 1, |x|^2 = |y|^2 = 2,
    # so CKA = 1^2 / (2 * 2).
    x = np.array([[1.0], [2.0], [3.0]])
    y = np.array([[1.0], [3.0], [2.0]])
    assert linear_cka(x, y) == pytest.approx(0.25)


def test_half_of_two_orthogonal_features():
    # X^T X = 2 I (norm 2 sqrt 2), Y^T Y = [2], ||Y^T X||^2 = 4:
    # CKA = 4 / (2 sqrt 2 * 2) = 1 / sqrt 2.
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert linear_cka(x, x[:, :1]) == pytest.approx(1 / np.sqrt(2))


def test_identical_representations_give_one():
    x = _random((20, 5))
    assert linear_cka(x, x) == pytest.approx(1.0)


def test_symmetric_and_in_unit_interval():
    x, y = _random((30, 4), 1), _random((30, 7), 2)
    value = linear_cka(x, y)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(linear_cka(y, x))
    assert value < 0.9  # unrelated random features are not alike


def test_invariant_to_orthogonal_transform():
    x, y = _random((40, 6), 3), _random((40, 6), 4) + _random((40, 6), 3)
    q, _ = np.linalg.qr(_random((6, 6), 5))
    assert linear_cka(x @ q, y) == pytest.approx(linear_cka(x, y))
    assert linear_cka(x, y @ q) == pytest.approx(linear_cka(x, y))


def test_invariant_to_isotropic_scaling_and_offset():
    x, y = _random((40, 6), 6), _random((40, 3), 7)
    assert linear_cka(7.5 * x + 3.0, 0.01 * y) == pytest.approx(
        linear_cka(x, y)
    )


def test_not_invariant_to_non_isotropic_scaling():
    x = _random((50, 4), 8)
    y = x + 0.5 * _random((50, 4), 9)
    stretched = y * np.array([20.0, 1.0, 1.0, 1.0])
    assert abs(linear_cka(x, stretched) - linear_cka(x, y)) > 0.05


def test_flattens_axes_after_the_first():
    x = _random((10, 2, 3, 4), 10)
    y = _random((10, 5), 11)
    assert linear_cka(x, y) == pytest.approx(linear_cka(x.reshape(10, -1), y))


def test_gram_form_matches_feature_form():
    # More features than examples switches to the Gram form.
    x, y = _random((6, 50), 12), _random((6, 40), 13)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )
    assert linear_cka(x, y) == pytest.approx(expected)
    assert cka_from_grams(centered_gram(x), centered_gram(y)) == pytest.approx(
        expected
    )


def test_centered_gram_rows_sum_to_zero():
    gram = centered_gram(_random((8, 3, 3), 14))
    assert gram.shape == (8, 8)
    np.testing.assert_allclose(gram.sum(axis=1), 0.0, atol=1e-9)


def test_constant_representation_gives_nan():
    assert np.isnan(linear_cka(np.ones((5, 3)), _random((5, 2))))
    assert np.isnan(cka_from_grams(np.zeros((4, 4)), np.eye(4)))


def test_mismatched_examples_raise():
    with pytest.raises(ValueError, match="same examples.*5 and 6"):
        linear_cka(_random((5, 2)), _random((6, 2)))


def test_too_few_examples_raise():
    with pytest.raises(ValueError, match="at least 2 examples.*n=1"):
        linear_cka(_random((1, 3)), _random((1, 3)))


def test_one_dimensional_input_raises():
    with pytest.raises(ValueError, match="shape \\(n, ...\\)"):
        linear_cka(np.arange(5.0), _random((5, 2)))


def test_gram_shapes_must_match():
    with pytest.raises(ValueError, match="same shape"):
        cka_from_grams(np.eye(3), np.eye(4))
