"""Smoke runs of the caching benchmarks (benchmarks/caching.py): the
scripts run end to end on tiny sizes and write what their reports read."""

import json

from conftest import load_script

caching_benchmark = load_script("benchmarks", "caching")


def test_cnn_scenario_smoke(tmp_path):
    out = tmp_path / "caching.json"
    caching_benchmark.main([
        "--seeds", "0", "--epochs", "3", "--steps", "4",
        "--pretrain-steps", "4", "--test-size", "64",
        "--methods", "full", "linear+cache",
        "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["scenario"] == "cnn_finetune"
    assert [r["method"] for r in saved["runs"]] == ["full", "linear+cache"]
    full, linear = saved["runs"]
    assert len(full["epoch_seconds"]) == 3
    assert 0.0 <= linear["test_accuracy"] <= 1.0
    assert linear["cache"]["status"] in ("off", "filling", "active")
    text = out.with_suffix(".md").read_text()
    assert "| 0 | linear+cache |" in text and "(cnn_finetune" not in text


def test_minilm_scenario_smoke(tmp_path):
    """MiniLM with dropout off, on token dicts (the suite's tokenisation)."""
    out = tmp_path / "caching_minilm.json"
    caching_benchmark.main([
        "--scenario", "minilm_finetune", "--seeds", "0", "--epochs", "1",
        "--steps", "2", "--test-size", "32", "--methods", "full",
        "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["scenario"] == "minilm_finetune"
    assert saved["steps_per_epoch"] == 2
    (run,) = saved["runs"]
    assert len(run["epoch_seconds"]) == 1
    assert "(minilm_finetune, dropout 0)" in out.with_suffix(".md").read_text()
