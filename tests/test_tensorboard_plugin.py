import argparse
import importlib.metadata

import keras
import pytest
import tensorflow as tf
from tensorboard import default as tensorboard_default
from tensorboard.backend import application
from tensorboard.backend.event_processing import data_provider
from tensorboard.backend.event_processing import plugin_event_multiplexer
from werkzeug import test as werkzeug_test

import keras_smartfrz
from keras_smartfrz.tensorboard_plugin import metadata
from keras_smartfrz.tensorboard_plugin import plugin as smartfrz_plugin
from conftest import mlp
from conftest import toy_data

PLUGIN = "/data/plugin/smartfrz"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """Two runs: `linear` (beside keras.callbacks.TensorBoard) and `any`."""
    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("logs")
    x, y = toy_data(64)
    frozen = {}
    for name, kwargs in (
        ("linear", {"freeze_start": 0.25}),
        ("any", {"freeze_start": 0.5, "mode": "any"}),
    ):
        freezer = keras_smartfrz.LinearFreezing(log_dir=root / name, **kwargs)
        board = keras.callbacks.TensorBoard(log_dir=str(root / name))
        mlp().fit(x, y, batch_size=16, epochs=4, verbose=0,
                  callbacks=[freezer, board])
        frozen[f"{name}/smartfrz"] = {
            d.layer: d.epoch for d in freezer.decisions if d.frozen}
        keras.backend.clear_session()
    return root, frozen


def make_client(root, path_prefix=""):
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(root))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(root))
    flags = argparse.Namespace(logdir=str(root), path_prefix=path_prefix,
                               samples_per_plugin={}, window_title="")
    app = application.TensorBoardWSGIApp(
        flags, [smartfrz_plugin.SmartFRZLoader], data_provider=provider)
    return werkzeug_test.Client(app)


@pytest.fixture(scope="module")
def client(logdir):
    return make_client(logdir[0])


def get(client, path, **kwargs):
    response = client.get(path, **kwargs)
    assert response.headers.get("X-Content-Type-Options") == "nosniff", path
    return response


def test_tensorboard_finds_the_plugin_through_our_entry_point():
    entry = [e for e in importlib.metadata.entry_points(
        group="tensorboard_plugins") if e.name == "smartfrz"]
    assert len(entry) == 1, (
        "no smartfrz entry point: re-run `pip install -e .` to register it")
    assert entry[0].dist.name == "keras-smartfrz"
    assert entry[0].load() is smartfrz_plugin.SmartFRZLoader
    assert smartfrz_plugin.SmartFRZLoader in (
        tensorboard_default.get_dynamic_plugins())


def test_plugins_listing_shows_an_enabled_iframe_dashboard(client):
    listing = get(client, "/data/plugins_listing").get_json()
    assert listing["smartfrz"]["enabled"] is True
    assert listing["smartfrz"]["tab_name"] == "SmartFRZ"
    assert listing["smartfrz"]["loading_mechanism"] == {
        "type": "IFRAME", "module_path": PLUGIN + "/static/index.js"}


def test_runs_lists_only_runs_with_smartfrz_data(client):
    response = get(client, PLUGIN + "/runs")
    assert response.status_code == 200
    assert response.get_json() == {"runs": [
        {"run": "any/smartfrz", "last_epoch": 3},
        {"run": "linear/smartfrz", "last_epoch": 3}]}


def test_timeline_tells_what_froze_when(client, logdir):
    _, frozen = logdir
    for run, expected in frozen.items():
        response = get(client, PLUGIN + "/timeline", query_string={"run": run})
        assert response.status_code == 200, run
        timeline = response.get_json()
        assert timeline["run"] == run
        assert timeline["epochs"] == [0, 1, 2, 3]
        assert [u["name"] for u in timeline["units"]] == [
            "mlp/d0", "mlp/d1", "mlp/d2", "mlp/head"]
        assert {u["name"]: u["frozen_epoch"] for u in timeline["units"]
                if u["frozen_epoch"] is not None} == expected
        assert timeline["units"][0]["num_params"] == 112
        head = timeline["units"][-1]
        assert head["frozen_epoch"] is None and head["scores"] == []
        series = timeline["series"]
        assert [s for s, _ in series["frozen_fraction"]] == [0, 1, 2, 3]
        assert series["frozen_fraction"][-1][1] == pytest.approx(
            len(expected) / 4)
        assert 0.0 <= series["compute_saved"][-1][1] < 2 / 3


