"""Linear centred kernel alignment (CKA): how alike two representations are.

SmartFRZ labels its predictor's training data with it: a layer counts as
converged once its output on a fixed probe batch is close, in linear CKA, to
the same layer's output in the fully trained model.
"""

import numpy as np


def _as_features(name, array):
    """`array` as a float64 `(n, features)` matrix with centred columns."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim < 2:
        raise ValueError(
            f"`{name}` must have a leading example axis and at least one "
            f"feature axis, shape (n, ...); received shape {array.shape}."
        )
    features = array.reshape(array.shape[0], -1)
    return features - features.mean(axis=0, keepdims=True)


def centered_gram(x):
    """The centred linear Gram matrix `Xc Xc^T` of `x`, shape `(n, n)`.

    `Xc` is `x` flattened to `(n, features)` with every column centred. Linear
    CKA needs only these matrices, and at `n x n` they stay small for any
    layer width: `tools/train_predictor.py` stores them instead of the
    layer outputs (see `cka_from_grams`).

    Args:
        x: array of shape `(n, ...)`, one row per example.

    Returns:
        A float64 array of shape `(n, n)`.
    """
    features = _as_features("x", x)
    return features @ features.T


def cka_from_grams(gram_x, gram_y):
    """Linear CKA from two centred Gram matrices (see `centered_gram`).

    `<Kx, Ky>_F / (||Kx||_F ||Ky||_F)`; NaN when either matrix is zero (a
    representation with no variance across the examples).
    """
    gram_x = np.asarray(gram_x, dtype=np.float64)
    gram_y = np.asarray(gram_y, dtype=np.float64)
    if gram_x.shape != gram_y.shape or gram_x.ndim != 2:
        raise ValueError(
            "Gram matrices must be square and of the same shape; received "
            f"shapes {gram_x.shape} and {gram_y.shape}."
        )
    denominator = np.linalg.norm(gram_x) * np.linalg.norm(gram_y)
    if denominator == 0.0:
        return float("nan")
    return float(np.sum(gram_x * gram_y) / denominator)


def linear_cka(x, y):
    """Linear CKA between two representations of the same `n` examples.

    Kornblith, Norouzi, Lee, Hinton, "Similarity of Neural Network
    Representations Revisited", ICML 2019. With `X` (n x p1) and `Y` (n x p2)
    the two representations, each column centred:

        CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

    which equals `<K, L>_F / (||K||_F ||L||_F)` for the Gram matrices
    `K = X X^T`, `L = Y Y^T`; the cheaper of the two forms is used. The value
    lies in `[0, 1]`, is 1 for identical representations, and is invariant to
    orthogonal transforms and isotropic scaling of either argument (not to
    scaling single features), so it compares what a layer represents rather
    than its coordinates or scale.

    Args:
        x: array of shape `(n, ...)`: one row per example; axes after the
            first are flattened into features (a conv map `(n, h, w, c)`
            becomes `(n, h*w*c)`).
        y: array of shape `(n, ...)`, the same examples in the same order.

    Returns:
        A Python float in `[0, 1]`; NaN when `x` or `y` is constant across
        the examples (CKA is undefined there).

    Example:

    ```python
    x = np.random.default_rng(0).normal(size=(100, 8))
    linear_cka(x, 3.0 * x)        # 1.0 (up to rounding): isotropic scaling
    linear_cka(x, x[:, :4])       # 0.64: only half of the features
    ```
    """
    features_x = _as_features("x", x)
    features_y = _as_features("y", y)
    n = features_x.shape[0]
    if features_y.shape[0] != n:
        raise ValueError(
            "`x` and `y` must hold the same examples (the same first "
            f"dimension); received {features_x.shape[0]} and "
            f"{features_y.shape[0]}."
        )
    if n < 2:
        raise ValueError(
            "Linear CKA needs at least 2 examples to centre the features; "
            f"received n={n}."
        )
    if features_x.shape[1] + features_y.shape[1] <= 2 * n:
        cross = np.linalg.norm(features_y.T @ features_x) ** 2
        denominator = np.linalg.norm(
            features_x.T @ features_x
        ) * np.linalg.norm(features_y.T @ features_y)
        if denominator == 0.0:
            return float("nan")
        return float(cross / denominator)
    return cka_from_grams(
        features_x @ features_x.T, features_y @ features_y.T
    )
