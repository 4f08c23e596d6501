"""The dashboard in the browser at the demo's and a ResNet-50's size (part (d) of benchmarks/dashboard.py).

The run: a real ``Publisher`` in this process publishes a structure, a step with per-filter statistics every
0.3 s and one snapshot holding the weights and gradients of one layer (the demo's conv2, 20 filters; the ResNet-50's
last 2,048-filter conv, ``stages.3.layers.2.layer.2``, weights 2,048 × 512 in 8 loose clusters) over real ZeroMQ to
a real ``revacnn-dash`` process (UMAP warm-up on, as by default), which headless Chromium (Playwright) shows. A
synthetic stream, not a real trainer: a ResNet-50 trained on the 2 shared cores would leave the dashboard and the
browser no CPU to measure. Layer names and widths are transformers' ResNet-50 (tests/model_shapes.py).

Measured in the page (``performance.now()``):
- navigation → network drawn: a click on the Network tab until the node trace's points are in the DOM (median of 3
  fresh page loads);
- expand all → drawn: a click on "Expand all" until every layer's column is drawn;
- update: a network figure request sent (assets/revacnn.js counts them at ``fetch``) until Plotly's
  ``plotly_afterplot`` for the figure it brought, while live, expanded in full (median and max over 10 s);
- frame rate while live: ``requestAnimationFrame`` callbacks a second over 5 s, and the jitter's frames a second;
- embedding: a click on PCA / t-SNE / UMAP until the embedding graph holds every filter's point, and the
  computation's own time as the page reports it (t-SNE's includes starting its helper process, the first use);
  everything is measured after the UMAP helper's warm-up, whose time the page reports;
- memory: RSS of the dashboard process and of its helper processes at the end (psutil).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from model_shapes import hf_resnet50_layers  # noqa: E402
from tsne_continuation import snapshots  # noqa: E402

DEMO = [{"name": "net.conv1", "out": 16, "in": 3, "k": 5}, {"name": "net.conv2", "out": 20, "in": 16, "k": 5},
        {"name": "net.conv3", "out": 20, "in": 20, "k": 5}, {"name": "net.fc", "out": 10, "in": 20480, "k": None}]
MODELS = {"demo": (DEMO, "net.conv2"),
          "resnet50": (hf_resnet50_layers(), "model.resnet.encoder.stages.3.layers.2.layer.2.convolution")}
GRAPH = "document.querySelector('#net-graph .js-plotly-plot')"
NODES_DRAWN = """(() => { for (const el of document.querySelectorAll('#net-graph .scatterlayer .trace')) {
    const d = el.__data__; if (d && d[0] && d[0].trace && d[0].trace.uid === 'revacnn-nodes') {
    return el.querySelectorAll('path.point').length; } } return 0; })()"""


def publish(model: str, pub, stop: threading.Event) -> None:
    """The structure, one snapshot of the embedded layer, then a per-filter step every 0.3 s until ``stop``."""
    from revacnn.wire.protocol import Message

    layers, embedded = MODELS[model]
    names = [l["name"] for l in layers]
    pub.publish(Message("structure", {
        "revision": 0, "step": 0, "model": model,
        "layers": [{"name": l["name"], "type": "Linear" if l["k"] is None else "Conv2d", "out": l["out"],
                    "in": l["in"], "kernel": l["k"], "frozen": None} for l in layers],
        "layer_edges": [[a, b] for a, b in zip(names, names[1:])]}))
    layer = next(l for l in layers if l["name"] == embedded)
    k = layer["k"] or 1
    weight = snapshots(layer["out"], layer["in"] * k * k, count=1)[0].astype(np.float32)
    weight = weight.reshape(layer["out"], layer["in"], k, k)
    pub.publish(Message("snapshot", {"step": 1}, {f"weight/{embedded}": weight,
                                                  f"grad/{embedded}": np.abs(weight) * 1e-3}))
    rng = np.random.default_rng(0)
    total = sum(l["out"] for l in layers)
    step = 0
    while not stop.wait(0.3):
        step += 1
        pub.publish(Message("step", {"step": step, "loss": 1.0 / step, "groups": [{"lr": 0.1}], "per_filter": True,
                                     "revision": 0, "layer_names": names},
                            {"filters": rng.random((5, total), dtype=np.float32)}))


def wait_js(page, expression: str, timeout_s: float = 120) -> None:
    page.wait_for_function(expression, timeout=timeout_s * 1000, polling="raf")


def timed_click(page, selector: str, done: str, timeout_s: float = 120) -> float:
    """Seconds from a click on ``selector`` until the JavaScript expression ``done`` holds (checked each frame)."""
    page.evaluate("() => { window.__t0 = performance.now(); }")
    page.click(selector)
    wait_js(page, done, timeout_s)
    return page.evaluate("() => (performance.now() - window.__t0) / 1000")


def frame_rates(page, seconds: float = 5.0) -> tuple[float, float]:
    """Display frames a second and the jitter's frames a second, over ``seconds``."""
    return tuple(page.evaluate("""(ms) => new Promise(done => {
        const R = window.__revacnn || {frames: 0}; const j0 = R.frames; let n = 0; const t0 = performance.now();
        const f = () => { n++; if (performance.now() - t0 < ms) { requestAnimationFrame(f); return; }
            const s = (performance.now() - t0) / 1000; done([n / s, ((window.__revacnn || R).frames - j0) / s]); };
        requestAnimationFrame(f); })""", seconds * 1000))


