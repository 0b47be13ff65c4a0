"""End to end: `tensorboard --logdir` serves the SmartFRZ dashboard to Chromium.

Needs Debian's `chromium` and `chromium-driver` (tools/setup.sh installs
them); without them this test fails, it does not skip. The browser is driven
through ChromeDriver's W3C WebDriver HTTP API with the standard library, and
everything stays on 127.0.0.1.

`SMARTFRZ_SCREENSHOT=docs/images/tensorboard_dashboard.png` makes the test
also save its screenshot there (the README's picture is made so).
"""

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import keras
import pytest

import keras_smartfrz
from conftest import mlp
from conftest import toy_data

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
    "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1250",
]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # W3C WebDriver element key


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method, url, body=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method,
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for(what, probe, timeout):
    """Calls `probe` until it returns something truthy; fails after timeout."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError) as error:
            last_error = error
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout} s waiting for {what} "
                f"(last error: {last_error!r})")


@contextlib.contextmanager
def process(args, log_path):
    """Runs `args` in its own process group; ends that group afterwards."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class WebDriver:
    """The few W3C WebDriver commands this test needs."""

    def __init__(self, url, profile_dir):
        self.url = url
        capabilities = {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": CHROMIUM_FLAGS + [f"--user-data-dir={profile_dir}"]}}
        value = self._call("POST", "/session",
                           {"capabilities": {"alwaysMatch": capabilities}})
        self.session = f"/session/{value['sessionId']}"

    def _call(self, method, path, body=None):
        try:
            return http(method, self.url + path, body)["value"]
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:1000]
            raise AssertionError(f"WebDriver {method} {path}: {detail}")

    def __call__(self, method, path, body=None):
        return self._call(method, self.session + path, body)

    def script(self, source, *args):
        return self("POST", "/execute/sync",
                    {"script": source, "args": list(args)})

    def quit(self):
        with contextlib.suppress(Exception):
            self._call("DELETE", self.session)


def train_runs(root):
    """Two runs beside keras.callbacks.TensorBoard; {run: {unit: epoch}}."""
    x, y = toy_data(128)
    frozen, units = {}, {}
    for name, freezer, learning_rate in (
        ("linear_freezing",
         keras_smartfrz.LinearFreezing(freeze_start=0.25,
                                       log_dir=root / "linear_freezing"),
         1e-2),
        ("auto_freeze",
         keras_smartfrz.AutoFreeze(window_size=4,
                                   log_dir=root / "auto_freeze"),
         3e-3),
    ):
        keras.utils.set_random_seed(1)
        model = mlp(hidden=(16, 16, 16, 16, 16))
        model.optimizer.learning_rate = learning_rate
        board = keras.callbacks.TensorBoard(log_dir=str(root / name))
        model.fit(x, y, batch_size=16, epochs=8, verbose=0,
                  callbacks=[freezer, board])
        run = f"{name}/smartfrz"
        frozen[run] = {d.layer: d.epoch for d in freezer.decisions
                       if d.frozen}
        units[run] = [u.name for u in freezer.units]
        keras.backend.clear_session()
    return frozen, units


def test_dashboard_shows_the_frozen_units_in_chromium(tmp_path):
    for path, package in ((CHROMIUM, "chromium"),
                          (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: apt-get install chromium "
                        f"chromium-driver (tools/setup.sh does; {package})")
    started = time.monotonic()
    logdir = tmp_path / "logs"
    frozen, units = train_runs(logdir)
    # LinearFreezing's schedule is deterministic; AutoFreeze's freezes are
    # whatever it decided here, and are checked the same way.
    assert len(frozen["linear_freezing/smartfrz"]) == 5

    board_port, driver_port = free_port(), free_port()
    board_url = f"http://127.0.0.1:{board_port}"
    tensorboard = [sys.executable, "-m", "tensorboard.main",
                   "--logdir", str(logdir), "--host", "127.0.0.1",
                   "--port", str(board_port)]
    chromedriver = [CHROMEDRIVER, f"--port={driver_port}"]
    with process(tensorboard, tmp_path / "tensorboard.log"), \
            process(chromedriver, tmp_path / "chromedriver.log"):
        wait_for("TensorBoard to list both runs", lambda: len(http(
            "GET", board_url + "/data/plugin/smartfrz/runs")["runs"]) == 2,
            timeout=40)
        wait_for("ChromeDriver", lambda: http(
            "GET", f"http://127.0.0.1:{driver_port}/status")["value"][
                "ready"], timeout=15)
        browser = WebDriver(f"http://127.0.0.1:{driver_port}",
                            tmp_path / "chromium-profile")
        try:
            # TensorBoard routes dashboards by the URL fragment.
            browser("POST", "/url", {"url": board_url + "/#smartfrz"})
            frame = wait_for("the dashboard's iframe", lambda: browser(
                "POST", "/elements",
                {"using": "css selector", "value": "iframe"}), timeout=20)
            assert len(frame) == 1
            browser("POST", "/frame", {"id": {ELEMENT: frame[0][ELEMENT]}})
            state = wait_for("the dashboard to render", lambda: browser.script(
                "const s = document.body && document.body.dataset.state;"
                "return s && s !== 'loading' ? s : null;"), timeout=20)
            assert state == "ready", browser.script(
                "return document.body.innerText")
            shown = browser.script("""
                const out = {};
                for (const box of document.querySelectorAll('.timeline')) {
                  const rows = [...box.querySelectorAll('text.unit-name')]
                    .map((t) => t.textContent);
                  const frozen = {};
                  for (const t of box.querySelectorAll('text.frozen-label'))
                    frozen[t.dataset.unit] = t.textContent;
                  out[box.dataset.run] = {rows, frozen};
                }
                return out;""")
            tables = browser.script("""
                const out = {};
                for (const run of document.querySelectorAll('section.run'))
                  out[run.dataset.run] = [...run.querySelectorAll(
                    'table.frozen-units td.unit-name')].map((t) => t.textContent);
                return out;""")
            browser("POST", "/frame/parent", {})
            screenshot = base64.b64decode(browser("GET", "/screenshot"))
        finally:
            browser.quit()

    assert set(shown) == set(frozen)
    for run, epochs in frozen.items():
        assert shown[run]["rows"] == units[run]
        assert shown[run]["frozen"] == {
            unit: f"froze, end of epoch {epoch + 1}"
            for unit, epoch in epochs.items()}
        assert tables[run] == sorted(epochs, key=epochs.get)
    assert screenshot.startswith(b"\x89PNG") and len(screenshot) > 20000
    (tmp_path / "dashboard.png").write_bytes(screenshot)
    target = os.environ.get("SMARTFRZ_SCREENSHOT")
    if target:
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        shutil.copyfile(tmp_path / "dashboard.png", target)
    assert time.monotonic() - started < 120
