"""The dashboard in headless Chromium on a real training run of HF MobileNetV2 (tests/zoo_train.py: a real Trainer
with ReVACNNCallback) — issue 27: the network view draws the model's layers, and its steering controls insert a
layer after a depthwise conv and freeze that conv by its own name, both acknowledged done by the trainer.

Screenshots go to artifacts/dashboard/ (ignored by git). Run alone with:  pytest -m browser tests/test_zoo_browser.py
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from browser_support import CHROMIUM, CHROMIUM_ARGS, free_port, require_chromium
from helpers import wait_for

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "dashboard"
playwright_api = pytest.importorskip("playwright.sync_api")
require_chromium()

DEPTHWISE = "net.model.mobilenet_v2.layer.1.conv_3x3.convolution"
INSERTED = "net.model.mobilenet_v2.layer.1.conv_3x3.normalization.inserted.conv"
STEM = "net.model.mobilenet_v2.conv_stem.first_conv.convolution"
POINTS = "#net-graph .scatterlayer .trace:last-child path.point"


def _layer_names(hub) -> list[str]:
    """The layers of the structure the dashboard holds for the run."""
    state = hub.get(hub.options()[0]["value"])
    return [layer["name"] for layer in (state.structure or {}).get("layers", [])]


# the menu's options read "<name> (Conv2d, 48 out)"; it is filtered when the model's first layer is not among them
FILTERED = """([name, first]) => {
    const shown = [...document.querySelectorAll('body *')].filter(e => e.children.length === 0
        && e.offsetParent !== null).map(e => e.textContent);
    return shown.some(t => t.startsWith(name + ' (')) && !shown.some(t => t.startsWith(first + ' (')); }"""


def _pick_layer(page, name: str) -> None:
    """Choose ``name`` in the layer menu by its search box, once the menu shows only the options it matches (before
    that, an option found in the full list moves away under the click). The page renews the menu's options with
    every per-filter step of the run, which can close the menu or clear its search: then it is typed again."""
    for _ in range(5):
        page.click("#net-layer")
        page.get_by_placeholder("Search").fill(name)
        try:
            page.wait_for_function(FILTERED, arg=[name, STEM], timeout=5000)
            page.get_by_text(f"{name} (", exact=False).first.click(timeout=5000)
            page.wait_for_selector(f"#net-details:has-text('{name}')", timeout=10000)
            return
        except playwright_api.TimeoutError:
            page.keyboard.press("Escape")
    raise AssertionError(f"{name} could not be chosen in the layer menu")


def test_the_network_view_draws_mobilenet_v2_and_steers_it(tmp_path):
    import waitress

    from revacnn_dash.app import create_app
    from revacnn_dash.data.hub import Hub

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    control, telemetry = free_port(), free_port()
    log = open(tmp_path / "trainer.log", "w")
    trainer = subprocess.Popen([sys.executable, str(ROOT / "tests" / "zoo_train.py"), "--root", str(tmp_path),
                                "--control-port", str(control), "--telemetry-port", str(telemetry)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    hub = Hub([f"tcp://127.0.0.1:{control}"], warm_umap=False, silence_s=3.0)
    server = waitress.create_server(create_app(hub, interval_ms=500).server, host="127.0.0.1", port=free_port(),
                                    threads=6)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30000)
            page.goto(f"http://127.0.0.1:{server.effective_port}/")
            page.wait_for_selector("#conn-banner:has-text('LIVE')", timeout=180000)
            page.get_by_text("Network", exact=True).click()
            page.wait_for_function(f"document.querySelectorAll('{POINTS}').length > 0", timeout=60000)
            layers = _layer_names(hub)
            assert len(layers) == 53 and DEPTHWISE in layers and layers[-1] == "net.model.classifier"
            labels = page.locator("#net-graph .annotation-text").all_text_contents()
            assert labels and page.locator(POINTS).count() >= len(labels)

            _pick_layer(page, DEPTHWISE)
            page.click("#btn-insert-layer")
            page.wait_for_selector(f"#event-log tr.ev-row:has-text('insert after {DEPTHWISE}') .ev-done",
                                   timeout=60000)
            assert wait_for(lambda: INSERTED in _layer_names(hub), timeout=30)
            page.wait_for_timeout(1500)                 # the page's next tick draws the new structure
            _pick_layer(page, INSERTED)                 # the layer list offers the new layer (the next structure)
            layers = _layer_names(hub)
            # the anchor kept its name, and the new layer comes right after it
            assert len(layers) == 54 and layers.index(INSERTED) == layers.index(DEPTHWISE) + 1

            _pick_layer(page, DEPTHWISE)
            page.click("#btn-freeze-layer")
            page.wait_for_selector(f"#event-log tr.ev-row:has-text('freeze {DEPTHWISE}') .ev-done", timeout=60000)
            page.screenshot(path=str(ARTIFACTS / "mobilenet-v2-steered.png"), full_page=True)
            browser.close()
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        server.close()
        hub.stop()
        log.close()