def update_seconds(page, seconds: float = 10.0) -> list[float]:
    """Request → drawn of each network figure drawn while live over ``seconds``."""
    page.evaluate(f"""() => {{ window.__upd = []; {GRAPH}.on('plotly_afterplot', () => {{
        const s = window.__revacnnNet.lastSent; if (s) {{ window.__upd.push((performance.now() - s) / 1000); }}
        }}); }}""")
    page.wait_for_timeout(seconds * 1000)
    return page.evaluate("() => window.__upd")


def open_page(browser, port: int):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"http://127.0.0.1:{port}/")
    page.wait_for_selector("#conn-banner:has-text('LIVE')", timeout=120000)
    page.wait_for_selector("#run-summary:has-text('step ')", timeout=120000)
    return page


def umap_warmed(page, timeout_s: float = 900) -> str:
    """Wait for the UMAP helper's warm-up; its time as the page reports it. The status line is rewritten when the
    embedding shown changes, so the colour is switched back and forth to read it."""
    page.get_by_text("Embedding", exact=True).click()
    deadline = time.monotonic() + timeout_s
    colours = ["cluster", "grad"]
    while "UMAP ready" not in page.inner_text("#emb-status"):
        if time.monotonic() > deadline:
            raise TimeoutError(page.inner_text("#emb-status"))
        page.click(f"#emb-colour input[value='{colours[0]}']")
        colours.reverse()
        page.wait_for_timeout(5000)
    page.click("#emb-colour input[value='grad']")
    return page.inner_text("#emb-status").split("warm-up took ")[-1].split(")")[0]


def embedding_seconds(page, model: str) -> dict:
    layers, embedded = MODELS[model]
    n = next(l["out"] for l in layers if l["name"] == embedded)
    page.get_by_text("Embedding", exact=True).click()
    page.click("#emb-layer")
    page.locator(f"[role=option]:has(input[value='{embedded}'])").click()
    wait_js(page, "document.querySelector('#emb-status') && "
                  "document.querySelector('#emb-status').innerText.includes('PCA of')", 120)
    out = {"filters": n}
    done = ("document.querySelectorAll('#emb-graph .scatterlayer .trace:first-child path.point').length === "
            f"{n} && document.querySelector('#emb-status').innerText.includes('{{M}} of {n} filters')")
    for method, label in (("tsne", "TSNE"), ("umap", "UMAP"), ("pca", "PCA")):
        out[method] = timed_click(page, f"#emb-method input[value='{method}']", done.replace("{M}", label), 300)
        out[method + "_server"] = float(page.inner_text("#emb-status").split(" in ")[1].split(" s")[0])
    return out


