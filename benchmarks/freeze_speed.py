"""How much a frozen prefix saves per train step, and what freezing costs.

Measures, with the project's own `find_units` and `freeze_layers`:

1. Train-step time with 0/25/50/75% of the forward cost frozen as a prefix,
   against the "ideal" (a forward-only pass of the prefix plus a train step of
   the remaining suffix as its own model), with `jit_compile` False and True,
   on a ResNet-style CNN and a keras-hub ViT classifier.
2. Why the XLA step falls short of the ideal KERAS_MECHANICS.md section 2
   reported: prefix forward XLA against non-XLA, the optimized HLO of frozen
   and unfrozen steps, BatchNormalization under XLA, and XLA:CPU flags.
3. Rebuild time per freezing stage: `freeze_layers` (which rebuilds the train
   step) plus the first, tracing and compiling, step.
4. Cost of one weight snapshot (`WeightSampler` over every unit, 1024 values
   each, plus the history append) against the train step.

All configurations live in one process and are timed interleaved, round after
round; the reported ratios are medians over rounds of ratios taken in the same
round, because the machines are shared and absolute milliseconds drift.

Usage:
    python benchmarks/freeze_speed.py                 # full run, 16-25 min on 2 cores
    python benchmarks/freeze_speed.py --quick         # ~7 min: 2 rounds, no children
    python benchmarks/freeze_speed.py --models cnn    # one model (cnn, vit)
    python benchmarks/freeze_speed.py --flags=        # skip the XLA-flags children
    python benchmarks/freeze_speed.py --render benchmarks/results/freeze_speed.json
                                                      # rewrite the .md from the .json

Results go to benchmarks/results/freeze_speed.{md,json} (see --out).
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from keras_smartfrz import find_units  # noqa: E402
from keras_smartfrz import freeze_layers  # noqa: E402
from keras_smartfrz.history import SnapshotHistory  # noqa: E402
from keras_smartfrz.sampling import WeightSampler  # noqa: E402
from keras_smartfrz.sampling import draw_sample_positions  # noqa: E402

TARGETS = (0.0, 0.25, 0.5, 0.75)
BATCH_SIZE = 64
NUM_CLASSES = 10
SAMPLE_SIZE = 1024
SNAPSHOTS_PER_EPOCH = 30
# Fashion-MNIST: 60,000 training images at batch 128.
STEPS_PER_EPOCH = 469
PROFILE_CALLS = 10
SEED = 0
BN_MODES = ("batch_statistics", "inference")  # freeze_layers(frozen_batchnorm=...)
NO_BN = "n/a"
T0 = time.perf_counter()


def log(message):
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def no_autograph(fn):
    return tf.autograph.experimental.do_not_convert(fn)


def forward_fn(model, training=False):
    """A plain function running `model` (closure, so tf.function sees one arg)."""

    @tf.autograph.experimental.do_not_convert
    def forward(inputs):
        return model(inputs, training=training)

    return forward


def fused_step_fn(prefix, suffix, training):
    """Prefix forward (no tape) then the suffix's train step, as one function."""

    @tf.autograph.experimental.do_not_convert
    def step(inputs, labels):
        return suffix.train_step((prefix(inputs, training=training), labels))

    return step


def median(values):
    return float(statistics.median(values)) if values else float("nan")


# --------------------------------------------------------------------- models
def build_cnn(use_batchnorm=True):
    """Stem + 8 residual blocks (conv-BN-ReLU-conv-BN + skip), 32 channels."""
    layers = keras.layers
    inputs = keras.Input((32, 32, 3), name="images")
    x = layers.Conv2D(32, 3, strides=2, padding="same",
                      use_bias=not use_batchnorm, name="stem_conv")(inputs)
    if use_batchnorm:
        x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_out")(x)
    for block in range(8):
        shortcut = x
        y = layers.Conv2D(32, 3, padding="same", use_bias=not use_batchnorm,
                          name=f"b{block}_conv1")(x)
        if use_batchnorm:
            y = layers.BatchNormalization(name=f"b{block}_bn1")(y)
        y = layers.ReLU(name=f"b{block}_relu1")(y)
        y = layers.Conv2D(32, 3, padding="same", use_bias=not use_batchnorm,
                          name=f"b{block}_conv2")(y)
        if use_batchnorm:
            y = layers.BatchNormalization(name=f"b{block}_bn2")(y)
        x = layers.Add(name=f"b{block}_add")([shortcut, y])
        x = layers.ReLU(name=f"b{block}_out")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(NUM_CLASSES, name="head")(x)
    return keras.Model(inputs, outputs, name="resnet_cnn")


class CnnKit:
    """The ResNet-style CNN; cut k = stem plus blocks 0..k-1 frozen."""

    name = "cnn"
    num_cuts = 8  # k = 0..7; k = 8 would leave only the head trainable

    def build(self):
        return build_cnn()

    def cut_label(self, k):
        return "stem" if k == 0 else f"stem+b0..b{k - 1}"

    def flops_fraction(self, k):
        # Multiply-adds of convolutions and the dense head (x2 for FLOPs);
        # BN, ReLU, add and pooling are elementwise and left out.
        stem = 2 * 16 * 16 * 3 * 3 * 3 * 32
        block = 2 * (2 * 16 * 16 * 3 * 3 * 32 * 32)
        head = 2 * 32 * NUM_CLASSES
        return (stem + k * block) / (stem + 8 * block + head)

    def _cut_tensor(self, model, k):
        name = "stem_out" if k == 0 else f"b{k - 1}_out"
        return model.get_layer(name).output

    def prefix_model(self, model, k):
        return keras.Model(model.input, self._cut_tensor(model, k))

    def prefix_layer_ids(self, model, k):
        prefix = self.prefix_model(model, k)
        return {id(layer) for layer in prefix.layers}

    def suffix_model(self, model, k):
        return keras.Model(self._cut_tensor(model, k), model.output)


