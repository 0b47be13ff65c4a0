"""The SmartFRZ dashboard's backend: a thin HTTP layer over the data provider.

Routes, under `/data/plugin/smartfrz`:

- `/static/<file>`: the frontend (`index.js`, the ES module TensorBoard loads
  in an iframe, and `style.css`). Only plain file names of the `static`
  folder are served; anything else (`..`, absolute or encoded paths) is
  refused.
- `/runs`: the runs that hold SmartFRZ data, as JSON.
- `/timeline?run=<run>`: one run's units, the epoch each froze at, the score
  of each unit at each stage, the frozen fractions and the estimated compute
  saved, as JSON. A missing or malformed run is a 400, an unknown one a 404.

Everything is read through `context.data_provider`, and every response
carries `X-Content-Type-Options: nosniff`.
"""

import json
import os
import re

from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from tensorboard.plugins.scalar import metadata as scalar_metadata
from werkzeug import wrappers

from keras_smartfrz.tensorboard_plugin import metadata

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ROUTE_PREFIX = "/data/plugin/" + metadata.PLUGIN_NAME
STATIC_ROUTE = "/static/"

# A static file is one plain file name: no separators, no leading dot.
_STATIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9]+)+")
_MIMETYPES = {".js": "text/javascript", ".css": "text/css"}
_MAX_RUN_NAME = 1024
# TensorBoard keeps 1000 points of each scalar series by default.
_SCALAR_SAMPLES = 1000
_STATE_SAMPLES = 1

_SERIES_TAGS = {
    "frozen_fraction": metadata.FROZEN_FRACTION_TAG,
    "frozen_param_fraction": metadata.FROZEN_PARAM_FRACTION_TAG,
    "compute_saved": metadata.COMPUTE_SAVED_TAG,
    "step_compute_saved": metadata.STEP_COMPUTE_SAVED_TAG,
}


def _json(request, content, code=200):
    # http_util.Respond sets X-Content-Type-Options: nosniff.
    return http_util.Respond(request, content, "application/json", code=code)


def _error(request, message, code):
    return _json(request, {"error": message}, code=code)


