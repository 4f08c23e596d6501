"""``revacnn``: command-line tools of the training side.

    revacnn demo          train the ReVACNN demo CNN on sklearn's digits and open the dashboard on it
    revacnn keys ...      CURVE keys for remote use: generate, allow, list, revoke (docs/remote.md)
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


def _serves_page(dash: subprocess.Popen, url: str, timeout: float) -> bool:
    """Wait until ``url`` answers with the dashboard's page, so the URL printed works when clicked at once (the
    dashboard takes seconds to import and bind). False if the dashboard exits first or ``timeout`` passes."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while dash.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:  # not listening yet (or another program holds the port: the dashboard will exit)
            pass
        time.sleep(0.2)
    return False


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def _demo(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [name for name in ("revacnn_dash", "pytorch_lightning") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"revacnn demo: needs {' and '.join(missing)}: pip install 'revacnn[train,dash]' "
              "(or run `bash .ci/setup`)", file=sys.stderr)
        return 2
    root = Path(args.root or tempfile.mkdtemp(prefix="revacnn-demo-"))
    # The demo alone stops its children, with one SIGINT each: they run in sessions of their own, so a Ctrl-C in the
    # terminal reaches the demo only (had it reached them too, the demo's SIGINT would land in the middle of their
    # orderly stop and break it off with a traceback), and `kill` or a closed terminal stops them as Ctrl-C does.
    # SIGINT is handled here too: a shell that starts the demo in the background has it ignored, and an ignored
    # signal stays ignored in the children, so neither the demo nor they would stop on it; a handled one is reset
    # to its default in them.
    for stop in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):   # no SIGHUP on Windows
        if stop is not None:
            signal.signal(stop, _interrupt)
    # Both children run on this interpreter: `.venv/bin/revacnn demo` works without the venv on PATH.
    train = subprocess.Popen([sys.executable, "-m", "revacnn.demo.train_digits", "--epochs", str(args.epochs),
                              "--slow", str(args.slow), "--root", str(root)], start_new_session=True)
    dash = connection = None
    interrupted = False
    try:
        deadline = time.monotonic() + 120
        while connection is None and time.monotonic() < deadline and train.poll() is None:
            found = sorted(root.glob("lightning_logs/version_*/revacnn/connection.json"))
            connection = found[-1] if found else None
            time.sleep(0.2)
        if connection is None:
            print("revacnn demo: the training run did not start (see its output above)", file=sys.stderr)
            return 1
        # The log folder, not this run's connection file: a trainer restarted into it (its next version_N) is
        # followed within a second.
        dash = subprocess.Popen([sys.executable, "-m", "revacnn_dash.cli", "--connect", str(root / "lightning_logs"),
                                 "--logdir", str(root), "--port", str(args.port)], start_new_session=True)
        url = f"http://127.0.0.1:{args.port}/"
        if _serves_page(dash, url, timeout=120):
            print(f"\nrevacnn demo: training in {root}\n  dashboard: {url}   (Ctrl-C stops both)\n", flush=True)
        elif dash.poll() is None:
            print(f"revacnn demo: the dashboard has not answered at {url} within 120 s; still waiting for it",
                  file=sys.stderr, flush=True)
        training = True
        while dash.poll() is None:
            if training and train.poll() is not None:
                training = False
                print(f"revacnn demo: {_run_end(connection, train.returncode)}; the dashboard keeps showing the "
                      "recorded run (Ctrl-C to quit)", flush=True)
            time.sleep(0.5)
        print(f"revacnn demo: the dashboard exited (code {dash.returncode}; its message is above); stopping",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted = train.poll() is None
    finally:
        _stop_children([process for process in (train, dash) if process is not None])
    if interrupted and connection is not None:   # say how the run ended: Ctrl-C stopped it, it did not finish
        print(f"revacnn demo: {_run_end(connection, train.returncode)}", flush=True)
    return 0


def _run_end(connection: Path, code: int | None) -> str:
    """How the demo's training ended, from the last state its run recorded (finished, stopped, failed) next to its
    connection file, else from its exit code: a run stopped with Ctrl-C or from the dashboard did not finish."""
    status = None
    try:
        from revacnn.recording.reader import open_run

        status = open_run(connection.parent).status()
    except Exception:   # no recording (or an unreadable one): the exit code says what it can
        pass
    state = status.get("state") if isinstance(status, dict) else None
    if state in ("finished", "stopped", "failed"):
        step = status.get("step")
        message = status.get("message") or ""
        return (f"training {state}" + (f" at step {step}" if isinstance(step, int) else "")
                + (f" ({message})" if message else ""))
    if code == 0:
        return "training finished"
    return f"training stopped (the trainer exited with code {code})" if code is not None else "training stopped"


def _stop_children(children: list[subprocess.Popen]) -> None:
    """One SIGINT each, then up to 10 s for their orderly stop before SIGKILL; another Ctrl-C kills them at once."""
    for process in children:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    try:
        for process in children:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    except KeyboardInterrupt:
        for process in children:
            if process.poll() is None:
                process.kill()


KEYS_EPILOG = """\
Remote steering with CURVE (docs/remote.md):

  on the GPU box (trainer):  revacnn keys generate --out ~/.revacnn/keys --name server
  on the laptop (client):    revacnn keys generate --out ~/.revacnn/client --name laptop
  copy ~/.revacnn/client/laptop.key (the PUBLIC key) to the GPU box, then there:
                             revacnn keys allow laptop.key --keys-dir ~/.revacnn/keys
  train with ReVACNNCallback(host="0.0.0.0", keys_dir="~/.revacnn/keys") and connect from the laptop with the
  run's connection.json and RunClient(..., client_keys="~/.revacnn/client/laptop.key_secret", host="gpu-box").

NAME.key is public and may be copied anywhere; NAME.key_secret is secret (mode 0600): never copy it off its machine.
"""


def _keys_generate(args: argparse.Namespace) -> int:
    from revacnn.wire.connection import generate_keypair, load_public_key

    try:
        public, secret = generate_keypair(args.out, args.name, force=args.force)
    except (FileExistsError, ValueError) as error:
        print(f"revacnn keys generate: {error}", file=sys.stderr)
        return 1
    print(f"public key  {public}   (share it: {load_public_key(public).decode()})")
    print(f"secret key  {secret}   (mode 0600; keep it on this machine)")
    return 0


def _keys_allow(args: argparse.Namespace) -> int:
    from revacnn.wire.connection import allow_key, load_public_key

    try:
        target = allow_key(args.public_key_file, args.keys_dir, name=args.name)
    except (FileExistsError, ValueError, OSError) as error:
        print(f"revacnn keys allow: {error}", file=sys.stderr)
        return 1
    print(f"allowed {load_public_key(target).decode()} as {target}\n"
          "(running trainers using this keys directory pick it up within a second or two)")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from revacnn.wire.connection import SERVER_KEY_NAME, allowed_keys, load_public_key

    directory = Path(args.keys_dir).expanduser()
    server = directory / f"{SERVER_KEY_NAME}.key"
    print(f"trainer key: {load_public_key(server).decode() if server.exists() else '(none yet)'}")
    keys = allowed_keys(directory)
    print(f"{len(keys)} allowed client key(s) in {directory / 'allowed'}:")
    for name, key in keys.items():
        print(f"  {name}  {key.decode()}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from revacnn.wire.connection import ALLOWED_DIR_NAME

    name = args.name if args.name.endswith(".key") else f"{args.name}.key"
    target = Path(args.keys_dir).expanduser() / ALLOWED_DIR_NAME / Path(name).name
    if not target.exists():
        print(f"revacnn keys revoke: no allowed key {target}", file=sys.stderr)
        return 1
    target.unlink()
    print(f"revoked {target}: running trainers using {args.keys_dir} refuse it within about a second, open "
          "connections included")
    return 0


def _add_keys(commands) -> None:
    from revacnn.wire.connection import default_keys_dir

    keys = commands.add_parser("keys", help="CURVE keys for remote use: generate, allow, list, revoke",
                               description="Manage CURVE keys: the trainer's keypair and the allow-list of client "
                                           "public keys that may read and steer its runs.",
                               epilog=KEYS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = keys.add_subparsers(dest="action", required=True)
    generate = actions.add_parser(
        "generate", help="make a keypair: NAME.key (public) and NAME.key_secret (secret, 0600)",
        description="Make a CURVE keypair. On the trainer's machine use --name server in the keys directory given to "
                    "ReVACNNCallback(keys_dir=...); on a client machine any name (its NAME.key is what the trainer "
                    "allows).", epilog=KEYS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("--out", required=True, help="directory to write the two files into (made if missing)")
    generate.add_argument("--name", default="client", help="file name stem (default: client; 'server' for a trainer)")
    generate.add_argument("--force", action="store_true", help="overwrite an existing keypair of that name")
    generate.set_defaults(run=_keys_generate)
    allow = actions.add_parser(
        "allow", help="allow a client's public key to connect to trainers using --keys-dir",
        description="Copy a client's public key (NAME.key) into KEYS_DIR/allowed/. Only its public half is ever "
                    "copied, even if given a .key_secret file.", epilog=KEYS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    allow.add_argument("public_key_file", help="the client's NAME.key file (from `revacnn keys generate`)")
    allow.add_argument("--keys-dir", default=str(default_keys_dir()),
                       help=f"the trainer's keys directory (default: $REVACNN_KEYS_DIR or {default_keys_dir()})")
    allow.add_argument("--name", help="name to store it under (default: the file's stem)")
    allow.set_defaults(run=_keys_allow)
    listing = actions.add_parser("list", help="show the trainer key and the allowed client keys")
    listing.add_argument("--keys-dir", default=str(default_keys_dir()), help="the trainer's keys directory")
    listing.set_defaults(run=_keys_list)
    revoke = actions.add_parser("revoke", help="remove an allowed client key by name")
    revoke.add_argument("name", help="the allowed key's name (as `revacnn keys list` shows it)")
    revoke.add_argument("--keys-dir", default=str(default_keys_dir()), help="the trainer's keys directory")
    revoke.set_defaults(run=_keys_revoke)


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
    _add_keys(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
