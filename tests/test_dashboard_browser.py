"""The dashboard in headless Chromium against a real training run (examples/train_digits.py) started by the test.

Screenshots go to artifacts/dashboard/ (ignored by git). Run alone with:  pytest -m browser tests/test_dashboard_browser.py
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from browser_support import CHROMIUM, CHROMIUM_ARGS, free_port, require_chromium

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "dashboard"
playwright_api = pytest.importorskip("playwright.sync_api")
require_chromium()


class Trainer:
    """examples/train_digits.py in a subprocess on fixed ports, so a restart is found at the same address."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.control, self.telemetry = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / f"trainer-{int(time.time() * 1000)}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "train_digits.py"), "--epochs", "200", "--slow", "0.03",
             "--snapshot-every", "40", "--root", str(self.root), "--control-port", str(self.control),
             "--telemetry-port", str(self.telemetry)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.control}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import waitress

    from revacnn_dash.app import create_app
    from revacnn_dash.data.hub import Hub

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(tmp_path_factory.mktemp("run"))
    trainer.start()
    hub = Hub([trainer.endpoint], warm_umap=False, silence_s=3.0)
    app = create_app(hub, interval_ms=500)
    port = free_port()
    server = waitress.create_server(app.server, host="127.0.0.1", port=port, threads=6)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30000)
        page.goto(f"http://127.0.0.1:{port}/")
        yield {"page": page, "trainer": trainer, "hub": hub}
        browser.close()
    trainer.kill()
    server.close()
    hub.stop()


def js_wait(page, expression: str, timeout: float = 30.0):
    """Poll a JavaScript expression until it is truthy; return its value."""
    page.wait_for_function(expression, timeout=timeout * 1000)
    return page.evaluate(expression)


def plot_data(page, graph_id: str, trace: int, axis: str = "x") -> list:
    return page.evaluate(f"(() => {{ const gd = document.querySelector('#{graph_id} .js-plotly-plot');"
                         f" return gd && gd.data && gd.data[{trace}] ? gd.data[{trace}].{axis} : []; }})()")


def node_count(page) -> int:
    return page.evaluate("document.querySelectorAll('#net-graph .scatterlayer .trace:last-child path.point').length")


def event_rows(page) -> list[str]:
    return page.locator("#event-log tr.ev-row").all_inner_texts()


def test_live_loss_and_network_show_within_seconds(setup):
    page = setup["page"]
    started = time.monotonic()
    page.wait_for_selector("#conn-banner:has-text('LIVE')", timeout=45000)
    # the loss trace grows live (Patch.extend): at least 20 steps, then more a moment later
    js_wait(page, "(() => { const gd = document.querySelector('#train-graph .js-plotly-plot');"
                  " return gd && gd.data && gd.data[0].x.length >= 20; })()", timeout=40)
    first = plot_data(page, "train-graph", 0)
    losses = plot_data(page, "train-graph", 0, "y")
    assert all(isinstance(v, (int, float)) for v in losses[:20]) and 0 < losses[0] < 5
    time.sleep(1.5)
    assert len(plot_data(page, "train-graph", 0)) > len(first)
    assert plot_data(page, "train-graph", 0)[: len(first)] == first      # extended, not redrawn
    page.screenshot(path=str(ARTIFACTS / "training.png"), full_page=True)
    page.get_by_text("Network", exact=True).click()
    # ReVACNN demo: 16 + 20 + 20 conv filters and 10 outputs, one node each
    js_wait(page, "document.querySelectorAll('#net-graph .scatterlayer .trace:last-child path.point').length"
                  " == 66", timeout=20)
    labels = page.locator("#net-graph .annotation-text").all_text_contents()
    assert [l for l in labels if l in ("conv1", "conv2", "conv3", "fc")] == ["conv1", "conv2", "conv3", "fc"]
    # paths: four width buckets drawn, top 50% of each layer's filters -> 8*20 + 10*20 + 10*10 = 460 segments
    count = """(() => { const gd = document.querySelector('#net-graph .js-plotly-plot');
        let n = 0; for (let i = 0; i < 4; i++) { n += gd.data[i].x.filter(v => v === null).length; } return n; })()"""
    js_wait(page, count + " > 0", timeout=20)
    assert page.evaluate(count) == 460
    # the jitter runs in the browser: points have moved without a server round trip per frame
    # (the wait is for the trainer's next per-filter step, which a loaded 2-core machine can delay; not the animation)
    moved = js_wait(page, "window.__revacnn && window.__revacnn.moved > 100 && window.__revacnn.moved", timeout=45)
    assert moved > 100
    amplitudes = page.evaluate("window.__revacnn.anim.amp")
    assert len(amplitudes) == 66 and max(amplitudes) == 8.0 and sum(a > 0.5 for a in amplitudes) >= 20
    assert time.monotonic() - started < 60
    page.screenshot(path=str(ARTIFACTS / "network.png"), full_page=True)


