"""Would telling the predictor how far training has got make it transfer?

The shipped predictor reads a unit's weight window and five features of it;
it does not know where the window sits in the run. Its labels ("freeze at
epoch e if the unit's CKA to the final model is >= 0.95 from e on") are
relative to the end of the run, so the share of "freeze" labels grows with
the epoch on every architecture, and on BERT trained from scratch (18% of
windows "freeze") it is what separates the two classes.

This script asks the cheapest version of the question: the predictor's
linear feature path alone (`fit_feature_logit`, the logistic regression its
training starts from), fitted on the training architectures with the class
weights of `train`, with and without a sixth feature, training progress
`(epoch + 1) / epochs`, which the engine knows at every stage
(`FreezeStage.epoch`, `.epochs`). Reports precision / recall / AUC per
architecture, whole architectures held out, at several thresholds.

Usage (from the repository root; the dataset comes from the predictor
pipeline's `collect` and `label`):

    python tools/train_predictor.py collect --out W/runs --archs mlp,cnn,cnn_mnist,cnn_ft,mlp_ft,resnet_ft,resnet --seeds 0
    python tools/train_predictor.py collect --out W/runs --archs bert --seeds 0,1
    python tools/train_predictor.py label --runs W/runs --out W/ds.npz
    python benchmarks/progress_feature.py W/ds.npz --holdout resnet,resnet_ft,bert

Writes `benchmarks/results/progress_feature.md` (or `--out`).
"""

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import train_predictor as tp  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85)


def fit_and_score(features, labels, train):
    positives = labels[train].mean()
    weights = np.where(
        labels[train] > 0.5, 0.5 / positives, 0.5 / (1 - positives)
    )
    kernel, bias = tp.fit_feature_logit(
        features[train], labels[train], weights
    )
    logit = features @ kernel[:, 0] + bias[0]
    return 1.0 / (1.0 + np.exp(-logit)), kernel[:, 0], bias[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("--holdout", default="resnet,resnet_ft,bert")
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks/results/progress_feature.md")
    )
    args = parser.parse_args(argv)
    arrays, meta = tp.load_dataset(args.dataset)
    holdout = [a for a in args.holdout.split(",") if a]
    labels = arrays["labels"].astype(np.float64)
    train = ~np.isin(arrays["arch"], holdout)
    archs = sorted(set(arrays["arch"].tolist()))
    variants = {
        "5 features (shipped)": arrays["features"],
        "5 features + progress": tp.dataset_features(arrays, True),
    }
    command = "python benchmarks/progress_feature.py DATASET --holdout " + (
        ",".join(holdout)
    )
    lines = [
        "# A training-progress feature for the predictor (linear path only)",
        "",
        f"Command: `{command}`, on the dataset `label` wrote from runs "
        f"{', '.join(meta['runs'])} (CKA threshold {meta['cka_threshold']}). "
        f"Held out (not fitted): {', '.join(holdout)} (marked *).",
        "",
        "Windows and share labelled \"freeze\": "
        + ", ".join(
            f"{a} {int((arrays['arch'] == a).sum())} "
            f"({labels[arrays['arch'] == a].mean():.0%})"
            for a in archs
        )
        + ".",
        "",
        "## Precision / recall (AUC) per architecture at threshold 0.5",
        "",
        "| features | " + " | ".join(
            a + ("*" if a in holdout else "") for a in archs
        ) + " | coefficients (last: progress), bias |",
        "|---|" + "---|" * len(archs) + "---|",
    ]
    scores = {}
    for name, features in variants.items():
        score, kernel, bias = fit_and_score(features, labels, train)
        scores[name] = score
        cells = []
        for arch in archs:
            mask = arrays["arch"] == arch
            m = tp.classification_metrics(labels[mask], score[mask])
            cells.append(
                f"{m['precision']:.2f} / {m['recall']:.2f} ({m['auc']:.2f})"
            )
        lines.append(
            f"| {name} | " + " | ".join(cells)
            + " | " + ", ".join(f"{c:.2f}" for c in kernel)
            + f"; {bias:.2f} |"
        )
    score = scores["5 features + progress"]
    lines += [
        "",
        "## With progress: precision / recall against the threshold",
        "",
        "| threshold | " + " | ".join(
            a + ("*" if a in holdout else "") for a in archs
        ) + " |",
        "|---|" + "---|" * len(archs),
    ]
    for threshold in THRESHOLDS:
        cells = []
        for arch in archs:
            mask = arrays["arch"] == arch
            m = tp.classification_metrics(
                labels[mask], score[mask], threshold
            )
            cells.append(f"{m['precision']:.2f} / {m['recall']:.2f}")
        lines.append(f"| {threshold} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## BERT by epoch: share labelled \"freeze\", mean score",
        "",
        "| epoch (of 8) | labelled freeze | mean score, shipped features | "
        "mean score, + progress |",
        "|---|---|---|---|",
    ]
    bert = arrays["arch"] == "bert"
    for epoch in sorted(set(arrays["epoch"][bert].tolist())):
        mask = bert & (arrays["epoch"] == epoch)
        lines.append(
            f"| {epoch + 1} | {labels[mask].mean():.0%} | "
            f"{scores['5 features (shipped)'][mask].mean():.2f} | "
            f"{score[mask].mean():.2f} |"
        )
    text = "\n".join(lines) + "\n"
    pathlib.Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
