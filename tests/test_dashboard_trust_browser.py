"""The dashboard a practitioner can trust, in headless Chromium against `revacnn demo` (a real trainer and a real
dashboard): a page opened mid-run charts the run from step 1, a done ack says what changed, a replayed early step
shows the structure of that step, a restarted trainer is followed with a fresh event log, the analysis pages open on
the watched run, and a diverged (NaN) run's every view renders — no HTTP 5xx answer during the whole module.

Screenshots go to artifacts/dashboard/ (ignored by git). Run alone with:
pytest -m browser tests/test_dashboard_trust_browser.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser_support import CHROMIUM, CHROMIUM_ARGS, free_port, require_chromium, served_dashboard
from helpers import processes_mentioning, wait_for

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "dashboard"
playwright_api = pytest.importorskip("playwright.sync_api")
require_chromium()

NODES = "#net-graph .scatterlayer .trace:last-child path.point"


def demo_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("revacnn")
    return ([str(script)] if script.exists() else [sys.executable, "-m", "revacnn.cli"]) + ["demo", *args]


def trainer_command(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "revacnn.demo.train_digits", "--epochs", "200", "--slow", "0.03",
            "--snapshot-every", "25", "--root", str(root), *args]


def connection_files(root: Path) -> list[Path]:
    return sorted(root.glob("lightning_logs/version_*/revacnn/connection.json"), key=lambda p: p.stat().st_mtime)


def watch_responses(page, failures: list) -> None:
    page.on("response", lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 500 else None)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_factory.mktemp("demo")
    root, port = tmp / "run", free_port()
    log = tmp / "demo.log"
    process = subprocess.Popen(demo_command("--root", str(root), "--port", str(port), "--epochs", "200",
                                            "--slow", "0.03"),
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    extra: list[subprocess.Popen] = []
    try:
        assert wait_for(lambda: f"dashboard: http://127.0.0.1:{port}/" in log.read_text(), 180, 0.3), \
            log.read_text()[-3000:]
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30000)
            failures: list[str] = []
            watch_responses(page, failures)
            yield {"page": page, "browser": browser, "root": root, "url": f"http://127.0.0.1:{port}/",
                   "failures": failures, "extra": extra, "log": log}
            browser.close()
    finally:
        for child in extra:
            child.kill()
            child.wait(10)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def js_wait(page, expression: str, timeout: float = 30.0):
    page.wait_for_function(expression, timeout=timeout * 1000)
    return page.evaluate(expression)


def chart_x(page) -> list:
    return page.evaluate("(() => { const gd = document.querySelector('#train-graph .js-plotly-plot');"
                         " return gd && gd.data && gd.data[0] ? gd.data[0].x : []; })()")


def event_row(page, text: str, status: str = "done") -> str:
    page.wait_for_selector(f"#event-log tr.ev-row:has-text('{text}') .ev-{status}", timeout=40000)
    return [r for r in page.locator("#event-log tr.ev-row").all_inner_texts() if text in r][0]


def pick(page, menu: str, option_text: str | re.Pattern) -> None:
    """Choose an option of a dcc.Dropdown (a tick may re-render the header and close the menu: try again)."""
    text = option_text if isinstance(option_text, re.Pattern) else \
        re.compile(re.escape(option_text) + r"(?!\d)")        # "step 1" is not "step 100"
    if text.search(page.inner_text(menu)):
        return                                  # chosen already (clicking it again would leave the menu open)
    for _ in range(4):
        page.click(menu)
        try:
            page.get_by_role("option").filter(has_text=text).first.click(timeout=4000)
            if page.locator(".dash-dropdown-content").count():
                page.keyboard.press("Escape")
            return
        except playwright_api.TimeoutError:
            page.keyboard.press("Escape")
    raise AssertionError(f"no option {option_text!r} in {menu}")


def test_a_page_opened_mid_run_charts_the_run_from_step_1(demo):
    from revacnn.recording.reader import open_run

    page, root = demo["page"], demo["root"]
    run_dir = connection_files(root)[-1].parent
    assert wait_for(lambda: (open_run(run_dir).last_step() or 0) >= 60, 300, 0.5)   # a loaded machine: slow steps
    page.goto(demo["url"])
    page.wait_for_selector("#conn-banner:has-text('LIVE')", timeout=45000)
    js_wait(page, "(() => { const gd = document.querySelector('#train-graph .js-plotly-plot');"
                  " return gd && gd.data && gd.data[0] && gd.data[0].x.length >= 60; })()", timeout=60)
    x = chart_x(page)
    assert x[:60] == list(range(1, 61)), x[:70]             # from step 1, every step once
    assert all(b == a + 1 for a, b in zip(x, x[1:])), x      # no gap, no duplicate at the seam
    page.screenshot(path=str(ARTIFACTS / "training-from-step-1.png"), full_page=True)
    assert demo["failures"] == []


def test_a_done_ack_says_what_changed(demo):
    from revacnn.recording.reader import open_run
    from revacnn.wire.client import RunClient

    page, root = demo["page"], demo["root"]
    run_dir = connection_files(root)[-1].parent
    page.fill("#in-lr", "0.01")
    page.click("#btn-lr")
    assert re.search(r"lr 0\.02 → 0\.01", event_row(page, "set lr=0.01"))
    page.fill("#in-bs", "48")
    page.click("#btn-bs")
    assert re.search(r"batch size 48 from epoch \d+", event_row(page, "batch_size=48"))
    # a widen from another client (after the run's first snapshot, for the replay test below)
    assert wait_for(lambda: open_run(run_dir).snapshot_steps(), 60, 0.5)
    client = RunClient(connection_files(root)[-1])
    client.connect(timeout=10)
    try:
        client.send_command("widen", {"layer": "net.conv2", "count": 1})
        row = event_row(page, "widen net.conv2 +1")
    finally:
        client.close()

    def widened_ids():  # the recorder writes every 0.5 s: the widened structure may reach the disk after the ack
        conv2 = [l for l in open_run(run_dir).structures()[-1][1]["layers"] if l["name"] == "net.conv2"][0]
        return conv2["filter_ids"] if len(conv2["filter_ids"]) == 21 else None

    ids = wait_for(widened_ids, 30, 0.2)
    assert ids, "the widened structure is recorded"
    new_id = ids[20]
    assert f"net.conv2: 20 → 21 filters; added index 20 (id {new_id})" in row, row
    page.screenshot(path=str(ARTIFACTS / "event-log-detail.png"), full_page=True)
    assert demo["failures"] == []


def test_a_replayed_early_step_shows_the_structure_it_had(demo):
    from revacnn.recording.reader import open_run

    page, root = demo["page"], demo["root"]
    run_dir = connection_files(root)[-1].parent
    reader = open_run(run_dir)
    widened_at = [s for s, body in reader.structures()
                  if {l["name"]: l["out"] for l in body["layers"]}["net.conv2"] == 21][0]
    assert wait_for(lambda: [s for s in reader.snapshot_steps() if s > widened_at + 1], 60, 0.5)
    before = [s for s in reader.snapshot_steps() if s < widened_at][0]
    after = [s for s in reader.snapshot_steps() if s > widened_at + 1][0]
    # the recording's entry (the live run's names the same id): "◼ recorded: <module> · <start> · <id>"
    pick(page, "#run-select", re.compile("◼ recorded: .*" + re.escape(reader.info["run_id"])))
    page.wait_for_selector("#conn-banner:has-text('REPLAY')", timeout=15000)
    page.get_by_text("Network", exact=True).click()
    for step, nodes in ((before, 66), (after, 67), (before, 66)):
        pick(page, "#replay-step", f"step {step}")
        page.wait_for_selector(f"#conn-banner:has-text('showing step {step}')", timeout=15000)
        js_wait(page, f"document.querySelectorAll('{NODES}').length == {nodes}", timeout=20)
        page.screenshot(path=str(ARTIFACTS / f"replay-step-{step}.png"), full_page=True)
    assert demo["failures"] == []


def test_the_dark_theme_colours_the_page_and_the_figures_but_not_their_colour_scales(demo):
    page = demo["page"]
    pick(page, "#run-select", "● live")
    page.get_by_text("Training", exact=True).click()
    page.wait_for_selector("#train-graph .js-plotly-plot")
    colours = ("(() => { const gd = document.querySelector('#train-graph .js-plotly-plot');"
               " return [getComputedStyle(gd.querySelector('.main-svg')).backgroundColor,"
               " getComputedStyle(gd.querySelector('.bg')).fill, getComputedStyle(gd.querySelector('.ytick text')).fill,"
               " gd._fullData[4].line.color]; })()")
    light = page.evaluate(colours)
    page.click("#theme-dark")
    page.wait_for_selector("body.rv-dark")
    dark = page.evaluate(colours)
    assert dark[1:3] == ["rgb(37, 38, 43)", "rgb(193, 194, 197)"] and dark[0] != light[0], (light, dark)
    assert dark[3] == light[3]                               # the lr trace keeps its colour
    page.wait_for_timeout(1500)      # a few ticks: the dark chrome holds while the chart grows
    assert page.evaluate(colours)[:3] == dark[:3]
    page.screenshot(path=str(ARTIFACTS / "training-dark.png"), full_page=True)
    page.click("#theme-dark")
    js_wait(page, "!document.body.classList.contains('rv-dark')")
    assert demo["failures"] == []


def test_a_restarted_trainer_is_followed_with_a_fresh_event_log(demo):
    page, root = demo["page"], demo["root"]
    pick(page, "#run-select", "● live")
    page.wait_for_selector("#conn-banner:has-text('LIVE')", timeout=15000)
    page.get_by_text("Training", exact=True).click()
    assert page.locator("#event-log tr.ev-row").count() >= 3      # the commands sent to the first trainer
    old = connection_files(root)[-1]
    (trainer,) = [pid for pid in processes_mentioning("revacnn.demo.train_digits") if pid in processes_mentioning(str(root))]
    os.kill(trainer, signal.SIGKILL)      # the demo's trainer, which this test started
    demo["extra"].append(subprocess.Popen(trainer_command(root), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.STDOUT, cwd=ROOT))
    assert wait_for(lambda: connection_files(root)[-1] != old, 120, 0.1)
    new = connection_files(root)[-1]

    run_id = json.loads(new.read_text())["run_id"]
    written = new.stat().st_mtime
    page.wait_for_selector(f"#conn-banner:has-text('LIVE — connected to run {run_id}')", timeout=30000)
    followed = time.time() - written
    print(f"the restarted trainer was shown {followed:.1f} s after it wrote its connection file")
    page.wait_for_selector("#event-log:has-text('no commands yet')", timeout=10000)
    js_wait(page, "(() => { const gd = document.querySelector('#train-graph .js-plotly-plot');"
                  " return gd && gd.data && gd.data[0] && gd.data[0].x.length >= 5 && gd.data[0].x[0] == 1; })()", timeout=40)
    page.screenshot(path=str(ARTIFACTS / "restarted.png"), full_page=True)
    # the analysis pages open on the run being watched (the new one)
    page.get_by_text("Explore log", exact=True).click()
    page.wait_for_selector(f"#ane-run:has-text('{run_id}')", timeout=30000)
    page.get_by_text("Compare snapshots", exact=True).click()
    page.wait_for_selector(f"#anc-run-a:has-text('{run_id}')", timeout=30000)
    assert demo["failures"] == []


def test_a_diverged_runs_every_view_renders_with_a_message(demo, tmp_path):
    """A run whose loss is NaN from its first steps: every tab is drawn, the banner says since when, and no request
    is answered 5xx."""
    root = tmp_path / "run"
    trainer = subprocess.Popen(trainer_command(root, "--lr", "1e4"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        assert wait_for(lambda: connection_files(root), 120, 0.2)
        with served_dashboard(tmp_path, "--connect", str(root / "lightning_logs")) as (port, _log):
            page = demo["browser"].new_page(viewport={"width": 1400, "height": 1000})   # the module's Chromium
            failures: list[str] = []
            watch_responses(page, failures)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#loss-not-finite:has-text('loss is NaN or ±inf since step')", timeout=60000)
            for tab, graph in (("Training", "train-graph"), ("Network", "net-graph"), ("Embedding", "emb-graph"),
                               ("Filters", "fil-caption"), ("Compare snapshots", "anc-network"),
                               ("Explore log", "ane-multiples")):
                page.get_by_text(tab, exact=True).click()
                page.wait_for_selector(f"#{graph}", state="attached", timeout=20000)
                page.wait_for_timeout(2500)      # a few refreshes of the tab: any failing one would be answered 5xx
                page.screenshot(path=str(ARTIFACTS / f"diverged-{graph}.png"), full_page=True)
            assert failures == []
            page.close()
    finally:
        trainer.kill()
        trainer.wait(10)
