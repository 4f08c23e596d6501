"""revacnn-dash: serve the dashboard for live runs and recorded ones.

    revacnn-dash --connect lightning_logs/version_0/revacnn              # a run directory
    revacnn-dash --connect run/connection.json --connect tcp://127.0.0.1:5556
    revacnn-dash --logdir lightning_logs                                  # replay recorded runs

For a trainer on another machine, forward its two ports over SSH and connect to localhost:
    ssh -N -L 5555:127.0.0.1:5555 -L 5556:127.0.0.1:5556 gpu-box
    revacnn-dash --connect tcp://127.0.0.1:5556        # the control port; telemetry is learned from the handshake
or connect directly to a trainer with CURVE on (docs/remote.md):
    revacnn-dash --connect connection.json --client-key ~/.revacnn/client/laptop.key_secret --remote-host gpu-box

The page is served on 127.0.0.1 without a token. A non-loopback --host requires a token (random, printed as
http://HOST:PORT/?token=…, or --token / $REVACNN_DASH_TOKEN); --token on loopback turns the check on as well.
Without a token only requests for a loopback name or an IP address (and the --host name) are answered, against
DNS rebinding; reaching the page under another name (an /etc/hosts alias, a proxy) needs --allow-host NAME.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from revacnn.wire.client import CLIENT_KEY_ENV
from revacnn.wire.publisher import is_loopback

from .auth import ENV_TOKEN, generate_token


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="revacnn-dash", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connect", action="append", default=[], metavar="TARGET",
                        help="a live run: its connection file, its run directory (…/revacnn), a log directory (the "
                             "newest connection.json below it, found again when the trainer restarts), or the "
                             "control endpoint tcp://host:port. Repeat for several runs.")
    parser.add_argument("--logdir", metavar="DIR",
                        help="a directory of recorded runs (e.g. lightning_logs) to replay without the trainer")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve the page on (default 127.0.0.1). A non-loopback address turns "
                             "token authentication on (see --token)")
    parser.add_argument("--port", type=int, default=8050, help="port to serve the page on (default 8050)")
    parser.add_argument("--token", default=os.environ.get(ENV_TOKEN) or None,
                        help=f"token the page requires (default ${ENV_TOKEN}; with a non-loopback --host and no "
                             "token a random one is made and printed in the URL). Given on loopback, the check "
                             "is on there too")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="INSECURE: serve a non-loopback --host WITHOUT authentication — anyone who reaches "
                             "the port can read and steer the runs. Only on a network you trust completely")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="without a token the page answers only requests addressed to a loopback name "
                             "(localhost), an IP address or the --host name (a defence against DNS rebinding); "
                             "also answer those for NAME (an alias, a proxy's name). Repeatable; '*' allows any "
                             "name. With a token the token protects the page and no name is checked")
    parser.add_argument("--client-key", default=os.environ.get(CLIENT_KEY_ENV) or None, metavar="PATH",
                        help=f"this dashboard's CURVE keypair (NAME.key_secret from `revacnn keys generate`, "
                             f"allow-listed on the trainer), for runs with CURVE on; default ${CLIENT_KEY_ENV}")
    parser.add_argument("--server-key", metavar="KEY",
                        help="the trainer's CURVE public key (Z85 or a .key file) for a bare tcp:// target; "
                             "a connection file names it itself")
    parser.add_argument("--remote-host", metavar="HOST",
                        help="replace the host of the runs' endpoints (e.g. the GPU box's name, when its "
                             "connection file says 127.0.0.1 or 0.0.0.0)")
    parser.add_argument("--threads", type=int, default=8, help="waitress worker threads (default 8)")
    parser.add_argument("--refresh-ms", type=int, default=500,
                        help="how often the page polls the runs' state, in ms (default 500; a hidden tab's views "
                             "are not polled)")
    parser.add_argument("--no-umap-warmup", action="store_true",
                        help="do not compile UMAP in the background at start (saves ~10-25 s of one CPU core)")
    args = parser.parse_args(argv)
    if not args.connect and not args.logdir:
        parser.error("nothing to show: give at least one --connect TARGET or --logdir DIR")
    if args.token is not None and not args.token.strip():
        parser.error("--token is empty")
    if args.insecure_no_auth and args.token:
        parser.error("--insecure-no-auth and --token contradict each other")
    args.auth_token = auth_token(args)
    args.allowed_hosts = allowed_hosts(args)
    return args


def allowed_hosts(args: argparse.Namespace) -> set[str]:
    """The host names (besides loopback ones and IP literals) a token-free page answers to: --allow-host, the
    --host name, and for a wildcard --host this machine's names (the URL printed uses them)."""
    names = {name.strip().lower().rstrip(".") for name in args.allow_host if name.strip()}
    if args.host in ("0.0.0.0", "::", "*", ""):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names.add(args.host.strip("[]").lower().rstrip("."))
    return names


def auth_token(args: argparse.Namespace) -> str | None:
    """The token the page will require, or None (loopback without --token, or --insecure-no-auth)."""
    if args.token:
        return args.token
    if is_loopback(args.host) or args.insecure_no_auth:
        return None
    return generate_token()


def own_line(stream) -> str:
    """A newline before a line printed to a terminal: there it may share the line of a progress bar (the demo's
    trainer draws one with carriage returns and no newline), and was glued onto its end."""
    try:
        return "\n" if stream.isatty() else ""
    except (AttributeError, ValueError):   # a closed or unusual stream
        return ""


def _interrupt(_signum, _frame) -> None:
    """SIGTERM (``kill``, a service manager) stops the dashboard in the same order as Ctrl-C: the server closed, the
    runs' clients and the embedding helpers stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import waitress

    from .app import create_app
    from .data.hub import Hub

    try:
        client_options = dict(client_keys=args.client_key, server_key=args.server_key, host=args.remote_host)
        hub = Hub(args.connect, logdir=args.logdir, warm_umap=not args.no_umap_warmup,
                  client_options=client_options)
    except (OSError, ValueError) as error:
        print(f"revacnn-dash: {error}", file=sys.stderr)
        return 2
    app = create_app(hub, interval_ms=max(100, args.refresh_ms))
    try:
        server = waitress.create_server(app.server, host=args.host, port=args.port, threads=args.threads,
                                        ident="revacnn-dash")
    except OSError as error:      # most often: another process (another dashboard?) has the port
        hub.stop()
        print(f"revacnn-dash: cannot serve on {args.host}:{args.port}: {error.strerror or error}; "
              f"choose another port with --port", file=sys.stderr)
        return 1
    shown = args.host
    if shown in ("0.0.0.0", "::", "*", ""):
        shown = socket.gethostname()
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{args.port}/"
    runs = f"{len(args.connect)} live run(s){', recordings from ' + args.logdir if args.logdir else ''}"
    if args.auth_token:
        from .auth import install_token_auth

        install_token_auth(app.server, args.auth_token)
        print(f"{own_line(sys.stdout)}revacnn-dash: serving on {url} ({runs}); the page requires a token — open\n"
              f"    {url}?token={args.auth_token}", flush=True)
    else:
        from .auth import install_host_check

        install_host_check(app.server, args.allowed_hosts)
        if not is_loopback(args.host):
            print(f"{own_line(sys.stderr)}revacnn-dash: WARNING: INSECURE — serving on a non-loopback address WITHOUT authentication "
                  "(--insecure-no-auth): anyone who reaches this port can read and steer your training runs.",
                  file=sys.stderr, flush=True)
        print(f"{own_line(sys.stdout)}revacnn-dash: serving on {url} ({runs})", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
