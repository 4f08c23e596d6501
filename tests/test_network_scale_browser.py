"""The network view at ResNet-50 scale in headless Chromium: a real ``Publisher`` streams transformers' ResNet-50
structure (54 layers, 26,570 filters, tests/model_shapes.py) and per-filter steps over real ZeroMQ to a real
``revacnn-dash`` process. The view must draw at the default grouping and expanded in full (big layers as density
strips), open a layer on a strip cell and go back, never ask for a figure while one is on the way, keep its
labels apart (measured on the page), and answer no request with a 5xx.

Screenshots go to artifacts/network-scale/ (ignored by git). Run alone with:
pytest -m browser tests/test_network_scale_browser.py
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import model_shapes
from browser_support import CHROMIUM, CHROMIUM_ARGS, require_chromium, served_dashboard

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "network-scale"
FIELDS = 5      # the step message's per-filter rows (grad |g|, grad², ‖w‖, update ratio, |act|)
playwright_api = pytest.importorskip("playwright.sync_api")
require_chromium()

LAYERS = model_shapes.hf_resnet50_layers()
STRIP_LAYERS = [l for l in LAYERS if l["out"] > 32]      # past the view's 32 nodes a column
EMBEDDED = "model.resnet.encoder.stages.3.layers.2.layer.2.convolution"    # 2,048 filters of 512 weights


def structure_body() -> dict:
    names = [l["name"] for l in LAYERS]
    return {"revision": 0, "step": 0, "model": "ResNetForImageClassification",
            "layers": [{"name": l["name"], "type": "Linear" if l["k"] is None else "Conv2d", "out": l["out"],
                        "in": l["in"], "kernel": l["k"], "frozen": None} for l in LAYERS],
            "layer_edges": [[a, b] for a, b in zip(names, names[1:])]}


def publish_steps(pub, stop: threading.Event) -> None:
    """A step with per-filter statistics every 0.3 s, as the callback sends them, until ``stop``."""
    from revacnn.wire.protocol import Message

    rng = np.random.default_rng(0)
    total = sum(l["out"] for l in LAYERS)
    step = 0
    while not stop.wait(0.3):
        step += 1
        pub.publish(Message("step", {"step": step, "loss": 1.0 / step, "groups": [{"lr": 0.1}], "per_filter": True,
                                     "revision": 0, "layer_names": [l["name"] for l in LAYERS]},
                            {"filters": rng.random((FIELDS, total), dtype=np.float32)}))


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    from revacnn.wire.connection import ConnectionInfo
    from revacnn.wire.protocol import Message
    from revacnn.wire.publisher import Publisher

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    logdir = tmp_path_factory.mktemp("scale")
    pub = Publisher("resnet50-scale", heartbeat_s=1.0).start()
    pub.set_status(state="running", step=0)
    pub.publish(Message("structure", structure_body()))
    weight = np.random.default_rng(1).normal(size=(2048, 512, 1, 1)).astype(np.float32)
    pub.publish(Message("snapshot", {"step": 1}, {f"weight/{EMBEDDED}": weight, f"grad/{EMBEDDED}": np.abs(weight)}))
    connection = ConnectionInfo("resnet50-scale", pub.telemetry_endpoint, pub.control_endpoint).write(
        logdir / "run" / "connection.json")
    stop = threading.Event()
    steps = threading.Thread(target=publish_steps, args=(pub, stop), daemon=True)
    steps.start()
    try:
        with served_dashboard(logdir, "--connect", str(connection)) as (port, _log), playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30000)
            failures: list[str] = []
            page.on("response", lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 500 else None)
            figure_requests = FigureRequests(page)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#conn-banner:has-text('LIVE')", timeout=60000)
            yield {"page": page, "failures": failures, "requests": figure_requests}
            browser.close()
    finally:
        stop.set()
        steps.join(5)
        pub.close()


class FigureRequests:
    """The network figure's requests as the page sends and completes them: how many the page's tick sent while one
    was on the way (a click may: the user asked)."""

    def __init__(self, page) -> None:
        self.open = 0
        self.sent = 0
        self.ticks_while_open = 0
        page.on("request", self.started)
        page.on("requestfinished", self.ended)
        page.on("requestfailed", self.ended)

    @staticmethod
    def is_figure(request) -> bool:
        return ("_dash-update-component" in request.url
                and "net-graph.figure" in (request.post_data_json or {}).get("output", ""))

    def started(self, request) -> None:
        if self.is_figure(request):
            if self.open and (request.post_data_json or {}).get("changedPropIds") == ["tick-network.data"]:
                self.ticks_while_open += 1
            self.open += 1
            self.sent += 1

    def ended(self, request) -> None:
        if self.is_figure(request):
            self.open -= 1


GRAPH = "document.querySelector('#net-graph .js-plotly-plot')"
TRACE_POINTS = """((uid) => { for (const el of document.querySelectorAll('#net-graph .scatterlayer .trace')) {
    const d = el.__data__; if (d && d[0] && d[0].trace && d[0].trace.uid === uid) {
    return Array.from(el.querySelectorAll('path.point')); } } return []; })"""


def trace_of(page, uid: str) -> dict | None:
    """The figure's trace ``uid`` as the page holds it (x, y, customdata), None when there is none."""
    return page.evaluate(f"(() => {{ const gd = {GRAPH}; if (!gd || !gd.data) return null;"
                         f" const t = gd.data.find(t => t.uid === '{uid}');"
                         " return t ? {x: t.x, y: t.y, customdata: t.customdata} : null; })()")


