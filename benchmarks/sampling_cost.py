"""What SmartFRZ's own work costs per epoch: weight sampling and the decision.

Side by side in one process, on the four models of the benchmark suite
(`suite.py`, built as there, trained on random inputs of the same shapes):

- *Sampling between steps* (how the engine samples): one call of the
  compiled gather (`WeightSampler()`) right after a train step, as
  `on_train_batch_end` makes it.
- *Sampling inside the train step* (tried on 2026-12-02 and not adopted,
  `InStepSampler` below): the same gather folded into the train step
  behind a `tf.cond`, writing a staging buffer that Python reads once per
  stage. Its cost is the extra time of a step that takes a snapshot over
  one that does not, plus the Python request before it; what a step
  without a snapshot pays for the `tf.cond` is measured too.
- *The decision*: one call of `PredictorPolicy.decide` on a window of every
  candidate unit, with the predictor's sort done by NumPy in
  `predictor_inputs` (now) and inside the model (before 2026-12-02).

Every quantity a difference or ratio compares is timed call by call in turn
(A, B, C, A, B, C, ...) so that the machine's load drifts affect all alike;
medians over all calls. Per epoch the suite takes 30 snapshots and one
decision over 120 steps (32 for MiniLM): the shares below use those counts
and this run's median step time.

Usage (from the repository root):

    python benchmarks/sampling_cost.py            # ~10 min on 2 cores
    python benchmarks/sampling_cost.py --quick    # smoke run

Writes `benchmarks/results/sampling_cost.json` and `.md`.
"""

import argparse
import json
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
from keras_smartfrz import policies  # noqa: E402
from keras_smartfrz import predictor as predictor_lib  # noqa: E402
from keras_smartfrz import sampling  # noqa: E402
from keras_smartfrz.sampling import WeightSampler  # noqa: E402
from keras_smartfrz.sampling import draw_sample_positions  # noqa: E402
from keras_smartfrz.units import find_units  # noqa: E402

RESULTS = suite.RESULTS
SNAPSHOTS_PER_EPOCH = 30


class InStepSampler(WeightSampler):
    """`WeightSampler` whose gather can also run inside the train step.

    `wrap_train_step(step)` returns `step` followed by a `tf.cond` that,
    when `request()` named a row of the staging buffer, gathers the sample
    (after the step's weight update: TensorFlow orders the reads after the
    writes of the same variables) into that row. `flush()` returns the rows
    written. Under XLA the gather reads the variables' values (XLA has no
    kernel for ResourceGatherNd).
    """

    def stage(self, capacity):
        width = len(self.units) * self.sample_size
        self.capacity = int(capacity)
        self._staged = tf.Variable(
            tf.zeros((self.capacity, width), tf.float32), trainable=False
        )
        self._slot = tf.Variable(-1, dtype=tf.int32, trainable=False)
        self.pending = 0

    def _gather_values(self, xla):
        if not xla:
            return sampling._gather_all(self._variables, self._indices)
        return tf.concat(
            [
                tf.cast(tf.gather_nd(tf.convert_to_tensor(v.value), i),
                        tf.float32)
                for v, i in zip(self._variables, self._indices)
            ],
            axis=0,
        )

    def wrap_train_step(self, train_step, jit_compile=False):
        def train_step_with_sampling(data):
            logs = train_step(data)

            def write():
                self._staged.scatter_nd_update(
                    tf.reshape(self._slot.read_value(), (1, 1)),
                    self._gather_values(jit_compile)[None],
                )
                self._slot.assign(-1)
                return tf.constant(True)

            tf.cond(self._slot.read_value() >= 0, write,
                    lambda: tf.constant(False))
            return logs

        return train_step_with_sampling

    def request(self):
        self._slot.assign(self.pending)
        self.pending += 1

    def flush(self):
        count, self.pending = self.pending, 0
        return self._staged[:count].numpy()


def random_batch(scenario, size, rng):
    """Random inputs and labels of the scenario's shapes, one batch."""
    batch = size.batch_size
    if scenario.name == "minilm_finetune":
        length = size.sequence_length
        x = {
            "token_ids": rng.integers(1000, 20000, (batch, length)),
            "segment_ids": np.zeros((batch, length), np.int64),
            "padding_mask": np.ones((batch, length), bool),
        }
        x = {k: v.astype(np.int32) for k, v in x.items()}
        y = rng.integers(0, 2, batch).astype(np.int32)
    else:
        x = rng.random((batch, 28, 28, 1), np.float32)
        y = rng.integers(0, 10, batch).astype(np.int32)
    return x, y


