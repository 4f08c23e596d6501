"""Who may connect to a run's sockets: the loopback test and the CURVE allow-list (docs/remote.md). No torch."""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from revacnn.wire.connection import CurveServerKeys

log = logging.getLogger(__name__)
ZAP_DOMAIN = "revacnn"


def is_loopback(host: str) -> bool:
    """True for a loopback address (IPv4 ``127.0.0.0/8``, IPv6 ``::1``, with or without brackets), or a host name
    that resolves to one (an unresolvable name is not)."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


class CountingAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, counting the CURVE clients it turned away (published in ``status.security``)."""

    denied = 0
    accepted = 0

    async def _authenticate_curve(self, domain, client_key):
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if allowed:
            self.accepted += 1
        else:
            self.denied += 1
        return allowed, reason


class CurveGuard:
    """The CURVE side of a run's sockets: the server keys, the ZAP authenticator thread and its allow-list, which
    is re-read when its directory changes. ``curve=None`` means no encryption and no authentication."""

    def __init__(self, curve: CurveServerKeys | None, run_id: str) -> None:
        self.curve = curve
        self.run_id = run_id
        self.auth: CountingAuthenticator | None = None
        self._allowed_signature: tuple | None = None
        self._allowed: frozenset[bytes] = frozenset()
        self._refused_logged: set[bytes] = set()

    def start(self, context: zmq.Context) -> None:
        """Start the ZAP thread in ``context``; must run before any bind (a CURVE socket without ZAP accepts
        anyone)."""
        if self.curve is None:
            return
        self.auth = CountingAuthenticator(context, log=log.getChild("auth"))
        self.auth.start()
        self.reload()

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server checked by this guard's ZAP domain (nothing without CURVE)."""
        if self.curve is None:
            return
        sock.curve_secretkey = self.curve.secret
        sock.curve_publickey = self.curve.public
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.curve_server = True

    def reload(self) -> bool:
        """(Re)load the allow-list when its directory changed; never allows any client by default.

        Returns True when a key that was allowed is not any more (``revacnn keys revoke``): the caller must then
        make every subscriber handshake again (``Publisher`` rebinds its telemetry socket), as ZAP only judges a
        connection when it opens. Control requests are checked one by one (``admits``)."""
        if self.auth is None:
            return False
        signature = self.curve.allowed_signature()
        if signature == self._allowed_signature:
            return False
        self._allowed_signature = signature
        keys = self.curve.allowed_now()
        revoked = self._allowed - set(keys)
        self._allowed = frozenset(keys)
        self._refused_logged -= set(keys)  # a key allowed again and revoked later is reported again
        self.auth.allow_any = False
        self.auth.certs[ZAP_DOMAIN] = keys  # the ZAP thread reads this dict; a whole new dict replaces it atomically
        log.info("revacnn: %d client key(s) allowed to connect to run %s", len(keys), self.run_id)
        if revoked:
            log.warning("revacnn: %d client key(s) revoked for run %s; their connections are refused from now on",
                        len(revoked), self.run_id)
        if not keys:
            log.warning("revacnn: CURVE is on but no client key is allowed yet: add one with `revacnn keys allow "
                        "CLIENT.key --keys-dir %s`", self.curve.allowed_dir.parent if self.curve.allowed_dir
                        else "DIR")
        return bool(revoked)

    def admits(self, frames: list) -> bool:
        """Whether a control request (``recv_multipart(copy=False)`` frames) comes from a key allowed *now*.

        ZAP checks a client once, when it connects; a key revoked later keeps its open connection, so every
        request is checked by the CURVE User-Id that ZAP gave its connection (pyzmq's authenticator sets it to the
        client's Z85 public key). Always True without CURVE."""
        if self.curve is None:
            return True
        try:
            user = frames[-1].get("User-Id")
        except (AttributeError, IndexError, zmq.ZMQError):
            return False
        key = user.encode() if isinstance(user, str) else b""
        if key in self._allowed:
            return True
        if key not in self._refused_logged:  # one line per refused key, not one per request
            self._refused_logged.add(key)
            log.warning("revacnn: ignoring control requests of run %s from a client key that is no longer allowed "
                        "(%s…)", self.run_id, key[:8].decode(errors="replace"))
        return False

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()

    def security(self) -> dict[str, Any]:
        """``{"mode": "curve" | "none", "allowed": n, "denied": n, "accepted": n}`` (counts with CURVE only)."""
        if self.curve is None:
            return {"mode": "none"}
        auth = self.auth
        allowed = auth.certs.get(ZAP_DOMAIN, {}) if auth is not None else {}
        return {"mode": "curve", "allowed": len(allowed), "denied": auth.denied if auth else 0,
                "accepted": auth.accepted if auth else 0}
