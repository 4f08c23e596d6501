"""The public import path of the torch-free client: ``from revacnn.client import RunClient``.

The implementation lives with the rest of the wire in ``revacnn.wire.client``; this module is the stable name
users' scripts and the docs use.
"""

from revacnn.wire.client import CLIENT_KEY_ENV, ConnectionFailed, RunClient

__all__ = ["CLIENT_KEY_ENV", "ConnectionFailed", "RunClient"]
