"""Filter embeddings: the features of one layer's filters, their 2-D layout (PCA, t-SNE or UMAP), Procrustes
alignment onto the previous layout so that a fresh one does not jump, neighbours and clusters in it."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg import orthogonal_procrustes

LAYOUT_POINTS = 1024  # t-SNE and UMAP lay out at most this many filters; the others are placed by neighbours
REDUCED_DIMS = 50     # t-SNE and UMAP see the filters' first principal components, no more
LANCZOS_FROM = 256   # rows and features past which PCA takes the two leading singular triplets only (``_pca``)
SOURCE_PREFIX = {"weight": "weight/", "grad": "grad/", "act": "act/", "actgrad": "actgrad/"}


def embedding_features(arrays: dict[str, np.ndarray], layer: str, source: str, probe: int = 0) -> np.ndarray | None:
    """One row per filter: ``weight`` (coefficients), ``grad`` (filter gradients), ``act`` (activation map of probe
    image ``probe``) or ``actgrad`` (activation-gradient map)."""
    arr = arrays.get(SOURCE_PREFIX[source] + layer)
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


def _similarity_transform(new: np.ndarray, previous: np.ndarray):
    """The least-squares rotation/reflection ``r``, scale and the two centroids mapping ``new`` onto ``previous``
    (rows matched), or None when ``new`` is a single point."""
    mu_n, mu_p = new.mean(0), previous.mean(0)
    a, b = new - mu_n, previous - mu_p
    norm_a = np.linalg.norm(a)
    if norm_a == 0:
        return None
    r, singular_sum = orthogonal_procrustes(a, b)
    return r, singular_sum / norm_a ** 2, mu_n, mu_p


def procrustes_align(new: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Rotate/reflect, scale and translate ``new`` (n×2) onto ``previous`` (same rows) by least squares, so that a
    fresh layout does not jump. Returns the transformed ``new``."""
    new = np.asarray(new, float)
    previous = np.asarray(previous, float)
    fit = _similarity_transform(new, previous)
    if fit is None:
        return np.tile(previous.mean(0), (len(new), 1))
    r, scale, mu_n, mu_p = fit
    return scale * (new - mu_n) @ r + mu_p


def align_to_previous(coords: np.ndarray, ids: list[int], previous: dict[int, tuple[float, float]] | None
                      ) -> np.ndarray:
    """Align on the filters present in both layouts (matched by stable filter id); new filters follow along."""
    if not previous:
        return coords
    common = [i for i, fid in enumerate(ids) if fid in previous]
    if len(common) < 3:
        return coords
    fit = _similarity_transform(coords[common], np.array([previous[ids[i]] for i in common]))
    if fit is None:
        return coords
    r, scale, mu_n, mu_p = fit
    return scale * (coords - mu_n) @ r + mu_p


def compute_embedding(x: np.ndarray, method: str, seed: int = 0, init: np.ndarray | None = None) -> np.ndarray:
    """2-D coordinates for the rows of ``x`` (n×d). PCA, t-SNE (seeded with ``init`` when given) or UMAP. NaN and
    ±inf (a diverged run) count as 0: as the largest floats they overflowed the decomposition.

    t-SNE and UMAP work on the rows' first ``REDUCED_DIMS`` principal components, and lay out at most
    ``LAYOUT_POINTS`` filters (landmarks, the same ones for the same ``n`` and ``seed``); the others are placed
    among their nearest landmarks (``place_by_neighbours``). Measured and chosen in docs/dashboard-compute.md."""
    n = x.shape[0]
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(np.abs(x).max()) if x.size else 0.0
    if top > 1e150:   # huge values overflow the sums of the centring and the decomposition: scaled down
        x = x / top
    if n < 3:
        return np.column_stack([np.arange(n, dtype=float), np.zeros(n)])
    x = x - x.mean(0)
    if not np.any(x):   # every filter alike (all zero, or all NaN drawn as 0): one point, no direction to show
        return np.zeros((n, 2))
    if method == "pca" or x.shape[1] < 2:
        return _pca(x)
    if method not in ("tsne", "umap"):
        raise ValueError(f"unknown embedding method {method!r}")
    layout = _tsne if method == "tsne" else _umap
    features = reduced_features(x, seed)
    if n <= LAYOUT_POINTS:
        return layout(features, seed, init)
    landmarks = np.sort(np.random.default_rng(seed).choice(n, LAYOUT_POINTS, replace=False))
    start = np.asarray(init, float)[landmarks] if init is not None and np.shape(init) == (n, 2) else None
    return place_by_neighbours(features, landmarks, layout(features[landmarks], seed, start))