def test_timeline_scores_come_per_stage(client):
    timeline = get(client, PLUGIN + "/timeline",
                   query_string={"run": "linear/smartfrz"}).get_json()
    d0 = timeline["units"][0]
    assert d0["frozen_epoch"] == 1
    assert d0["scores"] == [[0, 0.0], [1, 1.0]]  # not scored once frozen


@pytest.mark.parametrize("query, status", [
    ({}, 400),
    ({"run": ""}, 400),
    ({"run": "nope"}, 404),
    ({"run": "linear/train"}, 404),  # a run, but not ours
    ({"run": "linear"}, 404),
    ({"run": "../../etc/passwd"}, 404),
    ({"run": "linear/smartfrz\x00"}, 400),
    ({"run": "x" * 5000}, 400),
    ({"run": "<script>alert(1)</script>"}, 404),
])
def test_bad_run_names_get_a_json_error(client, query, status):
    response = get(client, PLUGIN + "/timeline", query_string=query)
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert "error" in response.get_json()


def test_static_files_are_served_with_their_type(client):
    script = get(client, PLUGIN + "/static/index.js")
    assert script.status_code == 200
    assert script.mimetype == "text/javascript"
    assert b"export async function render()" in script.data
    style = get(client, PLUGIN + "/static/style.css")
    assert style.status_code == 200 and style.mimetype == "text/css"


@pytest.mark.parametrize("path", [
    "/static/../plugin.py",
    "/static/..%2fplugin.py",
    "/static/%2e%2e/plugin.py",
    "/static/%2e%2e%2fplugin.py",
    "/static/%2E%2E%2F%2E%2E%2Fsummaries.py",
    "/static/..%5cplugin.py",
    "/static/%252e%252e%252fplugin.py",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/.",
    "/static/..",
    "/static/.hidden.js",
    "/static/index.js%00.css",
    "/static/sub/index.js",
])
def test_static_route_refuses_traversal(client, path):
    response = get(client, PLUGIN + path)
    assert response.status_code == 400
    assert response.get_json() == {"error": "Not a static file name."}


@pytest.mark.parametrize("name", ["nope.js", "plugin.py", "index.html"])
def test_static_route_serves_only_existing_frontend_files(client, name):
    response = get(client, PLUGIN + "/static/" + name)
    assert response.status_code == 404
    assert "error" in response.get_json()


def test_routes_work_under_a_path_prefix(logdir):
    client = make_client(logdir[0], path_prefix="/tb")
    assert get(client, "/tb" + PLUGIN + "/static/index.js").status_code == 200
    assert get(client, "/tb" + PLUGIN + "/static/%2e%2e/plugin.py"
               ).status_code == 400
    runs = get(client, "/tb" + PLUGIN + "/runs").get_json()["runs"]
    assert len(runs) == 2


def test_without_a_data_provider_there_are_no_runs(tmp_path):
    flags = argparse.Namespace(logdir=str(tmp_path), path_prefix="",
                               samples_per_plugin={}, window_title="")
    app = application.TensorBoardWSGIApp(
        flags, [smartfrz_plugin.SmartFRZLoader], data_provider=None)
    client = werkzeug_test.Client(app)
    assert get(client, PLUGIN + "/runs").get_json() == {"runs": []}
    assert get(client, PLUGIN + "/timeline",
               query_string={"run": "x"}).status_code == 404


def test_unreadable_state_is_a_404_not_a_crash(tmp_path):
    with tf.summary.create_file_writer(str(tmp_path / "broken")).as_default():
        tf.summary.write(metadata.STATE_TAG, tf.constant("{not json"), step=0,
                         metadata=metadata.create_state_metadata())
    client = make_client(tmp_path)
    assert get(client, PLUGIN + "/runs").get_json()["runs"] == [
        {"run": "broken", "last_epoch": 0}]
    response = get(client, PLUGIN + "/timeline",
                   query_string={"run": "broken"})
    assert response.status_code == 404
    assert "Unreadable" in response.get_json()["error"]
