"""What several views share: small component makers, the steering fieldsets, and ``bound`` (a view's module-level
callback with the hub given)."""

from __future__ import annotations

from typing import Any, Callable

import dash_mantine_components as dmc
from dash import dcc, html

#: The fieldsets holding each view's steering controls (the header disables them together).
STEERING_CONTROLS = ("steer-training", "steer-network", "steer-filters")


def bound(function: Callable, *context: Any) -> Callable:
    """``function`` with its first arguments (the hub, …) given: Dash calls it with the callback's values only."""
    def callback(*values):
        return function(*context, *values)

    callback.__name__ = function.__name__
    return callback


def monitors_no_layer(state) -> bool:
    return state.structure is not None and not state.structure.get("layers")


def button(label: str, id_: str, **style: Any) -> dmc.Button:
    """A Mantine button (a native <button>, so a disabled fieldset around it disables it too)."""
    return dmc.Button(label, id=id_, n_clicks=0, size="compact-sm", variant="light", className="rv-btn",
                      style={"margin": "2px", **style})


def steering_controls(id_: str, children: list) -> html.Fieldset:
    """A group of steering controls, all disabled at once (a disabled fieldset disables every control in it) while
    the shown run cannot take commands; its tooltip says why."""
    return html.Fieldset(children, id=id_, disabled=False,
                         style={"border": "none", "padding": "0", "margin": "0", "minWidth": "0"})


def number(id_: str, placeholder: str, step: Any = "any", width: str = "90px") -> dcc.Input:
    return dcc.Input(id=id_, type="number", placeholder=placeholder, step=step, debounce=False,
                     style={"width": width, "margin": "2px"})


def img(id_: str, **style: Any) -> html.Img:
    return html.Img(id=id_, style={"imageRendering": "pixelated", "maxWidth": "100%", **style})
