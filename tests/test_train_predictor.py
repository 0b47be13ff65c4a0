"""Tests of tools/train_predictor.py: its pure pieces and a tiny pipeline."""

import dataclasses
import importlib.util
import json
import pathlib
import sys

import keras
import numpy as np
import pytest

from keras_smartfrz import cka
from keras_smartfrz import datasets
from keras_smartfrz import predictor as predictor_lib

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_TOOL = _ROOT / "tools" / "train_predictor.py"
_spec = importlib.util.spec_from_file_location("train_predictor", _TOOL)
tp = importlib.util.module_from_spec(_spec)
sys.modules["train_predictor"] = tp
_spec.loader.exec_module(tp)

TINY = tp.Profile(
    name="tiny",
    archs=("mlp", "cnn"),
    seeds=(0,),
    window_size=4,
    sample_size=32,
    probe_size=16,
    validation_size=32,
    epochs=3,
    train_size=128,
    batch_size=16,
    holdout=("cnn",),
    predictor={"hidden_units": 8, "embedding_units": 4, "classifier_units": 4},
    train_epochs=2,
)


def _has_fashion_mnist():
    try:
        datasets.load_fashion_mnist()
    except FileNotFoundError:
        return False
    return True


def _has_mnist():
    try:
        datasets.load_mnist()
    except FileNotFoundError:
        return False
    return True


# ------------------------------------------------------------ pure pieces
def test_freeze_label_needs_threshold_from_e_on():
    curve = np.array(
        [
            [0.50, 0.96, 0.97, 1.00],
            [0.96, 0.90, 0.97, 1.00],
            [0.99, 0.99, 0.99, 1.00],
        ]
    )
    labels = tp.freeze_labels(curve, threshold=0.95)
    assert labels.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]


def test_freeze_label_threshold_is_inclusive():
    assert tp.freeze_labels(np.array([[0.95, 1.0]]), 0.95).tolist() == [[1, 1]]


def test_freeze_label_with_undefined_cka():
    curve = np.array([[0.5, np.nan, 1.0], [np.nan, 0.5, 1.0]])
    # A NaN hides the answer unless a known failure comes at or after it.
    assert tp.freeze_labels(curve, 0.95).tolist() == [[0, -1, 1], [0, 0, 1]]


def test_relative_label_waits_for_most_of_a_small_change():
    # Unit 0 starts far from its final representation (from scratch), unit
    # 1 close to it (fine-tuning): both pass the absolute 0.95 after epoch 0.
    curve = np.array([[0.96, 0.97, 0.99, 1.0], [0.97, 0.98, 0.995, 1.0]])
    start = np.array([0.30, 0.96])
    assert tp.freeze_labels(curve, 0.95).tolist() == [[1] * 4, [1] * 4]
    relative = tp.freeze_labels(curve, 0.95, start, remaining_fraction=0.2)
    # Unit 0: 1-CKA <= 0.2 * 0.70 = 0.14 everywhere; unit 1 must be within
    # 0.2 * 0.04 = 0.008 of the end, reached at epoch 2 only.
    assert relative.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    # An undefined start falls back to the absolute rule.
    nan_start = tp.freeze_labels(curve, 0.95, np.array([np.nan, np.nan]), 0.2)
    assert nan_start.tolist() == [[1] * 4, [1] * 4]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_relative_label_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match=repr(fraction)):
        tp.freeze_labels(np.ones((1, 2)), 0.95, np.zeros(1), fraction)


def test_epoch_windows_end_at_each_epoch():
    steps = np.arange(2, 33, 2)  # a snapshot every 2 steps, 16 steps/epoch
    windows = tp.epoch_windows(steps, [16, 32], window_size=4)
    assert steps[windows[0]].tolist() == [10, 12, 14, 16]
    assert steps[windows[1]].tolist() == [26, 28, 30, 32]
    assert tp.epoch_windows(steps, [4, 16], window_size=4)[0] is None


