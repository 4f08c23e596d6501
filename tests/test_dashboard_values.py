"""Every figure builder and view model takes any value a trainer can produce: NaN, ±inf, ±1e38, zeros, subnormals,
empty layers and layers of no filter. A diverged run blanked the network view (an HTTP 500 on every refresh); each
builder must return a figure whose JSON plotly and the browser take, and say what is odd instead of failing."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import plotly.graph_objects as go
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from revacnn.wire.protocol import Message
from revacnn_dash.compute.embeddings import compute_embedding
from revacnn_dash.compute.redundancy import redundancy
from revacnn_dash.figures.embedding import embedding_figure
from revacnn_dash.figures.network import network_figure
from revacnn_dash.figures.tables import hints_table
from revacnn_dash.figures.training import training_figure
from revacnn_dash.viewmodels.images import activation_image, data_uri, filter_image, fit_rows, to_uint8
from revacnn_dash.viewmodels.network import jitter_pixels, network_model

ODD = [math.nan, math.inf, -math.inf, 1e38, -1e38, 0.0, -0.0, 5e-324, -5e-324, 1e-310, 3.4028235e38, 1.0, -1.0,
       0.5, 1e308, -1e308]
values = st.one_of(st.sampled_from(ODD), st.floats(allow_nan=True, allow_infinity=True, width=32))
values32 = st.one_of(st.sampled_from([v for v in ODD if not abs(v) < math.inf or abs(v) <= 3.4028235e38]),
                     st.floats(allow_nan=True, allow_infinity=True, width=32))
FIELDS = ("grad_abs_mean", "grad_sq_mean", "weight_norm", "update_ratio", "act_abs_mean")
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,  # the same cases in CI
                    suppress_health_check=[HealthCheck.too_slow])
DATA_KEYS = {"x", "y", "z", "text", "customdata"}   # arrays where plotly draws null as a gap


def arrays(shape, dtype=np.float64):
    return hnp.arrays(dtype, shape, elements=values32 if dtype == np.float32 else values)


def assert_plotly_safe(fig: go.Figure) -> dict:
    """The figure serialises (as Dash sends it) to strict JSON, and no NaN or ±inf sits where plotly would choke:
    outside the data arrays (a marker size, a line width, an axis range, a colour)."""
    assert isinstance(fig, go.Figure)
    text = fig.to_json()
    out = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the figure's JSON"))

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if k not in DATA_KEYS:
                    walk(v, path + [k])
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, path)
        elif isinstance(node, float):
            assert math.isfinite(node), f"{node} at {'.'.join(path)}"

    raw = fig.to_plotly_json()
    walk(raw, [])
    return out


def annotations(fig: go.Figure) -> str:
    return " ".join(a.text or "" for a in fig.layout.annotations)


@st.composite
def structures(draw):
    """A structure of 0–4 layers of 0–5 filters, some of them frozen, and per-filter fields of odd values (a field
    may be missing, or a layer may have none)."""
    n = draw(st.integers(0, 4))
    layers, fields = [], {}
    for i in range(n):
        out = draw(st.integers(0, 5))
        frozen = draw(st.sampled_from([None, "all", [0], [1, 7]]))
        layers.append({"name": f"l{i}", "type": "Conv2d", "out": out, "frozen": frozen})
        if draw(st.booleans()):
            fields[f"l{i}"] = {f: draw(arrays(out, np.float32)) for f in FIELDS if draw(st.booleans()) or f ==
                               "act_abs_mean"}
    edges = [[f"l{i}", f"l{i + 1}"] for i in range(n - 1)] if draw(st.booleans()) else []
    return {"layers": layers, "layer_edges": edges}, fields


@SETTINGS
@given(structures(), st.sampled_from([[""], [], ["l0", "l1"]]), st.integers(1, 3))
def test_network_model_and_figure_take_any_values(case, expanded, max_nodes):
    structure, fields = case
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # "invalid value encountered in reduce" while serving
        model = network_model(structure, fields, expanded, max_nodes=max_nodes)
        fig, nodes_trace = network_figure(model)
        amp = jitter_pixels([n["jitter"] for n in model["nodes"]])
    assert_plotly_safe(fig)
    assert all(math.isfinite(a) and 0 <= a <= 8 for a in amp)
    assert all(math.isfinite(w) and 0 <= w <= 1 for _, _, w in model["paths"])
    odd = [n for n in model["nodes"] if any(n.get(k) is not None and not math.isfinite(n[k])
                                            for k in ("strength", "jitter", "grad", "update", "norm"))]
    assert ("NaN or ±inf" in annotations(fig)) == bool(odd)
    assert fig.data[nodes_trace].uid == "revacnn-nodes"


def test_a_diverged_layer_draws_its_finite_nodes_and_says_which_are_not():
    """The reported case: a NaN activation strength raised in ``int(w * 4)`` (an HTTP 500 on every refresh)."""
    structure = {"layers": [{"name": "a", "type": "Conv2d", "out": 3}, {"name": "b", "type": "Conv2d", "out": 2}],
                 "layer_edges": [["a", "b"]]}
    fields = {"a": {"act_abs_mean": np.array([np.nan, 2.0, np.inf], np.float32)},
              "b": {"act_abs_mean": np.array([1e38, 1e38], np.float32)}}
    fig, i = network_figure(network_model(structure, fields, [""]))
    assert_plotly_safe(fig)
    assert "⚠ 2 of 5 nodes hold NaN or ±inf" in annotations(fig)
    # NaN as the smallest finite colour, inf as the largest: b's 1e38 (a float64 mean: float32's overflowed)
    assert list(fig.data[i].marker.color) == pytest.approx([2.0, 2.0, 1e38, 1e38, 1e38], rel=1e-6)
    assert list(fig.data[i].marker.line.color)[:3] == ["#c62828", "#333", "#c62828"]


@SETTINGS
@given(st.integers(0, 30).flatmap(lambda n: st.tuples(*(arrays(n) for _ in range(4)))),
       st.lists(st.fixed_dictionaries({"step": st.integers(0, 100), "val_loss": st.one_of(st.none(), values),
                                       "val_acc": st.one_of(st.none(), values)}), max_size=5))
def test_training_figure_takes_any_values(cols, val):
    loss, acc, lr, step = cols
    fig = training_figure({"step": step, "loss": loss, "train_acc": acc, "lr": lr}, val,
                          [{"step": 3, "label": "pause"}])
    assert_plotly_safe(fig)


@SETTINGS
@given(st.integers(0, 8).flatmap(lambda n: st.tuples(arrays((n, 2)), arrays(n))),
       st.sampled_from(["grad", "cluster"]))
def test_embedding_figure_takes_any_values(case, colour):
    coords, grad = case
    n = len(coords)
    result = {"coords": coords.tolist(), "ids": list(range(n)), "grad": grad.tolist(), "cluster": [0] * n}
    fig = embedding_figure(result, colour, "l", "weight", "pca", 7)
    assert_plotly_safe(fig)
    assert ("NaN or ±inf" in annotations(fig)) == bool(n and not np.isfinite(coords).all())


@SETTINGS
@given(st.integers(0, 6).flatmap(lambda n: st.tuples(arrays((n, 2, 3)), arrays(n), arrays(n))))
def test_embedding_and_redundancy_of_odd_features(case):
    weight, act, upd = case
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        coords = compute_embedding(weight.reshape(len(weight), 6), "pca")
        hints = redundancy(weight, {"act_abs_mean": act, "update_ratio": upd},
                           np.zeros(len(weight), dtype=bool))
    assert coords.shape == (len(weight), 2) and np.isfinite(coords).all()
    assert all(np.isfinite(act[i]) for i in hints["dead"]) and all(np.isfinite(upd[i]) for i in hints["converged"])
    hints_table("l", hints)


@SETTINGS
@given(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5).flatmap(arrays), st.booleans())
@example(np.array([5e-324, np.nan]), False)  # a subnormal span: its half rounds to 0 (found by a random run)
def test_images_of_any_values(arr, symmetric):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        img = to_uint8(arr, symmetric=symmetric)
        assert img.dtype == np.uint8 and img.shape == arr.shape
        if arr.size and arr.ndim <= 2:
            data_uri(fit_rows(img if arr.ndim == 2 else img[None]))
        if arr.ndim >= 2 and arr.size:
            data_uri(filter_image(arr))
            data_uri(activation_image(arr))
    if arr.size:   # NaN draws as 0, ±inf as the extremes: the finite values keep their order
        fin = np.isfinite(arr)
        if fin.sum() >= 2 and not symmetric:
            lo, hi = arr[fin].min(), arr[fin].max()
            if hi > lo:
                assert img[fin][arr[fin].argmin()] == 0 and img[fin][arr[fin].argmax()] == 255


# -- the views' own outputs, fed protocol-shaped messages of a diverged run ------------------------------------------

STRUCTURE = {"revision": 0, "model": "M", "layers": [
    {"name": "c1", "type": "Conv2d", "kind": "conv", "in": 3, "out": 4, "frozen": None, "filter_ids": [0, 1, 2, 3]},
    {"name": "c2", "type": "Conv2d", "kind": "conv", "in": 4, "out": 0, "frozen": None, "filter_ids": []},
    {"name": "fc", "type": "Linear", "kind": "linear", "in": 4, "out": 2, "frozen": None, "filter_ids": [4, 5]}],
    "layer_edges": [["input", "c1"], ["c1", "c2"], ["c2", "fc"]]}


def step_message(step: int, loss: float, filters: np.ndarray | None = None) -> Message:
    """A ``step`` message as the callback sends it (tests/test_dashboard_state.py): NaN goes as nil, named."""
    body = {"step": step, "epoch": 0, "batch": step, "loss": loss, "metrics": {"train_acc": 0.5},
            "groups": [{"lr": 0.1}], "batch_size": 32, "samples_per_s": 100.0, "per_filter": filters is not None}
    if not np.isfinite(loss):
        body.update(loss=None, not_finite=["loss"])
    arrays = {}
    if filters is not None:
        body["layer_names"] = ["c1", "c2", "fc"]
        body["filter_fields"] = list(FIELDS)
        arrays["filters"] = filters
        arrays["layers"] = np.array([np.nan, np.nan, np.inf], dtype=np.float32)
    return Message("step", body, arrays)


class OneRun:
    """The views' ``hub``: one run, and the embedding service."""

    def __init__(self, state):
        from revacnn_dash.compute.embedding_service import EmbeddingService
        self.state = state
        self.embeddings = EmbeddingService()

    def get(self, key):
        return self.state


