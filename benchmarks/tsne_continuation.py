"""t-SNE continued from the previous layout: scikit-learn (today's ``compute_embedding`` + Procrustes alignment)
against openTSNE, for a 256- and a 2,048-filter layer over a few snapshots whose weights drift a little.

Reports per library and layer size: seconds for the first layout and per update, how far the points move between
consecutive aligned layouts (mean displacement / RMS radius of the layout) and the 10-nearest-neighbour recall of
the last layout against the filters' own space.
Run: ``PYTHONPATH=src:dashboard python benchmarks/tsne_continuation.py`` (needs ``pip install openTSNE``).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from revacnn_dash.compute.embeddings import align_to_previous, compute_embedding


def snapshots(n: int, d: int, count: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Filters in 8 loose clusters, then ``count - 1`` small drifts (as between two snapshots of a training run)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, d))
    x = centres[rng.integers(0, 8, n)] + 0.7 * rng.normal(size=(n, d))
    out = [x]
    for _ in range(count - 1):
        out.append(out[-1] + 0.05 * rng.normal(size=(n, d)))
    return out


def knn_recall(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    from sklearn.neighbors import NearestNeighbors
    a = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    b = NearestNeighbors(n_neighbors=k + 1).fit(y).kneighbors(y, return_distance=False)[:, 1:]
    return float(np.mean([len(set(p) & set(q)) / k for p, q in zip(a, b)]))


def sklearn_layout(x: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
    return compute_embedding(x, "tsne", seed=0, init=previous)


def opentsne_layout(x: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
    import openTSNE
    n = len(x)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    x = x - x.mean(0)
    if previous is None:
        return np.asarray(openTSNE.TSNE(perplexity=perplexity, random_state=0, n_jobs=1).fit(x))
    return np.asarray(openTSNE.TSNE(perplexity=perplexity, random_state=0, n_jobs=1, initialization=previous,
                                    early_exaggeration_iter=0, n_iter=250).fit(x))


def measure(layout, xs: list[np.ndarray]) -> dict[str, float]:
    ids = list(range(len(xs[0])))
    started = time.perf_counter()
    coords = layout(xs[0], None)
    first = time.perf_counter() - started
    updates, moves = [], []
    for x in xs[1:]:
        started = time.perf_counter()
        new = layout(x, coords)
        updates.append(time.perf_counter() - started)
        new = align_to_previous(new, ids, {i: tuple(p) for i, p in enumerate(coords)})
        radius = float(np.sqrt(((coords - coords.mean(0)) ** 2).sum(1).mean()))
        moves.append(float(np.linalg.norm(new - coords, axis=1).mean() / radius))
        coords = new
    return {"first_s": round(first, 2), "update_s": round(float(np.median(updates)), 2),
            "move": round(float(np.mean(moves)), 4), "knn10": round(knn_recall(xs[-1], coords), 3)}


def main() -> None:
    results = {}
    for n, d in ((256, 1152), (2048, 512)):
        xs = snapshots(n, d)
        for name, layout in (("sklearn", sklearn_layout), ("openTSNE", opentsne_layout)):
            results[f"{name} n={n}"] = measure(layout, xs)
            print(f"{name} n={n}: {results[f'{name} n={n}']}", flush=True)
    json.dump(results, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
