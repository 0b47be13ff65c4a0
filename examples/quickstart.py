"""Quickstart: freeze converged layers while training a CNN on Fashion-MNIST.

Trains the same Conv-BN-ReLU network twice, from the same initial weights and
in the same data order: once with `keras_smartfrz.SmartFRZ()` (layers freeze
during `fit` when the shipped predictor finds them converged, and from then
on cost no gradient work), once with plain full
training. Then prints what froze at which epoch, the test accuracy of both
runs, and their wall-clock training times as measured in this run.

    python examples/quickstart.py            # defaults: 8 epochs, 20000 images
    python examples/quickstart.py --jit      # with XLA (jit_compile=True)
    python examples/quickstart.py --freezer autofreeze   # a baseline instead

Fashion-MNIST is read offline from the Debian package `dataset-fashion-mnist`
(see `keras_smartfrz.datasets.load_fashion_mnist`).
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

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


FREEZERS = ("smartfrz", "autofreeze", "linear")


def make_freezer(name="smartfrz", predictor=None):
    """The freezing callback of the quickstart.

    Args:
        name: `"smartfrz"` (default): `keras_smartfrz.SmartFRZ()`, the
            shipped predictor (or `predictor`); `"autofreeze"` or
            `"linear"`: the baselines with their defaults.
        predictor: a predictor path for SmartFRZ (default: the shipped one).
    """
    if name == "smartfrz":
        return keras_smartfrz.SmartFRZ(predictor=predictor)
    if name == "autofreeze":
        return keras_smartfrz.AutoFreeze()
    return keras_smartfrz.LinearFreezing()


def build_model():
    """A small CNN: four Conv-BN-ReLU blocks and a dense head (5 units).

    BatchNormalization uses momentum 0.9, not Keras's 0.99: in a run this
    short, 0.99 leaves the moving statistics used at evaluation time far from
    settled, frozen or not.
    """
    inputs = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for block, (filters, pool) in enumerate(
        [(16, False), (32, True), (32, True), (64, False)], start=1
    ):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=f"conv{block}"
        )(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{block}")(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
        if pool:
            x = keras.layers.MaxPooling2D(2, name=f"pool{block}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool4")(x)
    outputs = keras.layers.Dense(10, name="head")(x)
    return keras.Model(inputs, outputs, name="fashion_cnn")


def compile_model(model, jit):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=bool(jit),
    )


def make_dataset(x, y, batch_size, seed):
    """Endless batches, reshuffled every pass; the same `seed` gives the same
    order.

    Tearing a tf.data iterator down can wait idle for up to a minute on
    tf.data's autotuning thread (`benchmarks/results/suite_notes.md`). Here
    `fit` gets `steps_per_epoch`, so no epoch ends by exhausting an
    iterator, and autotuning is off, so the one teardown after each `fit`
    does not wait either: with it on, one of three 2-epoch fits of this
    pipeline waited 20.5 s after its last epoch; with it off none did, and
    the epochs took as long (19.7-24.4 s against 20.9-22.4 s). This
    pipeline only slices arrays in memory: there is nothing to tune.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .prefetch(2)
        .with_options(options)
    )


class Progress(keras.callbacks.Callback):
    """Prints one line per epoch: loss, accuracy, frozen share, epoch time."""

    def __init__(self, label):
        super().__init__()
        self.label = label
        self.epoch_times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        if epoch == 0:
            self.first_start = self._start

    def on_epoch_end(self, epoch, logs=None):
        self.last_end = time.perf_counter()
        seconds = self.last_end - self._start
        self.epoch_times.append(seconds)
        logs = logs or {}
        frozen = logs.get("frozen_fraction")
        frozen = f"  frozen {frozen:.0%}" if frozen is not None else ""
        print(
            f"  [{self.label}] epoch {epoch + 1}/{self.params['epochs']}: "
            f"loss {logs.get('loss', float('nan')):.4f}  "
            f"accuracy {logs.get('accuracy', float('nan')):.4f}"
            f"{frozen}  ({seconds:.1f} s)",
            flush=True,
        )


def warm_up(x, y, batch_size, jit):
    """One throwaway step, so one-time TensorFlow start-up cost (thread pools,
    kernel selection) is charged to neither timed run."""
    model = build_model()
    compile_model(model, jit)
    model.train_on_batch(x[:batch_size], y[:batch_size])