def overlapping_labels(page) -> list[tuple[str, str]]:
    """Pairs of the figure's annotations (column labels and captions) whose drawn boxes overlap, measured on the
    page."""
    boxes = page.evaluate("""Array.from(document.querySelectorAll('#net-graph .annotation')).map(a => {
        const r = a.querySelector('.annotation-text').getBoundingClientRect();
        return [a.textContent, r.left, r.top, r.right, r.bottom]; })""")
    pairs = []
    for i, (ta, l1, t1, r1, b1) in enumerate(boxes):
        for tb, l2, t2, r2, b2 in boxes[i + 1:]:
            if l1 < r2 - 0.5 and l2 < r1 - 0.5 and t1 < b2 - 0.5 and t2 < b1 - 0.5:
                pairs.append((ta, tb))
    return pairs


def click_point(page, uid: str, index: int) -> None:
    """Click point ``index`` of trace ``uid``, scrolled into view, as a user would."""
    handle = page.evaluate_handle(f"{TRACE_POINTS}('{uid}')[{index}]")
    handle.as_element().scroll_into_view_if_needed()
    box = handle.as_element().bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def choose(page, dropdown: str, value: str) -> None:
    """Pick ``value`` in a dropdown as a user does: open it and click the option (its list opens outside the
    dropdown's element)."""
    page.click(dropdown)
    page.locator(f"[role=option]:has(input[value='{value}'])").click()
    page.wait_for_selector(f"{dropdown}:has-text('{value}')")


def columns_drawn(page, count: int) -> None:
    page.wait_for_function(f"(() => {{ const gd = {GRAPH}; return gd && gd.layout && gd.layout.annotations"
                           f" && gd.layout.annotations.length === {2 * count}; }})()", timeout=60000)


def test_resnet50_default_grouping_draws_with_labels_apart(scale):
    page = scale["page"]
    page.get_by_text("Network", exact=True).click()
    page.wait_for_function(f"{TRACE_POINTS}('revacnn-nodes').length > 0", timeout=60000)
    labels = page.evaluate(f"{GRAPH}.layout.annotations.map(a => a.hovertext).filter(t => t)")
    assert labels[0] == "resnet.embedder.embedder.convolution" and labels[-1] == "classifier.1"
    assert overlapping_labels(page) == []
    page.screenshot(path=str(ARTIFACTS / "resnet50-network.png"), full_page=True)
    assert scale["failures"] == []


