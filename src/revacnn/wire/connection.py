"""Connection files (docs/protocol.md §1) and CURVE keys (docs/remote.md): what a client needs to reach a run.

No torch. Keys are ZeroMQ certificate files (``zmq.auth``): ``NAME.key`` holds a public key, ``NAME.key_secret``
holds the public and the secret key (mode 0600). A trainer's keys directory holds ``server.key`` /
``server.key_secret`` and ``allowed/``, the public keys of the clients that may connect.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq
import zmq.auth

from revacnn.wire.protocol import PROTOCOL_VERSION

CONNECTION_FILE_NAME = "connection.json"
SERVER_KEY_NAME = "server"
ALLOWED_DIR_NAME = "allowed"


def bare_host(host: str) -> str:
    """``host`` without the brackets of an IPv6 literal in a URL (``[::1]`` → ``::1``)."""
    host = host.strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_ipv6_literal(host: str) -> bool:
    """True for an IPv6 address (``::1``, ``[::1]``, ``::``); such a ZeroMQ socket needs ``zmq.IPV6`` on, or its
    bind or connect fails with "No such device"."""
    return ":" in bare_host(host)


def tcp_endpoint(host: str, port: int | str | None = None) -> str:
    """``tcp://host:port`` with an IPv6 literal in brackets (``tcp://[::1]:5555``); no ``:port`` when None."""
    host = bare_host(host)
    address = f"[{host}]" if ":" in host else host
    return f"tcp://{address}" if port is None else f"tcp://{address}:{port}"


def endpoint_is_ipv6(endpoint: str) -> bool:
    """True when a ``tcp://`` endpoint names an IPv6 literal (``tcp://[::1]:5555``)."""
    return endpoint.startswith("tcp://[")


def default_keys_dir() -> Path:
    """``$REVACNN_KEYS_DIR``, else ``~/.revacnn/keys``."""
    return Path(os.environ.get("REVACNN_KEYS_DIR") or Path.home() / ".revacnn" / "keys").expanduser()


def _z85_key(value: bytes | str, what: str) -> bytes:
    key = value.encode() if isinstance(value, str) else bytes(value)
    key = key.strip()
    try:
        if len(key) != 40 or len(zmq.utils.z85.decode(key)) != 32:
            raise ValueError
    except Exception:  # z85.decode raises several types on bad input
        raise ValueError(f"{what} is not a CURVE key (40 Z85 characters)") from None
    return key