class VitKit:
    """keras-hub ViT classifier; cut k = patch embedding plus blocks 1..k frozen.

    8 encoder blocks (not 6) so that block boundaries fall within 1% of the
    25/50/75% targets (6 blocks put them 8 points apart).
    """

    name = "vit"
    num_layers = 8
    hidden_dim = 128
    mlp_dim = 256
    num_heads = 4
    patch_size = 4
    num_cuts = 8  # k = 0..7

    def build(self):
        import keras_hub

        backbone = keras_hub.models.ViTBackbone(
            image_shape=(32, 32, 3),
            patch_size=self.patch_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            hidden_dim=self.hidden_dim,
            mlp_dim=self.mlp_dim,
        )
        return keras_hub.models.ViTImageClassifier(
            backbone=backbone, num_classes=NUM_CLASSES, preprocessor=None
        )

    def cut_label(self, k):
        return "embed" if k == 0 else f"embed+blocks1..{k}"

    def flops_fraction(self, k):
        # Matmul FLOPs: patch projection, q/k/v/out projections, the two
        # attention matmuls (scores, weighted values), the MLP, the head.
        # LayerNorm, softmax, GELU and adds are left out.
        d, m = self.hidden_dim, self.mlp_dim
        patches = (32 // self.patch_size) ** 2
        tokens = patches + 1
        embed = 2 * patches * (self.patch_size**2 * 3) * d
        block = (2 * tokens * d * d * 4 + 2 * 2 * tokens * tokens * d
                 + 2 * 2 * tokens * d * m)
        head = 2 * d * NUM_CLASSES
        return (embed + k * block) / (embed + self.num_layers * block + head)

    def _parts(self, model):
        backbone = model.backbone
        encoder = backbone.get_layer("vit_encoder")
        embedding = backbone.get_layer("vit_patching_and_embedding")
        return embedding, encoder

    def prefix_model(self, model, k):
        embedding, encoder = self._parts(model)
        inputs = keras.Input((32, 32, 3))
        x = encoder.dropout(embedding(inputs))
        for block in encoder.encoder_layers[:k]:
            x = block(x)
        return keras.Model(inputs, x)

    def prefix_layer_ids(self, model, k):
        embedding, encoder = self._parts(model)
        owners = [embedding] + list(encoder.encoder_layers[:k])
        return {
            id(layer)
            for owner in owners
            for layer in owner._flatten_layers(include_self=True)
        }

    def suffix_model(self, model, k):
        embedding, encoder = self._parts(model)
        tokens = (32 // self.patch_size) ** 2 + 1
        inputs = keras.Input((tokens, self.hidden_dim))
        x = inputs
        for block in encoder.encoder_layers[k:]:
            x = block(x)
        x = encoder.layer_norm(x)
        x = x[:, 0]  # pooling="token"
        x = model.get_layer("output_dropout")(x)
        outputs = model.get_layer("predictions")(x)
        return keras.Model(inputs, outputs)


KITS = {"cnn": CnnKit, "vit": VitKit}


def compile_model(model, jit):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[],
        jit_compile=jit,
    )


def choose_cut(kit, target):
    fractions = [kit.flops_fraction(k) for k in range(kit.num_cuts)]
    k = int(np.argmin([abs(f - target) for f in fractions]))
    return k, fractions[k]


def prefix_units(kit, model, k):
    """The leading units of `find_units(model)` that lie inside cut k's prefix.

    Checks that they form a prefix in forward order: no later unit may own a
    layer of the prefix.
    """
    units = find_units(model)
    inside = kit.prefix_layer_ids(model, k)
    count = 0
    while count < len(units) and all(
        id(layer) in inside for layer in units[count].layers
    ):
        count += 1
    for unit in units[count:]:
        if any(id(layer) in inside for layer in unit.layers):
            raise AssertionError(
                f"{kit.name} cut {k}: unit {unit.name} lies in the prefix but "
                "after a unit that does not; find_units is not forward-ordered."
            )
    return units, count


# ---------------------------------------------------------------- timing core
def time_calls(fn, calls):
    """One warm-up call, then `calls` timed calls: median wall and CPU ms."""
    fn()
    wall, cpu = [], []
    for _ in range(calls):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return median(wall) * 1e3, median(cpu) * 1e3


class Bench:
    """Named closures timed interleaved, one sample per name and round.

    Closures added with the same `group` are timed call by call in turn
    (A, B, C, A, B, C, ...), so that the measurements a ratio compares see the
    same machine load: on a shared 2-core machine the process gets one core or
    two depending on the neighbours, and that changes within seconds.
    """

    def __init__(self):
        self.tasks = {}
        self.groups = {}
        self.wall = {}
        self.cpu = {}

    def add(self, name, fn, calls, group=None):
        if name in self.tasks:
            raise ValueError(f"Duplicate task name {name!r}.")
        self.tasks[name] = (fn, calls)
        self.groups.setdefault(group or name, []).append(name)
        self.wall[name] = []
        self.cpu[name] = []

    def run_group(self, names):
        calls = max(self.tasks[n][1] for n in names)
        for name in names:
            self.tasks[name][0]()  # warm-up
        wall = {n: [] for n in names}
        cpu = {n: [] for n in names}
        for call in range(calls):
            shift = call % len(names)
            for name in names[shift:] + names[:shift]:
                if call >= self.tasks[name][1]:
                    continue
                w0, c0 = time.perf_counter(), time.process_time()
                self.tasks[name][0]()
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
        for name in names:
            self.wall[name].append(median(wall[name]) * 1e3)
            self.cpu[name].append(median(cpu[name]) * 1e3)

    def run_round(self, round_index):
        groups = list(self.groups.values())
        # Rotate the order each round so no group always runs first or last.
        shift = (round_index * 3) % max(1, len(groups))
        for names in groups[shift:] + groups[:shift]:
            self.run_group(names)

    def ratio(self, numerator, denominator, source="wall"):
        """Median over rounds of numerator/denominator (summed names allowed)."""
        table = self.wall if source == "wall" else self.cpu

        def per_round(names):
            names = [names] if isinstance(names, str) else names
            return np.sum([table[n] for n in names], axis=0)

        return median(list(per_round(numerator) / per_round(denominator)))

    def ratio_all(self, numerator, denominator, source="wall"):
        """Median of per-round ratios pooled over every group holding both."""
        table = self.wall if source == "wall" else self.cpu
        values = []
        for name in table:
            if name.startswith(numerator + "@"):
                group = name.split("@", 1)[1]
                other = f"{denominator}@{group}"
                if other in table:
                    values += list(np.array(table[name]) / np.array(table[other]))
        return median(values)

    def ms(self, name):
        """Median ms of a task, or of all its per-group copies (`name@group`)."""
        if name in self.wall:
            return median(self.wall[name])
        copies = [n for n in self.wall if n.startswith(name + "@")]
        return median([v for n in copies for v in self.wall[n]])


# --------------------------------------------------------------- HLO analysis
def optimized_hlo(fn, *args):
    return fn.experimental_get_compiler_ir(*args)(stage="optimized_hlo")


def hlo_counts(text):
    """Counts instructions of an optimized HLO module (fusions included).

    Convolutions and dots are split by output shape: an output whose leading
    dimension is the batch is a forward or activation-gradient op; any other
    output (a kernel's shape) is a weight gradient.
    """
    instructions = [
        line for line in text.splitlines()
        if re.match(r"\s*(ROOT\s+)?%?[\w.\-]+ = ", line)
    ]

    def split(op):
        lines = [line for line in instructions if f" {op}(" in line]
        batch = [line for line in lines
                 if re.search(rf"= f32\[{BATCH_SIZE}[,\]]", line)]
        return len(lines), len(lines) - len(batch)

    conv, conv_weight = split("convolution")
    dot, dot_weight = split("dot")
    custom = re.findall(r'custom_call_target="([^"]+)"', text)
    return {
        "instructions": len(instructions),
        "convolution": conv,
        "convolution_weight_grad": conv_weight,
        "dot": dot,
        "dot_weight_grad": dot_weight,
        "reduce": sum(" reduce(" in line for line in instructions),
        "custom_call": len(custom),
        "custom_call_targets": sorted(set(custom)),
    }


# ----------------------------------------------------------- the experiments
class ModelBench:
    """Everything timed for one model kind (cnn or vit).

    The CNN is frozen in both `frozen_batchnorm` modes of `freeze_layers`:
    `batch_statistics` (the package default: the frozen BN keeps normalising
    with batch statistics and updating its moving statistics, so the frozen
    prefix must run its BN in training mode) and `inference` (Keras'
    convention, moving statistics). The ideal's prefix forward runs BN the same
    way as the frozen step does (`training=True` resp. `False`).
    """

    def __init__(self, kit, bench, args, data):
        self.kit = kit
        self.bench = bench
        self.args = args
        self.x, self.y = data
        self.modes = BN_MODES if kit.name == "cnn" else (NO_BN,)
        self.configs = {}  # (jit, target, mode) -> dict; mode None at 0%
        self.fns = {}  # task name -> closure, registered in groups later
        self.ideal = {}  # target -> dict
        self.info = {"cuts": {}, "rebuild": {}, "hlo": {}, "sampling": {}}

    def key(self, *parts):
        return "/".join([self.kit.name] + [str(p) for p in parts if p is not None])

    def step_key(self, jit, target, mode=None):
        return self.key(f"jit{int(jit)}", "step", target,
                        None if target == 0.0 else mode)

    def config_list(self):
        out = []
        for jit in (False, True):
            out.append((jit, 0.0, None))
            for target in TARGETS[1:]:
                for mode in self.modes:
                    out.append((jit, target, mode))
        return out

    # ---------------------------------------------------------------- setup
    def setup_frozen_configs(self):
        x, y = self.x, self.y
        for jit, target, mode in self.config_list():
            keras.utils.set_random_seed(SEED)
            model = self.kit.build()
            compile_model(model, jit)
            t = time.perf_counter()
            model.train_on_batch(x, y)
            initial_first_step = time.perf_counter() - t
            model.train_on_batch(x, y)
            if target == 0.0:
                k, fraction, layers, n_units = None, 0.0, [], 0
            else:
                k, fraction = choose_cut(self.kit, target)
                units, n_units = prefix_units(self.kit, model, k)
                layers = [la for u in units[:n_units] for la in u.layers]
                self.info["cuts"][str(target)] = {
                    "k": k,
                    "label": self.kit.cut_label(k),
                    "flops_fraction": fraction,
                    "frozen_units": n_units,
                    "total_units": len(units),
                    "first_trainable_unit": units[n_units].name,
                }
            freeze_kwargs = {} if mode in (None, NO_BN) else {"frozen_batchnorm": mode}
            n_weights_before = len(model.trainable_weights)
            t0 = time.perf_counter()
            freeze_layers(model, layers, **freeze_kwargs)
            t1 = time.perf_counter()
            model.train_on_batch(x, y)
            t2 = time.perf_counter()
            rebuild = self.info["rebuild"].setdefault(
                self.rebuild_key(jit, target, mode),
                {"initial_first_step_s": initial_first_step,
                 "freeze_layers_s": [], "first_step_s": []},
            )
            rebuild["freeze_layers_s"].append(t1 - t0)
            rebuild["first_step_s"].append(t2 - t1)
            rebuild["trainable_weights"] = [
                n_weights_before, len(model.trainable_weights)]
            self.configs[(jit, target, mode)] = {
                "model": model, "layers": layers, "k": k,
                "freeze_kwargs": freeze_kwargs,
            }
            self.fns[self.step_key(jit, target, mode)] = (
                lambda m=model: m.train_on_batch(x, y))
            log(f"{self.kit.name} jit={jit} target={target:.2f} bn={mode}: "
                f"cut {k} ({fraction:.3f} of forward FLOPs), {n_units} units "
                f"frozen, trainable weights {n_weights_before}->"
                f"{len(model.trainable_weights)}, freeze_layers "
                f"{1e3 * (t1 - t0):.1f} ms, first step {t2 - t1:.2f} s")

    @staticmethod
    def rebuild_key(jit, target, mode):
        return f"jit={int(jit)}/target={target}/bn={mode}"

    def group(self, target, mode):
        return f"{self.kit.name}/{target}/{mode}"

    def setup_ideals(self):
        x, y = self.x, self.y
        fns = self.fns
        keras.utils.set_random_seed(SEED)
        forward_model = self.kit.build()
        for xla in (False, True):
            fn = tf.function(forward_fn(forward_model), jit_compile=xla)
            fn(x)
            fns[self.key("full_fwd", f"xla{int(xla)}")] = lambda f=fn: f(x).numpy()
        for target in TARGETS[1:]:
            k, _ = choose_cut(self.kit, target)
            keras.utils.set_random_seed(SEED)
            model = self.kit.build()
            prefix = self.kit.prefix_model(model, k)
            prefix_fn = {}
            for mode in self.modes:
                training = mode == "batch_statistics"
                for xla in (False, True):
                    fn = tf.function(forward_fn(prefix, training), jit_compile=xla)
                    fn(x)
                    prefix_fn[(xla, mode)] = fn
                    fns[self.key("prefix_fwd", target, f"xla{int(xla)}", mode)] = (
                        lambda f=fn: f(x).numpy())
            activations = prefix(x, training=False)
            suffix = {}
            for jit in (False, True):
                suffix[jit] = self.kit.suffix_model(model, k)
                compile_model(suffix[jit], jit)
                suffix[jit].train_on_batch(activations, y)
                fns[self.key("suffix_step", target, f"jit{int(jit)}")] = (
                    lambda s=suffix[jit]: s.train_on_batch(activations, y))
            for mode in self.modes:
                frozen = self.configs[(False, target, mode)]["model"]
                if len(frozen.trainable_weights) != len(suffix[False].trainable_weights):
                    raise AssertionError(
                        f"{self.kit.name} target {target}: the frozen model "
                        f"trains {len(frozen.trainable_weights)} weights, the "
                        f"suffix {len(suffix[False].trainable_weights)}.")
                # The ideal: both parts in the step's compilation mode.
                for jit in (False, True):
                    fns[self.key("ideal", target, f"jit{int(jit)}", mode)] = (
                        lambda f=prefix_fn[(jit, mode)], s=suffix[jit]:
                        s.train_on_batch(f(x), y))
                # KERAS_MECHANICS' definition: non-XLA prefix, XLA suffix.
                fns[self.key("ideal_mixed", target, "jit1", mode)] = (
                    lambda f=prefix_fn[(False, mode)], s=suffix[True]:
                    s.train_on_batch(f(x), y))
                # The ideal's two parts compiled as ONE XLA program, the way
                # the frozen model's step is compiled.
                fused = tf.function(
                    fused_step_fn(prefix, suffix[True], mode == "batch_statistics"),
                    jit_compile=True)
                fused(x, y)
                fns[self.key("ideal_fused", target, "jit1", mode)] = (
                    lambda f=fused: f(x, y)["loss"].numpy())
            self.ideal[target] = {
                "k": k, "model": model, "prefix": prefix,
                "prefix_fn": prefix_fn, "suffix": suffix,
                "activations": activations,
            }
            log(f"{self.kit.name} ideal for target {target:.2f} (cut {k}) ready")
        self.register_groups()

    def register_groups(self):
        """One group per (target, BN mode): every timing a ratio there needs."""
        calls = self.args.calls
        for target in TARGETS[1:]:
            for mode in self.modes:
                group = self.group(target, mode)
                names = [self.step_key(j, 0.0) for j in (False, True)]
                names += [self.step_key(j, target, mode) for j in (False, True)]
                names += [self.key("ideal", target, f"jit{j}", mode) for j in (0, 1)]
                names += [self.key("ideal_mixed", target, "jit1", mode),
                          self.key("ideal_fused", target, "jit1", mode)]
                names += [self.key("prefix_fwd", target, f"xla{j}", mode) for j in (0, 1)]
                names += [self.key("suffix_step", target, f"jit{j}") for j in (0, 1)]
                names += [self.key("full_fwd", f"xla{j}") for j in (0, 1)]
                for name in names:
                    self.bench.add(f"{name}@{group}", self.fns[name], calls, group)

    def at(self, name, target, mode):
        """The name of `name`'s copy timed in the group of (target, mode)."""
        return f"{name}@{self.group(target, mode)}"

    def setup_batchnorm_study(self):
        """Full-depth CNN trunk forward: BN inference, BN training, no BN."""
        if self.kit.name != "cnn":
            return
        x = self.x
        keras.utils.set_random_seed(SEED)
        with_bn = self.kit.prefix_model(build_cnn(True), 8)
        keras.utils.set_random_seed(SEED)
        without_bn = self.kit.prefix_model(build_cnn(False), 8)
        variants = {
            "bn_inference": (with_bn, False),
            "bn_training": (with_bn, True),
            "no_bn": (without_bn, False),
        }
        for variant, (trunk, training) in variants.items():
            for xla in (False, True):
                fn = tf.function(forward_fn(trunk, training), jit_compile=xla)
                fn(x)
                self.bench.add(self.key("bn_study", variant, f"xla{int(xla)}"),
                               lambda f=fn: f(x).numpy(), self.args.calls,
                               group="cnn/bn_study")
        log("cnn BatchNormalization study ready")

    def setup_sampling(self):
        keras.utils.set_random_seed(SEED)
        model = self.kit.build()
        model(self.x[:1])
        self.info["sampling"] = sampling_setup(
            model, self.bench, self.key("sampling"), self.args.sampling_calls)

    # ------------------------------------------------------------- analyses
    def inspect_hlo(self):
        """Optimized XLA HLO of the unfrozen step, the frozen steps, the ideal."""
        data = (self.x, self.y)

        def step_hlo(model, step_data):
            return hlo_counts(optimized_hlo(
                tf.function(no_autograph(model.train_step), jit_compile=True),
                step_data))

        self.info["hlo"]["unfrozen step"] = step_hlo(
            self.configs[(True, 0.0, None)]["model"], data)
        for target in TARGETS[1:]:
            ideal = self.ideal[target]
            suffix = step_hlo(ideal["suffix"][True], (ideal["activations"], self.y))
            for mode in self.modes:
                model = self.configs[(True, target, mode)]["model"]
                entry = {
                    "frozen_step": step_hlo(model, data),
                    "prefix_forward": hlo_counts(optimized_hlo(
                        ideal["prefix_fn"][(True, mode)], self.x)),
                    "suffix_step": suffix,
                }
                self.info["hlo"][f"{target}/{mode}"] = entry
                log(f"{self.kit.name} HLO {target:.2f} bn={mode}: conv/dot/reduce "
                    + "; ".join(
                        f"{part} {c['convolution']}/{c['dot']}/{c['reduce']}"
                        for part, c in entry.items()))

    def repeat_rebuilds(self, repeats):
        """More samples of freeze_layers + first step (re-freezing the same set)."""
        x, y = self.x, self.y
        for _ in range(repeats):
            for (jit, target, mode), config in self.configs.items():
                model = config["model"]
                t0 = time.perf_counter()
                freeze_layers(model, config["layers"], **config["freeze_kwargs"])
                t1 = time.perf_counter()
                model.train_on_batch(x, y)
                t2 = time.perf_counter()
                rebuild = self.info["rebuild"][self.rebuild_key(jit, target, mode)]
                rebuild["freeze_layers_s"].append(t1 - t0)
                rebuild["first_step_s"].append(t2 - t1)
        if repeats:
            log(f"{self.kit.name} rebuild repeats done")

    # -------------------------------------------------------------- results
    def summary(self):
        b = self.bench
        rows = []
        for jit, target, mode in self.config_list():
            j = int(jit)
            base_name = self.step_key(jit, 0.0)
            if target == 0.0:
                rows.append({
                    "model": self.kit.name, "jit": jit, "target": target,
                    "bn_mode": mode, "step_ms": b.ms(base_name),
                    "frozen_over_unfrozen": 1.0, "speedup": 1.0,
                })
                continue

            def at(name, target=target, mode=mode):
                return self.at(name, target, mode)

            base = at(base_name)
            step = at(self.step_key(jit, target, mode))
            cut = self.info["cuts"][str(target)]
            ideal = at(self.key("ideal", target, f"jit{j}", mode))
            prefix = at(self.key("prefix_fwd", target, f"xla{j}", mode))
            suffix = at(self.key("suffix_step", target, f"jit{j}"))
            infer = self.modes[-1]
            row = {
                "model": self.kit.name, "jit": jit, "target": target,
                "bn_mode": mode,
                "step_ms": b.ms(step),
                "frozen_over_unfrozen": b.ratio(step, base),
                "frozen_over_unfrozen_cpu": b.ratio(step, base, "cpu"),
                "speedup": b.ratio(base, step),
                "speedup_cpu": b.ratio(base, step, "cpu"),
                "cut": cut["label"],
                "frozen_units": cut["frozen_units"],
                "total_units": cut["total_units"],
                "flops_fraction": cut["flops_fraction"],
                "fwd_time_fraction": b.ratio(
                    self.at(self.key("prefix_fwd", target, f"xla{j}", infer), target, infer),
                    self.at(self.key("full_fwd", f"xla{j}"), target, infer)),
                "ideal_ms": b.ms(ideal),
                "ideal_speedup": b.ratio(base, ideal),
                "achieved_over_ideal": b.ratio(ideal, step),
                "achieved_over_ideal_cpu": b.ratio(ideal, step, "cpu"),
                "achieved_over_ideal_parts": b.ratio([prefix, suffix], step),
                "prefix_fwd_ms": b.ms(prefix),
                "suffix_step_ms": b.ms(suffix),
                "cached_suffix_speedup": b.ratio(base, suffix),
            }
            if jit:
                mixed = at(self.key("ideal_mixed", target, "jit1", mode))
                fused = at(self.key("ideal_fused", target, "jit1", mode))
                row.update({
                    "fused_ideal_ms": b.ms(fused),
                    "achieved_over_fused_ideal": b.ratio(fused, step),
                    "achieved_over_fused_ideal_cpu": b.ratio(fused, step, "cpu"),
                    "fused_over_two_program_ideal": b.ratio(fused, ideal),
                    "mixed_ideal_ms": b.ms(mixed),
                    "achieved_over_mixed_ideal": b.ratio(mixed, step),
                    "mixed_ideal_speedup": b.ratio(base, mixed),
                })
            rows.append(row)
        return rows

    def forward_summary(self):
        b = self.bench
        pooled = [("full forward", self.key("full_fwd", "xla0"),
                   self.key("full_fwd", "xla1")),
                  ("unfrozen train step", self.step_key(False, 0.0),
                   self.step_key(True, 0.0))]
        for target in TARGETS[1:]:
            pooled.append((
                f"suffix train step after {self.info['cuts'][str(target)]['label']}",
                self.key("suffix_step", target, "jit0"),
                self.key("suffix_step", target, "jit1")))
            for mode in self.modes:
                tail = "" if mode == NO_BN else f", BN {mode}"
                pooled.append((
                    f"prefix {self.info['cuts'][str(target)]['label']} forward{tail}",
                    self.key("prefix_fwd", target, "xla0", mode),
                    self.key("prefix_fwd", target, "xla1", mode)))
                pooled.append((
                    f"frozen {target:.0%} train step{tail}",
                    self.step_key(False, target, mode),
                    self.step_key(True, target, mode)))
        out = {
            label: {"nonxla_ms": b.ms(plain), "xla_ms": b.ms(xla),
                    "xla_over_nonxla": b.ratio_all(xla, plain),
                    "xla_over_nonxla_cpu": b.ratio_all(xla, plain, "cpu")}
            for label, plain, xla in pooled
        }
        if self.kit.name == "cnn":
            for variant in ("bn_inference", "bn_training", "no_bn"):
                plain = self.key("bn_study", variant, "xla0")
                xla = self.key("bn_study", variant, "xla1")
                out[f"trunk (stem + 8 blocks) forward, {variant}"] = {
                    "nonxla_ms": b.ms(plain), "xla_ms": b.ms(xla),
                    "xla_over_nonxla": b.ratio(xla, plain),
                    "xla_over_nonxla_cpu": b.ratio(xla, plain, "cpu")}
        return out


def sampling_setup(model, bench, key, calls):
    """Builds a WeightSampler over all units and registers its timing tasks."""
    units = find_units(model)
    positions = [
        draw_sample_positions(u.num_params, SAMPLE_SIZE, SEED, i)
        for i, u in enumerate(units)
    ]
    t0 = time.perf_counter()
    sampler = WeightSampler(units, positions)
    t1 = time.perf_counter()
    snapshot = sampler()
    t2 = time.perf_counter()
    history = SnapshotHistory(len(units), 30, SAMPLE_SIZE)

    def snapshot_and_record():
        history.append(sampler())

    if bench is not None:
        bench.add(key + "/sampler", sampler, calls, group=key)
        bench.add(key + "/snapshot", snapshot_and_record, calls, group=key)
    return {
        "units": len(units),
        "params": int(sum(u.num_params for u in units)),
        "sampled_values": int(snapshot.size),
        "construct_s": t1 - t0,
        "first_call_s": t2 - t1,
        "sampler": sampler,
        "snapshot": snapshot_and_record,
    }


def resnet50_sampling(calls, rounds):
    """keras.applications.ResNet50(weights=None), for KERAS_MECHANICS section 5."""
    keras.utils.set_random_seed(SEED)
    model = keras.applications.ResNet50(weights=None)
    info = sampling_setup(model, None, None, calls)
    sampler_ms, snapshot_ms = [], []
    for _ in range(rounds):
        sampler_ms.append(time_calls(info["sampler"], calls)[0])
        snapshot_ms.append(time_calls(info["snapshot"], calls)[0])
    info.update({"sampler_ms": median(sampler_ms), "snapshot_ms": median(snapshot_ms),
                 "sampler_ms_rounds": sampler_ms})
    del info["sampler"], info["snapshot"]
    del model
    return info


# ------------------------------------------------------ XLA flags (children)
def flags_child(args):
    """Child process (XLA_FLAGS set by the parent): CNN pieces at the 50% cut.

    Frozen with the package default (`frozen_batchnorm="batch_statistics"`),
    so the ideal's prefix forward runs BN in training mode, as the step does.
    """
    kit = CnnKit()
    bench = Bench()
    x, y = make_data()
    k, _ = choose_cut(kit, 0.5)
    models = {}
    for jit in (False, True):
        for frozen in (False, True):
            keras.utils.set_random_seed(SEED)
            model = kit.build()
            compile_model(model, jit)
            model.train_on_batch(x, y)
            if frozen:
                units, n = prefix_units(kit, model, k)
                freeze_layers(model, [la for u in units[:n] for la in u.layers])
            model.train_on_batch(x, y)
            models[(jit, frozen)] = model
            bench.add(f"step/jit{int(jit)}/frozen{int(frozen)}",
                      lambda m=model: m.train_on_batch(x, y), args.calls, "all")
    keras.utils.set_random_seed(SEED)
    model = kit.build()
    prefix = kit.prefix_model(model, k)
    trunk = kit.prefix_model(model, 8)
    prefix_fn = {}
    for xla in (False, True):
        prefix_fn[xla] = tf.function(forward_fn(prefix, True), jit_compile=xla)
        prefix_fn[xla](x)
        bench.add(f"prefix_fwd/xla{int(xla)}",
                  lambda f=prefix_fn[xla]: f(x).numpy(), args.calls, "all")
        trunk_fn = tf.function(forward_fn(trunk), jit_compile=xla)
        trunk_fn(x)
        bench.add(f"trunk_fwd/xla{int(xla)}", lambda f=trunk_fn: f(x).numpy(),
                  args.calls, "all")
    suffix = kit.suffix_model(model, k)
    compile_model(suffix, True)
    acts = prefix(x, training=False)
    suffix.train_on_batch(acts, y)
    bench.add("ideal/jit1", lambda: suffix.train_on_batch(prefix_fn[True](x), y),
              args.calls, "all")
    for r in range(args.rounds):
        bench.run_round(r)
    hlo = hlo_counts(optimized_hlo(
        tf.function(no_autograph(models[(True, True)].train_step), jit_compile=True),
        (x, y)))
    result = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "ms": {name: bench.ms(name) for name in bench.tasks},
        "ratios": {
            "unfrozen_step_xla_over_nonxla": bench.ratio(
                "step/jit1/frozen0", "step/jit0/frozen0"),
            "frozen_step_xla_over_nonxla": bench.ratio(
                "step/jit1/frozen1", "step/jit0/frozen1"),
            "trunk_fwd_xla_over_nonxla": bench.ratio(
                "trunk_fwd/xla1", "trunk_fwd/xla0"),
            "prefix_fwd_xla_over_nonxla": bench.ratio(
                "prefix_fwd/xla1", "prefix_fwd/xla0"),
            "achieved_over_ideal_xla": bench.ratio("ideal/jit1", "step/jit1/frozen1"),
            "speedup_xla": bench.ratio("step/jit1/frozen0", "step/jit1/frozen1"),
            "speedup_nonxla": bench.ratio("step/jit0/frozen0", "step/jit0/frozen1"),
        },
        "hlo_frozen_step": hlo,
    }
    print("FLAGS_RESULT " + json.dumps(result), flush=True)


