"""Dashboard benchmark: step-to-browser latency, network figure / layout update cost, memory of a long run.

    python benchmarks/dashboard.py                 # ~5 minutes on 2 cores
    python benchmarks/dashboard.py --append        # also append the results to benchmarks/RESULTS.md

(a) Latency: a real ``Publisher`` in this process publishes one ``step`` message at a time (random spacing, so the
    publish time falls at random phases of the page's poll); a real ``revacnn-dash`` subprocess (waitress, loopback)
    serves the page to headless Chromium (Playwright). A MutationObserver in the page records ``Date.now()`` the
    first time the run summary shows ``step N``; latency = that time minus ``time.time()`` just before
    ``Publisher.publish`` (same host, same clock). Measured with the default page refresh (500 ms) and with
    ``--refresh-ms 1000``.
(a2) The same latency in a real training run: the demo trained by a real Trainer with ``ReVACNNCallback()`` at its
    defaults (a subprocess that stamps each step's end), so the whole path counts: the step read one step late, its
    wait in a ``steps`` batch, the I/O thread's send timer, the hub, the page's poll and the render.
(b) Server side: ``network_model`` + figure + JSON for a ResNet-50-sized structure (53 conv layers, 26,560 filters,
    + fc 1000) and for the demo model (conv 16, 20, 20 + fc 10); then the whole ``/_dash-update-component`` request
    of the network view through Flask's test client (first render, and updates each after a new per-filter step).
(d) In the browser at the demo's and a ResNet-50's size: navigation → network drawn, expand all → drawn, updates,
    frame rate while live, embedding of 2,048 filters, memory of the dashboard and its helpers
    (benchmarks/dashboard_browser.py says how). ``--only-scale`` runs this part alone.
(c) Memory: a child process loads the dashboard (Dash app + Hub) and applies 10,000 ``step`` messages with
    per-filter data (fresh float32 [5, F] arrays) to a RunState through ``RunState.apply`` — the code path of the
    I/O thread after decoding — and reports its RSS before and after (VmRSS / VmHWM from /proc).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # ResNet-50 layer shapes, shared with the tests
from model_shapes import resnet50_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("grad_abs_mean", "grad_sq_mean", "weight_norm", "update_ratio", "act_abs_mean")


# -- models ---------------------------------------------------------------------------------------------------------
MODELS = {"demo": [("net.conv1", 16), ("net.conv2", 20), ("net.conv3", 20), ("net.fc", 10)],
          "resnet50": [(layer["name"], layer["out"]) for layer in resnet50_layers()]}


def structure_body(model: str) -> dict:
    layers = MODELS[model]
    names = [n for n, _ in layers]
    return {"revision": 0, "step": 0,
            "layers": [{"name": n, "type": "Linear" if n.endswith("fc") else "Conv2d", "out": out, "frozen": None}
                       for n, out in layers],
            "layer_edges": [[a, b] for a, b in zip(names, names[1:])]}


def step_message(model: str, step: int, rng: np.random.Generator):
    from revacnn.wire.protocol import Message

    layers = MODELS[model]
    total = sum(out for _, out in layers)
    return Message("step", {"step": step, "loss": 1.0 / (1 + step), "groups": [{"lr": 0.1}], "per_filter": True,
                            "revision": 0, "layer_names": [n for n, _ in layers]},
                   {"filters": rng.random((len(FIELDS), total), dtype=np.float32)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# -- (a) latency -------------------------------------------------------------------------------------------------
OBSERVER_JS = """
() => {
  window.__seen = {};
  const el = document.getElementById('run-summary');
  const look = () => {
    const m = /step (\\d+)/.exec(el.innerText || '');
    if (m && !(m[1] in window.__seen)) { window.__seen[m[1]] = Date.now(); }
  };
  new MutationObserver(look).observe(el, {childList: true, subtree: true, characterData: true});
  look();
}
"""


def open_live_page(playwright, port: int, dash: subprocess.Popen, deadline: float):
    """Headless Chromium on the dashboard at ``port`` once it serves (retried until ``deadline`` unless the
    dashboard process exits), and once the page shows the run LIVE. Returns (browser, page)."""
    browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                         args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page()
    while True:
        try:
            page.goto(f"http://127.0.0.1:{port}/")
            break
        except Exception:
            if time.monotonic() > deadline or dash.poll() is not None:
                raise
            time.sleep(0.5)
    page.wait_for_selector("#conn-banner:has-text('LIVE')", timeout=60000)
    return browser, page


def latency(refresh_ms: int, steps: int, spacing: tuple[float, float], tmp: Path) -> dict:
    from playwright.sync_api import sync_playwright

    from revacnn.wire.connection import ConnectionInfo
    from revacnn.wire.protocol import Message
    from revacnn.wire.publisher import Publisher

    pub = Publisher("latency-bench", heartbeat_s=1.0).start()
    pub.set_status(state="running", step=0)
    pub.publish(Message("structure", structure_body("demo")))
    conn = ConnectionInfo("latency-bench", pub.telemetry_endpoint, pub.control_endpoint).write(
        tmp / f"run{refresh_ms}" / "connection.json")
    port = _free_port()
    log = open(tmp / f"dash{refresh_ms}.log", "w")
    dash = subprocess.Popen([sys.executable, "-m", "revacnn_dash.cli", "--connect", str(conn), "--port", str(port),
                             "--no-umap-warmup", "--refresh-ms", str(refresh_ms)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "REVACNN_DASH_TOKEN": ""})
    rng = np.random.default_rng(1)
    published: dict[int, float] = {}
    try:
        with sync_playwright() as p:
            browser, page = open_live_page(p, port, dash, time.monotonic() + 60)
            step = 1
            pub.publish(step_message("demo", step, rng))
            page.wait_for_selector("#run-summary:has-text('step 1 ')", timeout=30000)
            page.evaluate(OBSERVER_JS)
            rand = random.Random(2)
            for step in range(1000, 1000 + steps):
                time.sleep(rand.uniform(*spacing))
                published[step] = time.time()
                pub.publish(step_message("demo", step, rng))
            time.sleep(refresh_ms / 1000 * 3 + 1)
            seen = {int(k): v / 1000 for k, v in page.evaluate("() => window.__seen").items()}
            browser.close()
    finally:
        dash.terminate()
        dash.wait(10)
        pub.close()
    lat = []
    missed = 0
    for step, t in published.items():
        later = [v for k, v in seen.items() if k >= step]
        if not later:
            missed += 1
            continue
        lat.append(min(later) - t)         # this step shown, or a later one (when two fell into one poll)
    shown_exact = sum(1 for s in published if s in seen)
    return {"refresh_ms": refresh_ms, "steps": steps, "shown_exact": shown_exact, "missed": missed,
            "median_ms": statistics.median(lat) * 1000, "p95_ms": _pct(lat, 95) * 1000, "max_ms": max(lat) * 1000,
            "min_ms": min(lat) * 1000}


# -- (a2) latency of a real training run ----------------------------------------------------------------------
def train_child(root: Path) -> None:
    """The demo run at the callback's defaults; stamps ``time.time()`` at each step's end into ROOT/stamps.json,
    until ROOT/stop exists."""
    import pytorch_lightning as pl
    import torch

    from revacnn import ReVACNNCallback
    from revacnn.demo.data import DigitsDataModule
    from revacnn.demo.models import ClassifierModule, ReVACNNNet

    class StampSteps(pl.Callback):
        def __init__(self) -> None:
            self.stamps: list[tuple[int, float]] = []

        def on_train_batch_end(self, trainer, *args) -> None:
            self.stamps.append((trainer.global_step, time.time()))
            if len(self.stamps) % 20 == 0 and (root / "stop").exists():
                trainer.should_stop = True

    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    stamps = StampSteps()
    trainer = pl.Trainer(max_epochs=10_000, callbacks=[ReVACNNCallback(), stamps], default_root_dir=str(root),
                         log_every_n_steps=10, enable_model_summary=False, enable_progress_bar=False, logger=False)
    trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=32))
    (root / "stamps.json").write_text(json.dumps(stamps.stamps))


def training_latency(refresh_ms: int, seconds: float, tmp: Path) -> dict:
    """Step → browser latency of a real training run: the demo trained by a real Trainer with ``ReVACNNCallback()``
    at its defaults, so every part of the path is in it: the step read one step late, its wait in a ``steps`` batch,
    the I/O thread's send timer, the dashboard's hub, the page's poll and the browser's render. Latency of step N =
    the first time the page shows step N or a later one − the time step N ended (same host clock)."""
    from playwright.sync_api import sync_playwright

    root = tmp / f"train{refresh_ms}"
    root.mkdir(parents=True)
    log = open(tmp / f"train{refresh_ms}.log", "w")
    train = subprocess.Popen([sys.executable, __file__, "--train-child", str(root)], stdout=log,
                             stderr=subprocess.STDOUT, cwd=ROOT)
    dash = None
    try:
        deadline = time.monotonic() + 120
        connection = None
        while connection is None:
            found = sorted(root.glob("**/revacnn/connection.json"))
            connection = found[-1] if found else None
            if time.monotonic() > deadline or train.poll() is not None:
                raise RuntimeError(f"the training run did not start; see {log.name}")
            time.sleep(0.2)
        port = _free_port()
        dash = subprocess.Popen([sys.executable, "-m", "revacnn_dash.cli", "--connect", str(connection), "--port",
                                 str(port), "--no-umap-warmup", "--refresh-ms", str(refresh_ms)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "REVACNN_DASH_TOKEN": ""})
        with sync_playwright() as p:
            browser, page = open_live_page(p, port, dash, deadline)
            page.wait_for_selector("#run-summary:has-text('step ')", timeout=60000)
            page.evaluate(OBSERVER_JS)
            watch_from = time.time()
            time.sleep(seconds)
            watch_to = time.time()
            seen = {int(k): v / 1000 for k, v in page.evaluate("() => window.__seen").items()}
            browser.close()
        (root / "stop").touch()
        train.wait(60)
    finally:
        for process in (train, dash):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
        log.close()
    ended = json.loads((root / "stamps.json").read_text())
    shown = sorted(seen.items())
    lat = []
    for step, t in ended:
        # steps that end after the observer starts and early enough for the page to show them before it stops
        if t < watch_from + 0.5 or t > watch_to - 3 * refresh_ms / 1000 - 1:
            continue
        later = [when for shown_step, when in shown if shown_step >= step]
        lat.append(min(later) - t if later else math.inf)
    finite = [x for x in lat if math.isfinite(x)]
    return {"refresh_ms": refresh_ms, "seconds": seconds, "steps": len(lat), "updates": len(shown),
            "missed": len(lat) - len(finite),
            "steps_per_s": sum(watch_from <= t <= watch_to for _, t in ended) / (watch_to - watch_from),
            "median_ms": statistics.median(finite) * 1000, "p95_ms": _pct(lat, 95) * 1000,
            "max_ms": max(lat) * 1000, "min_ms": min(finite) * 1000}


# -- (b) server side ---------------------------------------------------------------------------------------------
def server_side(model: str, updates: int = 10) -> dict:
    from revacnn.wire.protocol import Message
    from revacnn_dash.app import create_app
    from revacnn_dash.compute.layers import default_expanded
    from revacnn_dash.data.hub import Hub
    from revacnn_dash.data.state import RunState
    from revacnn_dash.figures.network import network_figure as _network_figure
    from revacnn_dash.viewmodels.network import network_model

    rng = np.random.default_rng(0)
    hub = Hub([], warm_umap=False)
    state = RunState(f"bench-{model}")
    hub.runs[state.key] = state
    state.apply(Message("structure", structure_body(model)))
    state.apply(step_message(model, 1, rng))
    names = [n for n, _ in MODELS[model]]

    # the figure alone: view model + plotly figure + JSON, as the callback does it
    figure_s = []
    for i in range(5):
        t0 = time.perf_counter()
        fig, _ = _network_figure(network_model(state.structure, state.filters_by_layer(), default_expanded(names)))
        json.dumps(fig.to_plotly_json(), cls=__import__("plotly").utils.PlotlyJSONEncoder)
        figure_s.append(time.perf_counter() - t0)

    app = create_app(hub)
    client = app.server.test_client()
    deps = client.get("/_dash-dependencies").get_json()
    dep = next(d for d in deps if d["output"].startswith("..net-graph.figure"))
    outputs = [{"id": part.rsplit(".", 1)[0], "property": part.rsplit(".", 1)[1]}
               for part in dep["output"].strip(".").split("...")]

    def request(sig, n, parse=True):
        payload = {"output": dep["output"], "outputs": outputs,
                   "inputs": [{"id": "tick", "property": "n_intervals", "value": n},
                              {"id": "net-expanded", "property": "data", "value": None},
                              {"id": "run-select", "property": "value", "value": state.key},
                              {"id": "tabs", "property": "value", "value": "network"}],
                   "state": [{"id": "net-sig", "property": "data", "value": sig}],
                   "changedPropIds": ["tick.n_intervals"]}
        t0 = time.perf_counter()
        r = client.post("/_dash-update-component", json=payload)
        elapsed = time.perf_counter() - t0
        assert r.status_code in (200, 204), r.data[:300]
        if not parse:
            return elapsed, r.status_code
        body = r.get_json()
        return elapsed, len(r.data), body["response"]["net-sig"]["data"], len(
            body["response"]["net-graph"]["figure"]["data"][-1]["x"])

    first, size, sig, nodes = request(None, 1)
    update_s = []
    for i in range(updates):
        state.apply(step_message(model, 2 + i, rng))
        elapsed, size, sig, nodes = request(sig, 2 + i)
        update_s.append(elapsed)
    unchanged, code = request(sig, 99, parse=False)       # nothing new: the signature short-cut (no_update)

    hub.stop()
    layers = MODELS[model]
    return {"model": model, "layers": len(layers), "filters": sum(o for _, o in layers), "nodes": nodes,
            "figure_ms": statistics.median(figure_s) * 1000, "first_ms": first * 1000,
            "update_median_ms": statistics.median(update_s) * 1000, "update_max_ms": max(update_s) * 1000,
            "unchanged_ms": unchanged * 1000, "response_kb": size / 1024}


# -- (c) memory ------------------------------------------------------------------------------------------------------
def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_child(model: str, steps: int) -> None:
    from revacnn.wire.protocol import Message
    from revacnn_dash.app import create_app
    from revacnn_dash.data.hub import Hub
    from revacnn_dash.data.state import RunState

    hub = Hub([], warm_umap=False)
    create_app(hub)
    state = RunState(f"mem-{model}")
    hub.runs[state.key] = state
    state.apply(Message("structure", structure_body(model)))
    base = _proc_kb("VmRSS")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        state.apply(step_message(model, step, rng))
    elapsed = time.perf_counter() - t0
    filters = sum(o for _, o in MODELS[model])
    print(json.dumps({"model": model, "steps": steps, "filters": filters, "rss_base_mb": base / 1024,
                      "rss_after_mb": _proc_kb("VmRSS") / 1024, "hwm_mb": _proc_kb("VmHWM") / 1024,
                      "kept_filter_steps": len(state.filter_steps), "scalar_rows": len(state.scalars),
                      "ring_mb": len(state.filter_steps) * len(FIELDS) * filters * 4 / 2**20,
                      "apply_us_per_step": elapsed / steps * 1e6}))


def memory(model: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", model, "--memory-steps", str(steps)],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------------------------------------
def report(lat: list[dict], train_lat: list[dict], side: list[dict], mem: list[dict], scale: list[dict],
           command: str) -> str:
    cpu = "?"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import dash
    import plotly

    lines = [f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, "
             f"dash {dash.__version__}, plotly {plotly.__version__}, headless Debian Chromium; load average at the "
             f"end {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs shared the machine)", "",
             "(a) Step → browser latency: a real Publisher publishes one step; a real `revacnn-dash` process serves "
             "the page; a MutationObserver in the page stamps `Date.now()` when the run summary first shows that "
             "step (or a later one); latency = that − `time.time()` before `publish` (same host clock). "
             "Demo structure, no per-filter work on the page (Training tab).", "",
             "| page refresh | steps | shown exactly | median ms | p95 ms | min ms | max ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in lat:
        lines.append(f"| {r['refresh_ms']} ms | {r['steps']} | {r['shown_exact']} | {r['median_ms']:.0f} | "
                     f"{r['p95_ms']:.0f} | {r['min_ms']:.0f} | {r['max_ms']:.0f} |")
    lines += ["", "(a2) Step → browser latency in a real training run: the demo trained by a real Trainer with "
              "`ReVACNNCallback()` at its defaults, in a subprocess that stamps `time.time()` at each step's end; "
              "latency of step N = the first time the page shows step N or a later one − the end of step N. "
              "Every step that ended while the page watched counts (steps/s: the trainer's, sharing the 2 cores "
              "with the dashboard and Chromium).", "",
              "| page refresh | watched s | steps | page updates | steps/s | median ms | p95 ms | min ms | max ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in train_lat:
        lines.append(f"| {r['refresh_ms']} ms | {r['seconds']:.0f} | {r['steps']:,} | {r['updates']} | "
                     f"{r['steps_per_s']:.0f} | {r['median_ms']:.0f} | {r['p95_ms']:.0f} | {r['min_ms']:.0f} | "
                     f"{r['max_ms']:.0f} |")
    lines += ["", "(b) Network view, server side (median of 5 figure builds; the update request through Flask's test "
              "client, median/max of 10 updates, each after a new per-filter step):", "",
              "| model | layers | filters | nodes drawn | figure build ms | first render request ms | "
              "update request ms (median / max) | unchanged tick ms | response KiB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in side:
        lines.append(f"| {r['model']} | {r['layers']} | {r['filters']:,} | {r['nodes']} | {r['figure_ms']:.0f} | "
                     f"{r['first_ms']:.0f} | {r['update_median_ms']:.0f} / {r['update_max_ms']:.0f} | "
                     f"{r['unchanged_ms']:.1f} | {r['response_kb']:.0f} |")
    lines += ["", "(c) Memory of a dashboard process (Dash app + Hub loaded) holding one run after 10,000 step "
              "messages with per-filter data (ring buffers: 20k scalar rows, 256 per-filter steps):", "",
              "| model | filters | steps applied | per-filter steps kept | ring MiB (float32) | RSS before MiB | "
              "RSS after MiB | peak RSS MiB | apply µs/step |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in mem:
        lines.append(f"| {r['model']} | {r['filters']:,} | {r['steps']:,} | {r['kept_filter_steps']} | "
                     f"{r['ring_mb']:.1f} | {r['rss_base_mb']:.0f} | {r['rss_after_mb']:.0f} | {r['hwm_mb']:.0f} | "
                     f"{r['apply_us_per_step']:.0f} |")
    if scale:
        from dashboard_browser import report as scale_report
        lines += ["", "(d) In the browser (benchmarks/dashboard_browser.py): a synthetic stream over the real wire "
                  "(structure, a per-filter step every 0.3 s, one snapshot), a real `revacnn-dash`, headless "
                  "Chromium; times measured in the page.", "", *scale_report(scale)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--steps", type=int, default=50, help="published steps per latency run (default 50)")
    parser.add_argument("--memory-steps", type=int, default=10000)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--train-child", help=argparse.SUPPRESS)
    parser.add_argument("--training-seconds", type=float, default=60,
                        help="seconds the page watches the real training run in (a2) (default 60)")
    parser.add_argument("--skip-browser", action="store_true", help="skip (a), (a2) and (d)")
    parser.add_argument("--only-scale", action="store_true", help="run (d) alone")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.memory_steps)
        return 0
    if args.train_child:
        train_child(Path(args.train_child))
        return 0
    started = time.monotonic()
    side, mem, lat, train_lat, scale = [], [], [], [], []
    if not args.only_scale:
        side = [server_side(m) for m in ("demo", "resnet50")]
        print(json.dumps(side, indent=1), flush=True)
        mem = [memory(m, args.memory_steps) for m in ("demo", "resnet50")]
        print(json.dumps(mem, indent=1), flush=True)
    if not args.skip_browser:
        from dashboard_browser import measure as measure_scale
        with tempfile.TemporaryDirectory() as tmp:
            for model in ("demo", "resnet50"):
                scale.append(measure_scale(model, Path(tmp)))
                print(json.dumps(scale[-1]), flush=True)
    if not args.skip_browser and not args.only_scale:
        with tempfile.TemporaryDirectory() as tmp:
            for refresh_ms in (500, 1000):
                spacing = (refresh_ms / 1000, refresh_ms / 1000 * 1.4)
                lat.append(latency(refresh_ms, args.steps, spacing, Path(tmp)))
                print(json.dumps(lat[-1]), flush=True)
            for refresh_ms in (500, 1000):
                train_lat.append(training_latency(refresh_ms, args.training_seconds, Path(tmp)))
                print(json.dumps(train_lat[-1]), flush=True)
    command = "python benchmarks/dashboard.py" + (" --only-scale" if args.only_scale else "") + \
        (" --append" if args.append else "")
    text = report(lat, train_lat, side, mem, scale, command)
    print(text)
    print(f"total {time.monotonic() - started:.0f} s")
    if args.append:
        path = ROOT / "benchmarks" / "RESULTS.md"
        existing = path.read_text()
        if "\n## Dashboard\n" not in existing:
            existing = existing.rstrip("\n") + "\n\n## Dashboard\n"
        path.write_text(existing.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