def measure(model: str, tmp: Path) -> dict:
    import psutil
    from playwright.sync_api import sync_playwright

    from revacnn.wire.connection import ConnectionInfo
    from revacnn.wire.publisher import Publisher

    pub = Publisher(f"bench-{model}", heartbeat_s=1.0).start()
    pub.set_status(state="running", step=0)
    conn = ConnectionInfo(f"bench-{model}", pub.telemetry_endpoint, pub.control_endpoint).write(
        tmp / model / "connection.json")
    stop = threading.Event()
    feeder = threading.Thread(target=publish, args=(model, pub, stop), daemon=True)
    feeder.start()
    from browser_support import free_port
    port = free_port()
    log = open(tmp / f"dash-{model}.log", "w")
    dash = subprocess.Popen([sys.executable, "-m", "revacnn_dash.cli", "--connect", str(conn), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "REVACNN_DASH_TOKEN": ""})
    layers = MODELS[model][0]
    out: dict = {"model": model, "layers": len(layers), "filters": sum(l["out"] for l in layers)}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                        args=["--no-sandbox", "--disable-gpu"])
            deadline = time.monotonic() + 120
            while True:
                try:
                    page = open_page(browser, port)
                    break
                except Exception:
                    if time.monotonic() > deadline or dash.poll() is not None:
                        raise
                    time.sleep(1)
            # the UMAP helper's warm-up (numba compiling, minutes on the loaded machine) first, so that it does
            # not take the CPU from the other measurements
            out["umap_warmup"] = umap_warmed(page)
            navigation = []
            for attempt in range(3):
                page.close()
                page = open_page(browser, port)
                navigation.append(timed_click(page, "text=Network", f"{NODES_DRAWN} > 0"))
            out["navigation_s"] = navigation
            out["fps_default"] = frame_rates(page)
            out["expand_s"] = timed_click(page, "#btn-expand-all", f"(() => {{ const gd = {GRAPH}; return gd &&"
                                          f" gd.layout.annotations.length === {2 * len(layers)} &&"
                                          f" {NODES_DRAWN} > 0; }})()")
            out["update_s"] = update_seconds(page)
            out["fps_expanded"] = frame_rates(page)
            out["embedding"] = embedding_seconds(page, model)
            browser.close()
        proc = psutil.Process(dash.pid)
        out["rss_mb"] = proc.memory_info().rss / 2**20
        out["helpers_mb"] = sum(c.memory_info().rss for c in proc.children(recursive=True)) / 2**20
    finally:
        stop.set()
        dash.terminate()
        try:
            dash.wait(30)
        except subprocess.TimeoutExpired:   # slow to stop on a loaded machine: the figures are taken, keep them
            dash.kill()
            dash.wait(30)
        pub.close()
    return out


def report(results: list[dict]) -> list[str]:
    """The markdown rows of part (d)."""
    lines = ["| model | layers | filters | navigation → network drawn s (median of 3) | expand all → drawn s | "
             "update s (median / max, expanded, live) | fps default / expanded (display; jitter) | "
             "embedding s, click → drawn (of which computing): PCA / t-SNE / UMAP (filters) | UMAP warm-up | dashboard RSS MiB | helpers RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        upd = r["update_s"] or [float("nan")]
        e = r["embedding"]
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['filters']:,} | {statistics.median(r['navigation_s']):.2f} | "
            f"{r['expand_s']:.2f} | {statistics.median(upd):.2f} / {max(upd):.2f} | "
            f"{r['fps_default'][0]:.0f}; {r['fps_default'][1]:.0f} / {r['fps_expanded'][0]:.0f}; "
            f"{r['fps_expanded'][1]:.0f} | {e['pca']:.2f} ({e['pca_server']:.2f}) / {e['tsne']:.2f} "
            f"({e['tsne_server']:.2f}) / {e['umap']:.2f} ({e['umap_server']:.2f}) ({e['filters']:,}) | "
            f"{r['umap_warmup']} | {r['rss_mb']:.0f} | {r['helpers_mb']:.0f} |")
    return lines
