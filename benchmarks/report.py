"""Turns the suite's results json into BENCHMARKS.md and PNG plots.

Used by `benchmarks/suite.py` (after a run, or with `--render`). Everything in
the report is computed from the json, so a report can always be rebuilt:

    python benchmarks/suite.py --render --out benchmarks/results/suite.json
"""

import math
import os
import pathlib
import statistics

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("full", "smartfrz", "linear", "autofreeze")
LABELS = {
    "full": "full training",
    "smartfrz": "SmartFRZ",
    "linear": "LinearFreezing",
    "autofreeze": "AutoFreeze",
}
COLORS = {
    "full": "#444444",
    "smartfrz": "#d62728",
    "linear": "#1f77b4",
    "autofreeze": "#2ca02c",
}
# Target thresholds of issue 5.
TARGET_TIME_SAVED = 0.35
TARGET_ACCURACY_LOSS = 0.005
TARGET_BASELINE_FACTOR = 1.5
TARGET_OVERHEAD = 0.01


# ------------------------------------------------------------- statistics
def _mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def _sd(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _runs(results, scenario, method):
    return sorted(
        (r for r in results["runs"]
         if r["scenario"] == scenario and r["method"] == method),
        key=lambda r: r["seed"],
    )


def train_seconds(run):
    """Wall time of the run's epochs: first epoch's start to last epoch's
    end, every step, freezing stage and retrace included.

    Not `fit`'s whole wall time: when `fit` returns, TensorFlow 2.21 tears
    down the input pipeline's iterator, and that waits, idle, for tf.data's
    autotuning thread to wake up, which it does on its own period of up to
    a minute. In the suite of 2026-12-01 that added 0 s or 13-60 s after the
    last epoch at random, whatever the method (a stack dump taken during one
    such wait shows `IteratorResource::~IteratorResource` waiting on an
    `UnboundedThreadPool` thread at 0% CPU; a probe with autotuning off had
    no such wait, but slower epochs, so the suite keeps autotuning on and
    leaves the wait out of its times). The json keeps `fit_seconds` too.
    """
    epochs = run.get("epoch_seconds")
    return sum(epochs) if epochs else run["fit_seconds"]


def _overhead_share(run):
    overhead = run.get("overhead")
    if not overhead:
        return None
    return overhead["overhead_seconds"] / train_seconds(run)


def summarize(results):
    """Per scenario and method: means, spreads and paired ratios to full.

    Ratios to full training pair runs of the same seed (measured in the same
    process) and are then averaged over seeds.
    """
    summary = {}
    for scenario in results["scenarios"]:
        full = {r["seed"]: r for r in _runs(results, scenario, "full")}
        rows = {}
        for method in results.get("methods", METHODS):
            runs = _runs(results, scenario, method)
            if not runs:
                continue
            paired = [(r, full[r["seed"]]) for r in runs if r["seed"] in full]
            units = len(results["scenarios"][scenario]["units"])
            rows[method] = {
                "seeds": [r["seed"] for r in runs],
                "accuracy": [r["test_accuracy"] for r in runs],
                "accuracy_delta": [
                    r["test_accuracy"] - f["test_accuracy"] for r, f in paired
                ],
                "train_seconds": [train_seconds(r) for r in runs],
                "time_saved": [
                    1 - train_seconds(r) / train_seconds(f)
                    for r, f in paired
                ],
                "cpu_saved": [
                    1 - r["cpu_seconds"] / f["cpu_seconds"] for r, f in paired
                ],
                "flops_saved": [r["flops_saved"] for r in runs],
                "overhead_share": [_overhead_share(r) for r in runs],
                "freeze_cost": [
                    (r["overhead"]["freeze_seconds"]
                     + r["overhead"]["retrace_seconds"])
                    if r.get("overhead") else None
                    for r in runs
                ],
                "frozen_share": [len(r["freeze_epochs"]) / units
                                 for r in runs],
            }
        summary[scenario] = rows
    return summary


# ------------------------------------------------------------- formatting
def _pct(value, digits=1):
    return "–" if value is None or math.isnan(value) else (
        f"{100 * value:.{digits}f}%")


def _pm(values, scale=1.0, digits=4, suffix=""):
    mean, sd = _mean(values), _sd(values)
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}{suffix}"
    if not math.isnan(sd):
        text += f" ± {sd * scale:.{digits}f}"
    return text