def test_cka_to_final_compares_with_the_last_epoch():
    rng = np.random.default_rng(0)
    final = rng.normal(size=(12, 5))
    close = final + 0.1 * rng.normal(size=(12, 5))
    outputs = [rng.normal(size=(12, 5)), close, final]
    grams = np.array([[tp.normalized_gram(o) for o in outputs]])
    curve = tp.cka_to_final(grams)
    assert curve.shape == (1, 3)
    assert curve[0, 2] == pytest.approx(1.0, abs=1e-3)
    expected = cka.linear_cka(close, final)
    assert curve[0, 1] == pytest.approx(expected, abs=2e-3)
    assert curve[0, 0] < curve[0, 1]


def test_normalized_gram_has_unit_norm_and_zero_for_constants():
    gram = tp.normalized_gram(np.random.default_rng(1).normal(size=(8, 3)))
    assert gram.dtype == np.float16
    norm = np.linalg.norm(gram.astype(np.float64))
    assert norm == pytest.approx(1.0, abs=1e-3)
    assert not tp.normalized_gram(np.ones((8, 3))).any()


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(2)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60), 1)  # with ties
    pos, neg = scores[labels], scores[~labels]
    expected = np.mean(
        (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    )
    assert tp.roc_auc(labels, scores) == pytest.approx(expected)
    assert tp.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert tp.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert np.isnan(tp.roc_auc([1, 1], [0.1, 0.2]))


def test_classification_metrics_by_hand():
    metrics = tp.classification_metrics(
        [1, 1, 0, 0, 1], [0.9, 0.2, 0.7, 0.1, 0.6], threshold=0.5
    )
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["windows"] == 5
    assert np.isnan(tp.classification_metrics([1, 0], [0.1, 0.2])["precision"])


def test_unit_outputs_reads_nested_layers_and_restores_them():
    inner = keras.layers.Dense(4, name="inner")
    block = keras.Sequential([inner, keras.layers.ReLU()], name="block")
    head = keras.layers.Dense(2, name="head")
    model = keras.Sequential([keras.Input((3,)), block, head])
    x = np.random.default_rng(3).normal(size=(5, 3)).astype("float32")
    inner_out, head_out = tp.unit_outputs(model, [inner, head], x)
    np.testing.assert_allclose(inner_out, inner(x), rtol=1e-5)
    np.testing.assert_allclose(head_out, model(x), rtol=1e-5)
    assert "call" not in vars(inner) and "call" not in vars(head)


def test_cli_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tp.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("collect", "label", "train", "evaluate", "export", "all"):
        assert command in out


def test_unknown_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown architectures.*'nope'"):
        tp.collect(tmp_path, TINY, archs=("nope",), verbose=0)


def test_ship_refuses_a_quick_profile(tmp_path):
    with pytest.raises(ValueError, match="--ship"):
        tp.run_all(tmp_path, tp.PROFILES["quick"], ship=True, verbose=0)


def test_fine_tuning_archs_in_the_profiles():
    full, quick = tp.PROFILES["full"], tp.PROFILES["quick"]
    fine_tuning = [
        arch for arch, spec in tp.ARCHITECTURES.items() if spec.fine_tuning
    ]
    assert {"cnn_ft", "mlp_ft", "resnet_ft"} <= set(fine_tuning)
    assert set(fine_tuning) <= set(full.archs)
    assert set(full.holdout) == {"resnet", "bert", "resnet_ft"}
    assert any(tp.ARCHITECTURES[a].fine_tuning for a in quick.archs)
    for arch in fine_tuning:
        spec = tp.ARCHITECTURES[arch]
        assert spec.pretrain_dataset in tp.DATASETS
        assert spec.pretrain_dataset != spec.dataset
        assert full.pretrain_steps_of(arch) == spec.pretrain_steps >= 100
        # The profile's override keeps the quick pipeline quick.
        assert quick.pretrain_steps_of(arch) == quick.pretrain_steps <= 16
        epochs, train_size, batch_size = full.recipe(arch)
        assert -(-train_size // batch_size) >= full.window_size
    assert full.pretrain_steps_of("cnn") == quick.pretrain_steps_of("cnn") == 0
    with pytest.raises(ValueError, match="pretrain_steps"):
        tp.Architecture("mnist", tp.build_mlp, 16, 2, pretrain_dataset="mnist")


def test_reinitialize_head_redraws_only_the_head():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, bias_initializer="ones"),
            keras.layers.Dense(3, bias_initializer="ones"),
        ]
    )
    before = [w.copy() for w in model.get_weights()]
    tp.reinitialize_head(model, seed=7)
    after = model.get_weights()
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert not np.allclose(after[2], before[2])
    np.testing.assert_array_equal(after[3], np.ones(3))  # its initializer
    redrawn = after[2].copy()
    tp.reinitialize_head(model, seed=7)
    np.testing.assert_array_equal(model.get_weights()[2], redrawn)


