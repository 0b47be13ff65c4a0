"""Where activation caching applies: each of the suite's models, trained a
few short epochs with caching requested, and what the cache did.

Caching must stay off, with a reason, wherever it would change training
(`keras_smartfrz.caching`). This runs the suite's four models
(benchmarks/suite.py, its `quick` sizes) and two variants, 3 epochs of the
same examples (reshuffled), with a `FreezingCallback(cache_activations=True,
frozen_batchnorm="inference")` whose policy freezes every unit but the head
at the first stage: epoch 1 runs in full, epoch 2 fills the cache at the
deepest cut, epoch 3 reads it:

- `cnn_finetune`, `resnet_scratch`, `vit_scratch`, `minilm_finetune`: the
  suite's models as they are (MiniLM: the all-MiniLM-L6-v2 preset, whose
  dropout is 0.1);
- `cnn_finetune, augmenting`: the same CNN with fresh random noise added to
  every image by the input pipeline (a stand-in for random augmentation);
- `minilm_finetune, no dropout`: the preset's backbone and classifier
  built with `dropout=0.0` (then the cut is after the backbone).

Reported per run: the cache's final status and reason, the cuts it moved
to (filled or derived, stage epoch, hits), the warnings it gave, and the
units frozen. Accuracies mean nothing here (a few steps of training).

Usage (from the repository root):

    python benchmarks/caching_scope.py     # about 3 min on 2 CPU cores

Writes benchmarks/results/caching_scope.json and caching_scope.md.
"""

import argparse
import json
import os
import pathlib
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import caching as caching_benchmark  # noqa: E402
import suite  # noqa: E402

import keras_smartfrz  # noqa: E402
from keras_smartfrz import datasets  # noqa: E402
from keras_smartfrz.policies import FreezePolicy  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
EPOCHS = 3
CASES = (
    ("cnn_finetune", "as in the suite"),
    ("cnn_finetune", "augmenting"),
    ("resnet_scratch", "as in the suite"),
    ("vit_scratch", "as in the suite"),
    ("minilm_finetune", "as in the suite"),
    ("minilm_finetune", "no dropout"),
)


class FreezeEverything(FreezePolicy):
    """Proposes every candidate unit (the callback never freezes the head)."""

    needs_history = False

    def decide(self, stage):
        freeze = np.ones(len(stage.unit_names), bool)
        return freeze.astype(np.float32), freeze


def build(scenario, size, variant):
    if variant != "no dropout":
        return scenario.build(size)
    import keras_hub

    path = datasets.minilm_preset_path()
    backbone = keras_hub.models.BertBackbone.from_preset(path, dropout=0.0)
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None, dropout=0.0
    )


def pipeline(x, y, size, seed, variant):
    """`steps_per_epoch` batches that are the same examples every epoch,
    reshuffled; with `augmenting`, noise drawn afresh every epoch."""
    data = tf.data.Dataset.from_tensor_slices((x, y))
    data = data.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    if not isinstance(x, dict):
        data = data.map(
            lambda image, label: (
                tf.cast(image, tf.float32)[..., None] / 255.0, label))
    if variant == "augmenting":
        data = data.map(
            lambda image, label: (
                image + tf.random.normal(tf.shape(image), stddev=0.02),
                label))
    return data.repeat().batch(size.batch_size, drop_remainder=True)


def run_case(name, variant, seed=0):
    scenario, size = suite.SCENARIOS[name], suite.SIZES[name]["quick"]
    x, y, _, _ = scenario.load_data(size)
    n = size.steps_per_epoch * size.batch_size
    x, y = suite._take(x, slice(0, n)), y[:n]
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build(scenario, size, variant)
    scenario.compile(model, size)
    freezer = keras_smartfrz.FreezingCallback(
        FreezeEverything(), min_epochs=1, cache_activations=True,
        frozen_batchnorm="inference",
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(pipeline(x, y, size, seed, variant), epochs=EPOCHS,
                  steps_per_epoch=size.steps_per_epoch, verbose=0,
                  callbacks=[freezer])
    messages = []
    for w in caught:
        text = str(w.message)
        if "activation caching" in text and text not in messages:
            messages.append(text)
    info = freezer.cache_info
    row = {
        "scenario": name,
        "variant": variant,
        "status": info["status"],
        "reason": info["reason"],
        "cuts": info["cuts"],
        "warnings": messages,
        "frozen_units": len(freezer.frozen_units),
        "units": len(freezer.units),
        "seconds": time.perf_counter() - start,
    }
    hits = sum(sum(c["hits"]) for c in info["cuts"])
    print(f"{name:16s} {variant:16s} {info['status']:7s} hits {hits:3d} "
          f"frozen {row['frozen_units']}/{row['units']}  "
          f"{info['reason'] or ''}", flush=True)
    return row


def render(results, command):
    lines = [
        "# Where activation caching applies",
        "",
        f"Command: `{command}`",
        "",
        "Made by `benchmarks/caching_scope.py` (its docstring says what "
        f"runs). Machine: {results['machine']}.",
        "",
        f"Each row: {EPOCHS} epochs of the same examples (reshuffled); "
        "every unit but the head freezes at the first stage, with "
        "`cache_activations=True, frozen_batchnorm=\"inference\"`. "
        "`status` is the cache's at the "
        "end of `fit` (`off` with the reason `fit ended` after a cache "
        "served the run; another reason when it never did or stopped).",
        "",
        "| model | pipeline / model | units frozen | cuts (hits) | status, "
        "reason | warnings |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['scenario']} | {r['variant']} | "
            f"{r['frozen_units']}/{r['units']} | "
            f"{caching_benchmark._cuts(r)} | "
            f"{r['status']}: {r['reason']} | "
            + ("<br>".join(w.replace("|", "\\|") for w in r["warnings"])
               or "-")
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "caching_scope.json"))
    args = parser.parse_args(argv)

    results = {"machine": suite.machine_info(), "runs": []}
    for name, variant in CASES:
        results["runs"].append(run_case(name, variant))
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(results, indent=1) + "\n")
    command = "python benchmarks/caching_scope.py" + (
        "" if out == RESULTS / "caching_scope.json" else f" --out {out}")
    out.with_suffix(".md").write_text(render(results, command))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