def test_resnet50_expanded_in_full_draws_strips_without_overlaps(scale):
    page = scale["page"]
    page.click("#btn-expand-all")
    columns_drawn(page, len(LAYERS))
    strips = trace_of(page, "revacnn-strips")
    # every layer past 32 filters is a 32-cell strip; the cells of a layer cover its filters once
    assert len(strips["x"]) == 32 * len(STRIP_LAYERS)
    cells = {}
    for layer, first, count, _group, action in strips["customdata"]:
        assert action == "open"
        cells.setdefault(layer, []).append((first, count))
    outs = {l["name"]: l["out"] for l in LAYERS}
    assert sorted(cells) == sorted(l["name"] for l in STRIP_LAYERS)
    assert all(sum(c for _, c in v) == outs[k] and v[0][0] == 0 for k, v in cells.items())
    # the nodes: a node per filter of the small layers, the 3 strongest of each big one
    nodes = trace_of(page, "revacnn-nodes")
    assert len(nodes["x"]) == sum(l["out"] for l in LAYERS if l["out"] <= 32) + 3 * len(STRIP_LAYERS)
    assert overlapping_labels(page) == []
    page.wait_for_timeout(2000)          # a few live updates while expanded
    page.screenshot(path=str(ARTIFACTS / "resnet50-expand-all.png"), full_page=True)
    assert scale["requests"].sent > 1 and scale["requests"].ticks_while_open == 0
    assert scale["failures"] == []


def test_a_strip_cell_opens_its_filters_and_the_way_back_closes_them(scale):
    page = scale["page"]
    strips = trace_of(page, "revacnn-strips")
    # the second strip: the first stage's shortcut, 256 filters, 8 a cell; a cell away from its strongest filters'
    # nodes, which sit beside their cells and would take the click
    layer = strips["customdata"][32][0]
    assert layer.endswith("stages.0.layers.0.shortcut.convolution")
    top = [c[1] for c in trace_of(page, "revacnn-nodes")["customdata"] if c[0] == layer]
    cell = next(i for i in range(32, 64) if all(abs(f // 8 - (i - 32)) > 1 for f in top))
    _, first, count, _, _ = strips["customdata"][cell]
    assert (first, count) == (8 * (cell - 32), 8)
    click_point(page, "revacnn-strips", cell)
    page.wait_for_selector(f"#net-details:has-text('{layer}')", timeout=20000)
    page.wait_for_selector(f"#net-details:has-text('filters {first}–{first + 7}')", timeout=20000)
    page.wait_for_function(f"(() => {{ const gd = {GRAPH}; const t = gd.data.find(t => t.uid === 'revacnn-nodes');"
                           f" return t.customdata.filter(c => c[0] === '{layer}').length === 9; }})()", timeout=30000)
    nodes = trace_of(page, "revacnn-nodes")
    mine = [c for c in nodes["customdata"] if c[0] == layer]
    assert mine[0][4] == "close" and [c[1] for c in mine[1:]] == list(range(first, first + 8))
    assert len(trace_of(page, "revacnn-strips")["x"]) == 32 * (len(STRIP_LAYERS) - 1)
    assert overlapping_labels(page) == []
    page.screenshot(path=str(ARTIFACTS / "resnet50-opened.png"), full_page=True)
    back = [i for i, c in enumerate(nodes["customdata"]) if c[4] == "close"][0]
    click_point(page, "revacnn-nodes", back)
    page.wait_for_function(f"(() => {{ const gd = {GRAPH}; const t = gd.data.find(t => t.uid === 'revacnn-strips');"
                           f" return t && t.x.length === {32 * len(STRIP_LAYERS)}; }})()", timeout=30000)
    assert scale["requests"].ticks_while_open == 0
    assert scale["failures"] == []


def test_an_embedding_of_2048_filters_draws_every_point_without_a_carpet_of_labels(scale):
    page = scale["page"]
    page.get_by_text("Embedding", exact=True).click()
    choose(page, "#emb-layer", EMBEDDED)
    page.wait_for_selector("#emb-status:has-text('PCA of 2048 filters')", timeout=60000)
    points = page.evaluate("document.querySelectorAll('#emb-graph .scatterlayer .trace:first-child path.point')"
                           ".length")
    texts = page.evaluate("document.querySelectorAll('#emb-graph .scatterlayer .trace:first-child text').length")
    assert points == 2048 and texts == 0           # the index on hover only
    page.screenshot(path=str(ARTIFACTS / "resnet50-embedding-pca.png"), full_page=True)
    assert scale["failures"] == []
