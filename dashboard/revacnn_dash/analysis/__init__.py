"""Analysis views over recorded runs: snapshot comparison (CNNComparator), the training-log explorer (DeepTracker)
and the ReVACNN §4.1 observations, measured. Torch-free computations in ``compare``, ``explorer``, ``tracking`` and
``observations``; Dash page builders in ``pages`` (imported lazily so the computations work without Dash).

Mount in a Dash app::

    from revacnn_dash.analysis import RunSource, comparison_layout, explorer_layout, register_analysis_callbacks
    source = RunSource(["lightning_logs"])            # directories searched for recorded runs
    ... comparison_layout(source), explorer_layout(source) ...  (anywhere in app.layout, e.g. two dcc.Tabs)
    register_analysis_callbacks(app, source)

Docs: docs/analysis.md.
"""

from .compare import compare_snapshots, cosine, log_change, relative_l2
from .explorer import build_tree, filter_chart, layer_overview, order_filters
from .observations import channel_concentration, hopkins, mean_nn_cosine, track_observations
from .tracking import anomalies, cube, stable_flips, top_changed

__all__ = ["compare_snapshots", "cosine", "log_change", "relative_l2", "build_tree", "filter_chart",
           "layer_overview", "order_filters", "channel_concentration", "hopkins", "mean_nn_cosine",
           "track_observations", "anomalies", "cube", "stable_flips", "top_changed", "RunSource",
           "comparison_layout", "explorer_layout", "register_analysis_callbacks"]


def __getattr__(name):
    if name in ("RunSource", "comparison_layout", "explorer_layout", "register_analysis_callbacks"):
        from . import pages

        return getattr(pages, name)
    raise AttributeError(name)
