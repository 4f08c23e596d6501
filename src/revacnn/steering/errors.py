"""The one exception type of the steering engine."""


class SteeringError(ValueError):
    """A command was refused. The message names what was wrong; nothing was changed."""


class CheckpointMismatch(SteeringError, RuntimeError):
    """A steered checkpoint's weights do not fit the module it is loaded into, even after its change log was
    replayed. A ``RuntimeError`` too, as ``load_state_dict``'s own error is."""