def requested_views(page, seconds: float) -> list[str]:
    """The outputs of the callback requests the page sends in ``seconds`` (one entry per request)."""
    outputs: list[str] = []

    def record(request):
        if "_dash-update-component" in request.url:
            outputs.append((request.post_data_json or {}).get("output", ""))

    page.on("request", record)
    page.wait_for_timeout(seconds * 1000)      # playwright delivers the events while it waits
    page.remove_listener("request", record)
    return outputs


def test_only_the_shown_tab_is_polled(setup):
    page = setup["page"]
    page.wait_for_selector("#conn-banner:has-text('LIVE')", timeout=45000)
    page.get_by_text("Training", exact=True).click()
    page.wait_for_timeout(1000)
    training = requested_views(page, 3.0)             # ~6 ticks at 500 ms
    headers = [o for o in training if "run-summary.children" in o]
    assert len(headers) >= 4
    assert sum("train-graph.figure" in o for o in training) >= 4
    # the views of hidden tabs send nothing; with the run unchanged, neither does anything that takes run-select
    hidden = ("net-graph.figure", "net-details.children", "emb-graph.figure", "emb-layer.options", "fil-weights.src",
              "replay-step.className")
    assert [o for o in training if any(h in o for h in hidden)] == []
    # per tick: the header, the event log, the training chart and the runs overlay (its menu and its chart)
    assert len(training) <= 5 * len(headers) + 3
    page.get_by_text("Network", exact=True).click()
    page.wait_for_timeout(1000)
    network = requested_views(page, 3.0)
    assert sum("net-graph.figure" in o for o in network) >= 4
    assert [o for o in network if "train-graph.figure" in o or "emb-graph.figure" in o] == []
    assert node_count(page) == 66


def test_add_filter_on_conv2_changes_the_trainers_model(setup):
    from revacnn.wire.client import RunClient

    page = setup["page"]
    # click the first conv2 node (trace order: conv1 nodes 0-15, conv2 nodes 16-35)
    point = page.locator("#net-graph .scatterlayer .trace:last-child path.point").nth(16)
    box = point.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#net-details:has-text('net.conv2')", timeout=10000)
    assert "filter 0" in page.inner_text("#net-details")
    # the activation map shown is probe image 0's, and the probe menu says so (it showed an empty box)
    page.wait_for_selector("#net-probe:has-text('#0 (label')", timeout=10000)
    assert page.get_attribute("#net-act-img", "src").startswith("data:image/png")
    watcher = RunClient(setup["trainer"].endpoint)
    watcher.connect(timeout=10)
    try:
        page.fill("#widen-k", "1")
        page.click("#btn-widen")
        page.wait_for_selector("#event-log tr.ev-row:has-text('widen net.conv2 +1') .ev-done", timeout=30000)
        row = [r for r in event_rows(page) if "widen net.conv2 +1" in r][0]
        assert "done" in row
        # the trainer's model changed: its next structure message has 21 conv2 filters
        deadline = time.monotonic() + 20
        outs = None
        while time.monotonic() < deadline:
            message = watcher.recv(0.5)
            if message is not None and message.type == "structure":
                outs = {l["name"]: l["out"] for l in message.body["layers"]}
                if outs["net.conv2"] == 21:
                    break
        assert outs is not None and outs["net.conv2"] == 21 and outs["net.conv1"] == 16
    finally:
        watcher.close()
    # and the page shows the new filter: 67 nodes, conv2's count label reads 21
    js_wait(page, "document.querySelectorAll('#net-graph .scatterlayer .trace:last-child path.point').length"
                  " == 67", timeout=20)
    assert "21" in page.locator("#net-graph .annotation-text").all_text_contents()
    page.screenshot(path=str(ARTIFACTS / "network-widened.png"), full_page=True)


