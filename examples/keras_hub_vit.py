"""Train a keras-hub Vision Transformer with SmartFRZ freezing converged blocks.

Builds a small `keras_hub.models.ViTImageClassifier` from explicit
constructor arguments (no preset, so nothing downloads) and trains it from
scratch on Fashion-MNIST with `SmartFRZ`. A keras-hub ViT has only two
top-level layers (patch embedding and encoder); the callback looks inside
them and freezes the encoder blocks' own layers (attention projections,
layer norms, MLP) in forward order, so back-propagation stops ever earlier.

    python examples/keras_hub_vit.py
    python examples/keras_hub_vit.py --predictor path/to/predictor

Fashion-MNIST is read offline (`apt-get install dataset-fashion-mnist`).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_smartfrz  # noqa: E402
from keras_smartfrz import datasets  # noqa: E402


def build_vit(num_layers=4, hidden_dim=96):
    """A ViT for 28x28 grey images: 7x7 patches (16 of them + a class token)."""
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(28, 28, 1),
        patch_size=7,
        num_layers=num_layers,
        num_heads=4,
        hidden_dim=hidden_dim,
        mlp_dim=2 * hidden_dim,
    )
    return keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=10, preprocessor=None
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=12800,
                        help="training images used, of 60000")
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=4,
                        help="transformer blocks")
    parser.add_argument("--predictor", default=None,
                        help="SmartFRZ's predictor (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("epochs", "train_size", "test_size", "batch_size",
                 "num_layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    """Trains the ViT with SmartFRZ; returns what happened as a dict."""
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    (x, y), (x_test, y_test) = datasets.load_fashion_mnist()
    x = (x[: args.train_size, ..., None] / 255.0).astype(np.float32)
    y = y[: args.train_size]
    x_test = (x_test[: args.test_size, ..., None] / 255.0).astype(np.float32)
    y_test = y_test[: args.test_size]

    model = build_vit(num_layers=args.num_layers)
    steps = args.epochs * -(-len(x) // args.batch_size)
    model.compile(
        optimizer=keras.optimizers.AdamW(
            keras.optimizers.schedules.CosineDecay(1e-3, steps, alpha=0.05),
            weight_decay=0.05,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        # On CPU either works; without XLA each freezing stage's retrace is
        # cheaper (benchmarks/results/freeze_speed.md).
        jit_compile=False,
    )
    freezer = keras_smartfrz.SmartFRZ(predictor=args.predictor, verbose=1)
    print(f"ViT: {model.count_params() / 1e6:.2f}M parameters, "
          f"{len(keras_smartfrz.find_units(model))} freezable units; "
          f"{len(x)} images, {args.epochs} epochs.", flush=True)
    # keras-hub tasks turn NumPy inputs into an unshuffled dataset: shuffle
    # in a pipeline of our own, anew each epoch.
    train = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=args.seed)
        .batch(args.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    start = time.perf_counter()
    model.fit(train, epochs=args.epochs, callbacks=[freezer], verbose=2,
              shuffle=False)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)

    print(f"\nFrozen: {freezer.frozen_fraction:.0%} of {len(freezer.units)} "
          "units.")
    for decision in freezer.decisions:
        if decision.frozen:
            print(f"  end of epoch {decision.epoch + 1}: {decision.layer}")
    print(f"Test accuracy: {accuracy:.4f}; training time {seconds:.1f} s.")
    return {
        "units": [u.name for u in freezer.units],
        "frozen_units": list(freezer.frozen_units),
        "frozen_layers": list(freezer.frozen_layers),
        "frozen_fraction": freezer.frozen_fraction,
        "test_accuracy": float(accuracy),
        "seconds": seconds,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