def reduced_features(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The centred rows of ``x`` on their first ``REDUCED_DIMS`` principal components (``x`` itself when it has
    no more features): t-SNE's and UMAP's neighbour search and affinities cost in proportion to the features."""
    n, d = x.shape
    if d <= REDUCED_DIMS or n <= REDUCED_DIMS:
        return x
    from sklearn.decomposition import PCA
    return PCA(n_components=REDUCED_DIMS, random_state=seed).fit_transform(x)


def place_by_neighbours(features: np.ndarray, landmarks: np.ndarray, placed: np.ndarray, k: int = 5
                        ) -> np.ndarray:
    """Coordinates for every row of ``features``: the landmarks' own (``placed``, one row per index of
    ``landmarks``), the others the inverse-distance weighted mean of their ``k`` nearest landmarks' (in feature
    space). A row equal to a landmark lands on it."""
    from sklearn.neighbors import NearestNeighbors
    k = min(k, len(landmarks))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(features[landmarks]).kneighbors(features)
    weight = 1.0 / np.maximum(dist, 1e-12)
    weight /= weight.sum(1, keepdims=True)
    out = (placed[idx] * weight[..., None]).sum(1)
    out[landmarks] = placed
    return out


def _pca(x: np.ndarray) -> np.ndarray:
    """Scores of the centred rows of ``x`` on their first two principal components (a zero second column for
    one-feature rows). Small inputs: scikit-learn's PCA (the covariance's eigenvectors), or for more features than
    filters the eigenvectors of the smaller Gram matrix (scikit-learn has no cheap solver for that shape).
    Past ``LANCZOS_FROM`` rows and features: the two leading singular triplets by Lanczos iteration (ARPACK, a fixed
    start vector), exact to rounding like the full decomposition but ~10× faster for a 2,048-filter layer (a full
    2,048 × 2,048 eigendecomposition took 5 s on this 2-core machine). Each axis's sign: its largest score
    positive, so that one layer's PCA does not flip between calls."""
    n, d = x.shape
    if min(n, d) > LANCZOS_FROM:
        from scipy.sparse.linalg import svds
        u, s, _ = svds(x, k=2, v0=np.ones(min(n, d)) / np.sqrt(min(n, d)), solver="arpack")
        order = np.argsort(s)[::-1]
        out = u[:, order] * s[order]
    elif d > n:
        vals, vecs = np.linalg.eigh(x @ x.T)
        out = vecs[:, ::-1][:, :2] * np.sqrt(np.clip(vals[::-1][:2], 0, None))
    else:
        from sklearn.decomposition import PCA
        out = PCA(n_components=min(2, d), svd_solver="covariance_eigh").fit_transform(x)
        if out.shape[1] < 2:
            out = np.column_stack([out, np.zeros(n)])
    signs = np.where(out[np.abs(out).argmax(0), [0, 1]] < 0, -1.0, 1.0)
    return out * signs


def _tsne(x: np.ndarray, seed: int, init: np.ndarray | None) -> np.ndarray:
    """openTSNE, one thread (the helper process shares a loaded machine with the web server), exact neighbours
    (below ``LAYOUT_POINTS`` rows a brute-force search is quick), Barnes-Hut gradients (openTSNE's advice below 10k
    points): 125 iterations of early exaggeration then 250, or 150 from ``init`` (the previous layout) without
    exaggeration, so that the layout stays where it was."""
    import logging

    from openTSNE import TSNE
    # its warning on an initialisation of large spread is meant for fresh layouts: a continued one starts from the
    # converged previous layout on purpose
    logging.getLogger("openTSNE").setLevel(logging.ERROR)
    n = x.shape[0]
    common = {"perplexity": float(min(30.0, (n - 1) / 3)), "n_jobs": 1, "neighbors": "exact",
              "negative_gradient_method": "bh", "random_state": seed, "verbose": False}
    if init is not None and init.shape == (n, 2):
        return np.asarray(TSNE(early_exaggeration_iter=0, n_iter=150, **common).fit(
            x, initialization=np.asarray(init, float)))
    return np.asarray(TSNE(early_exaggeration_iter=125, n_iter=250, initialization="pca", **common).fit(x))


def _umap(x: np.ndarray, seed: int, init: np.ndarray | None) -> np.ndarray:
    """UMAP, 200 epochs (its default 500 for small data more than doubled the time for no visible change),
    spectral initialisation (random for the tiniest inputs); ``init`` unused: UMAP's layouts are aligned after."""
    import warnings

    import umap
    warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
    n = x.shape[0]
    return umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed, n_epochs=200,
                     init="spectral" if n > 4 else "random").fit_transform(x)


def nearest_neighbours(coords: np.ndarray, point: tuple[float, float], exclude: int, k: int = 4
                       ) -> tuple[list[int], list[float]]:
    """The ``k`` filters nearest to ``point`` in the embedding, never ``exclude`` (the dragged filter itself:
    the original took the 5th when it was among the 4)."""
    d = np.hypot(coords[:, 0] - point[0], coords[:, 1] - point[1])
    order = [int(i) for i in np.argsort(d, kind="stable") if int(i) != exclude][:k]
    return order, [float(d[i]) for i in order]


def kmeans_labels(x: np.ndarray, k: int = 4, seed: int = 0) -> np.ndarray:
    """Cluster labels of the rows of ``x`` (k-means, at most ``k`` clusters)."""
    from sklearn.cluster import KMeans
    # no more clusters than distinct rows (a diverged layer's NaN rows, drawn as zeros, are one): k-means would warn
    k = max(1, min(k, len(np.unique(x, axis=0)) if len(x) else 1))
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
