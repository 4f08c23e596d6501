"""View models: what a view draws, computed from a run's state without Dash — the network view's nodes and
paths (``network``) and small PNG images of filters and activation maps (``images``)."""
