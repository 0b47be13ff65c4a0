"""Activation caching and optimizer-state release, end to end, side by side
with freezing alone and full training.

The fine-tuning scenario of the suite (benchmarks/suite.py, scenario 1: a
ResNet-style CNN pretrained on MNIST inside the benchmark, fine-tuned on
Fashion-MNIST), trained these ways per seed from the same initial weights on
the same data order, one after the other in one process:

- `full`: every layer trains;
- `smartfrz`, `autofreeze`, `linear`: the three freezing callbacks with
  their default arguments, freezing alone;
- `<method>+cache`: the same plus `cache_activations=True`;
- `smartfrz+cache+release`: the same plus `release_optimizer_state=True`.

Every freezing run uses `frozen_batchnorm="inference"`, because caching
needs it, so that the only difference between `<method>` and
`<method>+cache` is the cache. Each epoch is one pass over the same 7680
training examples, reshuffled every epoch (the suite draws its epochs from
an endless stream instead, which gives every epoch other examples: no cache
can serve that). The dataset repeats and `fit` gets `steps_per_epoch`, so
no epoch ends by exhausting an iterator (tearing one down can wait idle on
tf.data's autotuning thread; see `report.train_seconds`).

Reported per run: test accuracy and its difference from full training of
the same seed, the epochs' wall time (`train s`: first epoch's start to last
epoch's end, every freezing stage, cache derivation and retrace included)
and its ratio to full training, epoch times, the epoch each unit froze, the
cache (its cuts, size, hits) and the peak resident memory above the level
before the run (sampled every 20 ms; the TensorFlow allocator keeps freed
memory, so this is an upper bound of what a run needed beyond the previous
one).

`--scenario minilm_finetune` runs the suite's scenario 4 instead (MiniLM,
all-MiniLM-L6-v2, fine-tuned on Rotten Tomatoes, 6 epochs of 32 batches of
32 snippets of 48 tokens, AdamW 5e-5), on the same 1024 snippets every
epoch, with the backbone and the classifier built with `dropout=0.0` for
every method, full training included: the preset's dropout of 0.1 is random
in every layer, and no cache can serve a prefix that draws random numbers.
The cut then sits inside the backbone, after the deepest frozen encoder
layer, and holds its hidden states and the padding mask.

Usage (from the repository root):

    python benchmarks/caching.py                  # seeds 0 1 2, about 35 min
    python benchmarks/caching.py --scenario minilm_finetune --seeds 0 1
    python benchmarks/caching.py --seeds 0 --epochs 3 --steps 20 \
        --pretrain-steps 20 --out /tmp/caching.json   # smoke

Writes benchmarks/results/caching.json and caching.md (caching_minilm.json
and caching_minilm.md for MiniLM).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import suite  # noqa: E402

import keras_smartfrz  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
METHODS = ("full", "smartfrz", "smartfrz+cache", "smartfrz+cache+release",
           "autofreeze", "autofreeze+cache", "linear", "linear+cache")


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak resident memory while the block runs, sampled by a thread."""

    def __enter__(self):
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class EpochClock(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        if epoch == 0:
            self.start = self._start

    def on_epoch_end(self, epoch, logs=None):
        self.end = time.perf_counter()
        self.seconds.append(self.end - self._start)


def make_freezer(method):
    name, *options = method.split("+")
    if name == "full":
        return None
    kwargs = dict(
        frozen_batchnorm="inference",
        cache_activations="cache" in options,
        release_optimizer_state="release" in options,
    )
    return {
        "smartfrz": keras_smartfrz.SmartFRZ,
        "autofreeze": keras_smartfrz.AutoFreeze,
        "linear": keras_smartfrz.LinearFreezing,
    }[name](**kwargs)


def dataset(x, y, batch_size, seed):
    """The same examples every epoch, reshuffled: each epoch of
    `len(y) // batch_size` steps is one pass (7680 = 120 x 64)."""
    data = tf.data.Dataset.from_tensor_slices((x, y))
    data = data.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    data = data.repeat()
    return data.batch(batch_size, drop_remainder=True).prefetch(2)


class MinilmNoDropout(suite.MinilmFinetune):
    """The suite's MiniLM fine-tuning with dropout off (see the docstring)."""

    def build(self, size):
        import keras_hub

        path = suite.datasets.minilm_preset_path()
        backbone = keras_hub.models.BertBackbone.from_preset(path,
                                                             dropout=0.0)
        return keras_hub.models.BertTextClassifier(
            backbone, num_classes=2, preprocessor=None, dropout=0.0)


def _first(data, n):
    return keras.tree.map_structure(lambda a: a[:n], data)


def run(scenario, size, weights, data, method, seed, epochs):
    x, y, xt, yt = data
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = scenario.build(size)
    model.set_weights(weights)
    scenario.compile(model, size)
    freezer = make_freezer(method)
    clock = EpochClock()
    callbacks = ([freezer] if freezer else []) + [clock]
    train = dataset(x, y, size.batch_size, seed)
    with PeakMemory() as memory:
        start = time.perf_counter()
        model.fit(train, epochs=epochs, callbacks=callbacks, verbose=0,
                  steps_per_epoch=len(y) // size.batch_size)
        seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(xt, yt, batch_size=256, verbose=0)
    result = {
        "method": method,
        "seed": seed,
        "test_accuracy": float(accuracy),
        "fit_seconds": seconds,
        "train_seconds": clock.end - clock.start,
        "epoch_seconds": clock.seconds,
        "peak_rss_above_start_bytes": memory.peak - memory.base,
    }
    if freezer is not None:
        result.update(
            freeze_epochs={
                d.layer: d.epoch + 1 for d in freezer.decisions if d.frozen
            },
            frozen_units=len(freezer.frozen_units),
            units=len(freezer.units),
            cache=dict(freezer.cache_info),
            optimizer_bytes_released=freezer.optimizer_bytes_released,
            overhead_seconds=dict(freezer.overhead_seconds),
        )
    print(
        f"  seed {seed} {method:22s} acc {accuracy:.4f} "
        f"{result['train_seconds']:6.1f} s (fit {seconds:.1f})  epochs "
        + " ".join(f"{s:.0f}" for s in clock.seconds)
        + (f"  cache {freezer.cache_info['status']} at "
           f"{freezer.cache_info['cut']}" if freezer else ""),
        flush=True,
    )
    return result


def _cuts(cache):
    """'s1b0_out (filled) > s2b0_out (derived)': each cut the run cached."""
    cuts = cache.get("cuts") or []
    if not cuts:
        return "-"
    return " > ".join(
        f"{c['cut']} ({'derived' if c['derived_from'] else 'filled'}, "
        f"ep {c['epoch'] + 1}"
        + (f", {sum(c['hits'])} hits" if "hits" in c else "")
        + ")"
        for c in cuts
    )


def _hits(cache):
    """Cache hits over the run: every cut's (older results: the last's)."""
    cuts = cache.get("cuts") or []
    if not cuts:
        return "-"
    if all("hits" in c for c in cuts):
        return str(sum(sum(c["hits"]) for c in cuts))
    return str(sum(cache.get("hits", [])))


def _megabytes(cache):
    """The largest cache the run held, in MB (older results: the last)."""
    sizes = [c.get("bytes") for c in cache.get("cuts") or []]
    # None: a cache whose size comes from the data, made at the last stage
    # and never traced.
    sizes = [b for b in sizes + [cache.get("bytes")] if b is not None]
    return max(sizes + [0]) / 2**20


def summary(results):
    """Per method: mean speed-up (train time) and accuracy difference
    against full training of the same seed, with the per-seed values."""
    by_seed = {}
    for r in results["runs"]:
        by_seed.setdefault(r["seed"], {})[r["method"]] = r
    rows = {}
    for runs in by_seed.values():
        full = runs.get("full")
        if full is None:
            continue
        for method, r in runs.items():
            if method == "full":
                continue
            row = rows.setdefault(method, {"speedup": [], "delta": []})
            row["speedup"].append(full["train_seconds"] / r["train_seconds"])
            row["delta"].append(
                100 * (r["test_accuracy"] - full["test_accuracy"]))
    return {m: rows[m] for m in METHODS if m in rows}


def render(results, command):
    scenario = results.get("scenario", "cnn_finetune")
    lines = [
        "# Activation caching and optimizer-state release, end to end"
        + (f" ({scenario}, dropout 0)" if scenario != "cnn_finetune" else ""),
        "",
        f"Command: `{command}`",
        "",
        "Made by `benchmarks/caching.py` (its docstring says what runs). "
        f"Machine: {results['machine']}. Load average before: "
        f"{results['load_before']}.",
        "",
        "`train s` is the epochs' wall time (every freezing stage, cache "
        "derivation and retrace included); `x full` its ratio to full "
        "training of the same seed; `Δ acc` the test accuracy's difference "
        "from it, in points. `cuts`: each cut the cache moved to, whether "
        "an epoch filled it from the inputs or it was derived from the "
        "previous cut at the stage, the stage's epoch and the batches "
        "it served; `hits` their sum, `cache MB` the largest cache.",
        "",
        "| seed | method | test acc | Δ acc | train s | x full | units frozen "
        "| cuts | cache MB | hits | opt. MB freed | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_seed = {}
    for r in results["runs"]:
        by_seed.setdefault(r["seed"], {})[r["method"]] = r
    for seed, runs in sorted(by_seed.items()):
        full = runs.get("full")
        for method in METHODS:
            r = runs.get(method)
            if r is None:
                continue
            cache = r.get("cache") or {}
            speed = (full["train_seconds"] / r["train_seconds"]
                     if full else None)
            delta = (100 * (r["test_accuracy"] - full["test_accuracy"])
                     if full else None)
            lines.append(
                f"| {seed} | {method} | {r['test_accuracy']:.4f} | "
                + (f"{delta:+.2f}" if delta is not None else "-")
                + f" | {r['train_seconds']:.1f} | "
                + (f"{speed:.2f}x" if speed else "-")
                + f" | {r.get('frozen_units', 0)}/{r.get('units', '-')} | "
                f"{_cuts(cache)} | "
                f"{_megabytes(cache):.1f} | {_hits(cache)}"
                f" | {r.get('optimizer_bytes_released', 0) / 2**20:.2f} | "
                f"{r['peak_rss_above_start_bytes'] / 2**20:.0f} |"
            )
    lines += ["", "Mean against full training (per seed in brackets):", "",
              "| method | x full | Δ acc (points) |", "|---|---|---|"]
    for method, row in summary(results).items():
        lines.append(
            f"| {method} | {statistics.mean(row['speedup']):.2f}x "
            f"({', '.join(f'{v:.2f}' for v in row['speedup'])}) | "
            f"{statistics.mean(row['delta']):+.2f} "
            f"({', '.join(f'{v:+.2f}' for v in row['delta'])}) |"
        )
    lines += ["", "Epoch times (s):", ""]
    for r in results["runs"]:
        lines.append(
            f"- seed {r['seed']} {r['method']}: "
            + ", ".join(f"{s:.1f}" for s in r["epoch_seconds"])
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", default="cnn_finetune",
                        choices=("cnn_finetune", "minilm_finetune"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: 10 (CNN), 6 (MiniLM)")
    parser.add_argument("--steps", type=int, default=None,
                        help="batches per epoch, each epoch the same "
                        "examples; default: 120 of 64 (CNN), 32 of 32 "
                        "(MiniLM)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=METHODS)
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="MNIST pretraining steps (default: the suite's)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="test examples evaluated (default: the suite's)")
    parser.add_argument("--append", action="store_true",
                        help="add the runs to those already in --out (the "
                        "same scenario; e.g. another seed)")
    parser.add_argument("--out", default=None,
                        help="default: benchmarks/results/caching.json "
                        "(CNN), caching_minilm.json (MiniLM)")
    args = parser.parse_args(argv)
    size = suite.SIZES[args.scenario]["full"]
    if args.scenario == "cnn_finetune":
        scenario = suite.CnnFinetune()
        epochs, steps, out = 10, 120, "caching.json"
    else:
        scenario = MinilmNoDropout()
        epochs, steps, out = (size.epochs, size.steps_per_epoch,
                              "caching_minilm.json")
    args.epochs = args.epochs or epochs
    args.steps = args.steps or steps
    args.out = args.out or str(RESULTS / out)
    if args.pretrain_steps is not None:
        size = dataclasses.replace(size, pretrain_steps=args.pretrain_steps)
    if args.test_size is not None:
        if args.test_size < 1:
            parser.error(f"--test-size must be >= 1; got {args.test_size}")
        size = dataclasses.replace(size, test_size=args.test_size)
    x, y, xt, yt = scenario.load_data(size)
    n = args.steps * size.batch_size
    x, xt = _first(x, n), _first(xt, size.test_size)
    if args.scenario == "cnn_finetune":
        x, xt = suite._images(x), suite._images(xt)
    data = (x, y[:n], xt, yt[: size.test_size])
    previous = None
    if args.append and pathlib.Path(args.out).exists():
        previous = json.loads(pathlib.Path(args.out).read_text())
        if previous.get("scenario", "cnn_finetune") != args.scenario:
            parser.error(f"--append: {args.out} holds another scenario")
    results = {
        "scenario": args.scenario,
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "machine": suite.machine_info(),
        "load_before": suite.load_average(),
        "runs": [],
    }
    command = "python benchmarks/caching.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if previous is not None:
        results["runs"] = previous["runs"]
        results["earlier"] = previous.get("earlier", []) + [
            {k: previous.get(k) for k in ("command", "machine",
                                          "load_before")}]
        command = previous.get("command", "?") + "`, then `" + command.strip()
    results["command"] = command.strip()
    for seed in args.seeds:
        weights = scenario.initial_weights(size, seed, None)
        for method in args.methods:
            results["runs"].append(
                run(scenario, size, weights, data, method, seed, args.epochs)
            )
            out = pathlib.Path(args.out)
            out.write_text(json.dumps(results, indent=1, default=float))
            out.with_suffix(".md").write_text(render(results, command.strip()))


if __name__ == "__main__":
    main()
