"""The network view at ResNet-50 scale in headless Chromium: a real ``Publisher`` streams transformers' ResNet-50
structure (54 layers, 26,570 filters, tests/model_shapes.py) and per-filter steps over real ZeroMQ to a real
``revacnn-dash`` process. The view must draw at the default grouping and expanded in full (big layers as density
strips, all of them one heatmap image), open a layer on a click on a strip cell and go back, never ask for a figure
while one is on the way, keep its labels apart (measured on the page), and answer no request with a 5xx.

Screenshots go to artifacts/network-scale/ (ignored by git). Run alone with:
pytest -m browser tests/test_network_scale_browser.py
"""

from __future__ import annotations

import json
import re
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


def strip_cells(page) -> list[dict]:
    """The density strips' cells as the page holds them (one heatmap: a column of cells per strip, rows bottom to
    top, the columns between strips empty), strip by strip, top to bottom: each cell's click data (JSON) and its
    centre in data units."""
    heat = trace_of(page, "revacnn-strips")
    if heat is None:
        return []
    x, y = heat["x"], heat["y"]
    cells = []
    for c in range(len(x) - 1):
        for r in reversed(range(len(y) - 1)):
            if heat["customdata"][r][c] is not None:
                layer, first, count, _group, action = json.loads(heat["customdata"][r][c])
                cells.append({"layer": layer, "first": first, "count": count, "action": action,
                              "x": (x[c] + x[c + 1]) / 2, "y": (y[r] + y[r + 1]) / 2})
    return cells


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
    strips = strip_cells(page)
    # every layer past 32 filters is a 32-cell strip, drawn as one image; the cells of a layer cover its filters once
    assert len(strips) == 32 * len(STRIP_LAYERS)
    assert page.evaluate("document.querySelectorAll('#net-graph .heatmaplayer image').length") == 1
    cells = {}
    for cell in strips:
        assert cell["action"] == "open"
        cells.setdefault(cell["layer"], []).append((cell["first"], cell["count"]))
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
    strips = strip_cells(page)
    # the second strip: the first stage's shortcut, 256 filters, 8 a cell; a cell away from its strongest filters'
    # nodes, which sit beside their cells and would take the click
    layer = strips[32]["layer"]
    assert layer.endswith("stages.0.layers.0.shortcut.convolution")
    top = [c[1] for c in trace_of(page, "revacnn-nodes")["customdata"] if c[0] == layer]
    cell = next(i for i in range(32, 64) if all(abs(f // 8 - (i - 32)) > 1 for f in top))
    first, count = strips[cell]["first"], strips[cell]["count"]
    assert (first, count) == (8 * (cell - 32), 8)
    x, y = to_screen(page, strips[cell]["x"], strips[cell]["y"])     # a cell of the image, clicked where it is
    page.mouse.move(x, y)
    page.mouse.click(x, y)
    page.wait_for_selector(f"#net-details:has-text('{layer}')", timeout=20000)
    page.wait_for_selector(f"#net-details:has-text('filters {first}–{first + 7}')", timeout=20000)
    page.wait_for_function(f"(() => {{ const gd = {GRAPH}; const t = gd && gd.data && gd.data.find(t => t.uid === 'revacnn-nodes');"
                           f" return t.customdata.filter(c => c[0] === '{layer}').length === 9; }})()", timeout=30000)
    nodes = trace_of(page, "revacnn-nodes")
    mine = [c for c in nodes["customdata"] if c[0] == layer]
    assert mine[0][4] == "close" and [c[1] for c in mine[1:]] == list(range(first, first + 8))
    assert len(strip_cells(page)) == 32 * (len(STRIP_LAYERS) - 1)
    assert overlapping_labels(page) == []
    page.screenshot(path=str(ARTIFACTS / "resnet50-opened.png"), full_page=True)
    back = [i for i, c in enumerate(nodes["customdata"]) if c[4] == "close"][0]
    click_point(page, "revacnn-nodes", back)
    wait_all_strips(page)
    assert scale["requests"].ticks_while_open == 0
    assert scale["failures"] == []


def column_index(page, layer: str) -> float:
    """The x of ``layer``'s column: where its strip's cells are drawn."""
    return next(c["x"] for c in strip_cells(page) if c["layer"] == layer)


def to_screen(page, x: float, y: float, scroll: bool = True) -> tuple[float, float]:
    """The viewport position of the data point (x, y); ``scroll``: the graph's scrolling box scrolled first to show
    it in the middle."""
    if scroll:
        page.evaluate(f"""(() => {{ const gd = {GRAPH}; const xa = gd._fullLayout.xaxis;
            const box = document.querySelector('#net-graph').parentElement;
            box.scrollLeft = Math.max(0, xa._offset + xa.l2p({x}) - box.clientWidth / 2); }})()""")
    return tuple(page.evaluate(f"""(() => {{ const gd = {GRAPH}; const r = gd.getBoundingClientRect();
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        return [r.left + xa._offset + xa.l2p({x}), r.top + ya._offset + ya.l2p({y})]; }})()"""))


def drag_box(page, x0: float, x1: float, y0: float, y1: float) -> None:
    """Draw a zoom box from data point (x0, y1) to (x1, y0) with the mouse, as a user does (the box's middle
    scrolled into view first)."""
    to_screen(page, (x0 + x1) / 2, (y0 + y1) / 2)
    left, top = to_screen(page, x0, y1, scroll=False)
    right, bottom = to_screen(page, x1, y0, scroll=False)
    page.mouse.move(left, top)
    page.mouse.down()
    page.mouse.move((left + right) / 2, (top + bottom) / 2, steps=4)
    page.mouse.move(right, bottom, steps=4)
    page.mouse.up()


def layer_nodes(page, layer: str) -> list[int]:
    """The filters of ``layer`` drawn as individual nodes (a node of one filter), as the page holds them."""
    nodes = trace_of(page, "revacnn-nodes")
    return [c[1] for c in nodes["customdata"] if c[0] == layer and c[2] == 1 and not c[4]]


def wait_layer_nodes(page, layer: str, count: int) -> None:
    page.wait_for_function(f"(() => {{ const gd = {GRAPH}; const t = gd && gd.data && gd.data.find(t => t.uid === 'revacnn-nodes');"
                           f" return t && t.customdata.filter(c => c[0] === '{layer}' && c[2] === 1 && !c[4]).length"
                           f" === {count}; }})()", timeout=60000)


def wait_all_strips(page) -> None:
    page.wait_for_function(f"(() => {{ const gd = {GRAPH}; const t = gd && gd.data && gd.data.find(t => t.uid === 'revacnn-strips');"
                           " return t && t.customdata.flat().filter(c => c).length ==="
                           f" {32 * len(STRIP_LAYERS)}; }})()", timeout=60000)


def test_zooming_in_draws_the_strips_in_view_filter_by_filter_and_zooming_out_returns(scale, tmp_path):
    from revacnn_dash.viewmodels.network import DETAIL_NODES

    page = scale["page"]
    wait_all_strips(page)
    outs = {l["name"]: l["out"] for l in LAYERS}
    shortcut = next(l["name"] for l in STRIP_LAYERS if l["name"].endswith("stages.0.layers.0.shortcut.convolution"))
    page.screenshot(path=str(tmp_path / "before-zoom.png"), full_page=True)
    # a box just wider than the 256-filter shortcut's column (narrower boxes zoom y only): that column alone in view
    ci = column_index(page, shortcut)
    drag_box(page, ci - 0.65, ci + 0.65, -0.015, 1.025)
    wait_layer_nodes(page, shortcut, outs[shortcut])
    assert layer_nodes(page, shortcut) == list(range(outs[shortcut]))   # every filter of it, each its own node
    # the other strips stay strips; the note says what the view draws
    assert len(strip_cells(page)) == 32 * (len(STRIP_LAYERS) - 1)
    assert page.evaluate(f"{GRAPH}.layout.annotations.some(a => a.text.startsWith("
                         f"'zoomed: {outs[shortcut]} filters of 1 strip(s)'))")
    page.screenshot(path=str(tmp_path / "zoomed-shortcut.png"), full_page=True)
    page.click("#btn-zoom-out")
    wait_all_strips(page)
    assert len(layer_nodes(page, shortcut)) == 3       # its strongest three beside its strip again

    # the 2,048-filter last conv: more filters in view than the cap, every 2nd drawn
    last = STRIP_LAYERS[-1]["name"]
    assert outs[last] == 2048 == 2 * DETAIL_NODES
    ci = column_index(page, last)
    drag_box(page, ci - 0.65, ci + 0.65, -0.015, 1.025)
    wait_layer_nodes(page, last, DETAIL_NODES)
    assert layer_nodes(page, last) == list(range(0, 2048, 2))
    assert page.evaluate(f"{GRAPH}.layout.annotations.some(a => a.text.includes('1,024 more in view hidden'))")
    # zoomed again into its top half: the filters whose rows are in the view, all of them
    drag_box(page, ci - 0.3, ci + 0.3, 0.55, 0.99)
    # the figure drawn for that zoom holds its ranges. A refresh requested before the zoom may still land after the
    # zoom's figure and show the previous ranges for one tick (known, docs/dashboard.md): read them once every
    # request made before the zoom has been answered
    zoomed = f"(() => {{ const r = {GRAPH}.layout.yaxis.range; return r[1] - r[0] < 0.9; }})()"
    page.wait_for_function(zoomed, timeout=60000)
    page.wait_for_timeout(1500)
    page.wait_for_function(zoomed, timeout=60000)
    y0, y1 = page.evaluate(f"{GRAPH}.layout.yaxis.range")
    expected = [i for i in range(2048) if y0 <= 1 - (i + 0.5) / 2048 <= y1]
    assert len(expected) < DETAIL_NODES
    wait_layer_nodes(page, last, len(expected))
    assert layer_nodes(page, last) == expected
    page.wait_for_timeout(1500)          # live updates while zoomed keep the zoom and the nodes
    assert layer_nodes(page, last) == expected
    page.screenshot(path=str(tmp_path / "zoomed-2048.png"), full_page=True)
    page.screenshot(path=str(ARTIFACTS / "resnet50-zoomed.png"), full_page=True)
    # a drawn filter is a node like any: a click selects it for steering (at its place in the data: the nodes
    # shake; they touch, so the one Plotly picks may be a neighbour)
    middle = expected[len(expected) // 2]
    x, y = to_screen(page, ci, 1 - (middle + 0.5) / 2048)
    # a click that lands while a live update redraws the graph is lost (Plotly replaces the node points under the
    # pointer), as it would be for a user, who clicks again: at most three clicks
    for attempt in range(3):
        page.mouse.move(x, y)
        page.mouse.click(x, y)
        try:
            page.wait_for_selector(f"#net-details:has-text('{last}')", timeout=8000)
            break
        except playwright_api.TimeoutError:
            if attempt == 2:
                raise
    chosen = re.search(r"filter (\d+)", page.inner_text("#net-details"))
    assert chosen and int(chosen.group(1)) in expected
    page.click("#btn-zoom-out")
    wait_all_strips(page)
    assert len(layer_nodes(page, last)) == 3
    page.screenshot(path=str(tmp_path / "after-zoom-out.png"), full_page=True)
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