def test_freeze_layer_is_marked_and_undone(setup):
    page = setup["page"]
    point = page.locator("#net-graph .scatterlayer .trace:last-child path.point").nth(0)
    box = point.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#net-details:has-text('net.conv1')", timeout=10000)
    page.click("#btn-freeze-layer")
    page.wait_for_selector("#event-log tr.ev-row:has-text('freeze net.conv1') .ev-done", timeout=30000)
    js_wait(page, "Array.from(document.querySelectorAll('#net-graph .annotation-text'))"
                  ".some(t => t.textContent === 'conv1 ❄')", timeout=20)
    symbols = page.evaluate("document.querySelector('#net-graph .js-plotly-plot').data[4].marker.symbol")
    assert symbols[:16] == ["x"] * 16 and "x" not in symbols[16:]
    page.screenshot(path=str(ARTIFACTS / "network-frozen.png"), full_page=True)
    page.click("#btn-unfreeze-layer")
    page.wait_for_selector("#event-log tr.ev-row:has-text('unfreeze net.conv1') .ev-done", timeout=30000)
    js_wait(page, "Array.from(document.querySelectorAll('#net-graph .annotation-text'))"
                  ".some(t => t.textContent === 'conv1')", timeout=20)


def test_invalid_lr_shows_the_error_text(setup):
    page = setup["page"]
    page.get_by_text("Training", exact=True).click()
    page.fill("#in-lr", "-1")
    page.click("#btn-lr")
    page.wait_for_selector("#event-log tr.ev-row:has-text('set lr=-1') .ev-error", timeout=30000)
    row = [r for r in event_rows(page) if "set lr=-1" in r][0]
    assert "set_hparams: field 'lr' must be >= 0.0, got -1.0" in row
    # a valid change goes through, is marked on the chart, and the hparams line follows
    page.fill("#in-lr", "0.01")
    page.click("#btn-lr")
    page.wait_for_selector("#event-log tr.ev-row:has-text('set lr=0.01') .ev-done", timeout=30000)
    page.wait_for_selector("#hp-now:has-text('lr 0.01')", timeout=10000)
    notes = page.locator("#train-graph .annotation-text").all_text_contents()
    assert "set lr=0.01" in notes and "widen net.conv2 +1" in notes
    # five commands answered on the control socket, and no telemetry reported lost (the summary would say so)
    assert "dropped" not in page.inner_text("#run-summary")
    assert setup["hub"].get(setup["hub"].options()[0]["value"]).summary()["gaps"] == 0
    page.wait_for_timeout(1500)               # the chart's lr trace reaches the change, for the screenshot
    page.screenshot(path=str(ARTIFACTS / "training-steered.png"), full_page=True)


