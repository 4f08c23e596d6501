"""Pure view-model code (no Dash, no I/O): hierarchy collapse, network layout, path selection, embedding alignment,
redundancy hints, and small PNG images. Unit-tested with asserted values."""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections import OrderedDict
from typing import Any, Iterable

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# hierarchy


def _split(names: list[str]) -> list[list[str]]:
    """Dotted names without their common prefix (``net.conv1`` → ``conv1`` when every name starts with ``net.``)."""
    parts = [n.split(".") for n in names]
    if not parts:
        return []
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [p[common:] for p in parts]


class TreeNode:
    def __init__(self, path: tuple[str, ...]) -> None:
        self.path = path
        self.children: OrderedDict[str, TreeNode] = OrderedDict()
        self.layers: list[str] = []       # monitored layer names below this node, forward order

    @property
    def id(self) -> str:
        return ".".join(self.path)

    @property
    def is_leaf(self) -> bool:
        return not self.children


def layer_tree(names: list[str]) -> TreeNode:
    """stage → block → layer, from dotted module names, in forward order."""
    root = TreeNode(())
    for name, parts in zip(names, _split(names)):
        node = root
        node.layers.append(name)
        for i, part in enumerate(parts):
            node = node.children.setdefault(part, TreeNode(tuple(parts[:i + 1])))
            node.layers.append(name)
    return root


def default_expanded(names: list[str], max_columns: int = 12) -> list[str]:
    """Expand the tree breadth-first while the number of columns stays within ``max_columns``."""
    root = layer_tree(names)
    expanded = {""}
    frontier = [root]
    while frontier:
        nxt = []
        for node in frontier:
            for child in node.children.values():
                if len(child.layers) > 1:
                    nxt.append(child)
        trial = expanded | {n.id for n in nxt}
        if not nxt or len(visible_columns(names, trial)) > max_columns:
            break
        expanded = trial
        frontier = nxt
    return sorted(expanded)


def visible_columns(names: list[str], expanded: Iterable[str]) -> list[dict[str, Any]]:
    """Columns left to right: a leaf layer (``kind`` "layer", one node per filter) or a collapsed group (``kind``
    "group", one node per layer inside)."""
    expanded = set(expanded)
    root = layer_tree(names)
    rel = {n: ".".join(p) for n, p in zip(names, _split(names))}
    columns: list[dict[str, Any]] = []

    def walk(node: TreeNode) -> None:
        for child in node.children.values():
            if len(child.layers) == 1:
                # a leaf, or a chain holding one layer (``downsample.0``): a filter column named in full
                columns.append({"id": rel[child.layers[0]], "kind": "layer", "label": rel[child.layers[0]],
                                "layers": [child.layers[0]]})
            elif child.id in expanded:
                walk(child)
            else:
                columns.append({"id": child.id, "kind": "group", "label": child.id + " ▸", "layers": child.layers})

    if root.is_leaf:
        return columns
    walk(root)
    # forward order of the first layer in each column
    order = {n: i for i, n in enumerate(names)}
    columns.sort(key=lambda c: order[c["layers"][0]])
    return columns


# ---------------------------------------------------------------------------------------------------------------
# network view


def top_half(strength: np.ndarray) -> np.ndarray:
    """Indices of the strongest ceil(n/2) entries, ranked numerically (ties by index), in ascending index order.
    (The original ranked the numbers as strings; we do not.) NaNs rank last."""
    s = np.asarray(strength, dtype=float)
    n = len(s)
    if n == 0:
        return np.zeros(0, dtype=int)
    key = np.where(np.isnan(s), -np.inf, s)
    order = np.lexsort((np.arange(n), -key))
    return np.sort(order[: math.ceil(n / 2)])


