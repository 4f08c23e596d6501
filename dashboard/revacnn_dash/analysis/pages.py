"""The analysis pages' public entry points, for mounting them in another Dash app (docs/analysis.md)::

    source = RunSource(["lightning_logs"])
    layout = html.Div([comparison_layout(source), explorer_layout(source)])   # or one per dcc.Tab
    register_analysis_callbacks(app, source)

The pages themselves are ``revacnn_dash.views.compare`` and ``revacnn_dash.views.explore``. Given ``page_ticks``
(the ids of two components whose data changes on every refresh while the explorer or the comparison is shown), the
pages follow runs still being recorded. Both layouts must be in the app's layout (or
``app.config.suppress_callback_exceptions=True`` when they are rendered lazily).
"""

from __future__ import annotations

from ..data.recordings import LIVE_REFRESH_S, RunSource
from ..views import compare, explore
from ..views.compare import layout as comparison_layout
from ..views.explore import layout as explorer_layout

__all__ = ["LIVE_REFRESH_S", "RunSource", "comparison_layout", "explorer_layout", "register_analysis_callbacks"]


def register_analysis_callbacks(app, source: RunSource, page_ticks: tuple[str, str] | None = None) -> None:
    """Register both pages' callbacks on ``app``; ``page_ticks``: the explorer's and the comparison's ticks."""
    explore_tick, compare_tick = page_ticks if page_ticks is not None else (None, None)
    explore.register(app, source, page_tick=explore_tick)
    compare.register(app, source, page_tick=compare_tick)
