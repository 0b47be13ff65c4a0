"""What freezing a BatchNormalization mid-training does to accuracy.

A frozen Keras BatchNormalization (`trainable=False`) normalises with its moving
statistics ("inference"); the alternative keeps batch statistics and freezes
only gamma/beta ("batch_statistics"). This trains a Conv-BN CNN on real
Fashion-MNIST, freezes the front half of its units at the end of epoch
`--freeze-epoch` in each mode (and not at all, for reference), and reports:
the train-mode loss on a fixed batch just before and just after the freeze
(the jump), and final test accuracy, over several seeds.

    python benchmarks/batchnorm_freeze.py --seeds 0 1 2

writes benchmarks/results/batchnorm_freeze.md and .json.
"""

import argparse
import json
import os
import pathlib
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_smartfrz  # noqa: E402
from keras_smartfrz.datasets import load_fashion_mnist  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
MODES = ("none", "inference", "batch_statistics")


def build_cnn():
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for i, filters in enumerate((32, 32, 64, 64)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
        if i % 2 == 1:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, name="head")(x)
    return keras.Model(inputs, outputs, name="bn_cnn")


class FreezeFrontAt(keras.callbacks.Callback):
    """Freezes the front half of the units at the end of one epoch and
    measures the train-mode loss on a fixed batch around the freeze."""

    def __init__(self, epoch, mode, probe):
        super().__init__()
        self.epoch, self.mode, self.probe = epoch, mode, probe
        self.loss_before = self.loss_after = None

    def _probe_loss(self):
        x, y = self.probe
        logits = self.model(x, training=True)
        return float(keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(y, logits,
                                                          from_logits=True)))

    def on_epoch_end(self, epoch, logs=None):
        if epoch != self.epoch or self.mode == "none":
            return
        units = keras_smartfrz.find_units(self.model)
        front = units[: len(units) // 2]
        self.loss_before = self._probe_loss()
        keras_smartfrz.freeze_layers(
            self.model, [l for u in front for l in u.layers],
            frozen_batchnorm=self.mode)
        self.loss_after = self._probe_loss()


def run(mode, seed, data, args):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    model = build_cnn()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True),
                  metrics=["accuracy"], jit_compile=args.jit)
    probe = (x_train[:256], y_train[:256])
    freezer = FreezeFrontAt(args.freeze_epoch, mode, probe)
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=128, epochs=args.epochs,
              callbacks=[freezer], verbose=0, shuffle=True)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=512, verbose=0)
    return {"mode": mode, "seed": seed, "test_accuracy": float(accuracy),
            "loss_before": freezer.loss_before,
            "loss_after": freezer.loss_after, "seconds": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--freeze-epoch", type=int, default=1,
                        help="0-based epoch at whose end the front freezes")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "batchnorm_freeze"))
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    prep = lambda x: (x[..., None] / 255.0).astype("float32")  # noqa: E731
    data = ((prep(x_train[: args.train_size]), y_train[: args.train_size]),
            (prep(x_test), y_test))
    rows = []
    for seed in args.seeds:
        for mode in MODES:
            row = run(mode, seed, data, args)
            rows.append(row)
            print(json.dumps(row), flush=True)

    lines = [
        "# Freezing BatchNormalization mid-training: accuracy",
        "",
        "Command: `python benchmarks/batchnorm_freeze.py "
        + " ".join(argv if argv is not None else os.sys.argv[1:]) + "`",
        "",
        f"Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"keras {keras.__version__}. Fashion-MNIST, {args.train_size} training "
        f"images, full 10k test set; Conv-BN CNN (4 conv units + head); the "
        f"front 2 units (conv+BN) frozen at the end of epoch "
        f"{args.freeze_epoch + 1} of {args.epochs}; seeds {args.seeds}.",
        "",
        "| frozen BN mode | test accuracy (mean ± sd) | train-mode probe loss before → after the freeze |",
        "|---|---|---|",
    ]
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        acc = np.array([r["test_accuracy"] for r in mine])
        jump = ("–" if mode == "none" else "; ".join(
            f"{r['loss_before']:.4f} → {r['loss_after']:.4f}" for r in mine))
        lines.append(f"| {mode} | {acc.mean():.4f} ± {acc.std():.4f} | {jump} |")
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    pathlib.Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
