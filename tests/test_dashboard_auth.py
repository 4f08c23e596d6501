"""Page authentication of revacnn-dash: the token policy of the CLI, and a real `revacnn-dash` process (waitress on
127.0.0.1 with auth forced on by --token) answering every route 401 without the token, and serving the page through
the token URL (cookie set, token stripped by a redirect) — also in headless Chromium."""

from __future__ import annotations

import pytest
import requests

from browser_support import CHROMIUM, CHROMIUM_ARGS, require_chromium, served_dashboard
from revacnn_dash.auth import COOKIE_PREFIX, cookie_value
from revacnn_dash.cli import parse_args

TOKEN = "test-token-Zq3p9L"


# -- the policy (no socket is bound) ------------------------------------------------------------------------------
def test_non_loopback_host_turns_auth_on_with_a_random_token(monkeypatch):
    monkeypatch.delenv("REVACNN_DASH_TOKEN", raising=False)
    a = parse_args(["--logdir", ".", "--host", "0.0.0.0"])
    b = parse_args(["--logdir", ".", "--host", "192.0.2.7"])
    assert a.auth_token and b.auth_token and a.auth_token != b.auth_token and len(a.auth_token) >= 40
    assert parse_args(["--logdir", ".", "--host", "0.0.0.0", "--token", "abc"]).auth_token == "abc"
    monkeypatch.setenv("REVACNN_DASH_TOKEN", "from-env")
    assert parse_args(["--logdir", ".", "--host", "0.0.0.0"]).auth_token == "from-env"
    assert parse_args(["--logdir", ".", "--host", "127.0.0.1"]).auth_token == "from-env"   # env on loopback: on


def test_loopback_is_token_free_unless_a_token_is_given(monkeypatch):
    monkeypatch.delenv("REVACNN_DASH_TOKEN", raising=False)
    assert parse_args(["--logdir", "."]).auth_token is None
    assert parse_args(["--logdir", ".", "--host", "localhost"]).auth_token is None
    assert parse_args(["--logdir", ".", "--host", "::1"]).auth_token is None
    assert parse_args(["--logdir", ".", "--token", "t0k"]).auth_token == "t0k"


def test_insecure_no_auth_is_the_only_way_to_serve_beyond_loopback_without_a_token(monkeypatch, capsys):
    monkeypatch.delenv("REVACNN_DASH_TOKEN", raising=False)
    assert parse_args(["--logdir", ".", "--host", "0.0.0.0", "--insecure-no-auth"]).auth_token is None
    with pytest.raises(SystemExit):
        parse_args(["--logdir", ".", "--host", "0.0.0.0", "--insecure-no-auth", "--token", "x"])
    assert "contradict" in capsys.readouterr().err


# -- a real revacnn-dash process --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_dashboard(tmp_path_factory.mktemp("logs"), "--token", TOKEN) as (port, log):
        log.seek(0)
        yield f"http://127.0.0.1:{port}", log.read()


@pytest.mark.parametrize("method,path", [("GET", "/"), ("GET", "/_dash-layout"), ("GET", "/_dash-dependencies"),
                                         ("POST", "/_dash-update-component"), ("GET", "/assets/x.css"),
                                         ("GET", "/_dash-component-suites/dash/dcc/dash_core_components.js"),
                                         ("GET", "/no-such-page")])
def test_every_route_needs_the_token(served, method, path):
    base, _ = served
    r = requests.request(method, base + path, json={} if method == "POST" else None, allow_redirects=False, timeout=10)
    assert r.status_code == 401 and r.headers["Content-Type"].startswith("text/plain")
    assert "token" in r.text
    wrong = requests.request(method, base + path + "?token=nope", allow_redirects=False, timeout=10)
    assert wrong.status_code == 401 and "invalid token" in wrong.text
    forged = requests.request(method, base + path, cookies={COOKIE_PREFIX + base.rsplit(":", 1)[1]: "x" * 64},
                              allow_redirects=False, timeout=10)
    assert forged.status_code == 401


def test_token_url_sets_a_strict_httponly_cookie_and_strips_the_token(served):
    base, printed = served
    assert f"{base}/?token={TOKEN}" in printed            # printed Jupyter-style
    session = requests.Session()
    r = session.get(f"{base}/?token={TOKEN}", allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"].endswith("/") and TOKEN not in r.headers["Location"]
    set_cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and TOKEN not in set_cookie
    assert cookie_value(TOKEN) in set_cookie
    page = session.get(base + "/", timeout=10)
    assert page.status_code == 200 and "_dash-config" in page.text
    layout = session.get(base + "/_dash-layout", timeout=10)
    assert layout.status_code == 200 and "conn-banner" in layout.text
    update = session.post(base + "/_dash-update-component", json={}, timeout=10)
    assert update.status_code != 401                   # reaches Dash (which rejects the empty payload)
    header = requests.get(base + "/_dash-layout", headers={"Authorization": f"token {TOKEN}"}, timeout=10)
    assert header.status_code == 200
    other = requests.get(f"{base}/_dash-layout?token={TOKEN}&a=1", allow_redirects=False, timeout=10)
    assert other.status_code == 302 and other.headers["Location"] == "/_dash-layout?a=1"


@pytest.mark.browser
def test_page_loads_in_chromium_through_the_token_url(served):
    playwright_api = pytest.importorskip("playwright.sync_api")
    require_chromium()
    base, _ = served
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{base}/")
            assert "authentication required" in page.inner_text("body")
            page.goto(f"{base}/?token={TOKEN}")
            page.wait_for_selector("#conn-banner", timeout=30000)
            page.wait_for_selector("#conn-banner:has-text('no runs')", timeout=30000)   # callbacks ran too
            assert "token" not in page.url
            cookies = page.context.cookies()
            assert any(c["name"].startswith(COOKIE_PREFIX) and c["httpOnly"] and c["sameSite"] == "Strict"
                       for c in cookies)
        finally:
            browser.close()
