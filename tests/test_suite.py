"""The benchmark suite (benchmarks/suite.py) and its report (report.py)."""

import json

import pytest

import keras_smartfrz
from conftest import load_script

suite = load_script("benchmarks", "suite")
report = load_script("benchmarks", "report")


@pytest.fixture
def predictor(tiny_predictor):
    return tiny_predictor


def test_sizes_cover_every_scenario_in_both_profiles():
    assert set(suite.SIZES) == set(suite.SCENARIOS)
    for name, sizes in suite.SIZES.items():
        assert set(sizes) == {"full", "quick"}
        full, quick = sizes["full"], sizes["quick"]
        assert full.epochs >= 3 and len(full.seeds) >= 2
        steps = lambda s: s.epochs * s.steps_per_epoch * s.batch_size  # noqa
        assert steps(quick) < steps(full) / 20
        assert quick.test_size < full.test_size


def test_method_order_full_first_then_rotated():
    methods = list(suite.METHODS)
    assert suite.method_order(0, methods) == [
        "full", "smartfrz", "linear", "autofreeze"]
    assert suite.method_order(1, methods) == [
        "full", "linear", "autofreeze", "smartfrz"]
    assert suite.method_order(3, methods) == suite.method_order(0, methods)
    assert suite.method_order(0, ["linear"]) == ["linear"]


def test_make_freezer_uses_defaults(predictor):
    assert suite.make_freezer("full", predictor) is None
    assert isinstance(suite.make_freezer("smartfrz", predictor),
                      keras_smartfrz.SmartFRZ)
    linear = suite.make_freezer("linear", predictor)
    assert linear.freeze_start == 0.5 and linear.freeze_level == 1.0
    assert suite.make_freezer("autofreeze", predictor).percentile == 50.0
    with pytest.raises(ValueError, match="Unknown method"):
        suite.make_freezer("egeria", predictor)


def _fake_results(profile="full"):
    """Two seeds of one scenario, with made-up but consistent numbers."""
    units = ["stem", "block1", "block2", "head"]
    runs = []
    for seed in (0, 1):
        for method, seconds, acc, frozen in [
            ("full", 100.0, 0.900, {}),
            ("smartfrz", 60.0, 0.899, {"stem": 1, "block1": 2}),
            ("linear", 80.0, 0.890, {"stem": 2}),
            ("autofreeze", 90.0, 0.900, {"stem": 3}),
        ]:
            by_epoch = [
                sorted(units.index(u) for u, at in frozen.items() if at <= e)
                for e in range(4)
            ]
            runs.append({
                "scenario": "toy", "seed": seed, "method": method,
                "test_accuracy": acc + 0.001 * seed,
                "fit_seconds": seconds + seed, "cpu_seconds": 2 * seconds,
                "epoch_seconds": [(seconds + seed) / 4] * 4,
                "loss": [1.0] * 4,
                "train_accuracy": [0.5] * 4, "frozen_fraction": [0.0] * 4,
                "freeze_epochs": frozen, "frozen_units_by_epoch": by_epoch,
                "flops": 1.0, "flops_full": 2.0,
                "flops_saved": 0.0 if method == "full" else 0.3,
                "overhead": None if method == "full" else {
                    "sampling_seconds": 0.2, "decide_seconds": 0.1,
                    "freeze_seconds": 0.05, "hooks_seconds": 0.4,
                    "overhead_seconds": 0.35, "retrace_seconds": 1.0,
                    "median_step_seconds": [0.1] * 4,
                    "first_step_seconds": [1.0] * 4,
                },
            })
    return {
        "format_version": 1, "profile": profile,
        "command": "python benchmarks/suite.py", "commit": "abc1234",
        "started": "2026-01-01T00:00:00", "finished": "2026-01-01T01:00:00",
        "wall_minutes": 60.0,
        "machine": {"cpus": 2, "cpu_model": "test CPU", "python": "3",
                    "tensorflow": "2", "keras": "3", "numpy": "2",
                    "keras_smartfrz": "0", "platform": "x"},
        "load_average_start": [1.0, 1.0, 1.0],
        "load_average_end": [1.0, 1.0, 1.0],
        "predictor": {"path": "shipped", "config": {"window_size": 30,
                                                    "sample_size": 1024},
                      "training": {"train_archs": ["mlp", "cnn"]}},
        "methods": list(suite.METHODS),
        "scenarios": {"toy": {
            "title": "Toy", "description": "A toy.",
            "size": {"epochs": 4, "steps_per_epoch": 10, "batch_size": 8,
                     "test_size": 10, "seeds": [0, 1]},
            "jit_compile": False, "units": units, "forward_flops": 10.0,
            "step_flops": 30.0, "step_flops_head_only": 11.0,
            "train_examples": 100, "test_examples": 10, "pretrain": None,
        }},
        "runs": runs,
        "errors": [],
    }


