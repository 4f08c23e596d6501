"""The analysis pages in headless Chromium: a small Dash app built here from ``comparison_layout``,
``explorer_layout`` and ``register_analysis_callbacks`` over the steered run recorded by test_analysis.py.

Screenshots go to artifacts/analysis/ (ignored by git). Run alone with:  pytest -m browser tests/test_analysis_browser.py
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from browser_support import CHROMIUM, CHROMIUM_ARGS, free_port, require_chromium

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "analysis"
playwright_api = pytest.importorskip("playwright.sync_api")
require_chromium()


def build_app(run_dir):
    from dash import Dash, dcc, html

    from revacnn_dash.analysis import RunSource, comparison_layout, explorer_layout, register_analysis_callbacks

    source = RunSource([run_dir])
    app = Dash(__name__)
    app.layout = html.Div([dcc.Tabs(id="tabs", value="compare", children=[
        dcc.Tab(label="Compare snapshots", value="compare", children=[comparison_layout(source)]),
        dcc.Tab(label="Explore the log", value="explore", children=[explorer_layout(source)])])])
    register_analysis_callbacks(app, source)
    return app


@pytest.fixture(scope="module")
def page():
    import waitress

    from test_analysis import recorded_run

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    app = build_app(recorded_run())
    port = free_port()
    server = waitress.create_server(app.server, host="127.0.0.1", port=port, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(f"http://127.0.0.1:{port}/")
        yield tab, errors
        browser.close()
    server.close()


def wait_text(tab, selector, text, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = tab.locator(selector).inner_text() if tab.locator(selector).count() else ""
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {selector}: {content!r}")


def test_comparison_page_shows_network_layer_and_filter_levels(page):
    tab, errors = page
    wait_text(tab, "#anc-network", "net.conv2")
    wait_text(tab, "#anc-network", "parameters")
    wait_text(tab, "#anc-summary", "activations compared")
    wait_text(tab, "#anc-network", "+2 / −2")              # widened and removed filters counted, not noise
    tab.locator("#anc-layer").click()
    tab.get_by_role("option", name="net.conv2").click()
    wait_text(tab, "#anc-layer-hist", "net.conv2")
    wait_text(tab, "#anc-filter-bars", "new")
    wait_text(tab, "#anc-filter-bars", "removed")
    # the filter level opens on the most-changed filter; clicking another filter's bar selects that one
    wait_text(tab, "#anc-filter-view", "activation B")
    first = tab.locator("#anc-filter").inner_text().strip()
    bars = tab.locator("#anc-filter-bars .bars .point path")
    labels = [t.text_content() for t in tab.locator("#anc-filter-bars .xtick text").all()]
    target = next(i for i, label in enumerate(labels) if label != first)
    bars.nth(target).click(force=True)
    deadline = time.monotonic() + 30
    title = ""
    while time.monotonic() < deadline:
        title = tab.locator("#anc-filter-view .gtitle").text_content() or ""
        if f"net.conv2 filter {labels[target]}:" in title:
            break
        time.sleep(0.2)
    assert f"net.conv2 filter {labels[target]}:" in title, (labels[target], title)
    assert tab.locator("#anc-filter").inner_text().strip() == labels[target]
    tab.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
    assert not errors, errors


def test_explorer_page_tree_leaf_chart_validation_and_cube(page):
    tab, errors = page
    tab.get_by_text("Explore the log").click()
    wait_text(tab, "#ane-multiples", "grad_weight_ratio per node")
    wait_text(tab, "#ane-multiples", "conv2")
    # steering events are drawn on the time axes
    wait_text(tab, "#ane-multiples", "widen net.conv2")
    # linked hover: one hover position labels every row of the small multiples
    tab.locator("#ane-multiples").scroll_into_view_if_needed()
    box = tab.locator("#ane-multiples .nsewdrag").first.bounding_box()
    tab.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and tab.locator("#ane-multiples .hoverlayer .hovertext").count() < 5:
        time.sleep(0.2)
    assert tab.locator("#ane-multiples .hoverlayer .hovertext").count() >= 5     # model + 4 layers
    tab.locator("#ane-tree button", has_text="conv2").first.click()
    wait_text(tab, "#ane-crumbs", "conv2")
    wait_text(tab, "#ane-filter-chart", "filters × iterations: cosine")
    # the leaf panel's style comes from the multiples' callback, which may answer after the chart's
    tab.locator("#ane-leaf").wait_for(state="visible", timeout=30_000)
    # zoom on the multiples: the filter chart follows (one shared iteration axis)
    box = tab.locator("#ane-multiples .nsewdrag").first.bounding_box()
    y = box["y"] + box["height"] * 0.5
    tab.mouse.move(box["x"] + box["width"] * 0.3, y)
    tab.mouse.down()
    tab.mouse.move(box["x"] + box["width"] * 0.6, y, steps=8)
    tab.mouse.up()
    script = ("() => { const g = document.querySelector('#ane-filter-chart .js-plotly-plot'); "
              "return g && g._fullLayout ? g._fullLayout.xaxis.range : null; }")
    deadline = time.monotonic() + 20
    span = None
    while time.monotonic() < deadline:
        xr = tab.evaluate(script)
        span = xr[1] - xr[0] if xr else None
        if span is not None and span < 15:
            break
        time.sleep(0.2)
    assert span is not None and span < 15, span               # 30 steps → about 9 after the zoom
    tab.locator("#ane-reset-zoom").click()
    # validation: make the rule sensitive enough for a 3-sample run so classes get flagged
    for selector, value in (("#ane-window", "1"), ("#ane-threshold", "2")):
        tab.locator(selector).fill(value)
        tab.locator(selector).press("Enter")
    wait_text(tab, "#ane-val-summary", "window d=1, threshold=2")
    wait_text(tab, "#ane-heatlines", "per-class error")
    wait_text(tab, "#ane-images", "image × iteration correctness")
    wait_text(tab, "#ane-cube", "top-10 changed filters")
    # the cube runs over iterations: a column per validation step, a row per layer, every class flagged there
    cube = tab.evaluate("() => { const d = document.querySelector('#ane-cube .js-plotly-plot').data[0]; "
                        "return {x: d.x, y: d.y, flagged: d.customdata[0]}; }")
    assert len(cube["x"]) == 3 and "net.fc" in cube["y"], cube
    assert any(c != "none" for c in cube["flagged"]), cube
    # top-3: cells that differ (top-10 holds most of the filters of these small layers)
    tab.locator("#ane-k").fill("3")
    tab.locator("#ane-k").press("Enter")
    wait_text(tab, "#ane-cube", "top-3 changed filters")
    tab.locator("#ane-cube").scroll_into_view_if_needed()
    tab.locator("#ane-cube").screenshot(path=str(ARTIFACTS / "explore-cube.png"))
    # one class's slice: its flagged steps marked above the plot
    tab.locator("#ane-cube-class").click()
    option = tab.get_by_role("option", name=re.compile(r"^class \d+ \(flagged\)$")).first
    klass = option.inner_text().split()[1]
    option.click()
    wait_text(tab, "#ane-cube", f"cube, class {klass}:")
    assert tab.locator("#ane-cube .shapelayer path").count() >= 1
    tab.locator("#ane-cube .nsewdrag").first.click(position={"x": 20, "y": 20})
    wait_text(tab, "#ane-cube-detail", "pinned:")
    wait_text(tab, "#ane-cube-detail", "net.fc:")          # top-changed filters of every layer at that step
    # the pinned cell's iteration is pinned on the time axes too
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and tab.locator("#ane-heatlines .shapelayer path").count() < 2:
        time.sleep(0.2)
    assert tab.locator("#ane-heatlines .shapelayer path").count() >= 2
    tab.screenshot(path=str(ARTIFACTS / "explore.png"), full_page=True)
    assert not errors, errors
