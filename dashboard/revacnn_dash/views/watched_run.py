"""The analysis pages (snapshot comparison, log explorer) open on the run being watched: when the header's run
changes, or its recording is first found (a live run's, by ``data.history``), their run menus move to its
recording. Picking another run there afterwards holds until the watched run changes again."""

from __future__ import annotations

from pathlib import Path

from dash import Input, Output, State, dcc, no_update

from .common import bound

#: The analysis pages' run menus that follow the watched run.
RUN_MENUS = ("ane-run", "anc-run-a", "anc-run-b")


def layout() -> list:
    return [dcc.Store(id="watched-recording")]


def register(app, hub) -> None:
    # The menus' options as inputs too: a live run's recording (a restarted trainer's new one) is listed a moment
    # after the run is shown.
    app.callback(*[Output(menu, "value") for menu in RUN_MENUS], Output("watched-recording", "data"),
                 Input("run-select", "value"), Input("tabs", "value"),
                 *[Input(menu, "options") for menu in RUN_MENUS], State("watched-recording", "data"))(
        bound(follow_watched_run, hub))


def recording_of(hub, key: str | None) -> str | None:
    """Where the shown run is recorded on this machine: a recorded run's directory, or a live run's once found."""
    state = hub.get(key)
    if state is None:
        return None
    return state.target if state.source == "replay" else state.recording_path


def follow_watched_run(hub, key, _tab, *menus_and_applied):
    """Each menu moves to the watched run's recording once per (run, recording): when it is first listed there."""
    *menus, applied = menus_and_applied
    applied = dict(applied or {})
    path = recording_of(hub, key)
    if path is None:
        return *[no_update] * len(RUN_MENUS), no_update
    values = []
    for menu, options in zip(RUN_MENUS, menus):
        value = None if applied.get(menu) == [key, path] else _option_for(path, options)
        if value is not None:    # not listed (yet): the menus refresh as recordings appear
            applied[menu] = [key, path]
        values.append(no_update if value is None else value)
    if all(v is no_update for v in values):
        return *values, no_update
    return *values, applied


def _option_for(path: str, options: list | None) -> str | None:
    wanted = Path(path).resolve()
    for option in options or []:
        if Path(str(option.get("value"))).resolve() == wanted:
            return option["value"]
    return None
