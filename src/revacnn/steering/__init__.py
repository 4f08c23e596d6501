"""Steering engine: change a running model and its optimizer safely (pure torch).

>>> engine = SteeringEngine(module, optimizers, schedulers, example_input=x)
>>> ack = engine.apply({"id": "1", "op": "widen", "args": {"layer": "net.conv3", "count": 1}})
"""

from .changelog import load_steered, replay_changelog
from .engine import SteeringEngine
from .errors import CheckpointMismatch, SteeringError

__all__ = ["SteeringEngine", "SteeringError", "CheckpointMismatch", "replay_changelog", "load_steered"]
