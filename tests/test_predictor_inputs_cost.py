"""benchmarks/predictor_inputs_cost.py runs end to end on tiny sizes, and
the two ways of working a window agree."""

import json

from conftest import load_script

cost = load_script("benchmarks", "predictor_inputs_cost")


def test_smoke(tmp_path):
    out = tmp_path / "cost.json"
    results = cost.main(["--units", "1", "3", "--repeats", "2",
                         "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["units"] for r in saved["rows"]] == [1, 3]
    assert saved["command"].endswith("--out " + str(out))
    for row in results["rows"]:
        assert row["float32_ms"] > 0 and row["float64_ms"] > 0
        assert row["max_abs_difference"] < 1e-3
    assert "| 3 |" in out.with_suffix(".md").read_text()