def test_summary_pairs_each_run_with_full_training_of_its_seed():
    summary = report.summarize(_fake_results())["toy"]
    smart = summary["smartfrz"]
    assert smart["time_saved"] == pytest.approx([0.4, 1 - 61 / 101])
    assert smart["accuracy_delta"] == pytest.approx([-0.001, -0.001])
    assert smart["cpu_saved"] == pytest.approx([0.4, 0.4])
    assert smart["overhead_share"] == pytest.approx([0.35 / 60, 0.35 / 61])
    assert smart["frozen_share"] == [0.5, 0.5]
    assert summary["full"]["time_saved"] == pytest.approx([0.0, 0.0])


def test_schedule_text_groups_units_by_epoch():
    units = ["stem", "block1", "block2", "head"]
    run = {"freeze_epochs": {"stem": 1, "block1": 1, "block2": 3}}
    assert report.schedule_text(run, units) == (
        "ep 1: stem .. block1 (2); ep 3: block2 (1)")
    assert report.schedule_text({"freeze_epochs": {}}, units) == (
        "nothing frozen")


def test_targets_are_assessed_from_the_numbers():
    results = _fake_results()
    lines = report.targets(results, report.summarize(results))
    assert len(lines) == 3
    assert "met" in lines[0] and "missed" not in lines[0]  # ~40% at -0.1 pt
    # LinearFreezing saves ~20%, AutoFreeze ~10%: SmartFRZ saves >= 1.5x.
    assert ": met" in lines[1]
    assert ": met" in lines[2]  # 0.35 s of 60 s is 0.6%


def test_report_and_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    results = _fake_results(profile="quick")
    path = report.write(results, tmp_path / "BENCHMARKS.md", tmp_path)
    text = path.read_text()
    assert "QUICK SMOKE RUN, not results" in text
    assert "| SmartFRZ |" in text and "ep 1: stem (1)" in text
    assert "python benchmarks/suite.py" in text
    assert "test CPU" in text
    for name in ("suite_quick_accuracy_vs_time.png",
                 "suite_quick_frozen_units.png"):
        assert (tmp_path / name).stat().st_size > 1000
        assert f"]({name})" in text


def test_quick_suite_one_scenario(tmp_path, predictor):
    """The whole pipeline on the smallest scenario, two methods."""
    out = tmp_path / "suite.json"
    results = suite.main([
        "--quick", "--scenarios", "resnet_scratch", "--methods", "full",
        "smartfrz", "--predictor", predictor, "--out", str(out),
        "--report", str(tmp_path / "BENCHMARKS.md"), "--plots",
        str(tmp_path),
    ])
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["runs"]] == ["full", "smartfrz"]
    info = saved["scenarios"]["resnet_scratch"]
    assert info["forward_flops"] > 1e6
    assert info["step_flops_head_only"] < info["step_flops"]
    full, smart = saved["runs"]
    size = suite.SIZES["resnet_scratch"]["quick"]
    assert len(full["epoch_seconds"]) == size.epochs
    assert full["flops_saved"] == 0.0 and full["overhead"] is None
    assert 0.0 <= smart["flops_saved"] < 1.0
    assert smart["overhead"]["hooks_seconds"] > 0.0
    frozen_early = [u for u, at in smart["freeze_epochs"].items()
                    if at < size.epochs]
    assert (smart["flops_saved"] > 0.0) == bool(frozen_early)
    assert "QUICK SMOKE RUN" in (tmp_path / "BENCHMARKS.md").read_text()
    assert results["runs"] == saved["runs"]
    # --resume keeps both runs (the json's lists match the sizes' tuples)
    # and runs only the method that is new.
    suite.main([
        "--quick", "--scenarios", "resnet_scratch", "--methods", "full",
        "smartfrz", "linear", "--predictor", predictor, "--out", str(out),
        "--no-report", "--resume",
    ])
    resumed = json.loads(out.read_text())
    assert [r["method"] for r in resumed["runs"]] == [
        "full", "smartfrz", "linear"]
    assert resumed["runs"][:2] == saved["runs"]


@pytest.mark.slow
def test_quick_suite_everything(tmp_path, predictor):
    """`--quick` end to end: four scenarios, four methods (minutes)."""
    out = tmp_path / "suite.json"
    suite.main(["--quick", "--predictor", predictor, "--out", str(out),
                "--report", str(tmp_path / "B.md"), "--plots",
                str(tmp_path)])
    saved = json.loads(out.read_text())
    assert saved["errors"] == []
    assert len(saved["runs"]) == 4 * 4
    assert set(saved["scenarios"]) == set(suite.SCENARIOS)


def test_time_is_the_epochs_not_fits_teardown():
    """A wait after the last epoch (tf.data's teardown) is not training
    time, whichever run it hits."""
    results = _fake_results()
    plain = report.summarize(results)["toy"]["smartfrz"]["time_saved"]
    for run in results["runs"]:
        if run["method"] == "full":
            run["fit_seconds"] += 40.0
    assert report.summarize(results)["toy"]["smartfrz"]["time_saved"] == (
        pytest.approx(plain))
    assert report.train_seconds({"fit_seconds": 7.0}) == 7.0