def test_a_diverged_run_renders_every_view_and_says_since_when(monkeypatch):
    from revacnn_dash.data.state import RunState
    from revacnn_dash.views import embedding as embedding_view
    from revacnn_dash.views import filters as filters_view
    from revacnn_dash.views import network as network_view
    from revacnn_dash.views import training as training_view
    from revacnn_dash.views.header import banner_children, summary_line

    state = RunState("x")
    state.apply(Message("structure", STRUCTURE, {}))
    good = np.ones((5, 6), np.float32)
    bad = np.full((5, 6), np.nan, np.float32)
    bad[:, 1] = np.inf
    bad[:, 4] = 1e38
    for step in range(1, 812):
        state.apply(step_message(step, 2.0 / step, good if step == 811 else None))
    for step in range(812, 820):
        state.apply(step_message(step, math.nan, bad))
    weight = np.full((4, 3, 3, 3), np.nan, np.float32)
    weight[0] = np.inf
    weight[1] = 1e38
    act = np.full((2, 4, 5, 5), np.nan, np.float32)
    state.apply(Message("snapshot", {"step": 819, "probe_labels": [0, 1]},
                        {"weight/c1": weight, "grad/c1": weight, "act/c1": act, "actgrad/c1": act,
                         "weight/c2": np.zeros((0, 4, 3, 3), np.float32),
                         "weight/fc": np.array([[np.nan, 1, 2, np.inf], [0, 0, 0, 0]], np.float32),
                         "act/fc": np.array([[np.nan, np.inf], [1e38, -1e38]], np.float32),
                         "probe_images": np.full((2, 3, 5, 5), np.nan, np.float32)}))
    hub = OneRun(state)
    try:
        summary = state.summary()
        banner = [c.children for c in banner_children(summary) if getattr(c, "id", None) == "loss-not-finite"]
        assert banner == ["⚠ loss is NaN or ±inf since step 812 (diverged?)"]
        summary_line(summary)

        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            fig, anim, _, options = network_view.network_view(hub, 1, None, "k", None, "network", None)
            assert_plotly_safe(fig) and "NaN or ±inf" in annotations(fig)
            json.dumps(anim, allow_nan=False)
            for layer in ("c1", "c2", "fc"):
                for filters in (None, [0], [1]):
                    network_view.network_details(hub, {"layer": layer, "filters": filters}, 1, 0, "k", "network")
                for probe in (0, 1):
                    outputs = filters_view.filters_view(hub, 1, layer, probe, "filters", "k", None)
                    assert str(outputs[4]).startswith("snapshot at step 819")
            patch, cursor, _ = training_view.training_chart(hub, 1, "k", ["log"], 0.6, None, "training")
        assert_plotly_safe(patch)
        json.dumps(cursor, allow_nan=False)

        for source in ("weight", "grad", "act"):
            for colour in ("grad", "cluster"):
                args = (hub, 1, "c1", source, "pca", colour, 0, "embedding", "k", None)
                for _ in range(500):
                    fig, status, data = embedding_view.embedding_view(*args)
                    if "computing" not in str(status):       # the status while computing is a spinner and text
                        break
                    time.sleep(0.02)
                assert "cannot embed" not in status, status
                assert_plotly_safe(fig)
                assert f"⚠ {4 if source == 'act' else 3} of 4 filters hold NaN or inf" in status
    finally:
        hub.embeddings.shutdown()


