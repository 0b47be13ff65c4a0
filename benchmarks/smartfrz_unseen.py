"""SmartFRZ end to end on a model the shipped predictor never saw.

Runs `examples/quickstart.py` (a 4-block Conv-BN CNN with a global-pooling
head, Adam, on real Fashion-MNIST: an architecture and optimiser that are not
in the predictor's reference zoo) once per seed. Each run trains the same
network from the same initial weights and in the same data order twice, with
`SmartFRZ()` and without freezing, in one process, full training first; the
time saved is the ratio of the two measured side by side.

    python benchmarks/smartfrz_unseen.py                  # 3 seeds, ~10 min
    python benchmarks/smartfrz_unseen.py --seeds 0 --epochs 2 --train-size 2048

Writes `benchmarks/results/smartfrz_unseen.json` and `.md` (or `--out`).
"""

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quickstart():
    spec = importlib.util.spec_from_file_location(
        "quickstart", ROOT / "examples" / "quickstart.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summarize(runs):
    """Mean and spread of the per-seed results."""

    def stats(key):
        values = np.array([run[key] for run in runs], dtype=np.float64)
        return {"mean": float(values.mean()), "std": float(values.std()),
                "values": values.tolist()}

    accuracy_delta = [r["freeze_accuracy"] - r["full_accuracy"] for r in runs]
    time_saved = [r["seconds_saved"] / r["full_seconds"] for r in runs]
    return {
        "seeds": [run["seed"] for run in runs],
        "smartfrz_accuracy": stats("freeze_accuracy"),
        "full_accuracy": stats("full_accuracy"),
        "accuracy_delta_points": {
            "mean": 100 * float(np.mean(accuracy_delta)),
            "values": [100 * d for d in accuracy_delta],
        },
        "time_saved_share": {
            "mean": float(np.mean(time_saved)),
            "values": time_saved,
        },
        "speedup": stats("speedup"),
        "frozen_fraction": stats("frozen_fraction"),
        "overhead_share": stats("overhead_share"),
    }


def to_markdown(args, runs, summary):
    lines = [
        "# SmartFRZ on a model outside the predictor's training runs",
        "",
        "Command: `"
        + " ".join(["python", "benchmarks/smartfrz_unseen.py", *args.argv])
        + "`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{args.cpus} CPUs, no GPU; Python {platform.python_version()}.",
        "",
        "Model: `examples/quickstart.py`'s CNN (4 Conv-BN-ReLU blocks, "
        "global average pooling, Dense head; Adam 1e-3) on Fashion-MNIST, "
        f"{args.train_size} training images, {args.epochs} epochs, batch "
        f"{args.batch_size}, all 10000 test images. Each seed trains both "
        "runs from the same initial weights in the same data order.",
        "",
        "`SmartFRZ s` and `full s` are the epochs' wall time (first "
        "epoch's start to last epoch's end: every step, freezing stage and "
        "retrace, not the input iterator's teardown after `fit`); "
        "`sampling + predictor` is SmartFRZ's own work (weight snapshots "
        "and freezing stages, as its `overhead_seconds` reports them) over "
        "its epochs' time.",
        "",
        "| seed | SmartFRZ acc | full acc | diff (pt) | SmartFRZ s | "
        "full s | time saved | frozen units | sampling + predictor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['seed']} | {run['freeze_accuracy']:.4f} | "
            f"{run['full_accuracy']:.4f} | "
            f"{100 * (run['freeze_accuracy'] - run['full_accuracy']):+.2f} | "
            f"{run['freeze_seconds']:.1f} | {run['full_seconds']:.1f} | "
            f"{run['seconds_saved'] / run['full_seconds']:.1%} | "
            f"{run['frozen_fraction']:.0%} | {run['overhead_share']:.2%} |"
        )
    lines += [
        f"| **mean** | {summary['smartfrz_accuracy']['mean']:.4f} | "
        f"{summary['full_accuracy']['mean']:.4f} | "
        f"{summary['accuracy_delta_points']['mean']:+.2f} | | | "
        f"{summary['time_saved_share']['mean']:.1%} | "
        f"{summary['frozen_fraction']['mean']:.0%} | "
        f"{summary['overhead_share']['mean']:.2%} |",
        "",
        "What froze (epoch, unit), per seed:",
        "",
    ]
    for run in runs:
        frozen = ", ".join(f"{e}: {u}" for e, u in run["frozen"]) or "nothing"
        lines.append(f"- seed {run['seed']}: {frozen}")
    lines += ["", "SmartFRZ's own work per seed (s): weight sampling, "
              "freezing stages (predictor, finiteness check, freeze and "
              "retrace), of which the freeze and retrace:", ""]
    for run in runs:
        o = run["overhead_seconds"]
        lines.append(
            f"- seed {run['seed']}: {o['sampling']:.2f}, "
            f"{o['decision']:.2f}, {o['freezing']:.2f}"
        )
    lines += ["", "Epoch times (s):", ""]
    for run in runs:
        for label, key in (("full", "full_epoch_seconds"),
                           ("SmartFRZ", "freeze_epoch_seconds")):
            lines.append(
                f"- seed {run['seed']} {label}: "
                + ", ".join(f"{t:.1f}" for t in run[key])
            )
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--predictor", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    args.argv = argv
    args.cpus = os.cpu_count()
    quickstart = _quickstart()
    runs = []
    for seed in args.seeds:
        print(f"=== seed {seed}", flush=True)
        options = [
            "--seed", str(seed), "--epochs", str(args.epochs),
            "--train-size", str(args.train_size),
            "--batch-size", str(args.batch_size),
        ]
        if args.predictor:
            options += ["--predictor", args.predictor]
        result = quickstart.main(options)
        result["seed"] = seed
        runs.append(result)
    summary = summarize(runs)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smartfrz_unseen.json").write_text(
        json.dumps({"argv": argv, "runs": runs, "summary": summary},
                   indent=2, default=float)
    )
    (out / "smartfrz_unseen.md").write_text(to_markdown(args, runs, summary))
    print(to_markdown(args, runs, summary))
    return summary


if __name__ == "__main__":
    main()