def test_fine_tuning_run_records_only_the_fine_tuning_phase(
    tmp_path, monkeypatch
):
    if not (_has_fashion_mnist() and _has_mnist()):
        pytest.skip("MNIST or Fashion-MNIST is missing (tools/setup.sh).")
    spec = tp.ARCHITECTURES["mlp_ft"]
    built = []

    def build(*args):
        model = spec.build(*args)
        built.append((model, model.get_weights()))
        return model

    monkeypatch.setitem(
        tp.ARCHITECTURES, "mlp_ft", dataclasses.replace(spec, build=build)
    )
    profile = dataclasses.replace(TINY, archs=("mlp_ft",), pretrain_steps=12)
    path = tp.collect_run("mlp_ft", 0, profile, tmp_path, verbose=0)
    [(model, fresh)] = built
    meta = tp.read_meta(path)
    assert meta["dataset"] == "fashion_mnist"
    pretrain = meta["pretrain"]
    assert pretrain["dataset"] == "mnist"
    assert (pretrain["steps"], pretrain["batch_size"]) == (12, 16)
    assert pretrain["examples"] == 12 * 16
    assert pretrain["new_head"] is True
    assert pretrain["optimizer"]["class"] == "Adam"  # build_mlp's own
    assert meta["optimizer"] == {
        "class": "SGD", "learning_rate": 0.005, "momentum": 0.9,
        "nesterov": False,
    }
    assert set(meta["history"]) >= {"loss", "accuracy"}
    assert len(meta["history"]["loss"]) == 3

    units = tp.find_units(model)
    sample = tp.WeightSampler(
        units,
        [
            tp.draw_sample_positions(unit.num_params, 32, 0, index)
            for index, unit in enumerate(units)
        ],
    )
    with np.load(path) as run:
        snapshots = run["snapshots"]
        # Only the fine-tuning: 3 epochs x 8 steps, a snapshot every 2.
        assert run["snapshot_steps"].tolist() == list(range(2, 25, 2))
        assert run["epoch_end_steps"].tolist() == [8, 16, 24]
        assert snapshots.shape == (4, 3 * 4, 32)
        assert run["grams"].shape == (4, 3, 16, 16)
    # The trajectory ends at the final model...
    np.testing.assert_allclose(snapshots[:, -1], sample(), rtol=1e-6)
    final = model.get_weights()
    # ...and starts far from the freshly built one: 12 pretraining steps
    # moved the body much more than the 2 fine-tuning steps to the first
    # snapshot, or than any later 2 steps.
    model.set_weights(fresh)
    body = slice(0, len(units) - 1)
    from_fresh = np.abs(snapshots[body, 0] - sample()[body]).mean()
    per_interval = np.abs(np.diff(snapshots[body], axis=1)).mean(axis=(0, 2))
    assert from_fresh > 3 * per_interval.max()
    model.set_weights(final)


# ---------------------------------------------------------- tiny pipeline
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    if not _has_fashion_mnist():
        pytest.skip("Fashion-MNIST is not installed (tools/setup.sh).")
    root = tmp_path_factory.mktemp("pipeline")
    runs = tp.collect(root / "runs", TINY, verbose=0)
    tp.main(
        ["label", "--runs", str(root / "runs"), "--out", str(root / "data.npz")]
    )
    tp.train(
        root / "data.npz",
        root / "predictor",
        holdout=TINY.holdout,
        epochs=TINY.train_epochs,
        batch_size=8,
        predictor_config=TINY.predictor,
        verbose=0,
    )
    report = tp.evaluate(root / "data.npz", root / "predictor", verbose=0)
    return {"root": root, "runs": runs, "report": report}