def measure_model(scenario, size, calls, jit_compile, predictor):
    keras.utils.set_random_seed(0)
    model = scenario.build(size)
    scenario.compile(model, size)
    model.jit_compile = jit_compile
    rng = np.random.default_rng(0)
    x, y = random_batch(scenario, size, rng)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    iterator = iter(dataset)
    model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0)  # build all
    units = find_units(model)
    positions = [
        draw_sample_positions(u.num_params, 1024, 0, i)
        for i, u in enumerate(units)
    ]
    sampler = InStepSampler(units, positions)
    sampler.stage(SNAPSHOTS_PER_EPOCH)

    model.make_train_function(force=True)
    plain = model.train_function
    model.train_step = sampler.wrap_train_step(
        model.train_step, jit_compile=jit_compile
    )
    model.make_train_function(force=True)
    wrapped = model.train_function
    del model.train_step
    # Warm up: traces, the host gather's trace, one buffer write.
    for _ in range(2):
        plain(iterator)
        sampler()
        wrapped(iterator)
    sampler.request()
    wrapped(iterator)
    sampler.flush()

    names = ("plain_step", "host_gather", "wrapped_step", "request",
             "wrapped_step_snapshot", "flush_per_snapshot")
    times = {k: [] for k in names}
    cpu = {k: [] for k in names}

    def timed(name, fn, per=1):
        wall, proc = time.perf_counter(), time.process_time()
        fn()
        times[name].append((time.perf_counter() - wall) / per)
        cpu[name].append((time.process_time() - proc) / per)

    for call in range(calls):
        timed("plain_step", lambda: plain(iterator))
        timed("host_gather", sampler)
        timed("wrapped_step", lambda: wrapped(iterator))
        if sampler.pending >= sampler.capacity:
            timed("flush_per_snapshot", sampler.flush, sampler.capacity)
        timed("request", sampler.request)
        timed("wrapped_step_snapshot", lambda: wrapped(iterator))
    sampler.flush()

    # The decision on every candidate (all units but the head).
    candidates = len(units) - 1
    window = np.cumsum(
        rng.normal(size=(candidates, 30, 1024)).astype(np.float32), axis=1
    )
    stage = policies.FreezeStage(
        epoch=1, epochs=10, unit_names=[u.name for u in units[:-1]],
        num_units=len(units), num_frozen=0, window=window,
        unit_indices=np.arange(candidates),
    )
    policy = predictor_lib.PredictorPolicy(predictor)

    def decide_sorting_in_model():
        inputs = predictor_lib.predictor_inputs(
            window, np.arange(candidates), len(units)
        )
        # Unsorted again: the model sorts it, as before 2026-12-02.
        inputs["window"] = predictor_lib.normalize_window(window)
        return keras.ops.convert_to_numpy(predictor(inputs, training=False))

    decide_new = lambda: policy.decide(stage)[0]  # noqa: E731
    for _ in range(2):
        decide_new()
        decide_sorting_in_model()
    decisions = {"decide_numpy_sort": [], "decide_model_sort": []}
    for _ in range(max(5, calls // 20)):
        start = time.perf_counter()
        new = decide_new()
        middle = time.perf_counter()
        old = decide_sorting_in_model()
        end = time.perf_counter()
        decisions["decide_numpy_sort"].append(middle - start)
        decisions["decide_model_sort"].append(end - middle)
    np.testing.assert_allclose(new, old.reshape(-1), rtol=1e-5, atol=1e-6)
    times.update(decisions)

    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items() if v}
    cpu_ms = {k: 1e3 * float(np.median(v)) for k, v in cpu.items() if v}
    row = {
        "units": len(units),
        "sampled_variables": len(sampler._variables),
        "jit_compile": jit_compile,
        "calls": calls,
        "steps_per_epoch": size.steps_per_epoch,
        "median_ms": ms,
        "median_cpu_ms": cpu_ms,
    }
    row.update(derived(row))
    return row


def _in_step(ms):
    return (
        ms["wrapped_step_snapshot"] - ms["wrapped_step"] + ms["request"]
        + ms.get("flush_per_snapshot", 0.0)
    )


def derived(row):
    """Per-snapshot costs and shares of an epoch, from the raw medians."""
    ms, cpu_ms = row["median_ms"], row["median_cpu_ms"]
    steps = row["steps_per_epoch"]
    epoch_ms = steps * ms["plain_step"]
    wrapper = ms["wrapped_step"] - ms["plain_step"]
    between = SNAPSHOTS_PER_EPOCH * ms["host_gather"]
    in_step = (
        SNAPSHOTS_PER_EPOCH * _in_step(ms)
        + (steps - SNAPSHOTS_PER_EPOCH) * wrapper
    )
    return {
        "per_snapshot_ms": {
            "between_steps": ms["host_gather"], "in_step": _in_step(ms),
        },
        "per_snapshot_cpu_ms": {
            "between_steps": cpu_ms["host_gather"],
            "in_step": _in_step(cpu_ms),
        },
        "wrapper_ms_per_step_without_snapshot": wrapper,
        "epoch_share": {
            "sampling_between_steps": between / epoch_ms,
            "sampling_in_step": in_step / epoch_ms,
            "decide_model_sort": ms["decide_model_sort"] / epoch_ms,
            "decide_numpy_sort": ms["decide_numpy_sort"] / epoch_ms,
            "before": (between + ms["decide_model_sort"]) / epoch_ms,
            "now": (between + ms["decide_numpy_sort"]) / epoch_ms,
            "in_step_numpy_sort": (
                in_step + ms["decide_numpy_sort"]) / epoch_ms,
        },
    }


def render(results):
    lines = [
        "# Sampling and decision cost per epoch",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']['cpus']} CPUs, "
        f"{results['machine']['cpu_model']}; TensorFlow "
        f"{results['machine']['tensorflow']}, Keras "
        f"{results['machine']['keras']}. Load average at start "
        f"{results['load_average_start']}, at end "
        f"{results['load_average_end']}; {results['wall_minutes']:.1f} min.",
        "",
        "Every number is a median over calls timed in turn within one "
        "process (see the script's docstring). *in step* = extra time of a "
        "train step that writes a snapshot over one that does not, plus the "
        "Python request before it and its share of the buffer read; "
        "*wrapper* = what a step without a snapshot pays for the in-step "
        "sampler. Shares of an epoch: 30 snapshots and one decision over "
        "the suite's steps per epoch at this run's median step time.",
        "",
        "| model | units (variables) | step ms | snapshot between steps ms "
        "(CPU) | snapshot in step ms (CPU) | tf.cond ms/step | decision ms: "
        "sort in model / NumPy | epoch share before | epoch share now | "
        "in step (not adopted) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["models"].items():
        row.update(derived(row))
        ms = row["median_ms"]
        share = row["epoch_share"]
        lines.append(
            f"| {name}{' (XLA)' if row['jit_compile'] else ''} "
            f"| {row['units']} ({row['sampled_variables']}) "
            f"| {ms['plain_step']:.1f} "
            f"| {row['per_snapshot_ms']['between_steps']:.2f} "
            f"({row['per_snapshot_cpu_ms']['between_steps']:.2f}) "
            f"| {row['per_snapshot_ms']['in_step']:.2f} "
            f"({row['per_snapshot_cpu_ms']['in_step']:.2f}) "
            f"| {row['wrapper_ms_per_step_without_snapshot']:+.2f} "
            f"| {ms['decide_model_sort']:.1f} / {ms['decide_numpy_sort']:.1f} "
            f"| {100 * share['before']:.2f}% | {100 * share['now']:.2f}% "
            f"| {100 * share['in_step_numpy_sort']:.2f}% |"
        )
    lines += [
        "",
        "*Epoch share before* = 30 snapshots between steps + a decision "
        "sorting inside the model; *now* = 30 snapshots between steps + a "
        "decision sorting with NumPy; *in step* = 30 snapshots in the step, "
        "the tf.cond on the other steps, and a decision sorting with NumPy.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--render", metavar="JSON",
        help="only rewrite the .md of an earlier run's .json",
    )
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(pathlib.Path(args.render).read_text())
        text = render(results)
        pathlib.Path(args.render).with_suffix(".md").write_text(text)
        print(text)
        return
    started = time.perf_counter()
    calls = 20 if args.quick else args.calls
    predictor = predictor_lib.load_predictor()
    results = {
        "command": "python benchmarks/sampling_cost.py"
        + (" --quick" if args.quick else ""),
        "commit": suite.git_commit(),
        "machine": suite.machine_info(),
        "load_average_start": suite.load_average(),
        "models": {},
    }
    plan = [(name, False) for name in suite.SCENARIOS]
    plan.append(("cnn_finetune", True))
    for name, jit in plan:
        scenario = suite.SCENARIOS[name]
        # The suite's full sizes in both profiles: --quick only times
        # fewer calls.
        size = suite.SIZES[name]["full"]
        suite.log(f"{name} jit_compile={jit}")
        key = name + ("_xla" if jit else "")
        # MiniLM's steps are ten times longer: fewer calls.
        model_calls = calls // 3 if name == "minilm_finetune" else calls
        try:
            results["models"][key] = measure_model(
                scenario, size, model_calls, jit, predictor
            )
        except FileNotFoundError as error:  # data/weights not installed
            suite.log(f"  skipped: {error}")
            continue
        suite.log("  " + json.dumps(results["models"][key]["epoch_share"]))
    results["load_average_end"] = suite.load_average()
    results["wall_minutes"] = (time.perf_counter() - started) / 60
    stem = args.out or str(
        RESULTS / ("sampling_cost_quick" if args.quick else "sampling_cost")
    )
    pathlib.Path(stem + ".json").write_text(json.dumps(results, indent=1))
    pathlib.Path(stem + ".md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