def train(model, dataset, epochs, steps_per_epoch, callbacks, label):
    """Fits and returns the epochs' wall time (first epoch's start to last
    epoch's end: every step, freezing stage and retrace; not the iterator's
    teardown after the last epoch) and each epoch's time."""
    progress = Progress(label)
    # shuffle=False: the dataset reshuffles itself, the same way each run.
    model.fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch,
              callbacks=callbacks + [progress], verbose=0, shuffle=False)
    return progress.last_end - progress.first_start, progress.epoch_times


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train a small CNN on Fashion-MNIST with and without "
        "layer freezing, from the same start, and compare."
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=20000,
                        help="training images used, of 60000 (default 20000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--test-size", type=int, default=10000,
                        help="test images evaluated, of 10000 (default 10000)")
    parser.add_argument("--jit", action="store_true",
                        help="compile the train step with XLA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--freezer", choices=FREEZERS, default="smartfrz",
                        help="freezing callback (default: smartfrz)")
    parser.add_argument("--predictor", default=None,
                        help="SmartFRZ predictor path (default: the one "
                        "shipped in the package)")
    parser.add_argument("--data-dir", default=None,
                        help="directory with the 4 Fashion-MNIST IDX .gz files "
                        "(default: search the usual places)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if not 1 <= args.train_size <= 60000:
        parser.error("--train-size must be in [1, 60000]")
    if not 1 <= args.test_size <= 10000:
        parser.error("--test-size must be in [1, 10000]")
    if not 1 <= args.batch_size <= args.train_size:
        parser.error("--batch-size must be in [1, --train-size]")
    return args


def main(argv=None):
    """Runs the comparison and returns its results as a dict.

    Example:

    ```python
    results = main(["--epochs", "2", "--train-size", "2048"])
    print(results["frozen_layers"], results["speedup"])
    ```

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`).

    Returns:
        A dict with `frozen` (list of `(epoch, layer)`, epochs 1-based),
        `frozen_layers`, `frozen_fraction`, `freeze_accuracy`,
        `full_accuracy`, `freeze_seconds`, `full_seconds`, `seconds_saved`,
        `speedup`, the freezer's `overhead_seconds` and `overhead_share` (its
        own sampling and decision time over its training time) and the
        arguments used.
    """
    args = parse_args(argv)
    print(f"keras {keras.__version__}, tensorflow {tf.__version__}, "
          f"backend {keras.backend.backend()}, jit_compile={args.jit}",
          flush=True)

    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist(
        args.data_dir
    )
    x_train = x_train[: args.train_size, ..., None]
    y_train = y_train[: args.train_size]
    x_test = x_test[: args.test_size, ..., None]
    y_test = y_test[: args.test_size]
    print(f"Fashion-MNIST: {len(x_train)} training images, {len(x_test)} "
          f"test images; {args.epochs} epochs of batch {args.batch_size}.",
          flush=True)

    # Same initial weights for both runs; same data order via the same seed.
    keras.utils.set_random_seed(args.seed)
    freeze_model = build_model()
    full_model = build_model()
    full_model.set_weights(freeze_model.get_weights())
    compile_model(freeze_model, args.jit)
    compile_model(full_model, args.jit)
    warm_up(x_train, y_train, args.batch_size, args.jit)

    freezer = make_freezer(args.freezer, args.predictor)
    name = type(freezer).__name__
    # Full training runs first, so any cost of running second in this
    # process falls on the freezing run rather than in its favour.
    print("\n1/2: full training (nothing frozen)", flush=True)
    steps = len(x_train) // args.batch_size
    full_seconds, full_epochs = train(
        full_model,
        make_dataset(x_train, y_train, args.batch_size, args.seed),
        args.epochs, steps, [], "full",
    )
    print(f"\n2/2: training with {name} (layers freeze during fit), same "
          "initial weights and data order", flush=True)
    freeze_seconds, freeze_epochs = train(
        freeze_model,
        make_dataset(x_train, y_train, args.batch_size, args.seed),
        args.epochs, steps, [freezer], name,
    )

    eval_batch = min(1000, len(x_test))
    _, freeze_accuracy = freeze_model.evaluate(
        x_test, y_test, batch_size=eval_batch, verbose=0)
    _, full_accuracy = full_model.evaluate(
        x_test, y_test, batch_size=eval_batch, verbose=0)

    frozen = [(d.epoch + 1, d.layer) for d in freezer.decisions if d.frozen]
    print(f"\nWhat {name} froze (units in forward order; the head never "
          "freezes):")
    if frozen:
        for epoch, layer in frozen:
            print(f"  end of epoch {epoch}: {layer}")
    else:
        print("  nothing")
    print(f"  frozen units: {freezer.frozen_fraction:.0%} of "
          f"{len(freezer.units)}; frozen layers: "
          f"{', '.join(freezer.frozen_layers) or '-'}")

    seconds_saved = full_seconds - freeze_seconds
    speedup = full_seconds / freeze_seconds
    print(f"\nTest accuracy ({len(x_test)} test images):")
    print(f"  {name:>12}: {freeze_accuracy:.4f}")
    print(f"  {'full':>12}: {full_accuracy:.4f}  "
          f"(difference {freeze_accuracy - full_accuracy:+.4f})")
    print("Wall-clock training time (the epochs, both runs in this process):")
    print(f"  {name:>12}: {freeze_seconds:.1f} s  (epochs: "
          f"{', '.join(f'{s:.1f}' for s in freeze_epochs)})")
    print(f"  {'full':>12}: {full_seconds:.1f} s  (epochs: "
          f"{', '.join(f'{s:.1f}' for s in full_epochs)})")
    print(f"  time saved: {seconds_saved:.1f} s "
          f"({seconds_saved / full_seconds:.1%} of full training), "
          f"speed-up x{speedup:.2f}, measured in this run only: timings on a "
          "shared machine are noisy.", flush=True)
    overhead = freezer.overhead_seconds
    overhead_share = (overhead["sampling"] + overhead["decision"]) / (
        freeze_seconds
    )
    print(f"  {name}'s own work (weight sampling {overhead['sampling']:.2f} "
          f"s, freezing stages {overhead['decision']:.2f} s): "
          f"{overhead_share:.2%} of its training time.", flush=True)

    return {
        "freezer": name,
        "epochs": args.epochs,
        "train_size": len(x_train),
        "test_size": len(x_test),
        "batch_size": args.batch_size,
        "jit": args.jit,
        "frozen": frozen,
        "frozen_layers": list(freezer.frozen_layers),
        "frozen_fraction": freezer.frozen_fraction,
        "freeze_accuracy": float(freeze_accuracy),
        "full_accuracy": float(full_accuracy),
        "freeze_seconds": freeze_seconds,
        "full_seconds": full_seconds,
        "freeze_epoch_seconds": freeze_epochs,
        "full_epoch_seconds": full_epochs,
        "seconds_saved": seconds_saved,
        "speedup": speedup,
        "overhead_seconds": dict(overhead),
        "overhead_share": overhead_share,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