def profile_child(args):
    """Child process (XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true): where
    the XLA step spends its time, per HLO instruction, from a TF profiler trace.

    CNN, 75% cut, default `batch_statistics` BN. Each program is profiled
    alone over `PROFILE_CALLS` calls; per-instruction times are summed over
    threads (an instruction split over 2 threads counts twice).
    """
    import glob
    import shutil
    import tempfile

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    kit = CnnKit()
    x, y = make_data()
    k, _ = choose_cut(kit, 0.75)
    models = {}
    for frozen in (False, True):
        keras.utils.set_random_seed(SEED)
        model = kit.build()
        compile_model(model, True)
        model.train_on_batch(x, y)
        if frozen:
            units, n = prefix_units(kit, model, k)
            freeze_layers(model, [la for u in units[:n] for la in u.layers])
        models[frozen] = model
    keras.utils.set_random_seed(SEED)
    model = kit.build()
    prefix = kit.prefix_model(model, k)
    suffix = kit.suffix_model(model, k)
    compile_model(suffix, True)
    acts = prefix(x, training=False)
    suffix.train_on_batch(acts, y)

    def xla(fn):
        return tf.function(fn, jit_compile=True)

    programs = {
        "unfrozen step": (xla(no_autograph(models[False].train_step)), ((x, y),)),
        "frozen step": (xla(no_autograph(models[True].train_step)), ((x, y),)),
        "ideal: prefix forward": (xla(forward_fn(prefix, True)), (x,)),
        "ideal: suffix step": (xla(no_autograph(suffix.train_step)), ((acts, y),)),
        "ideal as one program": (xla(fused_step_fn(prefix, suffix, True)), (x, y)),
    }
    calls = PROFILE_CALLS
    result = {}
    workdir = tempfile.mkdtemp(prefix="freeze_speed_profile_")
    try:
        for name, (fn, fn_args) in programs.items():
            hlo = optimized_hlo(fn, *fn_args)
            hlo_names = set(re.findall(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ", hlo, re.M))
            for _ in range(3):
                tf.nest.map_structure(lambda t: t.numpy(), fn(*fn_args))
            logdir = os.path.join(workdir, re.sub(r"\W+", "_", name))
            t0 = time.perf_counter()
            tf.profiler.experimental.start(logdir)
            for _ in range(calls):
                tf.nest.map_structure(lambda t: t.numpy(), fn(*fn_args))
            tf.profiler.experimental.stop()
            wall = (time.perf_counter() - t0) / calls * 1e3
            space = xplane_pb2.XSpace()
            path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
            with open(path, "rb") as f:
                space.ParseFromString(f.read())
            per_op = {}
            for plane in space.planes:
                names = {key: meta.name for key, meta in plane.event_metadata.items()}
                for line in plane.lines:
                    for event in line.events:
                        op = names.get(event.metadata_id, "")
                        if op in hlo_names:
                            per_op[op] = per_op.get(op, 0.0) + event.duration_ps / 1e9 / calls
            total = sum(per_op.values())
            conv = sum(v for op, v in per_op.items() if op.startswith("convolution"))
            transpose = sum(v for op, v in per_op.items() if "transpose" in op)
            top = sorted(per_op.items(), key=lambda item: -item[1])[:6]
            result[name] = {
                "wall_ms_under_profiler": wall,
                "op_thread_ms": total,
                "convolution_thread_ms": conv,
                "transpose_fusion_thread_ms": transpose,
                "other_thread_ms": total - conv - transpose,
                "top_ops": [[op, ms] for op, ms in top],
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("PROFILE_RESULT " + json.dumps(result), flush=True)


def run_child(mode, xla_flags, args, marker):
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags
    command = [sys.executable, os.path.abspath(__file__), mode,
               "--rounds", str(args.flags_rounds), "--calls", str(args.calls)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker + " ")]
    if proc.returncode != 0 or not line:
        log(f"  child {mode} failed (rc={proc.returncode}): {proc.stderr[-500:]}")
        return {"xla_flags": xla_flags, "error": proc.stderr[-2000:]}
    return json.loads(line[0][len(marker) + 1:])


def run_flags_study(args, flag_sets):
    results = []
    for flags in flag_sets:
        log(f"XLA flags study: XLA_FLAGS='{flags}'")
        result = run_child("--flags-child", flags, args, "FLAGS_RESULT")
        result.setdefault("xla_flags", flags)
        if "ratios" in result:
            log("  " + ", ".join(f"{k}={v:.2f}" for k, v in result["ratios"].items()))
        results.append(result)
    return results


# ------------------------------------------------------------------ reporting
def machine_info():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import keras_hub

    return {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu or platform.processor(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_hub": keras_hub.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset: on)"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def make_data():
    rng = np.random.default_rng(SEED)
    x = tf.constant(rng.normal(size=(BATCH_SIZE, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, NUM_CLASSES, size=(BATCH_SIZE,)))
    return x, y


def fmt(value, digits=2):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def write_markdown(path, command, report):
    info = report["machine"]
    lines = [
        "# Freeze speed: frozen-prefix train steps, rebuild and sampling cost",
        "",
        f"Command (from the repository root): `{command}`",
        "",
        f"Machine: {info['nproc']} CPUs (`nproc`), CPU model '{info['cpu_model']}'; "
        f"Python {info['python']}, TensorFlow {info['tensorflow']} (CPU), Keras "
        f"{info['keras']}, keras-hub {info['keras_hub']}, NumPy {info['numpy']}; "
        f"TF_ENABLE_ONEDNN_OPTS {info['tf_enable_onednn_opts']}; "
        f"XLA_FLAGS='{info['xla_flags']}'.",
        f"Load average (1/5/15 min) at start: {report['loadavg_start']}, at end: "
        f"{report['loadavg_end']} (a shared machine: other jobs ran meanwhile). "
        f"Wall time {report['wall_s'] / 60:.1f} min. {report['rounds']} "
        f"interleaved rounds x (1 warm-up + {report['calls']} timed calls) per "
        "configuration: ms are medians over rounds of per-round medians; "
        "ratios are medians over rounds of ratios taken in the same round. "
        "Everything a ratio compares is timed call by call in turn (A, B, C, "
        "A, B, C, ...) within one group, because the neighbours' load flips "
        "this process between about one and two usable cores within seconds "
        "(wall time then halves or doubles while CPU time stays put). Ratios "
        "of process CPU time are given in brackets as a second, load-robust "
        "estimate; where wall and CPU disagree, trust the CPU figure.",
        "",
        "Models: **cnn** = stride-2 stem + 8 residual blocks (conv-BN-ReLU-conv-BN"
        " + skip, 32 channels at 16x16) + GAP + Dense10, functional; **vit** = "
        "keras_hub ViTBackbone(image_shape=(32,32,3), patch_size=4, num_layers=8,"
        " num_heads=4, hidden_dim=128, mlp_dim=256) in ViTImageClassifier("
        "num_classes=10, preprocessor=None) (8 blocks rather than 6 so that the "
        "block boundaries fall near 25/50/75%). Input 32x32x3, batch 64, "
        "Adam(1e-3), sparse CE from logits, no metrics. Each configuration is "
        "its own fresh model: compiled, stepped twice, then frozen with "
        "`keras_smartfrz.freeze_layers` (the leading units of `find_units`). "
        "The cnn is frozen in both `frozen_batchnorm` modes: `batch_statistics` "
        "(the package default since ee9e87a: frozen BN keeps batch statistics "
        "and updates its moving statistics) and `inference` (Keras' convention, "
        "the mode of KERAS_MECHANICS section 2).",
        "",
        "Definitions: *FLOP frac* = analytic forward FLOPs of the frozen prefix / "
        "whole model (convolutions and matmuls; the cut closest to each target "
        "is used). *fwd-time frac* = measured prefix forward / full forward time"
        " (BN in inference mode, same compile mode as the step). *ideal* = "
        "prefix forward pass (no tape; BN in the same mode as in the frozen "
        "step) followed by a train step of the suffix as its own compiled model,"
        " **both parts in the step's compilation mode** (jit=True: XLA prefix + "
        "XLA suffix). *mixed ideal* (jit=True only) = KERAS_MECHANICS' "
        "definition: non-XLA prefix + XLA suffix. *achieved/ideal* = ideal ms / "
        "frozen step ms (1.00: the rebuilt step is as fast as the ideal). "
        "*cached* = the suffix step alone (prefix outputs cached), speed-up "
        "against the unfrozen step.",
        "",
        "## 1. Train step with a frozen prefix",
        "",
        "| model | jit | frozen BN | target | cut (frozen units) | FLOP frac | fwd-time frac | step ms | frozen/unfrozen | speed-up (CPU) | ideal ms (speed-up) | achieved/ideal (CPU) | cached speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["step_rows"]:
        if row["target"] == 0.0:
            lines.append(
                f"| {row['model']} | {row['jit']} | – | 0% | – | 0 | 0 | "
                f"{fmt(row['step_ms'], 1)} | 1.00 | 1.00 | – | – | – |")
            continue
        lines.append(
            f"| {row['model']} | {row['jit']} | {row['bn_mode']} | "
            f"{row['target']:.0%} | {row['cut']} ({row['frozen_units']}/"
            f"{row['total_units']}) | {row['flops_fraction']:.3f} | "
            f"{fmt(row['fwd_time_fraction'])} | {fmt(row['step_ms'], 1)} | "
            f"{fmt(row['frozen_over_unfrozen'])} | {fmt(row['speedup'])} "
            f"({fmt(row['speedup_cpu'])}) | "
            f"{fmt(row['ideal_ms'], 1)} ({fmt(row['ideal_speedup'])}) | "
            f"**{fmt(row['achieved_over_ideal'])}** "
            f"({fmt(row['achieved_over_ideal_cpu'])}) | "
            f"{fmt(row['cached_suffix_speedup'])} |")
    lines += [
        "",
        "The jit=True rows against three ideals: *two programs* = XLA prefix "
        "program + XLA suffix-step program (the ideal above); *mixed* = non-XLA "
        "prefix + XLA suffix (KERAS_MECHANICS' definition); *one program* = the "
        "same prefix and suffix sub-models traced into ONE `tf.function("
        "jit_compile=True)` (prefix forward, then `suffix.train_step`), i.e. "
        "compiled the way the frozen model's step is.",
        "",
        "| model | frozen BN | target | step ms | two programs ms | achieved/two programs | mixed ms | achieved/mixed | one program ms | **achieved/one program** (CPU) | one program / two programs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['model']} | {r['bn_mode']} | {r['target']:.0%} | {fmt(r['step_ms'], 1)} | "
        f"{fmt(r['ideal_ms'], 1)} | {fmt(r['achieved_over_ideal'])} | "
        f"{fmt(r['mixed_ideal_ms'], 1)} | {fmt(r['achieved_over_mixed_ideal'])} | "
        f"{fmt(r['fused_ideal_ms'], 1)} | **{fmt(r['achieved_over_fused_ideal'])}** "
        f"({fmt(r['achieved_over_fused_ideal_cpu'])}) | "
        f"{fmt(r['fused_over_two_program_ideal'])} |"
        for r in report["step_rows"] if r["target"] > 0 and r["jit"]
    ]
    frozen_rows = [r for r in report["step_rows"] if r["target"] > 0]
    lines += [
        "",
        "Cross-checks of achieved/ideal, same rounds: (a) with process CPU time "
        "instead of wall time; (b) with the ideal as the sum of the separately "
        "timed prefix forward and suffix step.",
        "",
        "| model | jit | frozen BN | target | achieved/ideal (wall) | (a) CPU time | (b) sum of parts | prefix fwd ms | suffix step ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['model']} | {r['jit']} | {r['bn_mode']} | {r['target']:.0%} | "
        f"{fmt(r['achieved_over_ideal'])} | {fmt(r['achieved_over_ideal_cpu'])} | "
        f"{fmt(r['achieved_over_ideal_parts'])} | {fmt(r['prefix_fwd_ms'], 1)} | "
        f"{fmt(r['suffix_step_ms'], 1)} |"
        for r in frozen_rows
    ]
    lines += [
        "",
        "## 2. XLA against non-XLA, piece by piece",
        "",
        "| model | piece | non-XLA ms | XLA ms | XLA/non-XLA (CPU) |",
        "|---|---|---|---|---|",
    ]
    for model_name, pieces in report["forward"].items():
        for label, v in pieces.items():
            lines.append(f"| {model_name} | {label} | {fmt(v['nonxla_ms'], 1)} | "
                         f"{fmt(v['xla_ms'], 1)} | {fmt(v['xla_over_nonxla'])} "
                         f"({fmt(v.get('xla_over_nonxla_cpu'))}) |")
    lines += [
        "",
        "Optimized HLO of the XLA programs (`tf.function(model.train_step, "
        "jit_compile=True).experimental_get_compiler_ir(...)(stage="
        "'optimized_hlo')`; instruction counts in the text, fused computations "
        "included). *conv (wgrad)*: convolutions in all, and those whose output "
        "is not batch-leading, i.e. weight gradients; same for *dot*. *diff* = "
        "frozen step minus (prefix forward + suffix step): the work the frozen "
        "step does beyond the ideal's two programs.",
        "",
        "| model | program | instructions | conv (wgrad) | dot (wgrad) | reduce | custom-call |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_name, hlo in report["hlo"].items():
        for label, entry in hlo.items():
            if "frozen_step" not in entry:
                programs = [(label, entry)]
            else:
                target, mode = label.split("/", 1)
                name = f"{float(target):.0%}" + ("" if mode == NO_BN else f", BN {mode}")
                parts = (entry["frozen_step"], entry["prefix_forward"], entry["suffix_step"])
                diff = {
                    key: parts[0][key] - parts[1][key] - parts[2][key]
                    for key in ("instructions", "convolution", "convolution_weight_grad",
                                "dot", "dot_weight_grad", "reduce", "custom_call")
                }
                diff["custom_call_targets"] = []
                programs = [(f"frozen step {name}", parts[0]),
                            ("  prefix forward", parts[1]),
                            ("  suffix step", parts[2]),
                            ("  **diff**", diff)]
            for program, c in programs:
                lines.append(
                    f"| {model_name} | {program} | {c['instructions']} | "
                    f"{c['convolution']} ({c['convolution_weight_grad']}) | "
                    f"{c['dot']} ({c['dot_weight_grad']}) | {c['reduce']} | "
                    f"{c['custom_call']} {','.join(c['custom_call_targets'])} |")
    if report.get("profile") and "error" not in report["profile"]:
        lines += [
            "",
            "Where the XLA time goes: TF profiler trace of each XLA program alone "
            "(child process `python benchmarks/freeze_speed.py --profile-child` "
            "with XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true; cnn, 75% cut, "
            f"default BN mode, {PROFILE_CALLS} calls). Times are per call, summed "
            "over threads, for events named after an HLO instruction of that "
            "program; convolution events only partly cover the Eigen work, so "
            "read the transpose column, not the totals. *transpose fusions* = "
            "the loop fusions that lay out activations for the weight-gradient "
            "convolutions.",
            "",
            "| program | wall ms/call (under profiler) | transpose fusions thread-ms | all traced HLO ops thread-ms | top instructions (thread-ms) |",
            "|---|---|---|---|---|",
        ]
        for name, entry in report["profile"].items():
            top = ", ".join(f"{op} {ms:.1f}" for op, ms in entry["top_ops"][:3])
            lines.append(
                f"| {name} | {fmt(entry['wall_ms_under_profiler'], 1)} | "
                f"{fmt(entry['transpose_fusion_thread_ms'], 1)} | "
                f"{fmt(entry['op_thread_ms'], 1)} | {top} |")
    if report.get("flags_study"):
        lines += [
            "",
            "XLA:CPU flags (one child process per flag set: `python "
            "benchmarks/freeze_speed.py --flags-child --rounds N` with XLA_FLAGS "
            "set; cnn, 50% cut, default `batch_statistics` BN; ratios taken "
            "within each process):",
            "",
            "| XLA_FLAGS | unfrozen step XLA/non-XLA | frozen step XLA/non-XLA | "
            "trunk fwd XLA/non-XLA | achieved/ideal (XLA) | speed-up XLA | "
            "speed-up non-XLA | unfrozen step ms non-XLA / XLA | HLO custom-calls |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for res in report["flags_study"]:
            if "error" in res:
                lines.append(f"| `{res['xla_flags']}` | failed | | | | | | | |")
                continue
            r, ms = res["ratios"], res["ms"]
            lines.append(
                f"| `{res['xla_flags'] or '(none)'}` | "
                f"{fmt(r['unfrozen_step_xla_over_nonxla'])} | "
                f"{fmt(r['frozen_step_xla_over_nonxla'])} | "
                f"{fmt(r['trunk_fwd_xla_over_nonxla'])} | "
                f"{fmt(r['achieved_over_ideal_xla'])} | {fmt(r['speedup_xla'])} | "
                f"{fmt(r['speedup_nonxla'])} | {fmt(ms['step/jit0/frozen0'], 0)} / "
                f"{fmt(ms['step/jit1/frozen0'], 0)} | "
                f"{res['hlo_frozen_step']['custom_call']} "
                f"{','.join(res['hlo_frozen_step']['custom_call_targets'])} |")
    lines += [
        "",
        "## 3. Rebuild per freezing stage",
        "",
        "`freeze_layers(model, prefix_layers)` (sets trainable=False and calls "
        "`make_train_function(force=True)`), then the first step (trace, and "
        "with jit an XLA compile). Medians over "
        f"{1 + report['rebuild_repeats']} samples (the first on a fresh model, the "
        "others re-freezing the same layers later). *initial* = first step of "
        "the freshly compiled, unfrozen model (one sample). 0% = "
        "`freeze_layers(model, [])`, a rebuild with nothing frozen.",
        "",
        "| model | jit | frozen BN | target | freeze_layers ms | first step s | initial first step s | step ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rebuild_rows"]:
        lines.append(
            f"| {row['model']} | {row['jit']} | {row['bn_mode'] or '–'} | "
            f"{row['target']:.0%} | {fmt(row['freeze_layers_ms'], 1)} | "
            f"{fmt(row['first_step_s'])} | {fmt(row['initial_first_step_s'])} | "
            f"{fmt(row['step_ms'], 1)} |")
    lines += [
        "",
        "## 4. Sampling cost per snapshot",
        "",
        f"`WeightSampler` over all units (sample_size={SAMPLE_SIZE}), timed "
        "interleaved with the steps; *snapshot* = sampler call + "
        "`SnapshotHistory.append` (what `FreezingCallback.on_train_batch_end` "
        "does when a snapshot is due). *share* = "
        f"{SNAPSHOTS_PER_EPOCH} x snapshot ms / ({STEPS_PER_EPOCH} x unfrozen "
        f"step ms), medians: {SNAPSHOTS_PER_EPOCH} snapshots per epoch "
        "(the default window of 30 per freezing stage, one stage per epoch) and "
        f"{STEPS_PER_EPOCH} steps per epoch (Fashion-MNIST, 60k images at batch "
        "128), with the step time measured here at batch 64 (a batch-128 step "
        "takes about twice as long, so the share there is about half).",
        "",
        "| model | units | params | sampled values | construct ms | first call (trace + XLA compile) ms | sampler ms | snapshot ms | share, jit=False | share, jit=True |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["sampling_rows"]:
        lines.append(
            f"| {row['model']} | {row['units']} | {row['params']:,} | "
            f"{row['sampled_values']:,} | {fmt(row['construct_s'] * 1e3, 1)} | "
            f"{fmt(row['first_call_s'] * 1e3, 1)} | {fmt(row['sampler_ms'], 3)} | "
            f"{fmt(row['snapshot_ms'], 3)} | {fmt(row.get('share_jit0_pct'), 3)}% | "
            f"{fmt(row.get('share_jit1_pct'), 3)}% |")
    if report.get("resnet50"):
        r = report["resnet50"]
        lines += [
            "",
            f"keras.applications.ResNet50(weights=None), timed alone after the "
            f"rest: {r['units']} units, {r['params']:,} trainable params, "
            f"{r['sampled_values']:,} sampled values; construct "
            f"{r['construct_s'] * 1e3:.1f} ms, first call {r['first_call_s'] * 1e3:.0f}"
            f" ms, **{r['sampler_ms']:.3f} ms per sampler call**, "
            f"{r['snapshot_ms']:.3f} ms per snapshot (KERAS_MECHANICS section 5: "
            "0.61 ms for an XLA gather over 54 kernels, 55,296 values).",
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def strip(obj):
    """JSON-safe copy (drops callables and models)."""
    if isinstance(obj, dict):
        return {str(k): strip(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, (list, tuple)):
        return [strip(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


# ----------------------------------------------------------------------- main
def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="few rounds and calls, no flags study (minutes)")
    parser.add_argument("--models", default="cnn,vit",
                        help="comma-separated subset of: cnn,vit")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--calls", type=int, default=None,
                        help="timed calls per configuration and round")
    parser.add_argument("--rebuild-repeats", type=int, default=None)
    parser.add_argument("--flags", default="--xla_cpu_use_thunk_runtime=false;"
                        "--xla_cpu_use_xnnpack=true",
                        help="';'-separated extra XLA_FLAGS sets to compare "
                             "with no flags ('' to skip)")
    parser.add_argument("--flags-rounds", type=int, default=None)
    parser.add_argument("--no-resnet50", action="store_true")
    parser.add_argument("--out", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "freeze_speed"),
        help="output path without extension (.md and .json are written)")
    parser.add_argument("--render", metavar="JSON",
                        help="only rewrite the .md of --out from a results .json")
    parser.add_argument("--flags-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the XLA profile (a child process)")
    args = parser.parse_args()
    quick = args.quick
    args.rounds = args.rounds or (2 if quick else 6)
    args.calls = args.calls or (3 if quick else 5)
    args.rebuild_repeats = (args.rebuild_repeats if args.rebuild_repeats is not None
                            else (0 if quick else 1))
    args.flags_rounds = args.flags_rounds or 3
    args.sampling_calls = 10 if quick else 20
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in KITS:
            parser.error(f"--models: unknown model '{m}'; choose from {sorted(KITS)}")
    return args


def main():
    args = parse_args()
    if args.flags_child:
        flags_child(args)
        return
    if args.profile_child:
        profile_child(args)
        return
    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        write_markdown(args.out + ".md", report["command"], report)
        return
    command = "python " + " ".join(
        [os.path.relpath(os.path.abspath(__file__), os.getcwd())] + sys.argv[1:])
    loadavg_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    log(f"models={args.models} rounds={args.rounds} calls={args.calls}")
    keras.utils.set_random_seed(SEED)
    data = make_data()
    bench = Bench()
    model_benches = []
    for name in args.models:
        mb = ModelBench(KITS[name](), bench, args, data)
        mb.setup_frozen_configs()
        mb.setup_ideals()
        mb.setup_batchnorm_study()
        mb.setup_sampling()
        model_benches.append(mb)
    for r in range(args.rounds):
        t = time.perf_counter()
        bench.run_round(r)
        log(f"round {r + 1}/{args.rounds} done in {time.perf_counter() - t:.1f}s; "
            + "; ".join(
                f"{mb.kit.name} jit{j} 50%/0%: "
                f"{bench.ms(mb.step_key(j, 0.5, mb.modes[0])):.0f}"
                f"/{bench.ms(mb.step_key(j, 0.0)):.0f} ms"
                for mb in model_benches for j in (0, 1)))
    for mb in model_benches:
        mb.inspect_hlo()
    for mb in model_benches:
        mb.repeat_rebuilds(args.rebuild_repeats)

    step_rows, rebuild_rows, sampling_rows = [], [], []
    forward, hlo, cuts = {}, {}, {}
    for mb in model_benches:
        step_rows += mb.summary()
        forward[mb.kit.name] = mb.forward_summary()
        hlo[mb.kit.name] = mb.info["hlo"]
        cuts[mb.kit.name] = mb.info["cuts"]
        for jit, target, mode in mb.config_list():
            rb = mb.info["rebuild"][mb.rebuild_key(jit, target, mode)]
            rebuild_rows.append({
                "model": mb.kit.name, "jit": jit, "target": target,
                "bn_mode": mode,
                "freeze_layers_ms": median(rb["freeze_layers_s"]) * 1e3,
                "first_step_s": median(rb["first_step_s"]),
                "initial_first_step_s": rb["initial_first_step_s"],
                "step_ms": bench.ms(mb.step_key(jit, target, mode)),
                "samples": rb,
            })
        s = mb.info["sampling"]
        row = {"model": mb.kit.name, **{k: v for k, v in s.items() if not callable(v)},
               "sampler_ms": bench.ms(mb.key("sampling") + "/sampler"),
               "snapshot_ms": bench.ms(mb.key("sampling") + "/snapshot")}
        for jit in (False, True):
            step = mb.step_key(jit, 0.0)
            row[f"share_jit{int(jit)}_pct"] = (
                100 * SNAPSHOTS_PER_EPOCH * row["snapshot_ms"]
                / (STEPS_PER_EPOCH * bench.ms(step)))
        sampling_rows.append(row)

    resnet = None
    if not args.no_resnet50:
        log("ResNet50 sampling")
        resnet = resnet50_sampling(args.sampling_calls, max(3, args.rounds // 2))
        log(f"ResNet50: {resnet['sampler_ms']:.3f} ms per sampler call")

    profile = None
    if "cnn" in args.models and not (args.no_profile or args.quick):
        log("XLA profile (child process)")
        profile = run_child("--profile-child", "--xla_cpu_enable_xprof_traceme=true",
                            args, "PROFILE_RESULT")
        for name, entry in profile.items():
            if isinstance(entry, dict) and "op_thread_ms" in entry:
                log(f"  {name}: {entry['op_thread_ms']:.1f} thread-ms in HLO ops, "
                    f"conv {entry['convolution_thread_ms']:.1f}, transpose fusions "
                    f"{entry['transpose_fusion_thread_ms']:.1f}")

    flags_study = None
    flag_sets = [f for f in args.flags.split(";")] if args.flags else []
    if not args.quick and "cnn" in args.models and flag_sets:
        flags_study = run_flags_study(args, [""] + flag_sets)

    report = {
        "command": command,
        "machine": machine_info(),
        "loadavg_start": loadavg_start,
        "loadavg_end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "wall_s": time.perf_counter() - T0,
        "rounds": args.rounds,
        "calls": args.calls,
        "rebuild_repeats": args.rebuild_repeats,
        "cuts": cuts,
        "step_rows": step_rows,
        "forward": forward,
        "hlo": hlo,
        "rebuild_rows": rebuild_rows,
        "sampling_rows": sampling_rows,
        "resnet50": resnet,
        "flags_study": flags_study,
        "profile": profile,
        "raw_wall_ms": bench.wall,
        "raw_cpu_ms": bench.cpu,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(strip(report), f, indent=1)
    write_markdown(args.out + ".md", command, report)
    log(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
