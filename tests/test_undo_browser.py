"""Undo in headless Chromium against a real training run: the demo diverges after a huge lr (momentum ≥ 1 is refused
since issue 30), one click on the command's Undo takes it back, the ack shows, the loss comes back down, and the
abandoned branch is drawn grey. Screenshot: artifacts/dashboard/undo.png."""

from __future__ import annotations

import math
import threading

import pytest

from browser_support import CHROMIUM, CHROMIUM_ARGS, free_port, require_chromium

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip("playwright.sync_api")
require_chromium()

from test_dashboard_browser import ARTIFACTS, Trainer, event_rows, plot_data  # noqa: E402  (after the skip)


def test_undo_of_a_diverging_lr_brings_the_loss_back(tmp_path):
    import waitress

    from revacnn_dash.app import create_app
    from revacnn_dash.data.hub import Hub

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(tmp_path)
    trainer.start()
    hub = Hub([trainer.endpoint], warm_umap=False, silence_s=3.0)
    server = waitress.create_server(create_app(hub, interval_ms=500).server, host="127.0.0.1", port=free_port(),
                                    threads=6)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(180000)   # generous: a loaded 2-core machine trains at ~1 step/s
            page.goto(f"http://127.0.0.1:{server.effective_port}/")
            page.get_by_text("Training", exact=True).click()
            page.wait_for_function("document.querySelector('#train-graph .js-plotly-plot')?.data?.[0]?.x?.length > 20",
                                   timeout=300000)
            page.fill("#in-lr", "1000")
            page.click("#btn-lr")
            page.wait_for_selector("#event-log tr.ev-row:has-text('set lr=1000') .ev-done")
            page.wait_for_selector("#loss-not-finite")          # the banner: the loss is NaN or inf
            page.click("#event-log tr.ev-row:has-text('set lr=1000') .ev-undo")
            page.wait_for_selector("#event-log tr.ev-row:has-text('rewind') .ev-done")
            assert any("rewind" in row and "done" in row for row in event_rows(page))
            # the loss comes back: the live trace ends in finite values below the starting loss (ln 10 ≈ 2.3)
            page.wait_for_function("(() => { const y = document.querySelector('#train-graph .js-plotly-plot')"
                                   ".data[0].y; return y.length > 5 && y.slice(-5).every(v => v !== null && v < 2.3);"
                                   " })()")
            abandoned = plot_data(page, "train-graph", 5, "y")
            assert len(abandoned) > 0 and any(v is None or not math.isfinite(v) or v > 2.3 for v in abandoned)
            assert page.inner_text("#hp-now").startswith("lr 0.02")
            page.screenshot(path=str(ARTIFACTS / "undo.png"), full_page=True)
            browser.close()
    finally:
        trainer.kill()
        server.close()
        hub.stop()