def generate_keypair(out_dir: str | os.PathLike, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (public + secret, 0600) into ``out_dir``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name {name!r} must be a plain file name")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise FileExistsError(f"{public} or {secret} already exists (pass force to overwrite)")
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        zmq.auth.create_certificates(str(out), name)
    finally:
        os.umask(old_umask)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def load_public_key(source: str | bytes | os.PathLike) -> bytes:
    """A Z85 public key from a ``.key`` file (or a ``.key_secret`` one: only its public half), or the key itself."""
    if isinstance(source, bytes) or (isinstance(source, str) and len(source.strip()) == 40
                                      and not Path(source).exists()):
        return _z85_key(source, "the public key")
    path = Path(source).expanduser()
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a CURVE key file ({error})") from None
    if public is None:
        raise ValueError(f"{path} holds no public key")
    return _z85_key(public, str(path))


def load_keypair(source: str | os.PathLike | tuple) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file, or a (public, secret) pair given directly."""
    if isinstance(source, tuple):
        public, secret = source
        return _z85_key(public, "the public key"), _z85_key(secret, "the secret key")
    path = Path(source).expanduser()
    if path.suffix == ".key" and path.with_name(path.name + "_secret").exists():
        path = path.with_name(path.name + "_secret")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a CURVE key file ({error})") from None
    if public is None or secret is None:
        raise ValueError(f"{path} holds no secret key: give the NAME.key_secret file made by `revacnn keys generate`")
    return _z85_key(public, str(path)), _z85_key(secret, str(path))


def allow_key(public_key_file: str | os.PathLike, keys_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Copy a client's public key into ``keys_dir/allowed/`` (only its public half, whatever file is given)."""
    public = load_public_key(public_key_file)
    allowed = Path(keys_dir).expanduser() / ALLOWED_DIR_NAME
    allowed.mkdir(parents=True, exist_ok=True)
    stem = name or Path(public_key_file).name.split(".key")[0] or "client"
    target = allowed / f"{stem}.key"
    if target.exists() and load_public_key(target) != public:
        raise FileExistsError(f"{target} already holds another key; pass another name")
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text("#   revacnn: a client allowed to connect\n#   ZeroMQ CURVE **Public** Certificate\n"
                         f"metadata\ncurve\n    public-key = \"{public.decode()}\"\n")
    os.replace(temporary, target)
    return target


def allowed_keys(keys_dir: str | os.PathLike) -> dict[str, bytes]:
    """{file name: public key} of every readable key in ``keys_dir/allowed/``."""
    return read_public_keys(Path(keys_dir).expanduser() / ALLOWED_DIR_NAME)


def read_public_keys(directory: str | os.PathLike) -> dict[str, bytes]:
    """{file name: public key} of every readable ``*.key`` file in ``directory`` (unreadable ones are skipped)."""
    directory = Path(directory)
    keys = {}
    for path in sorted(directory.glob("*.key")) if directory.is_dir() else []:
        try:
            keys[path.name] = load_public_key(path)
        except ValueError:
            continue
    return keys


@dataclass
class CurveServerKeys:
    """What the trainer's sockets need for CURVE: its keypair and the allow-list (a directory or fixed keys)."""

    public: bytes
    secret: bytes
    allowed_dir: Path | None = None
    allowed: tuple[bytes, ...] = ()

    @classmethod
    def from_keys_dir(cls, keys_dir: str | os.PathLike | None = None, create: bool = True) -> CurveServerKeys:
        """The trainer's keypair (made when missing and ``create``) and ``keys_dir/allowed/``."""
        directory = Path(keys_dir).expanduser() if keys_dir is not None else default_keys_dir()
        secret_file = directory / f"{SERVER_KEY_NAME}.key_secret"
        if not secret_file.exists():
            if not create:
                raise FileNotFoundError(f"no trainer key at {secret_file}: run `revacnn keys generate --out "
                                        f"{directory} --name {SERVER_KEY_NAME}`")
            generate_keypair(directory, SERVER_KEY_NAME)
        (directory / ALLOWED_DIR_NAME).mkdir(parents=True, exist_ok=True)
        public, secret = load_keypair(secret_file)
        return cls(public, secret, allowed_dir=directory / ALLOWED_DIR_NAME)

    def allowed_now(self) -> dict[bytes, bool]:
        keys = {key: True for key in self.allowed}
        if self.allowed_dir is not None:
            keys.update({key: True for key in read_public_keys(self.allowed_dir).values()})
        return keys

    def allowed_signature(self) -> tuple:
        """Changes when a key file is added, removed or rewritten in ``allowed_dir``."""
        if self.allowed_dir is None or not self.allowed_dir.is_dir():
            return ()
        try:
            return tuple(sorted((path.name, path.stat().st_mtime_ns, path.stat().st_size)
                                for path in self.allowed_dir.glob("*.key")))
        except OSError:
            return ("unreadable",)


@dataclass
class ConnectionInfo:
    """Endpoints and identity of one run. ``key`` is the hex HMAC key ('' when messages are unsigned).

    ``security`` is ``"none"`` or ``"curve"``; with CURVE, ``curve_server_key`` is the trainer's Z85 *public* key
    (a client also needs its own allow-listed keypair). The trainer's secret key is never written here.
    """

    run_id: str
    telemetry: str
    control: str
    protocol: int = PROTOCOL_VERSION
    signature_scheme: str = "hmac-sha256"
    key: str = ""
    security: str = "none"
    curve_server_key: str = ""
    pid: int = 0
    host: str = ""
    created: float = 0.0

    @property
    def key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.key) if self.key else None

    def write(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename); mode 0600 when a key is present."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["pid"] = data["pid"] or os.getpid()
        data["host"] = data["host"] or socket.gethostname()
        data["created"] = data["created"] or time.time()
        temporary = path.with_name(path.name + ".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if self.key else 0o644)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(data, handle, indent=2)
        os.replace(temporary, path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> ConnectionInfo:
        """Read a connection file, or the ``connection.json`` inside a run directory."""
        path = Path(path)
        if path.is_dir():
            path = path / CONNECTION_FILE_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no connection file at {path}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a valid connection file: {error}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a valid connection file: expected a JSON object")
        missing = [name for name in ("run_id", "telemetry", "control") if not isinstance(data.get(name), str)]
        if missing:
            raise ValueError(f"{path} is not a valid connection file: missing {', '.join(missing)}")
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)