def test_embedding_drag_sends_reinit_from_the_new_neighbours(setup):
    page = setup["page"]
    page.get_by_text("Embedding", exact=True).click()
    page.wait_for_selector("#emb-status:has-text('PCA of 21 filters')", timeout=30000)   # a post-widen snapshot
    # pause, so that no new snapshot moves the points while we drag (commands are still applied while paused)
    page.get_by_text("Training", exact=True).click()
    page.click("#btn-pause")
    page.wait_for_selector("#event-log tr.ev-row:has-text('pause') .ev-done", timeout=20000)
    page.wait_for_selector("#run-summary:has-text('state paused')", timeout=10000)
    page.get_by_text("Embedding", exact=True).click()
    time.sleep(2.0)
    status = page.inner_text("#emb-status")
    assert "filters of net.conv2 (weight)" in status
    n = int(status.split("PCA of ")[1].split(" ")[0])
    assert n == 21                       # conv2 after the widen
    pts = page.locator("#emb-graph .scatterlayer .trace path.point")
    assert pts.count() == n
    # hover a point: its filter image appears
    box = pts.nth(3).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2 - 3, box["y"] + box["height"] / 2)
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#emb-hover-text:has-text('filter 3')", timeout=10000)
    assert page.get_attribute("#emb-hover-img", "src").startswith("data:image/png;base64,")
    # drag filter 5 onto filter 0's position: filter 0 must be its nearest new neighbour
    a, b = pts.nth(5).bounding_box(), pts.nth(0).bounding_box()
    page.mouse.move(a["x"] + a["width"] / 2, a["y"] + a["height"] / 2)
    page.mouse.down()
    page.mouse.move(b["x"] + b["width"] / 2 + 2, b["y"] + b["height"] / 2 + 2, steps=8)
    page.mouse.up()
    page.wait_for_selector("#emb-feedback:has-text('re-initialise net.conv2 filter 5')", timeout=10000)
    feedback = page.inner_text("#emb-feedback")
    neighbours = [int(v) for v in feedback.split("from filters [")[1].split("]")[0].split(",")]
    assert len(neighbours) == 4 and 5 not in neighbours and neighbours[0] == 0
    page.wait_for_selector("#event-log tr.ev-row:has-text('reinit net.conv2[5]') :is(.ev-done, .ev-error)",
                           timeout=30000)
    row = [r for r in event_rows(page) if "reinit net.conv2[5]" in r][0]
    assert "done" in row, row
    page.screenshot(path=str(ARTIFACTS / "embedding.png"), full_page=True)
    page.get_by_text("Training", exact=True).click()
    page.click("#btn-resume")
    page.wait_for_selector("#run-summary:has-text('state running')", timeout=20000)


def test_filters_view_shows_images(setup):
    page = setup["page"]
    page.get_by_text("Filters", exact=True).click()
    page.wait_for_selector("#fil-caption:has-text('RGB images')", timeout=20000)
    sizes = page.evaluate("['fil-weights', 'fil-acts', 'fil-actgrads', 'fil-probe-img'].map(id => "
                          "document.getElementById(id).naturalWidth)")
    assert all(s > 20 for s in sizes), sizes
    # conv1's 16 activation maps: 8 to a row, each enlarged to at least 56 px, indices drawn in
    page.wait_for_selector("#fil-caption:has-text('8 a row, index over each')", timeout=20000)
    assert sizes[1] >= 8 * 56, sizes
    page.screenshot(path=str(ARTIFACTS / "filters.png"), full_page=True)


