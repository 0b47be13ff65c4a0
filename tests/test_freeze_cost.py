"""benchmarks/freeze_cost.py: its fixed freezing plan, and a tiny grid."""

import json

import numpy as np
import pytest
from conftest import load_script

from keras_smartfrz.policies import FreezeStage

freeze_cost = load_script("benchmarks", "freeze_cost")


def _stage(epoch, candidates, num_units, num_frozen):
    return FreezeStage(
        epoch=epoch, epochs=8,
        unit_names=[f"u{i}" for i in range(candidates)],
        num_units=num_units, num_frozen=num_frozen,
    )


def test_plan_freezes_its_prefix_at_its_epoch_only():
    plan = freeze_cost.PrefixAtEpoch(epoch=2, fraction=0.5)
    # 11 units, the head included: half of the 10 others is 5.
    _, freeze = plan.decide(_stage(0, 10, 11, 0))
    assert not freeze.any()
    _, freeze = plan.decide(_stage(1, 10, 11, 0))
    assert freeze.tolist() == [True] * 5 + [False] * 5
    # Units frozen before count towards the target.
    _, freeze = plan.decide(_stage(1, 8, 11, 2))
    assert freeze.tolist() == [True] * 3 + [False] * 5
    _, freeze = plan.decide(_stage(2, 5, 11, 5))
    assert not freeze.any()
    assert freeze_cost.PrefixAtEpoch(1, 0.01).target(11) == 1
    assert freeze_cost.PrefixAtEpoch(1, 1.0).target(11) == 10
    assert plan.get_config() == {"epoch": 2, "fraction": 0.5}


@pytest.mark.parametrize("kwargs, name", [
    ({"epoch": 0, "fraction": 0.5}, "epoch=0"),
    ({"epoch": True, "fraction": 0.5}, "epoch=True"),
    ({"epoch": 1, "fraction": 0.0}, "fraction=0.0"),
    ({"epoch": 1, "fraction": 1.5}, "fraction=1.5"),
])
def test_plan_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        freeze_cost.PrefixAtEpoch(**kwargs)


def test_tiny_grid(tmp_path):
    out = tmp_path / "cost"
    payload = freeze_cost.main([
        "--recipes", "bert", "--seeds", "0", "--epochs", "2",
        "--freeze-epochs", "1", "2", "--fractions", "1.0",
        "--train-size", "256", "--out", str(out),
    ])
    assert json.loads(out.with_suffix(".json").read_text()) == payload
    (run,) = payload["results"]
    # A freeze at the end of the last epoch changes nothing: not run.
    (cell,) = run["cells"]
    assert cell["freeze_epoch"] == 1 and cell["freeze_epochs"] == [1]
    assert cell["frozen_units"] == cell["units"] - 1
    full = run["full"]
    # The same run as full training up to the freeze, then not.
    assert (cell["test_accuracy_by_epoch"][0]
            == full["test_accuracy_by_epoch"][0])
    assert np.isclose(cell["cost_points"], 100 * (
        full["test_accuracy"] - cell["test_accuracy"]))
    text = out.with_suffix(".md").read_text()
    assert "| bert | 0 | 1 at epoch 1 |" in text
    assert "Cells: 1;" in text


@pytest.mark.parametrize("argv, message", [
    (["--fractions", "0"], "--fractions must be in (0, 1]"),
    (["--freeze-epochs", "0"], "--freeze-epochs must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
])
def test_cli_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit):
        freeze_cost.main(argv)
    assert message in capsys.readouterr().err
