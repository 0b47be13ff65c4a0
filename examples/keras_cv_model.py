"""Train a keras-cv ResNet with SmartFRZ freezing converged layers.

keras-cv 0.9 runs on Keras 3, but its presets (and preset-named classes
such as `ResNet18V2Backbone`) download weights, which fails offline. Built
from explicit constructor arguments, its backbones work: this example builds
a small `keras_cv.models.ResNetBackbone` (basic blocks, 64/128/256 channels)
with `include_rescaling=True`, so it takes raw 0-255 pixels, puts it in a
`keras_cv.models.ImageClassifier` (softmax output) and trains it from
scratch on Fashion-MNIST with `SmartFRZ`. Each convolution and the
BatchNormalization after it freeze together.

For new code prefer keras-hub (`examples/keras_hub_vit.py`), where the
KerasCV models moved; the freezing callbacks treat both alike.

    python examples/keras_cv_model.py
    python examples/keras_cv_model.py --predictor path/to/predictor

Fashion-MNIST is read offline (`apt-get install dataset-fashion-mnist`).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_cv  # noqa: E402
import numpy as np  # noqa: E402

import keras_smartfrz  # noqa: E402
from keras_smartfrz import datasets  # noqa: E402


def build_resnet(blocks=1):
    """keras-cv ResNet (v1, basic blocks) for 28x28 grey images, from config.

    keras-cv's stem has 64 channels (a 7x7 stride-2 convolution and max
    pooling: 28x28 becomes 7x7), and a first stage of basic blocks must
    match them.
    """
    backbone = keras_cv.models.ResNetBackbone(
        stackwise_filters=[64, 128, 256],
        stackwise_blocks=[blocks] * 3,
        stackwise_strides=[1, 2, 2],
        block_type="basic_block",
        include_rescaling=True,
        input_shape=(28, 28, 1),
    )
    return keras_cv.models.ImageClassifier(backbone=backbone, num_classes=10)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=12800,
                        help="training images used, of 60000")
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=1,
                        help="basic blocks per stage")
    parser.add_argument("--predictor", default=None,
                        help="SmartFRZ's predictor (default: the shipped one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("epochs", "train_size", "test_size", "batch_size", "blocks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    """Trains the keras-cv ResNet with SmartFRZ; returns a dict of results."""
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    (x, y), (x_test, y_test) = datasets.load_fashion_mnist()
    # Raw pixels: the backbone rescales them itself (include_rescaling).
    x = x[: args.train_size, ..., None].astype(np.float32)
    y = y[: args.train_size]
    x_test = x_test[: args.test_size, ..., None].astype(np.float32)
    y_test = y_test[: args.test_size]

    model = build_resnet(args.blocks)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        # ImageClassifier ends in a softmax: probabilities, not logits.
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False),
        metrics=["accuracy"],
        jit_compile=False,  # XLA:CPU is slower on conv nets
    )
    freezer = keras_smartfrz.SmartFRZ(predictor=args.predictor, verbose=1)
    print(f"keras-cv {keras_cv.__version__} ResNet: "
          f"{model.count_params() / 1e6:.2f}M parameters, "
          f"{len(keras_smartfrz.find_units(model))} freezable units.",
          flush=True)
    start = time.perf_counter()
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs,
              callbacks=[freezer], verbose=2)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)

    print(f"\nFrozen: {freezer.frozen_fraction:.0%} of {len(freezer.units)} "
          f"units ({', '.join(freezer.frozen_layers) or 'none'}).")
    print(f"Test accuracy: {accuracy:.4f}; training time {seconds:.1f} s.")
    return {
        "units": [u.name for u in freezer.units],
        "unit_layers": [u.layer_paths for u in freezer.units],
        "frozen_units": list(freezer.frozen_units),
        "frozen_layers": list(freezer.frozen_layers),
        "frozen_fraction": freezer.frozen_fraction,
        "test_accuracy": float(accuracy),
        "seconds": seconds,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
