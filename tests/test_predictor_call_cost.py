"""benchmarks/predictor_call_cost.py runs end to end on a tiny fit, and the
three ways of calling the predictor give the same scores."""

import json

from conftest import load_script

cost = load_script("benchmarks", "predictor_call_cost")


def test_smoke(tmp_path):
    out = tmp_path / "cost.json"
    results = cost.main(["--sequence", "3", "1", "--rounds", "1",
                         "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["sequence"] == [3, 1]
    assert saved["command"].endswith("--out " + str(out))
    assert [row["mode"] for row in results["rows"]] == list(cost.MODES)
    for row in results["rows"]:
        assert row["first_ms"] > 0 and row["total_ms"] >= row["first_ms"]
        assert row["max_abs_difference_from_eager"] < 1e-5
    assert "| numpy |" in out.with_suffix(".md").read_text()
