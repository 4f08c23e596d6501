"""The layer and probe-image menus of the embedding and filters views, filled from the shown run's structure and
snapshot (both views tick together: the "layers" tab tick)."""

from __future__ import annotations

from dash import Input, Output, State, no_update

from .common import bound


def register(app, hub) -> None:
    menus = [Output(f"{view}-{menu}", prop) for view in ("emb", "fil")
             for menu, prop in (("layer", "options"), ("layer", "value"), ("probe", "options"))]
    app.callback(*menus, Input("tick-layers", "data"), Input("run-select", "value"), State("emb-layer", "value"),
                 State("fil-layer", "value"), State("emb-layer", "options"), State("emb-probe", "options")
                 )(bound(layer_options, hub))


def layer_options(hub, _n, key, emb_layer, fil_layer, old_opts, old_probes):
    state = hub.get(key)
    if state is None or state.structure is None:
        return [], None, [], [], None, []
    opts = [{"label": l["name"], "value": l["name"]} for l in state.structure["layers"]]
    names = [o["value"] for o in opts]
    if not names:  # the run monitors no layer (its module has none): nothing to choose
        return [], None, [], [], None, []
    snap = state.snapshot
    n_probe = len(snap.arrays.get("probe_images", [])) if snap is not None else 0
    probes = [{"label": str(i), "value": i} for i in range(n_probe)]
    if opts == old_opts and probes == old_probes and emb_layer in names and fil_layer in names:
        return no_update, no_update, no_update, no_update, no_update, no_update
    emb_layer = emb_layer if emb_layer in names else (names[1] if len(names) > 1 else names[0])
    fil_layer = fil_layer if fil_layer in names else names[0]
    return opts, emb_layer, probes, opts, fil_layer, probes
