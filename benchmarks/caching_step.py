"""Step time of activation caching against freezing alone and the ideal.

The suite's fine-tuning CNN (benchmarks/suite.py, scenario 1) with the
units SmartFRZ froze in `benchmarks/caching.py` (the stem, stage 0 and block
s1b0; frozen BatchNormalization in inference mode), timed per train step in
one process, side by side:

- `full`: nothing frozen;
- `freeze`: those units frozen (`freeze_layers`);
- `cache`: the same with the cached train step of `keras_smartfrz.caching`
  after its fill epoch (every batch a cache hit);
- `ideal`: a model of the layers after the cut alone, trained by `fit` on
  precomputed features: what caching can at best reach.

Random inputs (the cost does not depend on the values), 20 batches of 64,
two timed epochs after a warm-up epoch, `jit_compile=False`.

    python benchmarks/caching_step.py   # about 2 minutes

Prints a table and writes benchmarks/results/caching_step.md.
"""

import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import suite  # noqa: E402

import keras_smartfrz  # noqa: E402
from keras_smartfrz import caching  # noqa: E402

FROZEN = ("stem_conv", "s0b0_1_conv", "s0b0_2_conv", "s0b0_proj_conv",
          "s0b1_1_conv", "s0b1_2_conv", "s1b0_1_conv", "s1b0_2_conv",
          "s1b0_proj_conv")
STEPS = 20


def step_ms(model, data):
    model.fit(data, epochs=1, verbose=0)  # trace / warm up
    start = time.perf_counter()
    model.fit(data, epochs=2, verbose=0)
    return (time.perf_counter() - start) / (2 * STEPS) * 1000


def main():
    scenario = suite.CnnFinetune()
    size = suite.SIZES["cnn_finetune"]["full"]
    keras.utils.set_random_seed(0)
    model = scenario.build(size)
    scenario.compile(model, size)
    rng = np.random.default_rng(0)
    x = rng.random((64 * STEPS, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64 * STEPS)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(64).cache()
    times = {"full": step_ms(model, data)}
    units = keras_smartfrz.find_units(model)
    layers = [l for u in units if u.name in FROZEN for l in u.layers]
    keras_smartfrz.freeze_layers(model, layers, frozen_batchnorm="inference")
    times["freeze"] = step_ms(model, data)
    cut = caching.find_cut(model)
    cache = caching.ActivationCache(model, cut, len(x))
    cache.install()
    keras_smartfrz.rebuild_train_step(model)
    model.fit(data, epochs=1, verbose=0)  # the fill epoch
    cache.end_epoch()
    times["cache"] = step_ms(model, data)
    cache.end_epoch()
    assert cache.misses == [0] and cache.hits == [3 * STEPS], cache.hits
    suffix = cut[3]
    features = cut[2].predict(x, verbose=0)
    suffix.compile(optimizer=scenario.optimizer(size), loss=suite._loss(),
                   jit_compile=False)
    times["ideal"] = step_ms(
        suffix,
        tf.data.Dataset.from_tensor_slices((features, y)).batch(64).cache(),
    )
    lines = [
        "# Activation caching: step time",
        "",
        "Command: `python benchmarks/caching_step.py` (see its docstring). "
        f"Machine: {suite.machine_info()['cpu_model']}, "
        f"{os.cpu_count()} cores, load average before "
        f"{suite.load_average()}.",
        f"Cut: `{cut[0].name}`, {caching.example_bytes(cut[1])} bytes per "
        "example.",
        "",
        "| step | ms | full / this | freeze / this |",
        "|---|---|---|---|",
    ]
    for name, ms in times.items():
        lines.append(f"| {name} | {ms:.1f} | {times['full'] / ms:.2f} | "
                     f"{times['freeze'] / ms:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(__file__).resolve().parent / "results"
    (out / "caching_step.md").write_text(text)


if __name__ == "__main__":
    main()