def _pm_pct(values, digits=1):
    return _pm(values, scale=100, digits=digits, suffix="%")


def _points(values):
    """Accuracy differences in percentage points, signed."""
    mean, sd = _mean(values), _sd(values)
    if math.isnan(mean):
        return "–"
    text = f"{100 * mean:+.2f}"
    if not math.isnan(sd):
        text += f" ± {100 * sd:.2f}"
    return text


def schedule_text(run, units):
    """'end of epoch 2: a .. c (3); end of epoch 4: d (1)' for one run."""
    by_epoch = {}
    for name, epoch in run["freeze_epochs"].items():
        by_epoch.setdefault(epoch, []).append(units.index(name))
    if not by_epoch:
        return "nothing frozen"
    parts = []
    for epoch in sorted(by_epoch):
        indices = sorted(by_epoch[epoch])
        first, last = units[indices[0]], units[indices[-1]]
        names = first if first == last else f"{first} .. {last}"
        parts.append(f"ep {epoch}: {names} ({len(indices)})")
    return "; ".join(parts)


# ------------------------------------------------------------------ plots
def plot(results, directory, stem):
    """Writes the two PNG plots; returns their paths (empty without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scenarios = list(results["scenarios"])
    methods = [m for m in METHODS if m in results.get("methods", METHODS)]
    paths = []

    fig, axes = plt.subplots(1, len(scenarios), squeeze=False,
                             figsize=(4.2 * len(scenarios), 3.8))
    for ax, scenario in zip(axes[0], scenarios):
        for method in methods:
            runs = _runs(results, scenario, method)
            if not runs:
                continue
            xs = [train_seconds(r) for r in runs]
            ys = [100 * r["test_accuracy"] for r in runs]
            ax.scatter(xs, ys, s=14, alpha=0.45, color=COLORS[method])
            ax.errorbar(
                _mean(xs), _mean(ys),
                xerr=0 if len(xs) < 2 else _sd(xs),
                yerr=0 if len(ys) < 2 else _sd(ys),
                fmt="o", ms=7, capsize=3, color=COLORS[method],
                label=LABELS[method],
            )
        ax.set_title(scenario, fontsize=10)
        ax.set_xlabel("training time (the epochs, s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle("Test accuracy vs training time\n(small: one seed; "
                 "large: mean ± sd)", fontsize=10)
    fig.tight_layout()
    path = directory / f"{stem}_accuracy_vs_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, len(scenarios), squeeze=False,
                             figsize=(4.2 * len(scenarios), 3.6))
    for ax, scenario in zip(axes[0], scenarios):
        info = results["scenarios"][scenario]
        epochs = info["size"]["epochs"]
        units = len(info["units"])
        for method in methods:
            runs = _runs(results, scenario, method)
            if not runs or method == "full":
                continue
            # Share of units frozen after k epochs, k = 0 .. epochs.
            curves = [
                [len(r["frozen_units_by_epoch"][e]) / units
                 for e in range(epochs)] + [len(r["freeze_epochs"]) / units]
                for r in runs
            ]
            mean = [_mean(values) for values in zip(*curves)]
            ax.step(range(epochs + 1), [100 * m for m in mean], where="post",
                    color=COLORS[method], label=LABELS[method], marker=".")
        ax.set_ylim(-3, 103)
        ax.set_xticks(range(epochs + 1))
        ax.set_title(f"{scenario} ({units} units)", fontsize=10)
        ax.set_xlabel("epochs done")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("units frozen (%, mean over seeds)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle("Units frozen after each epoch", fontsize=10)
    fig.tight_layout()
    path = directory / f"{stem}_frozen_units.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


# ---------------------------------------------------------------- targets
def targets(results, summary):
    """The three targets of issue 5: lines of markdown."""
    scenarios = [s for s in summary if "smartfrz" in summary[s]]
    lines = []
    if not scenarios:
        return ["SmartFRZ did not run: no target can be assessed."]

    saved = [_mean(summary[s]["smartfrz"]["time_saved"]) for s in scenarios]
    delta = [_mean(summary[s]["smartfrz"]["accuracy_delta"])
             for s in scenarios]
    mean_saved, mean_delta = _mean(saved), _mean(delta)
    met = mean_saved >= TARGET_TIME_SAVED and mean_delta >= (
        -TARGET_ACCURACY_LOSS)
    lines += [
        f"1. **Time saved >= {TARGET_TIME_SAVED:.0%} at <= "
        f"{100 * TARGET_ACCURACY_LOSS:.1f} points accuracy loss, averaged "
        f"over the scenarios: {'met' if met else 'missed'}.** SmartFRZ "
        f"saved {_pct(mean_saved)} of full training's wall-clock time "
        "(the epochs) on "
        f"average, at {100 * mean_delta:+.2f} points of test accuracy ("
        + ", ".join(
            f"{s}: {_pct(v)} / {100 * d:+.2f}"
            for s, v, d in zip(scenarios, saved, delta)
        ) + ").",
    ]

    parts, ok = [], True
    for baseline in ("linear", "autofreeze"):
        present = [s for s in scenarios if baseline in summary[s]]
        if not present:
            continue
        ours = _mean([_mean(summary[s]["smartfrz"]["time_saved"])
                      for s in present])
        theirs = _mean([_mean(summary[s][baseline]["time_saved"])
                        for s in present])
        ours_acc = _mean([_mean(summary[s]["smartfrz"]["accuracy"])
                          for s in present])
        theirs_acc = _mean([_mean(summary[s][baseline]["accuracy"])
                            for s in present])
        # A factor only means something when the baseline saved time; when
        # it saved none, any real saving of SmartFRZ beats it.
        if theirs > 0:
            factor = ours / theirs
            ratio = f"x{factor:.2f}"
        else:
            factor = float("inf") if ours > 0 else float("nan")
            ratio = "the baseline saved nothing"
        good = (ours > 0 and factor >= TARGET_BASELINE_FACTOR
                and ours_acc >= theirs_acc - TARGET_ACCURACY_LOSS)
        ok &= good
        parts.append(
            f"{LABELS[baseline]} saved {_pct(theirs)} (SmartFRZ "
            f"{_pct(ours)}, {ratio}) at mean accuracy "
            f"{100 * theirs_acc:.2f}% (SmartFRZ {100 * ours_acc:.2f}%)"
        )
    lines.append(
        f"2. **SmartFRZ saves >= {TARGET_BASELINE_FACTOR}x what "
        "LinearFreezing and AutoFreeze save, at equal or better accuracy "
        f"(equal: within {100 * TARGET_ACCURACY_LOSS:.1f} points): "
        f"{'met' if ok and parts else 'missed'}.** " + "; ".join(parts) + "."
    )

    shares = [
        v for s in scenarios for v in summary[s]["smartfrz"]["overhead_share"]
        if v is not None
    ]
    worst = max(shares) if shares else float("nan")
    lines.append(
        f"3. **Sampling + predictor overhead <= {TARGET_OVERHEAD:.0%} of "
        f"training time: {'met' if worst <= TARGET_OVERHEAD else 'missed'}."
        f"** Mean {_pct(_mean(shares), 2)}, worst run {_pct(worst, 2)} "
        "(time inside SmartFRZ's hooks, applying freezes excluded, over the "
        "run's epochs)."
    )
    return lines


def limits(results):
    """Per scenario: the most any freezing could save under the defaults."""
    lines = []
    for name, info in results["scenarios"].items():
        epochs = info["size"]["epochs"]
        head_only = info.get("step_flops_head_only")
        if not head_only:
            continue
        # Nothing freezes before the end of epoch 1 (the baselines'
        # min_epochs=1) or of epoch ceil(0.3 * epochs) (SmartFRZ's
        # min_epochs="auto"); the best case freezes every unit but the head
        # then.
        from keras_smartfrz.freezing_callback import auto_min_epochs

        frozen_share = 1 - head_only / info["step_flops"]
        best = (epochs - 1) / epochs * frozen_share
        warm = auto_min_epochs(epochs)
        best_warm = (epochs - warm) / epochs * frozen_share
        lines.append(
            f"- `{name}`: a training step costs "
            f"{info['step_flops'] / info['forward_flops']:.2f}x the forward "
            f"pass; with everything but the head frozen, "
            f"{head_only / info['forward_flops']:.2f}x. Freezing all of it "
            f"at the end of epoch 1 of {epochs} would save at most "
            f"{_pct(best)} of the training FLOPs; at the end of epoch "
            f"{warm} (SmartFRZ's default warm-up), {_pct(best_warm)}."
        )
    return lines


# ---------------------------------------------------------------- report
def write(results, report_path, plots_dir, stem=None):
    """Writes the markdown report (and the plots) for `results`.

    `stem` names the plots (`<stem>_*.png`) and the hand-written notes
    pasted in (`benchmarks/results/<stem>_notes.md`); by default `suite` or
    `suite_quick`, after the profile.
    """
    report_path = pathlib.Path(report_path)
    # Scenarios in their numbered order, whatever order the runs came in
    # (a resumed suite appends the scenarios it adds).
    results = dict(results, scenarios=dict(sorted(
        results["scenarios"].items(), key=lambda item: item[1]["title"])))
    if stem is None:
        stem = "suite_quick" if results["profile"] == "quick" else "suite"
    plots = plot(results, plots_dir, stem)
    summary = summarize(results)
    machine = results["machine"]
    quick = results["profile"] == "quick"
    lines = ["# Benchmarks: SmartFRZ against full training and the baselines",
             ""]
    if quick:
        lines += [
            "> **This is a QUICK SMOKE RUN, not results.** `--quick` trains "
            "each scenario for a handful of steps on tiny subsets, to check "
            "that the suite runs end to end; its accuracies, times and "
            "savings mean nothing. The full suite "
            "(`python benchmarks/suite.py`) replaces this file.",
            "",
        ]
    lines += [
        "SmartFRZ (`keras_smartfrz.SmartFRZ()`), `LinearFreezing()` and "
        "`AutoFreeze()`, each with its default arguments, against full "
        "training, on four scenarios with real data on CPU. Per seed, all "
        "methods start from the same weights and see the same batches in the "
        "same order; full training runs first, the freezing methods follow "
        "in an order rotated by seed, all in one process.",
        "",
        f"Command: `{results['command']}` (commit "
        f"`{results.get('commit')}`), {results['started']} to "
        f"{results.get('finished', '?')}, "
        f"{results.get('wall_minutes', float('nan')):.1f} min in all.",
        "",
        f"Machine: {machine['cpus']} CPU cores ({machine['cpu_model']}), "
        f"{machine.get('memory_gib', '?')} GiB; Python {machine['python']}, "
        f"TensorFlow {machine['tensorflow']} (CPU), Keras {machine['keras']}, "
        f"keras-hub {machine.get('keras_hub', '?')}, NumPy "
        f"{machine['numpy']}. Load average (1/5/15 min) at start "
        f"{results.get('load_average_start')}, at end "
        f"{results.get('load_average_end')}: a load above the core count "
        "means other jobs shared the machine and wall-clock times are noisy "
        "(the CPU-time column is the load-robust estimate).",
        "",
    ]
    predictor = results.get("predictor")
    if predictor:
        config = predictor.get("config") or {}
        training = predictor.get("training") or {}
        trained_on = list(training.get("train_archs") or [])
        held_out = list(training.get("held_out_archs") or [])
        zoo = ", ".join(trained_on) or "not recorded in its card"
        overlap = (
            " MiniLM fine-tuning on Rotten Tomatoes is in that zoo: scenario "
            "4 is in the predictor's own distribution (its training runs "
            "used the training split only)."
            if "minilm" in trained_on else
            " No scenario's model is in that zoo: the suite's CNN, ResNet "
            "and ViT are other configurations, and MiniLM is not in it."
        )
        lines += [
            f"SmartFRZ's predictor: {predictor['path']} (window "
            f"{config.get('window_size')}, sample "
            f"{config.get('sample_size')}), trained on the runs of "
            f"`tools/train_predictor.py`'s zoo: {zoo}"
            + (f" (held out: {', '.join(held_out)})" if held_out else "")
            + "." + overlap,
            "",
        ]

    lines += ["## Results", ""]
    for error in results.get("errors", []):
        lines += [f"**Scenario `{error['scenario']}` failed:** "
                  f"`{error['error']}` (see the suite's log).", ""]
    for path in plots:
        rel = os.path.relpath(path, report_path.parent)
        lines += [f"![{path.stem}]({rel})", ""]
    lines += [
        "Columns: test accuracy, mean ± sd over seeds; Δ accuracy against "
        "full training of the same seed, in points; train s = wall time of "
        "the epochs (every step, freezing stage and retrace; not `fit`'s "
        "setup and input-pipeline teardown, see `train_seconds` in "
        "`benchmarks/report.py`); time saved = 1 − train s / full "
        "training's train s of the same seed (wall), and the same with "
        "process CPU time over the whole `fit`; training FLOPs saved "
        "(analytic, "
        "`benchmarks/training_flops.py`); overhead = time in the callback's "
        "hooks (weight sampling, predictor or rule, bookkeeping) except "
        "applying freezes, over train s; freeze cost = applying freezes "
        "(`freeze_layers`, new sampler) plus the estimated retrace of the "
        "train step after each (first step of the epoch minus its median "
        "step), seconds; frozen = units frozen at the end.",
        "",
    ]
    for name, rows in summary.items():
        info = results["scenarios"][name]
        size = info["size"]
        lines += [
            f"### {info['title']}",
            "",
            f"{info['description']}",
            "",
            f"{size['epochs']} epochs of {size['steps_per_epoch']} steps, "
            f"batch {size['batch_size']} (of {info['train_examples']} "
            f"training examples), seeds {size['seeds']}; test: "
            f"{info['test_examples']} examples. {len(info['units'])} units; "
            f"forward {info['forward_flops'] / 1e6:.1f} MFLOPs per example."
            + (f" MNIST pretraining: {info['pretrain']['steps']} steps, "
               f"{info['pretrain']['seconds']:.0f} s, MNIST test accuracy "
               f"{info['pretrain']['mnist_test_accuracy']:.4f}."
               if info.get("pretrain") else ""),
            "",
            "| method | test accuracy | Δ accuracy (points) | train s | time "
            "saved (wall) | time saved (CPU) | FLOPs saved | overhead | "
            "freeze cost s | frozen |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, row in rows.items():
            lines.append(
                f"| {LABELS[method]} | {_pm(row['accuracy'])} | "
                f"{_points(row['accuracy_delta']) if method != 'full' else '–'}"
                f" | {_pm(row['train_seconds'], digits=1)} | "
                f"{_pm_pct(row['time_saved']) if method != 'full' else '–'} | "
                f"{_pm_pct(row['cpu_saved']) if method != 'full' else '–'} | "
                f"{_pm_pct(row['flops_saved']) if method != 'full' else '–'} |"
                f" {_pm_pct(row['overhead_share'], 2) if method != 'full' else '–'}"
                f" | {_pm(row['freeze_cost'], digits=1) if method != 'full' else '–'}"
                f" | {_pm_pct(row['frozen_share'], 0) if method != 'full' else '–'} |"
            )
        lines += ["", "When each unit froze (units in forward order; "
                  "`ep N` = at the end of epoch N):", "",
                  "| method | seed | frozen units |", "|---|---|---|"]
        for method in rows:
            if method == "full":
                continue
            for run in _runs(results, name, method):
                lines.append(
                    f"| {LABELS[method]} | {run['seed']} | "
                    f"{schedule_text(run, info['units'])} |"
                )
        lines.append("")

    lines += ["## Targets", ""]
    if quick:
        lines += ["(Computed from this quick smoke run; they mean nothing "
                  "until the full suite runs.)", ""]
    lines += targets(results, summary) + [""]
    lines += ["What any freezing could save here, from the FLOPs model:", ""]
    lines += limits(results) + [""]
    notes = ROOT / "benchmarks" / "results" / f"{stem}_notes.md"
    if notes.is_file():
        lines += ["## Analysis", "", notes.read_text().strip(), ""]

    lines += [
        "## Method",
        "",
        "- **Same start, same data, same randomness.** Per scenario and "
        "seed the model is built once (seeded) and its weights copied into "
        "every method's fresh model; the batches come from a `tf.data` "
        "pipeline shuffled with the seed (an epoch is `steps_per_epoch` "
        "batches of an endless, reshuffled stream of the whole training "
        "split); the global seed is reset before every `fit`, so dropout "
        "draws match. A throwaway two-step `fit` first charges "
        "TensorFlow's start-up to no run; each run still traces its own "
        "train step in its first epoch (a few seconds, the same for every "
        "method).",
        "- **Methods.** `SmartFRZ()`, `LinearFreezing()`, `AutoFreeze()`: "
        "their defaults (prefix mode, `min_epochs=1`, one freezing stage per "
        "epoch), frozen BatchNormalization "
        + ("in inference mode (`frozen_batchnorm=\"inference\"`, "
           "`--frozen-batchnorm inference`)"
           if results.get("frozen_batchnorm") == "inference"
           else "keeping batch statistics (the default)")
        + (". SmartFRZ with " + ", ".join(
            f"`{k}={v!r}`" for k, v in results["smartfrz_args"].items())
           if results.get("smartfrz_args") else "")
        + ". Untuned: the same arguments in every scenario.",
        "- **Times.** `fit` only (evaluation excluded), wall clock "
        "(`time.perf_counter`) and process CPU time (`time.process_time`); "
        "ratios pair each run with full training of the same seed in the "
        "same process. A freezing callback's per-step hook makes `fit` "
        "wait for every step (Keras dispatches callbacks asynchronously only "
        "when none has a batch hook); that cost is inside the measured "
        "times.",
        "- **FLOPs.** Per example, from the model's own training-mode graph "
        "(`benchmarks/training_flops.py`): analytic forward cost per "
        "operation (2 per multiply-add for matmuls, einsums and "
        "convolutions; 1 per output element otherwise); backward = one "
        "forward per input that needs a gradient, so 2x forward for a layer "
        "whose weights train, 1x for a layer without weights between the "
        "loss and the first trainable weight, 0 for the frozen prefix. Run "
        "FLOPs sum each epoch's step cost with the units frozen during that "
        "epoch; saved = 1 − run / full. The loss and the optimizer update "
        "are left out.",
        "- **Overhead.** Time spent inside the freezing callback's hooks, "
        "measured around each call (`HookTimer` in `benchmarks/suite.py`): "
        "weight sampling (`on_train_batch_end`, `on_train_begin`), the "
        "predictor or rule (`policy.decide`) and a stage's bookkeeping; "
        "applying a freeze (`freeze_layers`, rebuilding the sampler) and the "
        "train step's retrace that follows are reported apart as the "
        "freeze cost, and are included in the wall-clock times.",
        "- **jit_compile=False** everywhere: XLA:CPU is slower on conv nets "
        "(`benchmarks/results/freeze_speed.md`), and every freezing stage "
        "would recompile the transformers' steps.",
        "",
        "## Reproduce",
        "",
        "```bash",
        "bash tools/setup.sh                 # data and packages, offline "
        "afterwards",
        "python benchmarks/suite.py          # full suite: 72 min on 2 "
        "idle cores (2026-12-01)",
        "python benchmarks/suite.py --quick  # smoke run, a few minutes",
        "python benchmarks/suite.py --render # this file and the plots from "
        "benchmarks/results/suite.json",
        "```",
        "",
        "Sizes per scenario (full and quick) are in `SIZES` at the top of "
        "`benchmarks/suite.py`. `--predictor DIR` runs SmartFRZ with another "
        "predictor; `--resume` continues an interrupted suite; "
        "`--scenarios`, `--methods` and `--seeds` run a part.",
        "",
    ]
    report_path.write_text("\n".join(lines))
    return report_path
