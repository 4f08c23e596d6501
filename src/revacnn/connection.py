"""Connection files (docs/protocol.md §1): what a client needs to reach a run. No torch."""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from revacnn.protocol import PROTOCOL_VERSION

CONNECTION_FILE_NAME = "connection.json"


@dataclass
class ConnectionInfo:
    """Endpoints and identity of one run. ``key`` is the hex HMAC key ('' when messages are unsigned)."""

    run_id: str
    telemetry: str
    control: str
    protocol: int = PROTOCOL_VERSION
    signature_scheme: str = "hmac-sha256"
    key: str = ""
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
