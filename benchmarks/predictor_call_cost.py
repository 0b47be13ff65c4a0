"""What one fit's predictor calls cost: NumPy, traced `tf.function`, eager.

`PredictorPolicy` scores the candidate units of each freezing stage with
one predictor call. Three ways of making that call are timed here, each in
its own fresh process (so the first call pays what it pays in a new `fit`:
a trace, Keras' first eager dispatch, or NumPy's first matrix product):

- `numpy`: `FreezePredictor._numpy_call`, what the policy runs since
  2026-12-03 (the same network worked in NumPy on the current weights);
- `traced`: the policy's previous way, one `tf.function` with a free batch
  dimension, traced at the first call and reused;
- `eager`: `predictor(inputs, training=False)`, a plain Keras call.

Each process makes the calls of one fit, by default those of the suite's
ViT run (seed 0: 34 candidate units at the first stage, then 16, 16, 16,
11, 11, 8 and 3), on the same random-walk windows in every process; TensorFlow
is warmed up first with one small op, as a `fit` would have. Processes
alternate between the modes, `--rounds` times each. Reported per mode:
the median over rounds of the first call, of the later calls' median, and
of the fit's total; and the largest score difference from the eager call.

Usage (from the repository root):

    python benchmarks/predictor_call_cost.py
    python benchmarks/predictor_call_cost.py --sequence 3 2 --rounds 1 \
        --out /tmp/c.json                          # smoke

Writes benchmarks/results/predictor_call_cost.json and .md.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MODES = ("numpy", "traced", "eager")
VIT_SEQUENCE = (34, 16, 16, 16, 11, 11, 8, 3)


def _inputs(predictor, units, seed):
    from keras_smartfrz.predictor import predictor_inputs

    rng = np.random.default_rng([seed, units])
    steps = rng.normal(size=(units, predictor.window_size,
                             predictor.sample_size))
    window = np.cumsum(steps, axis=1).astype(np.float32)
    return predictor_inputs(window, np.arange(units), units + 1)


def _caller(mode, predictor):
    import keras
    import tensorflow as tf

    if mode == "numpy":
        return predictor._numpy_call
    if mode == "eager":
        return lambda inputs: keras.ops.convert_to_numpy(
            predictor(inputs, training=False))
    signature = [{
        "window": tf.TensorSpec(
            (None, predictor.window_size, predictor.sample_size), tf.float32),
        "features": tf.TensorSpec((None, predictor.num_features),
                                  tf.float32),
    }]
    traced = tf.function(lambda inputs: predictor(inputs, training=False),
                         input_signature=signature, autograph=False)
    return lambda inputs: traced(inputs).numpy()


def worker(mode, sequence, predictor_path, seed):
    """One fit's calls in this process; returns times (s) and scores."""
    import keras_smartfrz
    import tensorflow as tf

    predictor = keras_smartfrz.load_predictor(predictor_path)
    inputs = [_inputs(predictor, units, seed) for units in sequence]
    tf.reduce_sum(tf.ones((8, 8)) @ tf.ones((8, 8))).numpy()  # TF warm
    call = _caller(mode, predictor)
    times, scores = [], []
    for item in inputs:
        start = time.perf_counter()
        result = call(item)
        times.append(time.perf_counter() - start)
        scores.append(np.asarray(result, np.float64).reshape(-1).tolist())
    return {"mode": mode, "times": times, "scores": scores}


def _run_worker(mode, args):
    command = [sys.executable, __file__, "--worker", mode,
               "--sequence", *map(str, args.sequence),
               "--seed", str(args.seed)]
    if args.predictor:
        command += ["--predictor", args.predictor]
    done = subprocess.run(command, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(rounds):
    """Per mode: medians over rounds, and the score difference from eager."""
    reference = [np.asarray(s) for s in rounds[0]["eager"]["scores"]]
    rows = []
    for mode in MODES:
        runs = [r[mode] for r in rounds]
        first = [run["times"][0] for run in runs]
        later = [float(np.median(run["times"][1:])) for run in runs
                 if len(run["times"]) > 1]
        total = [sum(run["times"]) for run in runs]
        diff = max(
            float(np.max(np.abs(np.asarray(s) - ref)))
            for run in runs for s, ref in zip(run["scores"], reference)
        )
        rows.append({
            "mode": mode,
            "first_ms": 1000 * float(np.median(first)),
            "later_ms": 1000 * float(np.median(later)) if later else None,
            "total_ms": 1000 * float(np.median(total)),
            "total_ms_each_round": [1000 * t for t in total],
            "max_abs_difference_from_eager": diff,
        })
    return rows


def render(results):
    lines = [
        "# The predictor's calls in one fit: NumPy, traced, eager",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}. Candidate units per stage: "
        f"{', '.join(map(str, results['sequence']))} (one call each, in a "
        f"fresh process per mode and round); {results['rounds']} rounds, "
        "modes alternating; medians over rounds. Shipped predictor: "
        "windows of 30 snapshots x 1024 weights.",
        "",
        "| mode | first call ms | later calls ms (median) | all calls ms "
        "| max score difference from eager |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        later = "-" if row["later_ms"] is None else f"{row['later_ms']:.1f}"
        lines.append(
            f"| {row['mode']} | {row['first_ms']:.1f} | {later} | "
            f"{row['total_ms']:.1f} | "
            f"{row['max_abs_difference_from_eager']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequence", type=int, nargs="+",
                        default=list(VIT_SEQUENCE),
                        help="candidate units at each stage of the fit "
                        "(default: the suite's ViT, seed 0)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--predictor", default=None,
                        help="a saved predictor (default: the shipped one)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS /
                                             "predictor_call_cost.json"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.sequence) < 1:
        parser.error("--rounds and --sequence must be >= 1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.sequence, args.predictor,
                                args.seed)))
        return None

    import suite

    rounds = []
    for index in range(args.rounds):
        order = MODES[index % 3:] + MODES[:index % 3]
        rounds.append({mode: _run_worker(mode, args) for mode in order})
        print(f"round {index + 1}/{args.rounds}: " + ", ".join(
            f"{m} {1000 * sum(rounds[-1][m]['times']):.0f} ms"
            for m in MODES), flush=True)
    results = {
        "command": " ".join(
            ["python benchmarks/predictor_call_cost.py", *argv]),
        "machine": suite.machine_info(),
        "sequence": args.sequence,
        "rounds": args.rounds,
        "rows": summarise(rounds),
    }
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(render(results))
    for row in results["rows"]:
        print(f"{row['mode']}: first {row['first_ms']:.1f} ms, all "
              f"{row['total_ms']:.1f} ms, max diff "
              f"{row['max_abs_difference_from_eager']:.1e}")
    return results


if __name__ == "__main__":
    main()