def test_target_two_needs_a_real_saving():
    results = _fake_results()
    for run in results["runs"]:
        if run["method"] != "full":  # everything slower than full training
            run["fit_seconds"] = 120.0 + run["seed"]
            run["epoch_seconds"] = [run["fit_seconds"] / 4] * 4
    lines = report.targets(results, report.summarize(results))
    assert ": missed" in lines[0] and ": missed" in lines[1]
    assert "the baseline saved nothing" in lines[1]


def test_frozen_batchnorm_reaches_every_freezing_method():
    assert suite.parse_args([]).frozen_batchnorm == "batch_statistics"
    args = suite.parse_args(["--frozen-batchnorm", "inference"])
    for method in ("linear", "autofreeze"):
        freezer = suite.make_freezer(method, None, args.frozen_batchnorm)
        assert freezer.get_config()["frozen_batchnorm"] == "inference"
    assert suite.make_freezer("full", None, "inference") is None
    with pytest.raises(SystemExit):
        suite.parse_args(["--frozen-batchnorm", "train"])


def _previous_suite(predictor="P1", frozen_batchnorm="batch_statistics"):
    size = json.loads(json.dumps(
        suite.dataclasses.asdict(suite.SIZES["vit_scratch"]["full"])))
    return {
        "profile": "full",
        "frozen_batchnorm": frozen_batchnorm,
        "predictor": predictor,
        "command": "python benchmarks/suite.py",
        "scenarios": {"vit_scratch": {"size": size},
                      "resnet_scratch": {"size": dict(size, epochs=99)}},
        "runs": [{"scenario": s, "seed": 0, "method": m}
                 for s in ("vit_scratch", "resnet_scratch")
                 for m in suite.METHODS],
    }


def _new_results(predictor):
    return {"predictor": predictor, "command": "python benchmarks/suite.py "
            "--resume", "scenarios": {}, "runs": []}


def test_resume_keeps_runs_of_unchanged_sizes_and_the_same_predictor():
    results = _new_results("P1")
    message = suite.resume_from(_previous_suite(), results, "full",
                                "batch_statistics")
    assert message == "resuming: 4 runs kept"
    assert {r["scenario"] for r in results["runs"]} == {"vit_scratch"}
    assert set(results["scenarios"]) == {"vit_scratch"}  # resnet resized
    assert results["command"] == ("python benchmarks/suite.py; then "
                                  "python benchmarks/suite.py --resume")


def test_resume_with_a_new_predictor_drops_only_smartfrz_runs():
    results = _new_results("P2")
    message = suite.resume_from(_previous_suite(), results, "full",
                                "batch_statistics")
    assert "1 SmartFRZ runs made with another predictor" in message
    assert [r["method"] for r in results["runs"]] == [
        "full", "linear", "autofreeze"]
    # A resume that runs no SmartFRZ keeps the SmartFRZ runs and their
    # predictor.
    results = _new_results(None)
    suite.resume_from(_previous_suite(), results, "full", "batch_statistics")
    assert len(results["runs"]) == 4 and results["predictor"] == "P1"


def test_resume_refuses_another_profile_or_batchnorm_mode():
    for profile, mode in (("quick", "batch_statistics"),
                          ("full", "inference")):
        results = _new_results("P1")
        message = suite.resume_from(_previous_suite(), results, profile, mode)
        assert message.startswith("not resuming")
        assert results["runs"] == []


def test_smartfrz_args_reach_smartfrz_and_decide_resumption(predictor):
    args = suite.parse_args(["--smartfrz-arg", "min_epochs=3",
                             "--smartfrz-arg", "freeze_threshold=0.8"])
    assert args.smartfrz_args == {"min_epochs": 3, "freeze_threshold": 0.8}
    freezer = suite.make_freezer("smartfrz", predictor, "batch_statistics",
                                 args.smartfrz_args)
    assert freezer.min_epochs == 3
    assert freezer.get_config()["freeze_threshold"] == 0.8
    for bad in ("min_epochs", "min_epochs=three", "2x=1"):
        with pytest.raises(SystemExit):
            suite.parse_args(["--smartfrz-arg", bad])
    results = dict(_new_results("P1"), smartfrz_args={"min_epochs": 3})
    message = suite.resume_from(_previous_suite(), results, "full",
                                "batch_statistics")
    assert "1 SmartFRZ runs made with another predictor" in message


def test_steps_per_epoch_resizes_every_scenario_and_decides_resumption():
    args = suite.parse_args(["--steps-per-epoch", "938"])
    assert args.steps_per_epoch == 938
    size = suite.scenario_size("vit_scratch", "full", args.steps_per_epoch)
    assert size.steps_per_epoch == 938
    assert size.epochs == suite.SIZES["vit_scratch"]["full"].epochs
    assert suite.scenario_size("vit_scratch", "full") == (
        suite.SIZES["vit_scratch"]["full"])
    # Runs made at the default size are not resumed into a resized suite.
    results = _new_results("P1")
    message = suite.resume_from(_previous_suite(), results, "full",
                                "batch_statistics", 938)
    assert message == "resuming: 0 runs kept" and results["runs"] == []
    with pytest.raises(SystemExit):
        suite.parse_args(["--steps-per-epoch", "0"])
