"""Snapshot comparison (CNNComparator): what changed between two snapshots, at network, layer and filter level.

Torch-free. A *snapshot* is what ``RunReader.snapshot(step)`` returns; its structure (filter ids per layer) is the
recorded structure whose ``revision`` equals the snapshot body's ``revision``. Filters are matched by filter id, and
so are the input channels of a filter (by the producing layer's filter ids), so a steered shape change shows as
new / removed filters and channels instead of as noise. Measures and the rule for zeros and sign changes:
docs/analysis.md, "Measures".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import math

import numpy as np

__all__ = ["LOG_KINDS", "log_change", "relative_l2", "cosine", "structure_at", "SnapshotComparison",
           "compare_snapshots", "zero_floor"]

# kinds of coefficient pairs in log_change
LOG_KINDS = ("normal", "both_zero", "from_zero", "to_zero", "sign_flip")
ZERO_FRACTION = 1e-3       # |x| below this fraction of the layer's RMS (in snapshot a) counts as zero


def zero_floor(a: np.ndarray) -> float:
    """The magnitude below which a coefficient counts as zero: 1e-3 × RMS(a) (the layer's first snapshot)."""
    a = np.asarray(a, np.float64)
    finite = a[np.isfinite(a)]   # a diverged run's NaN and ±inf do not set the floor
    with np.errstate(over="ignore"):
        rms = float(np.sqrt(np.mean(finite * finite))) if finite.size else 0.0
    return ZERO_FRACTION * rms if 0 < rms < math.inf else np.finfo(np.float32).tiny


def log_change(a, b, floor: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise log change ln(|b| / |a|) and a kind code per element (index into ``LOG_KINDS``).

    Rule (documented in docs/analysis.md): with ε = ``floor`` (default ``zero_floor(a)``), a value with |x| < ε
    counts as zero.
      both zero           → 0            (kind both_zero)
      a zero, b not       → ln(|b| / ε)  (kind from_zero: a finite, clipped growth)
      b zero, a not       → ln(ε / |a|)  (kind to_zero: a finite, clipped shrink)
      opposite signs      → NaN          (kind sign_flip: a sign change is not a relative change; it is counted
                                          and shown separately, never averaged into log changes)
      otherwise           → ln(|b| / |a|) (kind normal; symmetric: ln(a/b) = −ln(b/a), and additive over steps)
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    eps = zero_floor(a) if floor is None else float(floor)
    za, zb = np.abs(a) < eps, np.abs(b) < eps
    flip = ~za & ~zb & (np.sign(a) != np.sign(b))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(np.maximum(np.abs(b), eps)) - np.log(np.maximum(np.abs(a), eps))
    out[za & zb] = 0.0
    out[flip] = np.nan
    kind = np.zeros(a.shape, np.int8)
    kind[za & zb] = 1
    kind[za & ~zb] = 2
    kind[~za & zb] = 3
    kind[flip] = 4
    return out, kind


def relative_l2(a, b, axis=None) -> np.ndarray | float:
    """‖b − a‖₂ / ‖a‖₂ (NaN where ‖a‖ = 0 and b ≠ a; 0 where both are zero)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    # a diverged run's ±inf: inf − inf and the sums of ±inf are NaN, quietly ("invalid value encountered in
    # reduce" was printed while serving)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        num = np.sqrt(np.sum((b - a) ** 2, axis=axis))
        den = np.sqrt(np.sum(a * a, axis=axis))
        out = np.where(den > 0, num / np.where(den > 0, den, 1), np.where(num > 0, np.nan, 0.0))
    return float(out) if np.ndim(out) == 0 else out


def cosine(a, b, axis=None) -> np.ndarray | float:
    """a·b / (‖a‖ ‖b‖); 1 where both are zero, NaN where exactly one is."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        dot = np.sum(a * b, axis=axis)
        na, nb = np.sqrt(np.sum(a * a, axis=axis)), np.sqrt(np.sum(b * b, axis=axis))
        out = np.where((na > 0) & (nb > 0), dot / (na * nb), np.where((na == 0) & (nb == 0), 1.0, np.nan))
    return float(out) if np.ndim(out) == 0 else out


def structure_at(structures: list, revision: int | None) -> dict:
    """The recorded structure body with this revision (the latest one at or before it; the last if None)."""
    bodies = [body for _, body in structures]
    if not bodies:
        raise KeyError("the run has no recorded structure")
    if revision is None:
        return bodies[-1]
    best = bodies[0]
    for body in bodies:
        if int(body.get("revision", 0)) <= int(revision):
            best = body
    return best


def _producers(structure: dict) -> dict[str, str]:
    """For each monitored layer, the one monitored layer feeding it (if exactly one; residual sums have several)."""
    sources: dict[str, list[str]] = {}
    for src, dst in structure.get("layer_edges", []) or []:
        if src != "input":
            sources.setdefault(dst, []).append(src)
    return {dst: srcs[0] for dst, srcs in sources.items() if len(srcs) == 1}


def _input_ids(structure: dict, layer: dict) -> list | None:
    """Ids of the input channels of ``layer`` (the producing layer's filter ids), or None if not one producer."""
    producer = _producers(structure).get(layer["name"])
    if producer is None:
        return None
    for other in structure["layers"]:
        if other["name"] == producer:
            return list(other["filter_ids"])
    return None


def _split_inputs(weight: np.ndarray, n_in: int | None) -> np.ndarray:
    """View a weight [out, in, …] (conv) or [out, in] (linear) as [out, groups, per-group] for input matching."""
    flat = weight.reshape(weight.shape[0], -1)
    if n_in and flat.shape[1] % n_in == 0:
        return flat.reshape(weight.shape[0], n_in, flat.shape[1] // n_in)
    return flat.reshape(weight.shape[0], 1, flat.shape[1])


@dataclass
class LayerComparison:
    name: str
    kind: str
    ids_a: list
    ids_b: list
    kept: list                  # filter ids present in both
    new: list                   # only in b
    removed: list               # only in a
    inputs_matched: str         # "by id", "positional", "not comparable"
    wa: np.ndarray              # [kept, in_kept, k] matched coefficients of a (float64)
    wb: np.ndarray
    filter_rel_l2: np.ndarray   # [kept]
    filter_cosine: np.ndarray   # [kept]
    filter_log_median: np.ndarray  # [kept] median |log change| over normal coefficients
    filter_flip_fraction: np.ndarray
    act_rel_l2: np.ndarray | None   # [kept] on the probe images
    act_cosine: np.ndarray | None
    rel_l2: float
    cosine: float
    log_median: float
    sign_flips: float
    kind_counts: dict
    act_rel: float | None
    act_cos: float | None
    norm_a: np.ndarray = field(default=None)   # [len(ids_a)] filter norms in a
    norm_b: np.ndarray = field(default=None)
    name_a: str | None = None   # its name in a, when it was renamed between the two (insert_layer: conv2 → conv2.0)

    def summary(self) -> dict[str, Any]:
        return {"layer": self.name, "kind": self.kind, "kept": len(self.kept), "new": len(self.new),
                "removed": len(self.removed), "inputs": self.inputs_matched, "rel_l2": self.rel_l2,
                "cosine": self.cosine, "log_median": self.log_median, "sign_flips": self.sign_flips,
                "act_rel_l2": self.act_rel, "act_cosine": self.act_cos}


class SnapshotComparison:
    """Two snapshots compared layer by layer (see ``compare_snapshots``)."""

    def __init__(self, snap_a, snap_b, struct_a, struct_b, probes_comparable: bool) -> None:
        self.a, self.b = snap_a, snap_b
        self.struct_a, self.struct_b = struct_a, struct_b
        self.probes_comparable = probes_comparable
        self.layers: dict[str, LayerComparison] = {}

    def network(self) -> list[dict[str, Any]]:
        """One summary row per layer (forward order of b, then layers only in a)."""
        return [layer.summary() for layer in self.layers.values()]

    def filter_pair(self, layer: str, filter_id: int) -> dict[str, Any]:
        """The two versions of one filter with matched inputs: ``a``, ``b`` [in, kh, kw] ([in, kd, kh, kw] for a 3-D
        conv; NaN for a missing input channel), ``diff``, ``log``, ``kind``, and activation maps [P, H, W]
        ([P, D, H, W]) of both (None if not recorded)."""
        comp = self.layers[layer]
        out: dict[str, Any] = {"layer": layer, "filter_id": int(filter_id)}
        spatial = self.b["arrays"][f"weight/{layer}"].shape[2:]
        if filter_id in comp.kept:
            i = comp.kept.index(filter_id)
            wa, wb = comp.wa[i], comp.wb[i]
            if len(spatial) >= 2 and wa.ndim == 2 and wa.shape[1] == int(np.prod(spatial)):
                wa = wa.reshape((wa.shape[0],) + tuple(spatial))
                wb = wb.reshape((wb.shape[0],) + tuple(spatial))
            log, kind = log_change(wa, wb, zero_floor(comp.wa))
            out.update(a=wa, b=wb, diff=wb - wa, log=log, kind=kind, status="kept",
                       rel_l2=relative_l2(wa, wb), cosine=cosine(wa, wb))
        else:
            status = "new" if filter_id in comp.new else "removed"
            snap, ids, name = (self.b, comp.ids_b, layer) if status == "new" else (self.a, comp.ids_a,
                                                                                  comp.name_a or layer)
            w = snap["arrays"][f"weight/{name}"][ids.index(filter_id)].astype(np.float64)
            out.update(a=w if status == "removed" else None, b=w if status == "new" else None, diff=None, log=None,
                       kind=None, status=status)
        for key, snap, ids, name in (("act_a", self.a, comp.ids_a, comp.name_a or layer),
                                     ("act_b", self.b, comp.ids_b, layer)):
            act = snap["arrays"].get(f"act/{name}")
            out[key] = act[:, ids.index(filter_id)] if act is not None and filter_id in ids else None
        return out


def compare_snapshots(snap_a: dict, snap_b: dict, structures_a: list, structures_b: list | None = None
                      ) -> SnapshotComparison:
    """Compare snapshot ``a`` (the reference) with ``b``. ``structures_*`` are ``RunReader.structures()`` of the
    runs they come from (the same list for two steps of one run).

    Per layer: filters matched by id (kept / new / removed); a kept filter's input channels matched by the
    producing layer's filter ids when the layer has exactly one monitored producer whose width divides the input
    size (conv → conv, conv → flatten → linear), positionally when the input sizes are equal, else the layer's
    coefficient measures are NaN ("not comparable"). Layer measures pool all matched coefficients of kept filters:
    relative L2 ‖b−a‖/‖a‖, cosine, median |log change| over "normal" coefficients, fraction of sign flips.
    Activation measures compare ``act/<L>`` on the probe images (only when both snapshots used the same probes).
    """
    structures_b = structures_a if structures_b is None else structures_b
    struct_a = structure_at(structures_a, snap_a["body"].get("revision"))
    struct_b = structure_at(structures_b, snap_b["body"].get("revision"))
    pa_, pb_ = snap_a["arrays"].get("probe_images"), snap_b["arrays"].get("probe_images")
    probes = pa_ is not None and pb_ is not None and pa_.shape == pb_.shape and bool(np.array_equal(pa_, pb_))
    result = SnapshotComparison(snap_a, snap_b, struct_a, struct_b, probes)
    layers_a = {layer["name"]: layer for layer in struct_a["layers"]}
    order = [layer["name"] for layer in struct_b["layers"]] + [n for n in layers_a if
                                                                 n not in {l["name"] for l in struct_b["layers"]}]
    layers_b = {layer["name"]: layer for layer in struct_b["layers"]}
    for name in order:
        lb = layers_b.get(name)
        name_a = name if name in layers_a or lb is None else _renamed_from(lb, layers_a, set(layers_b))
        la = layers_a.get(name_a)
        wa_full = snap_a["arrays"].get(f"weight/{name_a}")
        wb_full = snap_b["arrays"].get(f"weight/{name}")
        if la is None or lb is None or wa_full is None or wb_full is None:
            continue
        result.layers[name] = _compare_layer(name, la, lb, struct_a, struct_b, wa_full, wb_full,
                                             snap_a["arrays"].get(f"act/{name_a}") if probes else None,
                                             snap_b["arrays"].get(f"act/{name}") if probes else None)
        result.layers[name].name_a = name_a if name_a != name else None
    return result


def _renamed_from(layer_b: dict, layers_a: dict[str, dict], names_b: set[str]) -> str | None:
    """The layer of ``a`` that ``layer_b`` was called before a rename: of those gone from ``b``, the one sharing the
    most filter ids with it (insert_layer keeps the anchor's ids when it moves it into a Sequential)."""
    ids_b = set(layer_b.get("filter_ids") or [])
    shared = {name: len(ids_b & set(layer.get("filter_ids") or [])) for name, layer in layers_a.items()
              if name not in names_b}
    best = max(shared, key=shared.get, default=None)
    return best if best is not None and shared[best] > 0 else None


def _compare_layer(name, la, lb, struct_a, struct_b, wa_full, wb_full, act_a, act_b) -> LayerComparison:
    ids_a, ids_b = [int(i) for i in la["filter_ids"]], [int(i) for i in lb["filter_ids"]]
    set_a, set_b = set(ids_a), set(ids_b)
    kept = [i for i in ids_b if i in set_a]
    new = [i for i in ids_b if i not in set_a]
    removed = [i for i in ids_a if i not in set_b]
    pos_a = {fid: k for k, fid in enumerate(ids_a)}
    pos_b = {fid: k for k, fid in enumerate(ids_b)}
    rows_a = [pos_a[i] for i in kept]
    rows_b = [pos_b[i] for i in kept]
    in_a, in_b = _input_ids(struct_a, la), _input_ids(struct_b, lb)
    wa_full = wa_full.astype(np.float64)
    wb_full = wb_full.astype(np.float64)
    na_in = wa_full.reshape(len(ids_a), -1).shape[1]
    nb_in = wb_full.reshape(len(ids_b), -1).shape[1]
    matched = "not comparable"
    if in_a is not None and in_b is not None and na_in % len(in_a) == 0 and nb_in % len(in_b) == 0 \
            and na_in // len(in_a) == nb_in // len(in_b):
        ga, gb = _split_inputs(wa_full, len(in_a)), _split_inputs(wb_full, len(in_b))
        in_pos_a = {fid: k for k, fid in enumerate(in_a)}
        in_pos_b = {fid: k for k, fid in enumerate(in_b)}
        common = [i for i in in_b if i in in_pos_a]
        ca = [in_pos_a[i] for i in common]
        cb = [in_pos_b[i] for i in common]
        wa = ga[rows_a][:, ca]
        wb = gb[rows_b][:, cb]
        matched = "by id"
    elif na_in == nb_in:
        wa = _split_inputs(wa_full, wa_full.shape[1] if wa_full.ndim > 1 else None)[rows_a]
        wb = _split_inputs(wb_full, wb_full.shape[1] if wb_full.ndim > 1 else None)[rows_b]
        matched = "positional"
    else:
        wa = wb = np.zeros((len(kept), 0, 0))
    n = len(kept)
    fa, fb = wa.reshape(n, -1), wb.reshape(n, -1)
    floor = zero_floor(fa)
    log, kind = log_change(fa, fb, floor)
    normal = kind == 0
    abs_log = np.where(normal, np.abs(np.nan_to_num(log)), np.nan)
    from .explorer import _row_quantiles

    filter_log = _row_quantiles(abs_log, (0.5,))[0] if n and abs_log.shape[1] else np.full(n, np.nan)
    filter_flip = (kind == 4).mean(1) if fa.shape[1] else np.full(n, np.nan)
    comparable = fa.size > 0
    if act_a is not None and act_b is not None:
        aa = act_a[:, rows_a].astype(np.float64)
        ab = act_b[:, rows_b].astype(np.float64)
        per_a = np.moveaxis(aa, 1, 0).reshape(n, -1)
        per_b = np.moveaxis(ab, 1, 0).reshape(n, -1)
        act_rel, act_cos = relative_l2(per_a, per_b, axis=1), cosine(per_a, per_b, axis=1)
        act_total, act_total_cos = relative_l2(per_a, per_b), cosine(per_a, per_b)
    else:
        act_rel = act_cos = None
        act_total = act_total_cos = None
    counts = {k: int(np.count_nonzero(kind == i)) for i, k in enumerate(LOG_KINDS)}
    return LayerComparison(
        name=name, kind=lb.get("kind", ""), ids_a=ids_a, ids_b=ids_b, kept=kept, new=new, removed=removed,
        inputs_matched=matched, wa=wa, wb=wb,
        filter_rel_l2=relative_l2(fa, fb, axis=1) if comparable else np.full(n, np.nan),
        filter_cosine=cosine(fa, fb, axis=1) if comparable else np.full(n, np.nan),
        filter_log_median=filter_log if comparable else np.full(n, np.nan),
        filter_flip_fraction=filter_flip,
        act_rel_l2=act_rel, act_cosine=act_cos,
        rel_l2=relative_l2(fa, fb) if comparable else float("nan"),
        cosine=cosine(fa, fb) if comparable else float("nan"),
        log_median=float(np.median(np.abs(log[normal]))) if normal.any() else float("nan"),
        sign_flips=float((kind == 4).mean()) if kind.size else float("nan"),
        kind_counts=counts, act_rel=act_total, act_cos=act_total_cos,
        norm_a=np.linalg.norm(wa_full.reshape(len(ids_a), -1), axis=1),
        norm_b=np.linalg.norm(wb_full.reshape(len(ids_b), -1), axis=1))
