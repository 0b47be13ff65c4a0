"""The benchmark suite's analytic FLOPs counter, against hand-computed numbers."""


import keras
import pytest
import tensorflow as tf

from conftest import load_script

flops_lib = load_script("benchmarks", "training_flops")


def _paths(model, *names):
    return {v.path for name in names for v in model.get_layer(name).weights}


def _profiler_flops(model, spec):
    """TensorFlow's own count (tf.compat.v1.profiler), inference graph."""
    graph = (
        tf.function(lambda x: model(x, training=False))
        .get_concrete_function(spec)
        .graph
    )
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


def test_dense_forward_and_training_flops():
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(30, use_bias=False, name="d1"),
            keras.layers.Dense(5, use_bias=False, name="d2"),
        ]
    )
    spec = tf.TensorSpec((1, 20))
    flops = flops_lib.TrainingFlops(model, spec)
    d1, d2 = 2 * 20 * 30, 2 * 30 * 5
    assert flops.forward == d1 + d2
    assert _profiler_flops(model, spec) == d1 + d2
    # d1: its input is data, so only its weight gradient (1x); d2: 2x.
    assert flops.step() == (d1 + d2) + d1 + 2 * d2
    # d1 frozen: forward only; d2 is the first trainable layer: 1x.
    assert flops.step(frozen=_paths(model, "d1")) == (d1 + d2) + d2
    everything = _paths(model, "d1", "d2")
    assert flops.step(frozen=everything) == d1 + d2


def test_conv_forward_flops_match_hand_count_and_tf_profiler():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, use_bias=False, name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(5, use_bias=False, name="head"),
        ]
    )
    spec = tf.TensorSpec((1, 8, 8, 3))
    flops = flops_lib.TrainingFlops(model, spec)
    conv = 2 * 3 * 3 * 3 * 4 * 6 * 6  # 2*k*k*cin*cout*H_out*W_out
    head = 2 * (6 * 6 * 4) * 5
    assert flops.forward == conv + head
    assert _profiler_flops(model, spec) == conv + head
    assert flops.step() == (conv + head) + conv + 2 * head
    assert flops.step(frozen=_paths(model, "conv")) == (conv + head) + head


def test_layers_without_weights_after_the_cut_cost_one_backward():
    inputs = keras.Input((16,))
    x = keras.layers.Dense(16, use_bias=False, name="d1")(inputs)
    x = keras.layers.ReLU(name="relu")(x)
    outputs = keras.layers.Dense(4, use_bias=False, name="d2")(x)
    model = keras.Model(inputs, outputs)
    flops = flops_lib.TrainingFlops(model, tf.TensorSpec((1, 16)))
    d1, relu, d2 = 2 * 16 * 16, 16, 2 * 16 * 4
    assert flops.forward == d1 + relu + d2
    # Gradient reaches d1's weights through the ReLU: relu 1x, d2 2x, d1 1x.
    assert flops.step() == flops.forward + d1 + relu + 2 * d2
    # d1 frozen: nothing before d2 needs a gradient, the ReLU neither.
    assert flops.step(frozen=_paths(model, "d1")) == flops.forward + d2


def test_einsum_attention_is_counted():
    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")
    inputs = keras.Input((5, 8))
    model = keras.Model(inputs, layer(inputs, inputs))
    flops = flops_lib.TrainingFlops(model, tf.TensorSpec((1, 5, 8)))
    projections = 4 * 2 * 5 * 8 * 8  # q, k, v, output: 5 tokens, 8 -> 2x4
    attention = 2 * (2 * 5 * 5 * 4)  # scores and weighted values
    assert flops.forward >= projections + attention
    assert flops.unknown_ops == []
    assert flops.step() > 2 * flops.forward


def test_einsum_equation_with_ellipsis():
    @tf.function
    def product(a, b):
        return tf.einsum("...ij,jk->...ik", a, b)

    graph = product.get_concrete_function(
        tf.TensorSpec((3, 2, 4)), tf.TensorSpec((4, 5))
    ).graph
    (op,) = [op for op in graph.get_operations() if op.type == "Einsum"]
    assert flops_lib.op_forward_flops(op) == 2 * 3 * 2 * 4 * 5


@pytest.mark.parametrize("frozen_fraction", [0.0, 0.5])
def test_frozen_prefix_never_costs_more(frozen_fraction):
    layers = [keras.Input((8,))] + [
        keras.layers.Dense(8, name=f"d{i}") for i in range(4)
    ]
    model = keras.Sequential(layers)
    flops = flops_lib.TrainingFlops(model, tf.TensorSpec((1, 8)))
    count = int(4 * frozen_fraction)
    frozen = _paths(model, *(f"d{i}" for i in range(count)))
    assert flops.forward <= flops.step(frozen) <= flops.step()
    assert flops.step() <= 3 * flops.forward
