"""Token authentication for the dashboard's page (Jupyter-style), on every HTTP route of the Flask server.

The page can steer training, so whenever it listens beyond loopback every request — the page, Dash's
``/_dash-layout``, ``/_dash-update-component`` and ``/_dash-component-suites/…`` asset routes, ``/assets/…``,
unknown paths — must carry the token:

* ``?token=TOKEN`` in the URL: checked, then an HttpOnly, SameSite=Strict cookie is set and the browser is
  redirected to the same URL without the token (so it leaves the address bar and the history);
* the cookie (an HMAC of the token, never the token itself);
* or an ``Authorization: token TOKEN`` / ``Bearer TOKEN`` header (scripts).

Anything else gets ``401`` with a short plain-text message. Comparisons use ``hmac.compare_digest``.

Without a token (loopback, the default) the ``Host`` header is checked instead (``install_host_check``): a page on
an attacker's domain whose DNS name is re-pointed at 127.0.0.1 (DNS rebinding) would otherwise be same-origin with
the dashboard and could read and steer the runs. Only loopback names, IP literals (which no DNS answer can rebind)
and the names given with ``--allow-host`` are served; anything else gets ``403``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from urllib.parse import urlencode

ENV_TOKEN = "REVACNN_DASH_TOKEN"
COOKIE_PREFIX = "revacnn_dash_"
_MISSING = ("revacnn-dash: authentication required. Open the URL with ?token=… that revacnn-dash printed when it "
            "started (or pass the header 'Authorization: token …').\n")
_WRONG = "revacnn-dash: invalid token.\n"


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def cookie_value(token: str) -> str:
    """What the cookie holds: a keyed hash of the token, so the cookie jar never stores the token itself."""
    return hmac.new(token.encode(), b"revacnn-dash session cookie", hashlib.sha256).hexdigest()


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def install_token_auth(server, token: str) -> None:
    """Require ``token`` on every request to the Flask ``server`` (a Dash app's ``app.server``)."""
    from flask import Response, redirect, request

    if not token:
        raise ValueError("an empty token would let everyone in")
    expected_cookie = cookie_value(token)

    def cookie_name() -> str:
        # Cookies are not port-scoped: two dashboards on one host must not overwrite each other's cookie.
        port = request.host.rsplit(":", 1)[-1] if ":" in request.host.split("]")[-1] else "80"
        return COOKIE_PREFIX + "".join(c for c in port if c.isdigit())

    def deny(text: str) -> Response:
        response = Response(text, status=401, mimetype="text/plain")
        response.headers["Cache-Control"] = "no-store"
        return response

    @server.before_request
    def _require_token():
        name = cookie_name()
        given = request.args.get("token")
        if given is not None:
            if not _equal(given, token):
                return deny(_WRONG)
            query = [(k, v) for k, values in request.args.lists() if k != "token" for v in values]
            response = redirect(request.path + ("?" + urlencode(query) if query else ""), code=302)
            response.set_cookie(name, expected_cookie, httponly=True, samesite="Strict", path="/")
            response.headers["Cache-Control"] = "no-store"
            return response
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() in ("token", "bearer") and value:
            return None if _equal(value.strip(), token) else deny(_WRONG)
        cookie = request.cookies.get(name)
        if cookie is not None:
            return None if _equal(cookie, expected_cookie) else deny(_WRONG)
        return deny(_MISSING)


# -- the Host allow-list (DNS rebinding) --------------------------------------------------------------------------
LOOPBACK_NAMES = frozenset({"localhost"})
_FOREIGN_HOST = ("revacnn-dash: refused a request for host {host!r}: this dashboard answers only to loopback names "
                 "and addresses (localhost, 127.0.0.1, [::1]) so that another web site cannot reach it through DNS "
                 "rebinding. If you reach it under this name on purpose, restart it with --allow-host {name}.\n")


def host_name(header: str) -> str:
    """The host of a ``Host`` header, lower-case and without port, brackets or a final dot (``[::1]:8050`` →
    ``::1``); ``""`` when it is malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return ""
        return name
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") <= 1 else ""


def host_allowed(header: str, allowed: set[str] | frozenset[str]) -> bool:
    """Whether a request with this ``Host`` header may be served without a token: a loopback name, an IP literal
    (a browser sends one only when the user typed it: no DNS answer can rebind it) or a name in ``allowed``
    (``"*"`` allows any)."""
    name = host_name(header)
    if not name:
        return False
    if name in LOOPBACK_NAMES or "*" in allowed or name in {n.lower().rstrip(".") for n in allowed}:
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def install_host_check(server, allowed: set[str] | frozenset[str] = frozenset()) -> None:
    """Serve only requests whose ``Host`` header ``host_allowed`` accepts, on every route of the Flask ``server``;
    others get ``403`` with a plain-text hint naming ``--allow-host``."""
    from flask import Response, request

    @server.before_request
    def _require_known_host():
        header = request.headers.get("Host", "")
        if host_allowed(header, allowed):
            return None
        name = host_name(header) or "NAME"
        text = _FOREIGN_HOST.format(host=header[:200], name=name[:200])
        response = Response(text, status=403, mimetype="text/plain")
        response.headers["Cache-Control"] = "no-store"
        return response