@SETTINGS
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(arrays((3, n)), arrays((3, n)))))
def test_snapshot_comparison_measures_of_odd_values_are_quiet(case):
    """``RuntimeWarning: invalid value encountered in reduce`` was printed while serving: the comparison's sums of
    a diverged run's ±inf (inf − inf, inf · −inf)."""
    from revacnn_dash.analysis.compare import cosine, log_change, relative_l2, zero_floor

    a, b = case
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        relative_l2(a, b, axis=1)
        cosine(a, b, axis=1)
        floor = zero_floor(a)
        log_change(a, b)
    assert math.isfinite(floor) and floor > 0


@SETTINGS
@given(st.integers(0, 8).flatmap(lambda t: st.tuples(st.just(t), arrays((5, t)), arrays((3, t)))),
       st.sampled_from(["cosine", "update_ratio", "weight_norm"]))
def test_explorer_figures_take_any_values(case, field):
    """The training-log explorer's small multiples and filters × iterations chart of a diverged recording."""
    from revacnn_dash.figures.explorer_charts import filter_chart_figure, multiples_figure

    t, bands, matrix = case
    steps = np.arange(t) * 10
    tree = {"root": "", "nodes": {"": {"name": "model", "children": ["a"], "layer": None},
                                  "a": {"name": "a", "children": [], "layer": "a"}}}
    stats = dict(zip(("min", "q1", "median", "q3", "max"), np.sort(bands, axis=0)))
    overview = {"field": field, "steps": t, "raw": True, "nodes": {"": {"step": steps, **stats},
                                                                  "a": {"step": steps, **stats}}}
    events = [{"step": 5, "label": "pause"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fig = multiples_figure(overview, tree, "", [3], events, None)
        chart = filter_chart_figure({"step": steps, "field": field, "values": matrix, "filter_ids": [0, 1, 2],
                                     "exact": True}, [3], events, [0, 10])
    assert_plotly_safe(fig)
    assert_plotly_safe(chart)


@SETTINGS
@given(st.tuples(arrays((2, 3, 3)), arrays((2, 3, 3)), arrays((2, 2, 4, 4))), st.sampled_from(["kept", "new"]))
def test_comparison_filter_figure_takes_any_values(case, status):
    from revacnn_dash.analysis.compare import log_change
    from revacnn_dash.figures.comparison_charts import filter_figure

    a, b, act = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diff, log = b - a, log_change(a, b)[0]
    pair = {"a": a, "b": b, "diff": diff, "log": log, "act_a": act, "act_b": act, "status": status,
            "rel_l2": float(np.nan), "cosine": float(np.inf), "layer": "l", "filter_id": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fig = filter_figure(pair, 1)
    assert_plotly_safe(fig)


def test_the_banner_states_the_telemetry_schedule_and_survives_any_value():
    from revacnn_dash.views.header import schedule_text

    text, tip = schedule_text({"budget": 0.02, "fixed": ["snapshot_every"], "scalars_every": 1, "filters_every": 50,
                               "snapshot_every": 2000, "cost": 0.016,
                               "seconds": {"scalars": 1e-4, "filters": 0.05, "snapshot": 1.2}})
    assert text == "per-filter data every 50 steps · snapshots every 2,000 steps · telemetry 1.6 % of training"
    assert "budget: 2 % of training time" in tip and "fixed by the user: snapshot_every" in tip
    assert "filters: 50.0 ms each" in tip
    for odd in (None, {}, {"filters_every": float("nan"), "cost": float("inf")}, {"filters_every": True},
                {"filters_every": -3, "seconds": {"x": None}, "budget": "x"}, [1, 2], "schedule"):
        assert schedule_text(odd) is None
    assert schedule_text({"filters_every": 1, "snapshot_every": 0})[0] == "per-filter data every step · snapshots off"
