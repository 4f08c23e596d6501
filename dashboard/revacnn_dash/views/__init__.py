"""The dashboard's views: each module has a ``layout(...)`` (its Dash components) and a ``register(app, ...)`` (its
callbacks, module-level functions bound to the hub). ``revacnn_dash.app.create_app`` puts them together."""

try:    # plotly's JSON encoder imports pandas lazily; two server threads doing that at once can hit a half-imported
    import pandas  # noqa: F401  module ("partially initialized module 'pandas'"), so import it here, once
except ImportError:  # pragma: no cover - pandas is optional
    pass
