"""SmartFRZ in a custom training setup: own train_step, tf.data, XLA, mixed precision.

What freezing needs from a custom setup, shown on a CNN trained on
Fashion-MNIST:

- **Your own `train_step`.** Freezing sets `trainable=False` and rebuilds
  the train step (never `compile()`), so a `train_step` that differentiates
  `self.trainable_variables`, read when the step is traced, drops frozen
  layers by itself. This one also reports the gradient norm.
- **A `tf.data` pipeline** with augmentation (random shifts and flips),
  caching, prefetching and an endless stream cut into epochs by
  `steps_per_epoch`: the callback takes its snapshot schedule from
  `steps_per_epoch`.
- **`jit_compile=True`** (XLA): each freezing stage recompiles the step
  once, so stages are once per epoch, not per layer.
- **Mixed precision** (`--precision`, default `mixed_bfloat16`; with
  `mixed_float16` Keras wraps the optimizer in a `LossScaleOptimizer`, which
  freezing keeps): weights stay float32, so the sampled weight history is
  the same as in float32 training.

    python examples/custom_training.py
    python examples/custom_training.py --precision mixed_float16

Fashion-MNIST is read offline (`apt-get install dataset-fashion-mnist`).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_smartfrz  # noqa: E402
from keras_smartfrz import datasets  # noqa: E402

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


class GradientNormModel(keras.Model):
    """A functional model with its own train step (reports the gradient norm)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gradient_norm = keras.metrics.Mean(name="gradient_norm")

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
            # A no-op unless mixed_float16 wrapped the optimizer.
            scaled_loss = self.optimizer.scale_loss(loss)
        # Read at trace time: after a freeze, the rebuilt step no longer
        # differentiates (or updates) the frozen layers.
        variables = self.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        self.optimizer.apply(gradients, variables)
        norm = tf.linalg.global_norm(gradients)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            norm = norm / tf.cast(self.optimizer.dynamic_scale, norm.dtype)
        self.gradient_norm.update_state(norm)
        for metric in self.metrics:
            if metric.name == "loss":  # fit's loss tracker
                metric.update_state(loss)
        # Updates the compiled metrics; returns every metric's result.
        return self.compute_metrics(x, y, y_pred)


def build_model(width=32):
    """Conv-BN-ReLU blocks; the head computes in float32 (stable softmax)."""
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for block, (filters, pool) in enumerate(
        [(width, False), (width, True), (2 * width, True), (2 * width, False)]
    ):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                name=f"conv{block}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{block}")(x)
        x = keras.layers.ReLU()(x)
        if pool:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, dtype="float32", name="head")(x)
    return GradientNormModel(inputs, outputs, name="custom_cnn")


def make_pipeline(x, y, batch_size, seed, augment):
    """Cached, shuffled, (augmented,) batched, prefetched and endless."""

    def prepare(image, label):
        image = tf.cast(image, tf.float32)[..., None] / 255.0
        if augment:
            image = tf.image.random_flip_left_right(image)
            image = tf.image.resize_with_crop_or_pad(image, 32, 32)
            image = tf.image.random_crop(image, (28, 28, 1))
        return image, label

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if augment:
        dataset = dataset.shuffle(len(x), seed=seed).repeat()
    return (
        dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size, drop_remainder=augment)
        .prefetch(tf.data.AUTOTUNE)
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps-per-epoch", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--precision", choices=PRECISIONS,
                        default="mixed_bfloat16")
    parser.add_argument("--no-jit", dest="jit", action="store_false",
                        help="compile without XLA")
    parser.add_argument("--predictor", default=None,
                        help="SmartFRZ's predictor (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("epochs", "steps_per_epoch", "batch_size", "test_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    """Trains with the custom setup and SmartFRZ; returns a dict of results."""
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    previous_policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(args.precision)
    try:
        (x, y), (x_test, y_test) = datasets.load_fashion_mnist()
        train = make_pipeline(x, y, args.batch_size, args.seed, augment=True)
        test = make_pipeline(x_test[: args.test_size], y_test[: args.test_size],
                             500, args.seed, augment=False)
        model = build_model()
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=args.jit,
        )
        freezer = keras_smartfrz.SmartFRZ(predictor=args.predictor,
                                          verbose=1)
        print(f"precision {args.precision}, jit_compile={args.jit}, "
              f"optimizer {type(model.optimizer).__name__}; "
              f"{args.epochs} epochs of {args.steps_per_epoch} steps.",
              flush=True)
        start = time.perf_counter()
        history = model.fit(train, epochs=args.epochs,
                            steps_per_epoch=args.steps_per_epoch,
                            callbacks=[freezer], verbose=2,
                            shuffle=False)  # the pipeline shuffles
        seconds = time.perf_counter() - start
        accuracy = model.evaluate(test, verbose=0, return_dict=True)[
            "accuracy"]
        compute_dtype = model.get_layer("conv0").compute_dtype
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)

    print(f"\nFrozen: {freezer.frozen_fraction:.0%} of {len(freezer.units)} "
          f"units ({', '.join(freezer.frozen_layers) or 'none'}).")
    print(f"Test accuracy: {accuracy:.4f}; training time {seconds:.1f} s.")
    return {
        "precision": args.precision,
        "compute_dtype": compute_dtype,
        "jit_compile": args.jit,
        "optimizer": type(model.optimizer).__name__,
        "units": [u.name for u in freezer.units],
        "frozen_units": list(freezer.frozen_units),
        "frozen_layers": list(freezer.frozen_layers),
        "frozen_fraction": freezer.frozen_fraction,
        "gradient_norm": history.history["gradient_norm"],
        "test_accuracy": float(accuracy),
        "seconds": seconds,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
