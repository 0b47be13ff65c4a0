"""What a freeze costs in accuracy: the zoo's BERT frozen by a fixed plan.

The predictor's labels call a freeze wrong when the unit's representation
is still far (CKA < 0.95) from the final model's. The issue's reason for
asking for precision is that a wrong freeze costs accuracy. This measures
that cost directly, with no predictor: per recipe and seed, the zoo's BERT
(`tools/train_predictor.py`, from scratch on Rotten Tomatoes) is trained
without freezing, then once per cell of a grid, from the same initial
weights and in the same data order, with the first `fraction` of its
non-head units (forward order, as SmartFRZ's prefix mode) frozen at the
end of epoch `epoch` and nothing else. A cell's cost is full training's
final test accuracy minus the cell's, in points; runs are the same as full
training up to the freeze.

Usage (from the repository root):

    python benchmarks/freeze_cost.py --recipes bert --seeds 0 1
    python benchmarks/freeze_cost.py --recipes bert --seeds 0 --epochs 2 \\
        --freeze-epochs 1 --fractions 1.0 --train-size 512 --out /tmp/smoke

Writes `benchmarks/results/freeze_cost.json` and `.md` (or `--out`).
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
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import heldout_bert  # noqa: E402
from keras_smartfrz import FreezingCallback  # noqa: E402
from keras_smartfrz import policies  # noqa: E402


@keras.saving.register_keras_serializable(package="keras_smartfrz_bench")
class PrefixAtEpoch(policies.FreezePolicy):
    """Freezes the first `fraction` of the non-head units at the end of
    epoch `epoch` (1-based), and nothing at any other stage.

    Args:
        epoch: the epoch at whose end the prefix freezes, >= 1.
        fraction: share of the non-head units frozen, in (0, 1]; the count
            is rounded down, at least one unit.
    """

    needs_history = False

    def __init__(self, epoch, fraction):
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise ValueError(
                f"`epoch` must be an integer >= 1; received epoch={epoch!r}.")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(
                "`fraction` must be in (0, 1]; received "
                f"fraction={fraction!r}.")
        self.epoch = epoch
        self.fraction = float(fraction)

    def target(self, num_units):
        """Units this plan freezes in a model of `num_units` (head
        included)."""
        return max(1, int(np.floor(self.fraction * (num_units - 1))))

    def decide(self, stage):
        candidates = len(stage.unit_names)
        count = 0
        if stage.epoch + 1 == self.epoch:
            count = int(np.clip(self.target(stage.num_units)
                                - stage.num_frozen, 0, candidates))
        freeze = np.arange(candidates) < count
        return freeze.astype(np.float32), freeze

    def get_config(self):
        return {"epoch": self.epoch, "fraction": self.fraction}


def run_grid(recipe, seed, freeze_epochs, fractions, epochs=None,
             train_size=None):
    """Full training and one run per (freeze epoch, fraction) cell."""
    prepared = heldout_bert.prepare(recipe, seed, epochs, train_size)
    full = heldout_bert.train(prepared, "full")
    result = {"recipe": recipe, "seed": seed, "epochs": prepared["epochs"],
              "train_size": int(len(prepared["train_index"])),
              "steps_per_epoch": prepared["steps_per_epoch"],
              "full": full, "cells": []}
    for epoch in freeze_epochs:
        if epoch >= prepared["epochs"]:
            continue  # a freeze at the last epoch's end changes nothing
        for fraction in fractions:
            freezer = FreezingCallback(PrefixAtEpoch(epoch, fraction))
            row = heldout_bert.train(
                prepared, f"prefix {fraction:g} at epoch {epoch}", freezer)
            row.update({
                "freeze_epoch": epoch, "fraction": fraction,
                "cost_points": 100 * (full["test_accuracy"]
                                      - row["test_accuracy"]),
                "time_saved": 1 - sum(row["epoch_seconds"])
                / sum(full["epoch_seconds"]),
            })
            result["cells"].append(row)
    return result


def to_markdown(results, command):
    lines = [
        "# What a freeze costs: the zoo's BERT frozen by a fixed plan",
        "",
        f"Command: `{command}`",
        "",
        "Each cell freezes the first *fraction* of the non-head units at "
        "the end of *epoch* and nothing else; same initial weights and data "
        "order as full training. Cost: full training's final test accuracy "
        "minus the cell's, in points (negative: the freeze ended higher). "
        "*Best* is the best epoch's test accuracy. Time saved is over the "
        "epochs' wall time, each epoch's evaluation included.",
        "",
        "| recipe | seed | freeze | frozen units | final / best "
        "| cost (points) | time saved |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        full = r["full"]
        lines.append(
            f"| {r['recipe']} | {r['seed']} | none (full) | 0 | "
            f"{full['test_accuracy']:.4f} / "
            f"{max(full['test_accuracy_by_epoch']):.4f} | - | - |")
        for c in r["cells"]:
            lines.append(
                f"| {r['recipe']} | {r['seed']} | {c['fraction']:g} at "
                f"epoch {c['freeze_epoch']} | {c['frozen_units']}/"
                f"{c['units']} | {c['test_accuracy']:.4f} / "
                f"{max(c['test_accuracy_by_epoch']):.4f} | "
                f"{c['cost_points']:+.2f} | {100 * c['time_saved']:.1f}% |")
    costs = [c["cost_points"] for r in results for c in r["cells"]]
    if costs:
        lines += [
            "",
            f"Cells: {len(costs)}; cost above 0.5 points: "
            f"{sum(c > 0.5 for c in costs)}; largest cost "
            f"{max(costs):+.2f} points.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    heldout_bert.add_run_arguments(parser, ["bert"], "freeze_cost")
    parser.add_argument("--freeze-epochs", type=int, nargs="+",
                        default=[1, 2, 3])
    parser.add_argument("--fractions", type=float, nargs="+",
                        default=[0.5, 1.0])
    args = parser.parse_args(argv)
    heldout_bert.check_run_arguments(parser, args)
    if min(args.freeze_epochs) < 1:
        parser.error("--freeze-epochs must be >= 1; received "
                     f"{args.freeze_epochs}.")
    if not all(0.0 < f <= 1.0 for f in args.fractions):
        parser.error(f"--fractions must be in (0, 1]; received "
                     f"{args.fractions}.")
    command = "python benchmarks/freeze_cost.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    results = []
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for recipe in args.recipes:
        for seed in args.seeds:
            results.append(run_grid(recipe, seed, args.freeze_epochs,
                                    args.fractions, args.epochs,
                                    args.train_size))
            # Written after every recipe and seed: a long grid keeps what
            # it has measured.
            payload = {"command": command, "results": results}
            out.with_suffix(".json").write_text(
                json.dumps(payload, indent=2) + "\n")
            out.with_suffix(".md").write_text(to_markdown(results, command))
    return payload


if __name__ == "__main__":
    main()
