"""Smoke tests of the example scripts, run with tiny arguments."""

import importlib.util
import math
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load_example(name):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", EXAMPLES / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs_and_reports(capsys):
    quickstart = _load_example("quickstart")
    results = quickstart.main(
        ["--epochs", "2", "--train-size", "1024", "--batch-size", "128",
         "--test-size", "1000"]
    )
    out = capsys.readouterr().out

    assert results["freezer"] == "AutoFreeze"
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

    assert "What AutoFreeze froze" in out
    assert "Test accuracy" in out
    assert f"{results['full_accuracy']:.4f}" in out
    assert "time saved" in out