class SmartFRZPlugin(base_plugin.TBPlugin):
    """TensorBoard's "SmartFRZ" dashboard: what froze, when, what it saved.

    For each run written by a freezing callback with `log_dir=`, it draws a
    units x epochs heat map of the policy's scores with the epoch each unit
    froze, the frozen fractions over time and the estimated compute saved.
    TensorBoard loads it through the `tensorboard_plugins` entry point of the
    keras-smartfrz distribution.

    Args:
        context: a `tensorboard.plugins.base_plugin.TBContext`.

    Example (`tensorboard --logdir logs` does the same for you):

    ```python
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer
    from tensorboard.plugins import base_plugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory("logs")
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, "logs")
    plugin = SmartFRZPlugin(base_plugin.TBContext(data_provider=provider))
    apps = plugin.get_plugin_apps()  # route -> WSGI app
    ```
    """

    plugin_name = metadata.PLUGIN_NAME

    def __init__(self, context):
        self._data_provider = context.data_provider

    def is_active(self):
        # TensorBoard's core lists the plugin names that own data, which
        # includes ours as soon as a `smartfrz/state` tensor is written.
        return False

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(
            es_module_path=STATIC_ROUTE + "index.js",
            tab_name="SmartFRZ",
        )

    def get_plugin_apps(self):
        return {
            STATIC_ROUTE + "*": self._serve_static,
            "/runs": self._serve_runs,
            "/timeline": self._serve_timeline,
        }

    # -------------------------------------------------------------- static
    @wrappers.Request.application
    def _serve_static(self, request):
        prefix = ROUTE_PREFIX + STATIC_ROUTE
        # `request.path` is already percent-decoded, so encoded traversal
        # (`%2e%2e`, `%2f`) arrives here as `..` and `/` and is refused too.
        path = request.path
        name = path[len(prefix):] if path.startswith(prefix) else ""
        if not _STATIC_NAME.fullmatch(name):
            return _error(request, "Not a static file name.", 400)
        static_dir = os.path.realpath(STATIC_DIR)
        file_path = os.path.realpath(os.path.join(static_dir, name))
        extension = os.path.splitext(file_path)[1]
        if (
            os.path.dirname(file_path) != static_dir
            or extension not in _MIMETYPES
            or not os.path.isfile(file_path)
        ):
            return _error(request, "No such static file.", 404)
        with open(file_path, "rb") as handle:
            content = handle.read()
        return http_util.Respond(request, content, _MIMETYPES[extension])

    # ---------------------------------------------------------------- data
    def _state_series(self, ctx, experiment, runs=None):
        """`{run: TensorTimeSeries}` of the `smartfrz/state` tags we read."""
        if self._data_provider is None:
            return {}
        mapping = self._data_provider.list_tensors(
            ctx,
            experiment_id=experiment,
            plugin_name=metadata.PLUGIN_NAME,
            run_tag_filter=provider.RunTagFilter(
                runs=runs, tags=[metadata.STATE_TAG]
            ),
        )
        result = {}
        for run, tags in mapping.items():
            series = tags.get(metadata.STATE_TAG)
            if series is None:
                continue
            version = metadata.parse_state_metadata(series.plugin_content)
            if version == metadata.STATE_FORMAT:
                result[run] = series
        return result

    @wrappers.Request.application
    def _serve_runs(self, request):
        ctx = plugin_util.context(request.environ)
        experiment = plugin_util.experiment_id(request.environ)
        runs = [
            {"run": run, "last_epoch": series.max_step}
            for run, series in sorted(
                self._state_series(ctx, experiment).items()
            )
        ]
        return _json(request, {"runs": runs})

    @wrappers.Request.application
    def _serve_timeline(self, request):
        run = request.args.get("run")
        if not run:
            return _error(request, "Give a run: ?run=<run name>.", 400)
        if len(run) > _MAX_RUN_NAME or any(ord(c) < 32 for c in run):
            return _error(request, "Malformed run name.", 400)
        ctx = plugin_util.context(request.environ)
        experiment = plugin_util.experiment_id(request.environ)
        if run not in self._state_series(ctx, experiment, runs=[run]):
            return _error(request, f"No SmartFRZ data for run {run!r}.", 404)
        state = self._latest_state(ctx, experiment, run)
        if state is None:
            return _error(
                request, f"Unreadable SmartFRZ state in run {run!r}.", 404
            )
        return _json(request, self._timeline(ctx, experiment, run, state))

    def _latest_state(self, ctx, experiment, run):
        data = self._data_provider.read_tensors(
            ctx,
            experiment_id=experiment,
            plugin_name=metadata.PLUGIN_NAME,
            downsample=_STATE_SAMPLES,
            run_tag_filter=provider.RunTagFilter(
                runs=[run], tags=[metadata.STATE_TAG]
            ),
        )
        points = data.get(run, {}).get(metadata.STATE_TAG) or []
        if not points:
            return None
        # Downsampling always keeps the last point written.
        value = points[-1].numpy
        try:
            raw = value.item() if hasattr(value, "item") else value
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8")
            state = json.loads(raw)
        except (ValueError, TypeError, UnicodeDecodeError):
            return None
        if not isinstance(state, dict) or not isinstance(
            state.get("units"), list
        ):
            return None
        return state

    def _timeline(self, ctx, experiment, run, state):
        names = [str(name) for name in state["units"]]
        num_params = state.get("num_params") or [None] * len(names)
        frozen_epochs = state.get("frozen_epoch") or [None] * len(names)
        score_tags = {metadata.score_tag(name): name for name in names}
        tags = list(_SERIES_TAGS.values()) + list(score_tags)
        data = self._data_provider.read_scalars(
            ctx,
            experiment_id=experiment,
            plugin_name=scalar_metadata.PLUGIN_NAME,
            downsample=_SCALAR_SAMPLES,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=tags),
        ).get(run, {})

        def points(tag):
            # One value per step; a later write of a step (a second `fit`
            # into the same directory) replaces an earlier one.
            by_step = {d.step: float(d.value) for d in data.get(tag, [])}
            return [[step, by_step[step]] for step in sorted(by_step)]

        series = {key: points(tag) for key, tag in _SERIES_TAGS.items()}
        epochs = sorted(
            {step for values in series.values() for step, _ in values}
        )
        return {
            "run": run,
            "last_epoch": state.get("epoch"),
            "epochs": epochs,
            "cost_model": state.get("cost_model"),
            "units": [
                {
                    "name": name,
                    "num_params": num_params[index],
                    "frozen_epoch": frozen_epochs[index],
                    "scores": points(metadata.score_tag(name)),
                }
                for index, name in enumerate(names)
            ],
            "series": series,
        }


class SmartFRZLoader(base_plugin.TBLoader):
    """Makes the `SmartFRZPlugin`; the `tensorboard_plugins` entry point."""

    def load(self, context):
        return SmartFRZPlugin(context)
