"""What the predictor's NumPy inputs cost per freezing stage, float32
windows worked in float32 (what the callback does) side by side with the
same windows worked in float64 (what it did before 2026-12-03).

For each number of candidate units, random-walk windows of the shipped
predictor's shape (30 snapshots of 1024 sampled weights, float32, as the
callback's history holds them) go through `predictor_inputs` twice per
repeat, once as they are and once cast to float64 first, alternating, in
one process; reported: the median time of each and their ratio, and the
largest difference between the two results (the float32 work must give the
float64 result to within the predictor's input resolution).

Usage (from the repository root):

    python benchmarks/predictor_inputs_cost.py
    python benchmarks/predictor_inputs_cost.py --units 3 --repeats 2 \
        --out /tmp/p.json                          # smoke

Writes benchmarks/results/predictor_inputs_cost.json and .md.
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import suite  # noqa: E402
from keras_smartfrz.predictor import predictor_inputs  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def measure(units, repeats, window_size=30, sample_size=1024, seed=0):
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(units, window_size, sample_size))
    window32 = np.cumsum(steps, axis=1).astype(np.float32)
    window64 = window32.astype(np.float64)  # the same numbers
    positions = np.arange(units)
    times = {"float32": [], "float64": []}
    for _ in range(repeats):
        for name, window in (("float32", window32), ("float64", window64)):
            start = time.perf_counter()
            result = predictor_inputs(window, positions, units + 1)
            times[name].append(time.perf_counter() - start)
            if name == "float32":
                fast = result
            else:
                exact = result
    diff = max(float(np.max(np.abs(fast[k] - exact[k]))) for k in fast)
    median = {k: 1000.0 * float(np.median(v)) for k, v in times.items()}
    return {
        "units": units,
        "float32_ms": median["float32"],
        "float64_ms": median["float64"],
        "speedup": median["float64"] / median["float32"],
        "max_abs_difference": diff,
    }


def render(results):
    lines = [
        "# The predictor's inputs per freezing stage: float32 vs float64 work",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}. Medians of {results['repeats']} "
        "calls of `predictor_inputs` each, alternating, one process; windows "
        "of 30 snapshots x 1024 float32 weights per unit.",
        "",
        "| units | float64 ms | float32 ms | speed-up | max abs difference |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['units']} | {row['float64_ms']:.1f} | "
            f"{row['float32_ms']:.1f} | {row['speedup']:.2f}x | "
            f"{row['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, nargs="+", default=[17, 35, 54],
                        help="candidate units per stage (the suite's CNN, "
                        "ViT and MiniLM have 17, 35 and 54 units)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS /
                                             "predictor_inputs_cost.json"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.units) < 1:
        parser.error("--units and --repeats must be >= 1")
    rows = [measure(u, args.repeats) for u in args.units]
    results = {
        "command": " ".join(
            ["python benchmarks/predictor_inputs_cost.py", *argv]),
        "machine": suite.machine_info(),
        "repeats": args.repeats,
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(render(results))
    for row in rows:
        print(f"{row['units']} units: float64 {row['float64_ms']:.1f} ms, "
              f"float32 {row['float32_ms']:.1f} ms "
              f"({row['speedup']:.2f}x), max diff "
              f"{row['max_abs_difference']:.1e}")
    return results


if __name__ == "__main__":
    main()
