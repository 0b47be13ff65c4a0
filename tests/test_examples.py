"""Smoke tests of the example scripts, run with tiny arguments."""

import math

from conftest import load_script


def _load_example(name):
    return load_script("examples", name)


def test_quickstart_runs_and_reports(capsys):
    quickstart = _load_example("quickstart")
    results = quickstart.main(
        ["--epochs", "2", "--train-size", "1024", "--batch-size", "32",
         "--test-size", "1000"]
    )
    out = capsys.readouterr().out

    assert results["freezer"] == "SmartFRZ"  # the shipped predictor
    assert results["epochs"] == 2 and results["train_size"] == 1024
    assert results["test_size"] == 1000
    for key in ("freeze_accuracy", "full_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    for key in ("freeze_seconds", "full_seconds"):
        assert results[key] > 0.0
    assert len(results["freeze_epoch_seconds"]) == 2
    assert len(results["full_epoch_seconds"]) == 2
    assert math.isclose(
        results["seconds_saved"],
        results["full_seconds"] - results["freeze_seconds"],
    )
    assert 0.0 <= results["frozen_fraction"] < 1.0  # the head never freezes
    frozen_units = [layer for _, layer in results["frozen"]]
    assert all(unit in results["frozen_layers"] for unit in frozen_units)
    assert all(1 <= epoch <= 2 for epoch, _ in results["frozen"])

    assert 0.0 < results["overhead_share"] < 1.0
    assert "What SmartFRZ froze" in out
    assert "Test accuracy" in out
    assert f"{results['full_accuracy']:.4f}" in out
    assert "time saved" in out


def test_quickstart_runs_a_baseline(capsys):
    quickstart = _load_example("quickstart")
    results = quickstart.main(
        ["--epochs", "2", "--train-size", "512", "--batch-size", "64",
         "--test-size", "500", "--freezer", "autofreeze"]
    )
    assert results["freezer"] == "AutoFreeze"
    assert "What AutoFreeze froze" in capsys.readouterr().out
