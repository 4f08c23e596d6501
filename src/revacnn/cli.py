"""``revacnn``: command-line tools of the training side.

    revacnn demo          train the ReVACNN demo CNN on sklearn's digits and open the dashboard on it
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    root = Path(args.root or tempfile.mkdtemp(prefix="revacnn-demo-"))
    train = subprocess.Popen([sys.executable, "-m", "revacnn.demo.train_digits", "--epochs", str(args.epochs),
                              "--slow", str(args.slow), "--root", str(root)])
    connection = None
    deadline = time.monotonic() + 120
    while connection is None and time.monotonic() < deadline and train.poll() is None:
        found = sorted(root.glob("lightning_logs/version_*/revacnn/connection.json"))
        connection = found[-1] if found else None
        time.sleep(0.2)
    if connection is None:
        train.terminate()
        print("revacnn demo: the training run did not start (see its output above)", file=sys.stderr)
        return 1
    dash = subprocess.Popen(["revacnn-dash", "--connect", str(connection), "--logdir", str(root),
                             "--port", str(args.port)])
    print(f"\nrevacnn demo: training in {root}\n  dashboard: http://127.0.0.1:{args.port}/   (Ctrl-C stops both)\n",
          flush=True)
    try:
        train.wait()
        print("revacnn demo: training finished; the dashboard keeps showing the recorded run (Ctrl-C to quit)")
        dash.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for process in (train, dash):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in (train, dash):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="revacnn", description="revacnn: watch and steer CNN training.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train the demo CNN on sklearn digits and serve the dashboard on it",
                               description="Train the ReVACNN demo CNN (16-20-20) on sklearn's digits with the "
                                           "callback, and serve revacnn-dash connected to it.")
    demo.add_argument("--epochs", type=int, default=100, help="epochs to train (default 100)")
    demo.add_argument("--slow", type=float, default=0.03,
                      help="seconds to pause per batch so the run lasts long enough to steer (default 0.03)")
    demo.add_argument("--port", type=int, default=int(os.environ.get("REVACNN_DASH_PORT", 8050)),
                      help="dashboard port (default 8050)")
    demo.add_argument("--root", help="where logs go (default: a new temporary folder)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
