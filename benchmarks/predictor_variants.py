"""Which label rule and inputs make the predictor transfer? Held-out metrics.

Trains the full predictor (attention network and feature path, the recipe
of `tools/train_predictor.py train`) once per variant on one collection of
reference runs, with whole architectures held out, and reports precision,
recall and AUC on them at the default threshold 0.5. A variant is a label
rule (`label --cka-threshold T [--remaining-fraction F]`) crossed with the
predictor's inputs: with or without training progress
(`FreezePredictor(use_progress=True)`, `train --use-progress`).

Also reports when each held-out architecture's units would first be frozen:
for every (run, unit), the first epoch whose window scores >= 0.5 against
the first epoch labelled "freeze", as shares of the run's epochs. A wrong
early freeze is what costs accuracy end to end.

Usage (from the repository root; RUNS from `train_predictor.py collect`):

    python benchmarks/predictor_variants.py --runs RUNS --workdir W \\
        --rules 0.95 0.99 0.95:0.1 --holdout resnet,bert,resnet_ft

Every dataset and predictor is kept in `W` and reused when present, so an
interrupted run resumes. Writes `benchmarks/results/predictor_variants.md`
(or `--out`) and its data as JSON beside it.
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import train_predictor as tp  # noqa: E402

from keras_smartfrz import predictor as predictor_lib  # noqa: E402


def parse_rule(text):
    """"0.95" -> (0.95, None); "0.95:0.1" -> (0.95, 0.1)."""
    threshold, _, fraction = text.partition(":")
    return float(threshold), (float(fraction) if fraction else None)


def rule_name(rule):
    threshold, fraction = rule
    # No dot: a predictor path with a suffix reads as a file name.
    name = f"cka{threshold:g}" + (f"-rf{fraction:g}" if fraction else "")
    return name.replace(".", "p")


def first_freeze_epochs(arrays, scores, mask, threshold=0.5):
    """Per (run, unit) in `mask`: (first epoch scored >= threshold, first
    epoch labelled freeze, epochs), epochs as `None` when never."""
    rows = []
    keys = sorted(set(zip(arrays["run"][mask].tolist(),
                          arrays["unit"][mask].tolist())))
    for run, unit in keys:
        rows_of = mask & (arrays["run"] == run) & (arrays["unit"] == unit)
        order = np.argsort(arrays["epoch"][rows_of])
        epochs = arrays["epoch"][rows_of][order]
        predicted = scores[rows_of][order] >= threshold
        labelled = arrays["labels"][rows_of][order] == 1
        rows.append((
            int(epochs[predicted][0]) if predicted.any() else None,
            int(epochs[labelled][0]) if labelled.any() else None,
            int(arrays["epochs"][rows_of][0]),
        ))
    return rows


def timing_summary(rows):
    """Shares of units frozen too early / on time or later / never."""
    early = sum(1 for p, l, _ in rows if p is not None and (l is None or p < l))
    later = sum(1 for p, l, _ in rows if p is not None and l is not None
                and p >= l)
    never = sum(1 for p, _, _ in rows if p is None)
    predicted = [(p + 1) / n for p, _, n in rows if p is not None]
    return {
        "units": len(rows),
        "too_early": early,
        "on_time_or_later": later,
        "never": never,
        "mean_first_progress": float(np.mean(predicted)) if predicted else None,
    }


def run_variant(dataset, workdir, holdout, use_progress, train_epochs,
                predictor_config, verbose):
    name = dataset.stem + ("-progress" if use_progress else "")
    out = workdir / name
    card_file = out / "predictor_card.json"
    trained = card_file.is_file() and "per_arch" in json.loads(
        card_file.read_text()).get("metrics", {})
    seconds = None
    if not trained:
        started = time.time()
        tp.train(dataset, out, holdout, epochs=train_epochs,
                 predictor_config=dict(predictor_config,
                                       use_progress=use_progress),
                 verbose=verbose)
        tp.evaluate(dataset, out, verbose=verbose)
        seconds = time.time() - started
    model = predictor_lib.load_predictor(out)
    arrays, _ = tp.load_dataset(dataset)
    scores = model.predict(
        {"window": arrays["windows"].astype(np.float32),
         "features": tp.dataset_features(arrays, model.use_progress)},
        batch_size=256, verbose=0,
    ).reshape(-1)
    timing = {
        arch: timing_summary(
            first_freeze_epochs(arrays, scores, arrays["arch"] == arch))
        for arch in holdout
    }
    return {
        "name": name,
        "path": str(out),
        "use_progress": use_progress,
        "metrics": model.card["metrics"],
        "training": {
            key: model.card["training"].get(key)
            for key in ("validation_auc_start", "attention_path",
                        "epochs_run", "fit_freeze_share", "windows")
        },
        "train_seconds": seconds,
        "first_freeze": timing,
    }


def render(results, holdout, command):
    lines = [
        "# Predictor variants: label rule x progress input, held out",
        "",
        f"Command: `{command}`. Each variant trains the predictor with the "
        "recipe of `tools/train_predictor.py train` (early stopping on a "
        "whole validation architecture, the ViT when present, and the "
        "attention path kept only if it beats the features' logistic "
        f"regression there) with {', '.join(holdout)} held out of training "
        "entirely; metrics at threshold 0.5 on the held-out runs, labelled "
        "by the variant's own rule.",
        "",
        "| label rule | progress | held-out arch | windows | labelled freeze "
        "| predicted | precision | recall | AUC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rule, variants in results.items():
        for row in variants:
            per_arch = row["metrics"]["per_arch"]
            for arch in holdout + ["pooled"]:
                m = (row["metrics"]["held_out_pooled"] if arch == "pooled"
                     else per_arch[arch])
                lines.append(
                    f"| {rule} | {'yes' if row['use_progress'] else 'no'} "
                    f"| {arch} | {m['windows']} | {m['freeze_share']:.2f} "
                    f"| {m['predicted_share']:.2f} | {m['precision']:.2f} "
                    f"| {m['recall']:.2f} | {m['auc']:.2f} |"
                )
    lines += [
        "",
        "## When held-out units would first freeze",
        "",
        "Per (run, unit): the first epoch whose window scores >= 0.5, "
        "against the first epoch labelled \"freeze\" from which the label "
        "stays. `too early`: scored before its label (or labelled never); "
        "`mean first progress`: (epoch + 1) / epochs of the first "
        "predicted freeze.",
        "",
        "| label rule | progress | arch | units | too early | on time or "
        "later | never | mean first progress |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rule, variants in results.items():
        for row in variants:
            for arch, t in row["first_freeze"].items():
                progress = ("-" if t["mean_first_progress"] is None
                            else f"{t['mean_first_progress']:.2f}")
                lines.append(
                    f"| {rule} | {'yes' if row['use_progress'] else 'no'} "
                    f"| {arch} | {t['units']} | {t['too_early']} "
                    f"| {t['on_time_or_later']} | {t['never']} | {progress} |"
                )
    lines += [
        "",
        "## Training",
        "",
        "| label rule | progress | validation AUC at start | attention path "
        "| epochs | fit windows (freeze share) |",
        "|---|---|---|---|---|---|",
    ]
    for rule, variants in results.items():
        for row in variants:
            t = row["training"]
            start = t["validation_auc_start"]
            lines.append(
                f"| {rule} | {'yes' if row['use_progress'] else 'no'} "
                f"| {'-' if start is None else f'{start:.3f}'} "
                f"| {t['attention_path']} | {t['epochs_run']} "
                f"| {t['windows']['fit']} ({t['fit_freeze_share']:.2f}) |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rules", nargs="+", default=["0.95"],
                        help="label rules, THRESHOLD[:REMAINING_FRACTION]")
    parser.add_argument("--holdout", default="resnet,bert,resnet_ft")
    parser.add_argument("--progress", choices=["both", "yes", "no"],
                        default="both")
    parser.add_argument("--quick", action="store_true",
                        help="the quick profile's predictor size and epochs")
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks/results/predictor_variants.md"))
    args = parser.parse_args(argv)
    profile = tp.PROFILES["quick" if args.quick else "full"]
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    holdout = [a for a in args.holdout.split(",") if a]
    progress_options = {"both": (False, True), "yes": (True,),
                        "no": (False,)}[args.progress]
    results = {}
    for text in args.rules:
        rule = parse_rule(text)
        dataset = workdir / f"{rule_name(rule)}.npz"
        if not dataset.is_file():
            tp.label(args.runs, dataset, threshold=rule[0],
                     remaining_fraction=rule[1], verbose=0)
        label = f"CKA {rule[0]:g}" + (
            f", remaining {rule[1]:g}" if rule[1] else "")
        results[label] = [
            run_variant(dataset, workdir, holdout, use_progress,
                        profile.train_epochs, profile.predictor, verbose=0)
            for use_progress in progress_options
        ]
    command = ("python benchmarks/predictor_variants.py --runs RUNS "
               f"--workdir W --rules {' '.join(args.rules)} "
               f"--holdout {','.join(holdout)}"
               + (f" --progress {args.progress}"
                  if args.progress != "both" else "")
               + (" --quick" if args.quick else ""))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, holdout, command))
    out.with_suffix(".json").write_text(json.dumps(
        tp._json_safe({"command": command, "results": results}), indent=2))
    print(out.read_text())
    return results


if __name__ == "__main__":
    main()