def test_killing_and_restarting_the_trainer_is_shown_and_recovered(setup):
    page, trainer = setup["page"], setup["trainer"]
    page.get_by_text("Training", exact=True).click()
    old_run = setup["hub"].get(None).run_id
    trainer.kill()
    page.wait_for_selector("#conn-banner:has-text('UNREACHABLE')", timeout=20000)
    assert "no heartbeat" in page.inner_text("#conn-banner") or "cannot reach" in page.inner_text("#conn-banner")
    # the steering controls are off while no trainer can take a command, and say why
    js_wait(page, "document.querySelector('#btn-lr').matches(':disabled')", timeout=10)
    assert page.get_attribute("#steer-training", "title").startswith("the run is unreachable")
    page.screenshot(path=str(ARTIFACTS / "unreachable.png"), full_page=True)
    trainer.start()
    page.wait_for_selector("#conn-banner:has-text('LIVE')", timeout=60000)
    js_wait(page, "!document.querySelector('#btn-lr').matches(':disabled')", timeout=10)
    new_run = setup["hub"].get(None).run_id
    assert new_run != old_run and new_run in page.inner_text("#conn-banner")
    # the chart is redrawn for the new process: its steering markers are gone from the new step axis (the event
    # log keeps them), and the loss trace holds only the new run's steps, in order: exactly the history the
    # dashboard holds for the new process (how early that starts depends on when the reconnect lands)
    js_wait(page, "!Array.from(document.querySelectorAll('#train-graph .annotation-text'))"
                  ".some(t => t.textContent === 'widen net.conv2 +1')", timeout=30)
    js_wait(page, "(() => { const gd = document.querySelector('#train-graph .js-plotly-plot');"
                  " return gd && gd.data && gd.data[0].x.length >= 5; })()", timeout=40)
    x = plot_data(page, "train-graph", 0)
    new_steps = setup["hub"].get(None).scalars_since(0)[0]["step"].tolist()
    assert all(b > a for a, b in zip(x, x[1:])), x
    assert x == new_steps[:len(x)], (x, new_steps[:len(x)])
    # the event log starts afresh for the new process (the old one's commands are in its recording)
    page.wait_for_selector("#event-log:has-text('no commands yet')", timeout=10000)
    # the restart is in the state's log
    assert any("trainer restarted" in text for _, text in setup["hub"].get(None).log)


def test_replay_of_the_recorded_run(setup):
    """The first trainer process (killed above) left a recording: replay it without the trainer."""
    page, hub = setup["page"], setup["hub"]
    hub.logdir = str(setup["trainer"].root)
    page.get_by_text("Training", exact=True).click()
    deadline = time.monotonic() + 20
    while not any(o["label"].startswith("◼ recorded") for o in hub.options()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for attempt in range(3):      # the menu may close when a tick re-renders the header; open it again
        page.click("#run-select")
        try:
            page.get_by_text("◼ recorded", exact=False).first.click(timeout=5000)
            page.wait_for_selector("#conn-banner:has-text('REPLAY')", timeout=10000)
            break
        except playwright_api.TimeoutError:
            page.screenshot(path=str(ARTIFACTS / f"replay-attempt-{attempt}.png"), full_page=True)
            page.keyboard.press("Escape")
    page.wait_for_selector("#conn-banner:has-text('REPLAY')", timeout=5000)
    # a recording takes no commands: every steering control is disabled, its tooltip says so
    # (a tab's controls are in the page while the tab is shown)
    for tab, group, controls in (("Network", "steer-network", "'#btn-widen', '#btn-remove-layer', '#insert-bn input'"),
                                 ("Training", "steer-training", "'#btn-lr', '#btn-stop', '#in-lr'")):
        page.get_by_text(tab, exact=True).click()
        js_wait(page, f"[{controls}].every(sel => document.querySelector(sel)?.matches(':disabled'))", timeout=10)
        assert page.get_attribute(f"#{group}", "title").startswith("a recorded run cannot be steered"), group
    banner = page.inner_text("#conn-banner")
    assert "snapshots; showing step" in banner
    # that trainer was killed: its recording says running (or validating, if the kill came during a validation),
    # and the summary says that is not the run's state now
    assert re.search(r"state (running|validating) at its last write, \d\d:\d\d:\d\d \(recording not closed\)",
                     page.inner_text("#run-summary")), page.inner_text("#run-summary")
    replay = [s for s in hub.runs.values() if s.source == "replay"][0]
    steps = replay.scalars_since(0)[0]["step"]
    assert len(steps) > 20 and steps[0] == 1, steps
    js_wait(page, "(() => { const gd = document.querySelector('#train-graph .js-plotly-plot');"
                  f" return gd && gd.data && gd.data[0].x.length == {len(steps)}; }})()", timeout=20)
    # the steering log was recorded: the widen and the refused lr are in the event log
    page.wait_for_selector("#event-log tr.ev-row:has-text('widen') .ev-done", timeout=10000)
    rows = event_rows(page)
    assert any("must be >= 0.0" in r for r in rows), rows
    page.screenshot(path=str(ARTIFACTS / "replay.png"), full_page=True)