def test_collect_records_the_engine_schedule(pipeline):
    assert sorted(p.name for p in pipeline["runs"]) == [
        "run-cnn-s0.npz",
        "run-mlp-s0.npz",
    ]
    with np.load(pipeline["root"] / "runs" / "run-mlp-s0.npz") as run:
        # 128 examples / batch 16 = 8 steps per epoch; window 4 -> every 2.
        assert run["snapshot_steps"].tolist() == list(range(2, 25, 2))
        assert run["epoch_end_steps"].tolist() == [8, 16, 24]
        assert run["snapshots"].shape == (4, 12, 32)  # 4 Dense units
        assert run["grams"].shape == (4, 3, 16, 16)
        assert run["unit_names"].tolist()[-1].endswith("dense_3")
        # The snapshots move: real training was recorded.
        assert np.abs(np.diff(run["snapshots"], axis=1)).max() > 0


def test_recorded_windows_are_the_engine_windows():
    """Training data and inference must see the very same windows."""
    from keras_smartfrz import FreezingCallback
    from keras_smartfrz import policies

    class Spy(policies.FreezePolicy):
        def __init__(self):
            self.windows = []

        def decide(self, stage):
            self.windows.append(np.array(stage.window))
            zeros = np.zeros(len(stage.unit_names))
            return zeros, zeros > 0

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer="adam", loss=tp._loss())
    x = np.random.default_rng(4).normal(size=(80, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    spy = Spy()
    engine = FreezingCallback(spy, window_size=3, sample_size=16, seed=5)
    recorder = tp.RunRecorder(
        tp.find_units(model), sample_size=16, seed=5, window_size=3,
        probe_inputs=x[:8],
    )
    model.fit(
        x, y, batch_size=8, epochs=3, callbacks=[engine, recorder], verbose=0
    )
    snapshots = np.stack(recorder.snapshots, axis=1)
    windows = tp.epoch_windows(
        recorder.snapshot_steps, recorder.epoch_end_steps, window_size=3
    )
    assert len(spy.windows) == 3
    for engine_window, index in zip(spy.windows, windows):
        # The engine drops the head, the last unit.
        np.testing.assert_array_equal(snapshots[:-1, index], engine_window)
    assert np.array(recorder.grams).shape == (3, 3, 8, 8)
    assert np.array(recorder.initial_grams).shape == (3, 8, 8)


def test_relative_label_is_stricter_and_recorded(pipeline, tmp_path):
    runs = pipeline["root"] / "runs"
    with np.load(runs / "run-mlp-s0.npz") as run:
        assert run["initial_grams"].shape == run["grams"][:, 0].shape
        start = tp.start_cka(run)
        assert start.shape == (len(run["unit_names"]),)
        assert np.all((start > 0.0) & (start <= 1.0 + 1e-6))
    tp.label(runs, tmp_path / "rel.npz", remaining_fraction=0.05, verbose=0)
    relative, meta = tp.load_dataset(tmp_path / "rel.npz")
    absolute, _ = tp.load_dataset(pipeline["root"] / "data.npz")
    assert meta["remaining_fraction"] == 0.05
    # Same windows; a "freeze" under the relative rule is one under the
    # absolute rule too.
    np.testing.assert_array_equal(relative["cka"], absolute["cka"])
    assert np.all(absolute["labels"][relative["labels"] == 1] == 1)


def test_start_cka_needs_initial_grams(tmp_path):
    path = tmp_path / "run-old-s0.npz"
    np.savez(path, grams=np.ones((2, 3, 4, 4)))  # collected before them
    with np.load(path) as run, pytest.raises(
            ValueError, match="run-old-s0.npz' has no initial_grams"):
        tp.start_cka(run)


def test_label_rule_report(pipeline, tmp_path):
    from conftest import load_script

    label_rule = load_script("benchmarks", "label_rule")
    out = tmp_path / "label_rule.md"
    label_rule.main([str(pipeline["root"] / "runs"), "--out", str(out)])
    text = out.read_text()
    assert "| mlp s0 | from scratch |" in text
    assert "CKA 0.95, remaining 0.1" in text
    rules = [(0.95, None), (0.95, 0.3), (0.95, 0.1), (0.99, None)]
    row = label_rule.analyse(
        pipeline["root"] / "runs" / "run-mlp-s0.npz", rules)
    share = {rule: row["rules"][rule]["share"] for rule in rules}
    # A relative rule is stricter than the absolute one, a smaller fraction
    # stricter still, and so is a higher threshold.
    assert share[(0.95, None)] >= share[(0.95, 0.3)] >= share[(0.95, 0.1)]
    assert share[(0.95, None)] >= share[(0.99, None)]


def test_label_reference_labels_against_the_best_epoch():
    from conftest import load_script

    reference = load_script("benchmarks", "label_reference")
    rng = np.random.default_rng(0)

    def gram(x):
        return cka.centered_gram(x)

    settled = rng.normal(size=(12, 5))
    grams = np.stack([
        # Unit 0 reaches the best epoch's representation at epoch 1.
        [gram(rng.normal(size=(12, 5))), gram(settled), gram(settled),
         gram(rng.normal(size=(12, 5)))],
        # Unit 1 differs from it until the best epoch.
        [gram(rng.normal(size=(12, 5))) for _ in range(2)]
        + [gram(settled), gram(rng.normal(size=(12, 5)))],
        # Unit 2 is constant before the best epoch: CKA undefined.
        [np.zeros((12, 12))] * 2 + [gram(settled)] * 2,
    ])
    labels = reference.best_reference_labels(grams, best=2, threshold=0.95)
    # At and after the best epoch (index 2) every window is "freeze".
    assert labels.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [-1, -1, 1, 1]]


def test_label_reference_report(pipeline, tmp_path):
    from conftest import load_script

    reference = load_script("benchmarks", "label_reference")
    out = tmp_path / "reference"
    result = reference.main([
        "--runs", str(pipeline["root"] / "runs"),
        "--dataset", str(pipeline["root"] / "data.npz"),
        "--predictor", str(pipeline["root"] / "predictor"), "--out", str(out),
    ])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [run["run"] for run in saved["runs"]] == ["run-cnn-s0",
                                                     "run-mlp-s0"]
    for run in saved["runs"]:
        assert 1 <= run["best_epoch"] <= run["epochs"] == 3
    assert saved["archs"]["cnn"]["held_out"] is True
    assert saved["archs"]["mlp"]["held_out"] is False
    # The final-model reference is the dataset's own labels: the same
    # metrics `evaluate` wrote into the card.
    card = json.loads(
        (pipeline["root"] / "predictor" / "predictor_card.json").read_text()
    )
    for key in ("windows", "freeze_share", "predicted_share"):
        assert saved["archs"]["cnn"]["final"][key] == pytest.approx(
            card["metrics"]["per_arch"]["cnn"][key])
    assert "| cnn | yes | 6 |" in out.with_suffix(".md").read_text()
    assert result["archs"].keys() == saved["archs"].keys()


def test_predictor_variants_report(pipeline, tmp_path):
    from conftest import load_script

    variants = load_script("benchmarks", "predictor_variants")
    out = tmp_path / "variants.md"
    argv = ["--runs", str(pipeline["root"] / "runs"),
            "--workdir", str(tmp_path / "w"), "--rules", "0.95", "0.99",
            "--holdout", "cnn", "--quick", "--out", str(out)]
    results = variants.main(argv)
    text = out.read_text()
    assert "| CKA 0.95 | yes | cnn | 6 |" in text
    assert "| CKA 0.99 | no | pooled | 6 |" in text
    rows = results["CKA 0.95"]
    assert [row["use_progress"] for row in rows] == [False, True]
    assert predictor_lib.load_predictor(rows[1]["path"]).use_progress
    timing = rows[0]["first_freeze"]["cnn"]
    # 3 candidate units of one cnn run, each counted once.
    assert timing["units"] == 3
    assert (timing["too_early"] + timing["on_time_or_later"]
            + timing["never"]) == 3
    # A second call reuses the trained predictors instead of retraining.
    again = variants.main(argv)
    assert again["CKA 0.95"][0]["train_seconds"] is None
    assert json.loads(out.with_suffix(".json").read_text())["command"]


def test_collect_resumes_and_checks_settings(pipeline):
    path = pipeline["root"] / "runs" / "run-mlp-s0.npz"
    before = path.stat().st_mtime_ns
    tp.collect(pipeline["root"] / "runs", TINY, archs=("mlp",), verbose=0)
    assert path.stat().st_mtime_ns == before
    other = dataclasses.replace(TINY, sample_size=64)
    with pytest.raises(ValueError, match="collected with"):
        tp.collect(pipeline["root"] / "runs", other, archs=("mlp",), verbose=0)


def test_label_writes_consistent_windows(pipeline):
    arrays, meta = tp.load_dataset(pipeline["root"] / "data.npz")
    count = len(arrays["labels"])
    # mlp: 3 candidate units (head excluded) x 2 epochs (last excluded);
    # cnn: 3 candidates (conv+BN, conv+BN, dense) x 2 epochs.
    assert count == 12
    assert arrays["windows"].shape == (count, 4, 32)
    np.testing.assert_array_equal(arrays["windows"][:, 0], 0.0)
    assert set(arrays["labels"].tolist()) <= {0, 1}
    assert np.all(arrays["cka"][arrays["labels"] == 1] >= meta["cka_threshold"])
    assert np.all(arrays["unit_index"] < arrays["num_units"] - 1)
    assert np.all(arrays["epoch"] < arrays["epochs"] - 1)
    assert sorted(set(arrays["arch"].tolist())) == ["cnn", "mlp"]
    assert meta["normalization"] == predictor_lib.NORMALIZATION


def test_train_writes_a_loadable_predictor_with_card(pipeline):
    predictor = predictor_lib.load_predictor(pipeline["root"] / "predictor")
    assert (predictor.window_size, predictor.sample_size) == (4, 32)
    training = predictor.card["training"]
    assert training["held_out_archs"] == ["cnn"]
    assert training["train_archs"] == ["mlp"]
    assert training["windows"]["held_out"] == 6
    assert not (pipeline["root"] / "predictor" / "backup").exists()


def test_progress_predictor_trains_on_the_windows_epochs(pipeline, tmp_path):
    data = pipeline["root"] / "data.npz"
    arrays, _ = tp.load_dataset(data)
    features = tp.dataset_features(arrays, use_progress=True)
    np.testing.assert_array_equal(features[:, :-1], arrays["features"])
    np.testing.assert_allclose(
        features[:, -1], (arrays["epoch"] + 1) / arrays["epochs"])
    assert tp.dataset_features(arrays) is arrays["features"]
    tp.main([
        "train", "--data", str(data), "--out", str(tmp_path / "p"),
        "--holdout", "cnn", "--epochs", "1", "--batch-size", "8",
        "--hidden-units", "8", "--embedding-units", "4",
        "--classifier-units", "4", "--use-progress",
    ])
    predictor = predictor_lib.load_predictor(tmp_path / "p")
    assert predictor.use_progress and predictor.num_features == 6
    report = tp.evaluate(data, tmp_path / "p", verbose=0)
    assert report["cnn"]["held_out"] and report["cnn"]["windows"] == 6


def test_evaluate_reports_each_architecture(pipeline):
    report = pipeline["report"]
    assert report["cnn"]["held_out"] and not report["mlp"]["held_out"]
    for row in report.values():
        assert row["windows"] == 6
        assert set(row) >= {"precision", "recall", "auc", "freeze_share"}
    card = json.loads(
        (pipeline["root"] / "predictor" / "predictor_card.json").read_text()
    )
    assert card["metrics"]["per_arch"]["cnn"]["held_out"] is True
    assert card["metrics"]["held_out_pooled"]["windows"] == 6


def test_export_copies_a_loadable_predictor(pipeline, tmp_path):
    targets = tp.export(
        pipeline["root"] / "predictor", tmp_path / "assets", verbose=0
    )
    assert [t.name for t in targets] == [
        "predictor.weights.h5",
        "predictor_card.json",
    ]
    loaded = predictor_lib.load_predictor(tmp_path / "assets")
    assert loaded.card["metrics"]["per_arch"]


def test_export_refuses_a_broken_predictor(pipeline, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    source = pipeline["root"] / "predictor"
    (broken / "predictor_card.json").write_text(
        (source / "predictor_card.json").read_text()
    )
    (broken / "predictor.weights.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="predictor.weights.h5"):
        tp.export(broken, tmp_path / "assets", verbose=0)
    assert not (tmp_path / "assets").exists()