def _bins(n: int, max_nodes: int) -> list[tuple[int, int]]:
    if n <= max_nodes:
        return [(i, i + 1) for i in range(n)]
    edges = np.linspace(0, n, max_nodes + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _frozen_mask(layer: dict[str, Any]) -> np.ndarray:
    out = int(layer.get("out", 0))
    frozen = layer.get("frozen")
    mask = np.zeros(out, dtype=bool)
    if frozen == "all":
        mask[:] = True
    elif isinstance(frozen, list):
        for i in frozen:
            if 0 <= int(i) < out:
                mask[int(i)] = True
    return mask


def network_model(structure: dict[str, Any], fields: dict[str, dict[str, np.ndarray]], expanded: Iterable[str],
                  max_nodes: int = 64, max_lines: int = 3000) -> dict[str, Any]:
    """Positions, sizes and stats of every visible node, and the paths to draw between consecutive columns.

    ``fields`` = ``{layer: {field: array[out]}}`` (``RunState.filters_by_layer``). Returns plain lists:
    ``nodes`` (x, y, jitter, strength, frozen, layer, filters, label), ``columns`` and ``paths``
    (src node index, dst node index, width 0–1)."""
    layers = {l["name"]: l for l in structure.get("layers", [])}
    names = [l["name"] for l in structure.get("layers", [])]
    columns = visible_columns(names, expanded)
    nodes: list[dict[str, Any]] = []
    col_nodes: list[list[int]] = []
    for ci, col in enumerate(columns):
        members: list[dict[str, Any]] = []
        if col["kind"] == "layer":
            name = col["layers"][0]
            layer = layers[name]
            out = int(layer["out"])
            f = fields.get(name, {})
            frozen = _frozen_mask(layer)
            for a, b in _bins(out, max_nodes):
                idx = list(range(a, b))
                members.append({
                    "layer": name, "filters": idx,
                    "label": f"{name}[{a}]" if b - a == 1 else f"{name}[{a}–{b - 1}]",
                    "jitter": _mean(f.get("grad_sq_mean"), a, b), "strength": _mean(f.get("act_abs_mean"), a, b),
                    "grad": _mean(f.get("grad_abs_mean"), a, b), "update": _mean(f.get("update_ratio"), a, b),
                    "norm": _mean(f.get("weight_norm"), a, b), "frozen": bool(frozen[a:b].all()) if b > a else False})
            col["frozen"] = layer.get("frozen") == "all"
            col["partly_frozen"] = bool(frozen.any())
            col["caption"] = f"{out}" if len(members) == out else f"{out} (in {len(members)} bins)"
        else:
            lnames = col["layers"]
            for a, b in _bins(len(lnames), max_nodes):
                group = lnames[a:b]
                stats = {k: [] for k in ("grad_sq_mean", "act_abs_mean", "grad_abs_mean", "update_ratio")}
                for n in group:
                    for k in stats:
                        if k in fields.get(n, {}):
                            stats[k].append(float(np.mean(fields[n][k])))
                frozen = all(layers[n].get("frozen") == "all" for n in group)
                members.append({
                    "layer": group[0] if len(group) == 1 else None, "group": col["id"], "layers": group,
                    "filters": None, "label": group[0] if len(group) == 1 else f"{group[0]} … {group[-1]}",
                    "jitter": _avg(stats["grad_sq_mean"]), "strength": _avg(stats["act_abs_mean"]),
                    "grad": _avg(stats["grad_abs_mean"]), "update": _avg(stats["update_ratio"]),
                    "norm": None, "frozen": frozen,
                    "out": sum(int(layers[n]["out"]) for n in group)})
            col["frozen"] = all(layers[n].get("frozen") == "all" for n in lnames)
            col["partly_frozen"] = any(layers[n].get("frozen") for n in lnames)
            col["caption"] = f"{len(lnames)} layers"
        n = len(members)
        ids = []
        for i, m in enumerate(members):
            m["x"] = float(ci)
            m["y"] = 1.0 - (i + 0.5) / n if n else 0.5
            m["column"] = ci
            ids.append(len(nodes))
            nodes.append(m)
        col["x"] = float(ci)
        col_nodes.append(ids)

    # paths between consecutive connected columns; thickness from the source's activation strength
    col_of = {}
    for ci, col in enumerate(columns):
        for n in col["layers"]:
            col_of[n] = ci
    linked = set()
    for a, b in structure.get("layer_edges", []):
        if a in col_of and b in col_of and col_of[b] == col_of[a] + 1:
            linked.add(col_of[a])
    if not structure.get("layer_edges"):
        linked = set(range(len(columns) - 1))
    paths: list[tuple[int, int, float]] = []
    per_pair = max(1, max_lines // max(1, len(linked)))
    for ci in sorted(linked):
        src, dst = col_nodes[ci], col_nodes[ci + 1]
        strength = np.array([nodes[i]["strength"] if nodes[i]["strength"] is not None else np.nan for i in src])
        if np.all(np.isnan(strength)):
            continue
        chosen = [src[i] for i in top_half(strength)]
        top = np.nanmax(strength) or 1.0
        budget = max(1, per_pair // max(1, len(chosen)))
        targets = dst if len(dst) <= budget else [dst[int(j)] for j in np.linspace(0, len(dst) - 1, budget)]
        for s in chosen:
            w = float(nodes[s]["strength"] / top) if top > 0 else 0.0
            for t in targets:
                paths.append((s, t, w))
    return {"columns": columns, "nodes": nodes, "paths": paths}


def _mean(arr: np.ndarray | None, a: int, b: int) -> float | None:
    if arr is None or b > len(arr):
        return None
    return float(np.mean(arr[a:b]))


def _avg(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def jitter_pixels(jitter: list[float | None], max_px: float = 8.0, reference_quantile: float = 0.9) -> list[float]:
    """Shake amplitude in pixels, proportional to the mean squared gradient. The scale is set so that the node at the
    ``reference_quantile`` of the visible ones shakes ``max_px``; larger ones are clipped there (squared gradients
    are heavy-tailed: scaling by the maximum would leave all but one or two nodes still)."""
    arr = np.array([np.nan if v is None else v for v in jitter], dtype=float)
    finite = arr[np.isfinite(arr)]
    if not len(finite):
        return [0.0] * len(jitter)
    ref = float(np.quantile(finite, reference_quantile, method="lower"))
    if not ref > 0:
        ref = float(finite.max())
    if not ref > 0:
        return [0.0] * len(jitter)
    return [0.0 if not np.isfinite(v) else float(min(max_px, max_px * v / ref)) for v in arr]


# ---------------------------------------------------------------------------------------------------------------
# embedding


def embedding_features(arrays: dict[str, np.ndarray], layer: str, source: str, probe: int = 0) -> np.ndarray | None:
    """One row per filter: ``weight`` (coefficients), ``grad`` (filter gradients), ``act`` (activation map of probe
    image ``probe``) or ``actgrad`` (activation-gradient map)."""
    key = {"weight": "weight/", "grad": "grad/", "act": "act/", "actgrad": "actgrad/"}[source] + layer
    arr = arrays.get(key)
    if arr is None:
        return None
    arr = np.asarray(arr, dtype=np.float64)
    if source in ("act", "actgrad"):
        if arr.ndim < 2 or probe >= arr.shape[0]:
            return None
        arr = arr[probe]
    return arr.reshape(arr.shape[0], -1)


def missing_maps_reason(body: dict[str, Any], arrays: dict[str, np.ndarray], layer: str) -> str | None:
    """Why a snapshot carries no activation maps of ``layer`` (None when it has them): the probe pass failed or had
    no images (``probe_error``), or the layer's maps would have passed the snapshot's ``max_activation_bytes``
    (``probe_skipped``)."""
    if f"act/{layer}" in arrays:
        return None
    if body.get("probe_error"):
        return f"no activation maps in this snapshot: {body['probe_error']}"
    if layer in (body.get("probe_skipped") or []):
        return (f"no activation maps of {layer}: they would pass the snapshot's limit on map sizes "
                f"(ReVACNNCallback(max_activation_bytes=…), 64 MiB by default)")
    return f"no activation maps of {layer} in this snapshot (the probe pass did not reach it)"


def procrustes_align(new: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Rotate/reflect, scale and translate ``new`` (n×2) onto ``previous`` (same rows) by least squares, so that a
    fresh layout does not jump. Returns the transformed ``new``."""
    new = np.asarray(new, float)
    previous = np.asarray(previous, float)
    mu_n, mu_p = new.mean(0), previous.mean(0)
    a, b = new - mu_n, previous - mu_p
    norm_a = np.linalg.norm(a)
    if norm_a == 0:
        return np.tile(mu_p, (len(new), 1))
    u, s, vt = np.linalg.svd(a.T @ b)
    r = u @ vt
    scale = s.sum() / norm_a ** 2
    return scale * a @ r + mu_p


def align_to_previous(coords: np.ndarray, ids: list[int], previous: dict[int, tuple[float, float]] | None
                      ) -> np.ndarray:
    """Align on the filters present in both layouts (matched by stable filter id); new filters follow along."""
    if not previous:
        return coords
    common = [i for i, fid in enumerate(ids) if fid in previous]
    if len(common) < 3:
        return coords
    prev = np.array([previous[ids[i]] for i in common])
    mu_n, mu_p = coords[common].mean(0), prev.mean(0)
    a, b = coords[common] - mu_n, prev - mu_p
    norm_a = np.linalg.norm(a)
    if norm_a == 0:
        return coords
    u, s, vt = np.linalg.svd(a.T @ b)
    r = u @ vt
    scale = s.sum() / norm_a ** 2
    return scale * (coords - mu_n) @ r + mu_p


def compute_embedding(x: np.ndarray, method: str, seed: int = 0, init: np.ndarray | None = None) -> np.ndarray:
    """2-D coordinates for the rows of ``x`` (n×d). PCA, t-SNE (seeded with ``init`` when given) or UMAP. NaN and
    ±inf (a diverged run) count as 0: as the largest floats they overflowed the decomposition."""
    n = x.shape[0]
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if n < 3:
        return np.column_stack([np.arange(n, dtype=float), np.zeros(n)])
    x = x - x.mean(0)
    if method == "pca" or x.shape[1] < 2:
        # eigenvectors of the smaller Gram/covariance matrix: far cheaper than an SVD of x for wide inputs
        if x.shape[1] <= n:
            vals, vecs = np.linalg.eigh(x.T @ x)
            out = x @ vecs[:, ::-1][:, :2]
        else:
            vals, vecs = np.linalg.eigh(x @ x.T)
            out = vecs[:, ::-1][:, :2] * np.sqrt(np.clip(vals[::-1][:2], 0, None))
        if out.shape[1] < 2:
            out = np.column_stack([out, np.zeros(n)])
        return out
    if method == "tsne":
        from sklearn.manifold import TSNE
        perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
        if init is not None and init.shape == (n, 2):
            # a warm start from the previous layout: no early exaggeration, so the layout stays where it was
            return TSNE(n_components=2, perplexity=perplexity, init=np.asarray(init, float), random_state=seed,
                        max_iter=250, early_exaggeration=1.0).fit_transform(x)
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                    max_iter=500).fit_transform(x)
    if method == "umap":
        import warnings

        import umap
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        return umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed,
                         init="spectral" if n > 4 else "random").fit_transform(x)
    raise ValueError(f"unknown embedding method {method!r}")


def nearest_neighbours(coords: np.ndarray, point: tuple[float, float], exclude: int, k: int = 4
                       ) -> tuple[list[int], list[float]]:
    """The ``k`` filters nearest to ``point`` in the embedding, never ``exclude`` (the dragged filter itself:
    the original took the 5th when it was among the 4)."""
    d = np.hypot(coords[:, 0] - point[0], coords[:, 1] - point[1])
    order = [int(i) for i in np.argsort(d, kind="stable") if int(i) != exclude][:k]
    return order, [float(d[i]) for i in order]


def kmeans_labels(x: np.ndarray, k: int = 4, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import KMeans
    k = max(1, min(k, len(x)))
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)


# ---------------------------------------------------------------------------------------------------------------
# redundancy hints


def redundancy(weight: np.ndarray | None, fields: dict[str, np.ndarray] | None, frozen: np.ndarray | None = None,
               dup_cosine: float = 0.95, dead_fraction: float = 0.01, converged_fraction: float = 0.02
               ) -> dict[str, list]:
    """Near-duplicate pairs (cosine of flattened filters ≥ ``dup_cosine``), dead filters (act_abs_mean below
    ``dead_fraction`` × the layer median, or exactly 0) and converged ones (update_ratio below
    ``converged_fraction`` × the layer median; frozen filters excluded)."""
    hints: dict[str, list] = {"duplicates": [], "dead": [], "converged": []}
    if weight is not None and len(weight) > 1:
        w = np.asarray(weight, float).reshape(len(weight), -1)
        norms = np.linalg.norm(w, axis=1)
        unit = w / np.where(norms == 0, 1, norms)[:, None]
        cos = unit @ unit.T
        i, j = np.triu_indices(len(w), 1)
        mask = cos[i, j] >= dup_cosine
        pairs = sorted(zip(i[mask].tolist(), j[mask].tolist(), cos[i, j][mask].tolist()), key=lambda t: -t[2])
        hints["duplicates"] = [(a, b, round(c, 4)) for a, b, c in pairs]
    if fields:
        act = fields.get("act_abs_mean")
        if act is not None and len(act):
            med = float(np.median(act))
            hints["dead"] = [int(i) for i in np.flatnonzero((act <= dead_fraction * med) | (act == 0))]
        upd = fields.get("update_ratio")
        if upd is not None and len(upd):
            live = upd if frozen is None else upd[~frozen[: len(upd)]]
            med = float(np.median(live)) if len(live) else 0.0
            cand = np.flatnonzero(upd < converged_fraction * med) if med > 0 else np.zeros(0, int)
            if frozen is not None:
                cand = [i for i in cand if not frozen[i]]
            hints["converged"] = [int(i) for i in cand]
    return hints


# ---------------------------------------------------------------------------------------------------------------
# images


def to_uint8(arr: np.ndarray, symmetric: bool = False) -> np.ndarray:
    a = np.nan_to_num(np.asarray(arr, dtype=np.float64))
    if symmetric:
        m = np.abs(a).max() or 1.0
        return np.clip((a / m + 1) * 127.5, 0, 255).astype(np.uint8)
    lo, hi = a.min(), a.max()
    if hi <= lo:
        return np.full(a.shape, 128, dtype=np.uint8)
    return np.clip((a - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    """Encode an H×W (grey) or H×W×3 (RGB) uint8 array as PNG, without Pillow."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim == 2:
        color = 0
    elif img.ndim == 3 and img.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"png_bytes wants H×W or H×W×3, got {img.shape}")
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def data_uri(img: np.ndarray, scale: int = 1) -> str:
    if scale > 1:
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def filter_image(weight: np.ndarray, rgb: bool | None = None) -> np.ndarray:
    """One filter (in_ch×kh×kw) as an image: RGB when it has 3 input channels, else its input channels side by
    side (grey, symmetric around 0 = mid grey). A 3-D conv's filter (in_ch×kd×kh×kw) is a row of kd slices per input
    channel."""
    w = np.asarray(weight, float)
    if w.ndim == 1:
        return to_uint8(w[None, :], symmetric=True)
    if w.ndim == 2:
        return to_uint8(w, symmetric=True)
    if rgb is None:
        rgb = w.ndim == 3 and w.shape[0] == 3
    if rgb:
        return to_uint8(np.transpose(w, (1, 2, 0)))
    slices = w.reshape(-1, *w.shape[-2:])
    ncols = min(len(w), 8) if w.ndim == 3 else int(np.prod(w.shape[1:-2]))
    return mosaic([to_uint8(c, symmetric=True) for c in slices], ncols=ncols, pad=1)


def activation_image(maps: np.ndarray, symmetric: bool = False) -> np.ndarray:
    """One probe image's activation maps of a layer (``act/<L>[p]``, channels first) as one grey image: a grid of
    the C maps of a conv (``[C, H, W]``), a row of depth slices per channel for a 3-D conv (``[C, D, H, W]``), a
    row of C values for a Linear (``[C]``), a row per filter for a Linear on tokens or a Conv1d (``[C, T]``)."""
    if maps.ndim >= 3 and maps.shape[-1] > 1 and maps.shape[-2] > 1:
        ncols = 8 if maps.ndim == 3 else int(np.prod(maps.shape[1:-2]))
        return mosaic([to_uint8(m, symmetric=symmetric) for m in maps.reshape(-1, *maps.shape[-2:])], ncols=ncols,
                      pad=1)
    rows = maps[None, :] if maps.ndim == 1 else maps.reshape(maps.shape[0], -1)
    return to_uint8(rows, symmetric=symmetric)


def fit_rows(img: np.ndarray, width: int = 560, max_height: int = 480, max_repeat: int = 8) -> np.ndarray:
    """A grey image of one row per filter (a weight matrix, a Linear's or Conv1d's maps) laid out to be read at about
    ``width`` pixels: more columns than that are averaged in bins, fewer are widened (at most ``max_repeat`` times),
    and each row becomes a band of up to ``max_repeat`` pixels, thinner when there are many rows."""
    rows, cols = img.shape
    if cols > width:
        bin_size = -(-cols // width)
        padded = np.full((rows, -(-cols // bin_size) * bin_size), np.nan)
        padded[:, :cols] = img
        img = np.nanmean(padded.reshape(rows, -1, bin_size), axis=2).round().astype(np.uint8)
    img = np.repeat(img, max(1, min(max_repeat, max_height // rows)), axis=0)
    return np.repeat(img, max(1, min(max_repeat, width // img.shape[1])), axis=1)


def mosaic(tiles: list[np.ndarray], ncols: int, pad: int = 1, fill: int = 255) -> np.ndarray:
    """Tiles (same shape, uint8 grey or RGB) in a grid."""
    if not tiles:
        return np.full((1, 1), fill, dtype=np.uint8)
    h, w = tiles[0].shape[:2]
    extra = tiles[0].shape[2:]
    ncols = max(1, min(ncols, len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad) + extra, fill, dtype=np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, ncols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = t
    return out
