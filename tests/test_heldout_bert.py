"""benchmarks/heldout_bert.py runs end to end on a tiny BERT fit."""

import json

from conftest import load_script

heldout = load_script("benchmarks", "heldout_bert")


def test_smoke(tmp_path):
    out = tmp_path / "heldout"
    payload = heldout.main(["--recipes", "bert", "--seeds", "0",
                            "--epochs", "2", "--train-size", "512",
                            "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["command"].endswith("--out " + str(out))
    (run,) = payload["results"]
    assert run["recipe"] == "bert" and run["steps_per_epoch"] == 16
    full, frz = run["full"], run["smartfrz"]
    assert len(full["epoch_seconds"]) == len(frz["epoch_seconds"]) == 2
    # Both runs start from the same weights and read the same batches: up
    # to the first stage that freezes something they are the same run. The
    # shipped predictor freezes only at the end of the last epoch here, so
    # every epoch's accuracy agrees.
    assert frz["freeze_epochs"] in ([], [2])
    assert frz["test_accuracy_by_epoch"] == full["test_accuracy_by_epoch"]
    assert "| bert | 0 |" in out.with_suffix(".md").read_text()
