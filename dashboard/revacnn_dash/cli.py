"""revacnn-dash: serve the dashboard for live runs and recorded ones.

    revacnn-dash --connect lightning_logs/version_0/revacnn              # a run directory
    revacnn-dash --connect run/connection.json --connect tcp://127.0.0.1:5556
    revacnn-dash --logdir lightning_logs                                  # replay recorded runs

For a trainer on another machine, forward its two ports over SSH and connect to localhost:
    ssh -N -L 5555:127.0.0.1:5555 -L 5556:127.0.0.1:5556 gpu-box
    revacnn-dash --connect tcp://127.0.0.1:5556        # the control port; telemetry is learned from the handshake
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from revacnn.publisher import is_loopback


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
                        help="address to serve the page on (default 127.0.0.1; only loopback addresses are allowed "
                             "until authentication lands — use an SSH tunnel for remote viewing)")
    parser.add_argument("--port", type=int, default=8050, help="port to serve the page on (default 8050)")
    parser.add_argument("--threads", type=int, default=8, help="waitress worker threads (default 8)")
    parser.add_argument("--no-umap-warmup", action="store_true",
                        help="do not compile UMAP in the background at start (saves ~10-25 s of one CPU core)")
    args = parser.parse_args(argv)
    if not args.connect and not args.logdir:
        parser.error("nothing to show: give at least one --connect TARGET or --logdir DIR")
    if not _loopback(args.host):
        parser.error(f"refusing to serve on {args.host!r}: the dashboard can steer training and has no "
                     "authentication yet (that comes with issue 7). Serve on 127.0.0.1 and reach it through an SSH "
                     f"tunnel instead, e.g.  ssh -N -L {args.port}:127.0.0.1:{args.port} this-host")
    return args


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return is_loopback(socket.gethostbyname(host))
        except OSError:
            return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import waitress

    from .app import create_app
    from .hub import Hub

    hub = Hub(args.connect, logdir=args.logdir, warm_umap=not args.no_umap_warmup)
    app = create_app(hub)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"revacnn-dash: serving on http://{host}:{args.port}/ "
          f"({len(args.connect)} live run(s){', recordings from ' + args.logdir if args.logdir else ''})",
          flush=True)
    try:
        waitress.serve(app.server, host=args.host, port=args.port, threads=args.threads, ident="revacnn-dash")
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
