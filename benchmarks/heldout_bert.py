"""SmartFRZ end to end on the zoo's BERT, with a predictor that never saw it.

The predictor's held-out precision on BERT from scratch is low against its
CKA labels (`label_reference.md`). This asks what those freezes cost: per
recipe and seed, the zoo's BERT (`tools/train_predictor.py`, `bert`:
Adam 3e-4 constant; `bert_decay`: AdamW, warm-up, cosine decay) is trained
on Rotten Tomatoes twice in one process, from the same initial weights and
in the same data order: without freezing, then with `SmartFRZ(predictor=
PATH)`. Reported: test accuracy at the end and at the best epoch, units
frozen and when, and the epochs' wall time of each run, side by side.

Usage (from the repository root; `PATH` a predictor trained with BERT held
out, e.g. `train_predictor.py train --holdout resnet,bert,bert_decay,...`):

    python benchmarks/heldout_bert.py --predictor PATH
    python benchmarks/heldout_bert.py --recipes bert --seeds 0 --epochs 2 \\
        --train-size 512 --out /tmp/smoke          # smoke run

Writes `benchmarks/results/heldout_bert.json` and `.md` (or `--out`).
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import suite  # noqa: E402
import train_predictor as tp  # noqa: E402
import keras_smartfrz  # noqa: E402

RECIPES = ("bert", "bert_decay")


def prepare(recipe, seed, epochs=None, train_size=None):
    """One recipe and seed's data, model builder and initial weights.

    Every run made from it starts from the same weights and reads the same
    batches in the same order (the seed's training subset, shuffled each
    epoch from the seed).
    """
    spec = tp.ARCHITECTURES[recipe]
    data = tp.DATASETS[spec.dataset]()
    epochs = epochs or spec.epochs
    num_train = tp._length(data.x_train)
    train_index = np.random.default_rng(seed).permutation(num_train)[
        : train_size or num_train]
    steps_per_epoch = -(-len(train_index) // spec.batch_size)
    keras.utils.set_random_seed(seed)
    initial = spec.build(data, steps_per_epoch, epochs).get_weights()
    return {
        "recipe": recipe, "seed": seed, "epochs": epochs, "spec": spec,
        "data": data, "train_index": train_index,
        "steps_per_epoch": steps_per_epoch, "initial": initial,
    }


def train(prepared, label, freezer=None):
    """Trains one model of `prepared` (with `freezer` among the callbacks,
    if given) and returns its row: test accuracy each epoch, the epochs'
    wall time, and what the freezer froze."""
    spec, data = prepared["spec"], prepared["data"]
    index, seed = prepared["train_index"], prepared["seed"]
    batch_size = spec.batch_size
    keras.utils.set_random_seed(seed)
    model = spec.build(data, prepared["steps_per_epoch"], prepared["epochs"])
    model.set_weights(prepared["initial"])
    # The suite's epoch clock (and progress line): wall time of each epoch,
    # its evaluation included.
    clock = suite.EpochLog(f"{prepared['recipe']} seed {seed} {label}")
    callbacks = [clock] if freezer is None else [freezer, clock]
    history = model.fit(
        tp._batches(tp._take(data.x_train, index), data.y_train[index],
                    batch_size, shuffle_seed=seed),
        epochs=prepared["epochs"],
        validation_data=tp._batches(data.x_test, data.y_test, batch_size),
        callbacks=callbacks, shuffle=False, verbose=0,
    )
    accuracy = history.history["val_accuracy"]
    row = {
        "test_accuracy": float(accuracy[-1]),
        "test_accuracy_by_epoch": [float(a) for a in accuracy],
        "train_accuracy": float(history.history["accuracy"][-1]),
        "epoch_seconds": clock.seconds,
    }
    if freezer is not None:
        row["frozen_units"] = len(freezer.frozen_units)
        row["units"] = len(freezer.units)
        row["freeze_epochs"] = sorted(
            {d.epoch + 1 for d in freezer.decisions if d.frozen})
        row["overhead_seconds"] = dict(freezer.overhead_seconds)
    print(f"{prepared['recipe']} seed {seed} {label}: test accuracy "
          f"{row['test_accuracy']:.4f}, {sum(clock.seconds):.0f} s",
          flush=True)
    return row


def run_pair(recipe, seed, predictor, epochs=None, train_size=None):
    """Full training, then SmartFRZ, of one recipe and seed."""
    prepared = prepare(recipe, seed, epochs, train_size)
    result = {"recipe": recipe, "seed": seed, "epochs": prepared["epochs"],
              "train_size": int(len(prepared["train_index"])),
              "steps_per_epoch": prepared["steps_per_epoch"]}
    result["full"] = train(prepared, "full")
    result["smartfrz"] = train(
        prepared, "smartfrz", keras_smartfrz.SmartFRZ(predictor=predictor))
    full, frz = result["full"], result["smartfrz"]
    result["accuracy_delta_points"] = 100 * (
        frz["test_accuracy"] - full["test_accuracy"])
    result["time_saved"] = 1 - sum(frz["epoch_seconds"]) / sum(
        full["epoch_seconds"])
    return result


def to_markdown(results, command):
    lines = [
        "# SmartFRZ on the zoo's BERT with a predictor that never saw it",
        "",
        f"Command: `{command}`",
        "",
        "Test accuracy on Rotten Tomatoes' test split; *best* is the best "
        "epoch's (what early stopping would keep). Time saved is over the "
        "epochs' wall time of the two runs (each epoch's evaluation on the "
        "test split included, the same in both), side by side in one "
        "process.",
        "",
        "| recipe | seed | full: final / best | SmartFRZ: final / best "
        "| diff (points) | frozen units | freeze epochs | time saved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        full, frz = r["full"], r["smartfrz"]
        lines.append(
            f"| {r['recipe']} | {r['seed']} | {full['test_accuracy']:.4f} / "
            f"{max(full['test_accuracy_by_epoch']):.4f} | "
            f"{frz['test_accuracy']:.4f} / "
            f"{max(frz['test_accuracy_by_epoch']):.4f} | "
            f"{r['accuracy_delta_points']:+.2f} | "
            f"{frz['frozen_units']}/{frz['units']} | "
            f"{', '.join(map(str, frz['freeze_epochs'])) or '-'} | "
            f"{100 * r['time_saved']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def add_run_arguments(parser, recipes, out_name):
    """The flags naming the runs (recipes, seeds, epochs, training size)
    and the output path, shared with `freeze_cost.py`."""
    parser.add_argument("--recipes", nargs="+", default=recipes,
                        choices=RECIPES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: the recipe's (8)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="training examples (default: the whole split)")
    parser.add_argument("--out", default=str(
        ROOT / "benchmarks" / "results" / out_name),
        help="output path without extension (.md and .json are written)")


def check_run_arguments(parser, args):
    """Rejects a non-positive `--epochs` or `--train-size`, naming it."""
    for name in ("epochs", "train_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; "
                         f"received {value}.")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--predictor", default=None,
                        help="predictor directory or weights file "
                             "(default: the shipped one, which saw `bert`)")
    add_run_arguments(parser, list(RECIPES), "heldout_bert")
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    command = "python benchmarks/heldout_bert.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    results = [
        run_pair(recipe, seed, args.predictor, args.epochs, args.train_size)
        for recipe in args.recipes for seed in args.seeds
    ]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "predictor": args.predictor,
               "results": results}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(results, command))
    return payload


if __name__ == "__main__":
    main()
