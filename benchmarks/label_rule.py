"""How the predictor's label rule treats fine-tuning and from-scratch runs.

Reads run files collected by `tools/train_predictor.py collect` (they must
hold `initial_grams`, recorded since the fine-tuning members joined the zoo)
and labels each with the absolute rule (linear CKA to the final model >= T
from the window's epoch on, `label --cka-threshold T`) for several T, and
with the relative rule of `label --remaining-fraction F` (also: 1 - CKA at
most F times the unit's 1 - CKA at the start of the run) for several F.
Reports, per run, the share
of windows labelled "freeze", the first epoch at which each unit would be
labelled "freeze", and each unit's CKA to the final model at the start and
after epoch 1.

Usage (from the repository root):

    python tools/train_predictor.py collect --out /tmp/relzoo \
        --archs cnn_ft,mlp_ft,resnet_ft,mlp,cnn,resnet --seeds 0
    python benchmarks/label_rule.py /tmp/relzoo

Writes benchmarks/results/label_rule.md (or `--out`), followed by the
hand-written analysis in benchmarks/results/label_rule_notes.md.
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
import train_predictor as tp  # noqa: E402

# (CKA threshold, remaining fraction or None for the absolute rule alone)
RULES = ((0.95, None), (0.95, 0.2), (0.95, 0.1), (0.98, None), (0.99, None))


def analyse(path, rules=RULES):
    """One run's labels under each (threshold, remaining fraction) rule."""
    with np.load(path) as run:
        meta = json.loads(str(run["meta"]))
        curve = tp.cka_to_final(run["grams"])
        start = tp.start_cka(run)
    results = {}
    for rule in rules:
        threshold, fraction = rule
        labels = tp.freeze_labels(curve, threshold, start, fraction)
        body = labels[:-1, :-1]  # the head never freezes; last epoch is 1
        known = body >= 0
        first = [
            int(np.argmax(row == 1)) + 1 if (row == 1).any() else None
            for row in body
        ]
        results[rule] = {
            "share": float((body == 1)[known].mean()) if known.any() else None,
            "first": first,
        }
    return {
        "arch": meta["arch"],
        "seed": meta["seed"],
        "epochs": meta["epochs"],
        "fine_tuning": meta.get("pretrain") is not None,
        "start_cka": start[:-1].tolist(),
        "epoch1_cka": curve[:-1, 0].tolist(),
        "rules": results,
    }


def _rule_name(rule):
    threshold, fraction = rule
    return f"CKA {threshold}" + ("" if fraction is None else
                                 f", remaining {fraction}")


def render(rows, command, rules=RULES):
    lines = [
        "# The label rule on fine-tuning and from-scratch runs",
        "",
        f"Command: `{command}` (see `benchmarks/label_rule.py`).",
        "",
        "Share of windows labelled \"freeze\" (head and last epoch excluded):",
        "",
        "| run | kind | epochs | " + " | ".join(map(_rule_name, rules))
        + " |",
        "|---|---|---|" + "---|" * len(rules),
    ]
    for row in rows:
        shares = [row["rules"][r]["share"] for r in rules]
        lines.append(
            f"| {row['arch']} s{row['seed']} | "
            f"{'fine-tuning' if row['fine_tuning'] else 'from scratch'} | "
            f"{row['epochs']} | "
            + " | ".join("-" if s is None else f"{s:.0%}" for s in shares)
            + " |"
        )
    lines += [
        "",
        "First epoch labelled \"freeze\", per unit in forward order "
        "(`-`: never):",
        "",
        "| run | " + " | ".join(map(_rule_name, rules)) + " |",
        "|---|" + "---|" * len(rules),
    ]
    for row in rows:
        cells = [
            " ".join("-" if e is None else str(e)
                     for e in row["rules"][r]["first"])
            for r in rules
        ]
        lines.append(f"| {row['arch']} s{row['seed']} | "
                     + " | ".join(cells) + " |")
    lines += [
        "",
        "Linear CKA of each unit's probe outputs with the final model's, at "
        "the start of the recorded run and after its first epoch:",
        "",
        "| run | at the start | after epoch 1 |",
        "|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['arch']} s{row['seed']} | "
            + " ".join(f"{c:.3f}" for c in row["start_cka"]) + " | "
            + " ".join(f"{c:.3f}" for c in row["epoch1_cka"]) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", help="directory of run-*.npz files")
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks/results/label_rule.md"))
    args = parser.parse_args(argv)
    rows = [analyse(p) for p in tp.run_paths(args.runs)]
    rows.sort(key=lambda r: (not r["fine_tuning"], r["arch"], r["seed"]))
    command = "python benchmarks/label_rule.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    text = render(rows, command.strip())
    notes = ROOT / "benchmarks/results/label_rule_notes.md"
    if notes.is_file():  # the analysis, written by hand
        text += "\n## Analysis\n\n" + notes.read_text()
    pathlib.Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
