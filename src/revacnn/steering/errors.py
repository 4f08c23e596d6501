"""The one exception type of the steering engine."""


class SteeringError(ValueError):
    """A command was refused. The message names what was wrong; nothing was changed."""
