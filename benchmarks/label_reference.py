"""Which model the labels point at: the final one, or the best on validation.

The label rule (`tools/train_predictor.py label`) calls a unit converged at
epoch e when its representation is within linear CKA `T` of the *final*
model's from e on. A run that overfits ends on a model worse on held-out
data than one it passed through, and its labels then follow the
memorisation, not what a freeze costs. This script shows how far each run
of a collection overfits and scores a predictor against both references:

- *final*: the rule as shipped (CKA to the last epoch's representation);
- *best*: CKA to the representation at the epoch of best validation
  accuracy; every window at or after that epoch is "freeze" (training past
  it does not make the model a user keeps any better).

Per architecture: windows, share labelled "freeze", precision, recall and
AUC of the predictor at `--threshold` under each reference, and whether the
architecture was held out of the predictor's training (its card says).

Usage (from the repository root):

    python tools/train_predictor.py label --runs RUNS --out DATA.npz
    python benchmarks/label_reference.py --runs RUNS --dataset DATA.npz \\
        --predictor PREDICTOR_DIR

`PREDICTOR_DIR` holds a predictor written by `train_predictor.py train`
(with a card naming its held-out architectures). Writes
`benchmarks/results/label_reference.md` and `.json` (or `--out`).
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))
import train_predictor as tp  # noqa: E402
from keras_smartfrz import cka  # noqa: E402
from keras_smartfrz import predictor as predictor_lib  # noqa: E402


def best_reference_labels(grams, best, threshold):
    """Labels against the representation at epoch index `best`.

    `(units, epochs)` int8: 1 at epochs at or after `best`; before it, 1 if
    CKA to `best`'s representation is >= `threshold` from e up to `best`;
    -1 where that CKA is undefined (a constant representation).
    """
    units, epochs = grams.shape[:2]
    labels = np.ones((units, epochs), np.int8)
    for unit in range(units):
        curve = np.array(
            [cka.cka_from_grams(grams[unit, e], grams[unit, best])
             for e in range(best + 1)]
        )
        known = np.isfinite(curve)
        fails = known & (curve < threshold)
        for epoch in range(best):
            span = slice(epoch, best + 1)
            if fails[span].any():
                labels[unit, epoch] = 0
            elif not known[span].all():
                labels[unit, epoch] = -1
    return labels


def run_summary(path, threshold):
    """How one run overfits, and its labels against its best epoch."""
    with np.load(path) as run:
        meta = json.loads(str(run["meta"]))
        grams = run["grams"]
        history = meta["history"]
        validation = history.get("val_accuracy")
        if not validation:
            raise ValueError(f"'{path}' recorded no validation accuracy.")
        best = int(np.argmax(validation))
        labels = best_reference_labels(grams, best, threshold)
    return {
        "run": pathlib.Path(path).stem,
        "arch": meta["arch"],
        "epochs": len(validation),
        "best_epoch": best + 1,
        "best_val_accuracy": float(validation[best]),
        "final_val_accuracy": float(validation[-1]),
        "final_train_accuracy": float(history["accuracy"][-1]),
    }, labels


def evaluate(runs_dir, dataset, predictor_dir, threshold=0.5):
    arrays, meta = tp.load_dataset(dataset)
    cka_threshold = meta["cka_threshold"]
    predictor = predictor_lib.load_predictor(predictor_dir)
    card = predictor_lib.read_card(predictor_dir)
    training = card.get("training", {})
    trained_on = training.get("train_archs")
    held_out_archs = set(training.get("held_out_archs", []))
    scores = predictor.predict(
        {
            "window": arrays["windows"].astype(np.float32),
            "features": tp.dataset_features(arrays, predictor.use_progress),
        },
        batch_size=512,
        verbose=0,
    ).reshape(-1)
    best_labels = np.full(len(scores), -1, np.int8)
    runs = []
    for path in tp.run_paths(runs_dir):
        selected = arrays["run"] == path.stem
        if not selected.any():
            continue
        summary, labels = run_summary(path, cka_threshold)
        runs.append(summary)
        best_labels[selected] = labels[
            arrays["unit_index"][selected], arrays["epoch"][selected]
        ]
    archs = {}
    for arch in sorted(set(arrays["arch"].tolist())):
        selected = arrays["arch"] == arch
        known = selected & (best_labels >= 0)
        archs[arch] = {
            # Held out: named so by the card, or not among the
            # architectures it was trained on (one collected later).
            "held_out": arch in held_out_archs or (
                trained_on is not None and arch not in trained_on),
            "final": tp.classification_metrics(
                arrays["labels"][selected], scores[selected], threshold
            ),
            "best": tp.classification_metrics(
                best_labels[known], scores[known], threshold
            ),
        }
    return {
        "dataset": str(dataset),
        "predictor": str(predictor_dir),
        "cka_threshold": cka_threshold,
        "freeze_threshold": threshold,
        "runs": runs,
        "archs": archs,
    }


def render(result, command):
    lines = [
        "# Labels against the final model or the best on validation",
        "",
        f"Command: `{command}`",
        "",
        f"Predictor `{result['predictor']}`, dataset `{result['dataset']}` "
        f"(CKA threshold {result['cka_threshold']}), freeze threshold "
        f"{result['freeze_threshold']}.",
        "",
        "## How far each run overfits",
        "",
        "| run | epochs | best epoch | val acc at best | val acc final "
        "| train acc final |",
        "|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['run']} | {run['epochs']} | {run['best_epoch']} | "
            f"{run['best_val_accuracy']:.3f} | {run['final_val_accuracy']:.3f}"
            f" | {run['final_train_accuracy']:.3f} |"
        )
    lines += [
        "",
        "## The predictor against each reference",
        "",
        "| arch | held out | windows | freeze share (final / best) "
        "| precision (final / best) | recall (final / best) "
        "| AUC (final / best) |",
        "|---|---|---|---|---|---|---|",
    ]

    def pair(row, key):
        return " / ".join(
            "-" if not np.isfinite(row[ref][key]) else f"{row[ref][key]:.3f}"
            for ref in ("final", "best")
        )

    for arch, row in result["archs"].items():
        lines.append(
            f"| {arch} | {'yes' if row['held_out'] else 'no'} | "
            f"{row['final']['windows']} | {pair(row, 'freeze_share')} | "
            f"{pair(row, 'precision')} | {pair(row, 'recall')} | "
            f"{pair(row, 'auc')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", required=True, help="run files' directory")
    parser.add_argument("--dataset", required=True,
                        help="the runs labelled by `train_predictor.py label`")
    parser.add_argument("--predictor", required=True,
                        help="directory of a predictor and its card")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="freeze threshold (default 0.5)")
    parser.add_argument("--out", default=str(
        ROOT / "benchmarks" / "results" / "label_reference"),
        help="output path without extension (.md and .json are written)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1]; received "
                     f"{args.threshold}.")
    result = evaluate(args.runs, args.dataset, args.predictor, args.threshold)
    command = "python benchmarks/label_reference.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(result, command))
    print(render(result, command))
    return result


if __name__ == "__main__":
    main()
