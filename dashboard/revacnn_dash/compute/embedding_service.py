"""Embeddings off the request path: one worker thread, results cached per snapshot, layouts kept stable.

Callbacks call ``request(...)``: it returns the cached result at once, or queues the job and returns None (the page
shows "computing…" and polls). PCA runs on the worker thread (milliseconds); t-SNE and UMAP run in two helper
processes, one each, so their CPU- and GIL-heavy work (numba compilation above all) never slows the web server's
threads. UMAP's first call in a process is slow, so ``warm_umap`` runs it once in its process at start and
``umap_status`` reports progress. A helper idle for ``idle_s`` (10 minutes) exits (each held ~0.35 GB), and starts
again on the next job of its method (UMAP's then compiles again); each runs its numerical libraries on one thread (their default thread pools, one per
process, oversubscribed the 2 cores 10-fold: t-SNE of 2,048 filters took 115 s).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from .cache import LRUCache
from .embeddings import align_to_previous, compute_embedding, embedding_features, kmeans_labels


class EmbeddingService:
    """A worker thread computing filter embeddings on request, its results in an LRU cache, its t-SNE and UMAP
    runs in helper processes."""

    def __init__(self, cache_size: int = 64, idle_s: float = 600.0) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.cache = LRUCache(cache_size)
        self.pending: set[tuple] = set()
        self.previous: dict[tuple, dict[int, tuple[float, float]]] = {}   # (run, layer, source, method) → layout
        self.lock = threading.Lock()
        self.umap_state = "not started"
        self.umap_started = 0.0
        self.umap_seconds: float | None = None
        self.pools: dict[str, ProcessPoolExecutor] = {}
        self.futures: dict[str, set] = {}      # each helper's unfinished jobs
        self.idle_s = idle_s
        self.last_used: dict[str, float] = {}   # each helper's last job's end (monotonic)
        self.thread = threading.Thread(target=self._run, name="revacnn-embedding", daemon=True)
        self.thread.start()

    def _submit(self, method: str, fn, *args):
        """A job for ``method``'s helper process; ``shutdown`` knows from these whether the helper is busy."""
        with self.lock:       # one step, so that retire_idle never stops a helper given a job
            if method not in self.pools:
                self.pools[method] = ProcessPoolExecutor(max_workers=1, initializer=_helper_process_start,
                                                         mp_context=multiprocessing.get_context("spawn"))
                self.last_used[method] = time.monotonic()
            future = self.pools[method].submit(fn, *args)
            self.futures.setdefault(method, set()).add(future)
        future.add_done_callback(lambda f: self._job_done(method, f))
        return future

    def _job_done(self, method: str, future) -> None:
        with self.lock:
            self.futures.get(method, set()).discard(future)
            self.last_used[method] = time.monotonic()

    def retire_idle(self) -> list[str]:
        """Stop the helpers that have had no job for ``idle_s`` seconds (the next job starts a fresh one); returns
        their methods. A stopped UMAP helper is warm no longer."""
        retired = []
        with self.lock:
            for method, pool in list(self.pools.items()):
                idle = time.monotonic() - self.last_used.get(method, time.monotonic())
                if not self.futures.get(method) and idle > self.idle_s:
                    del self.pools[method]
                    retired.append((method, pool))
        for method, pool in retired:
            pool.shutdown(wait=True)
            if method == "umap" and self.umap_state == "ready":
                self.umap_state = "not started"
        return [m for m, _ in retired]

    def shutdown(self) -> None:
        """Stop the helper processes now, even mid-job: a UMAP warm-up compiles numba code for ~20 s, and a pool
        shut down without this would make the dashboard's exit wait for it. An idle helper (the usual case: the
        warm-up is long over) is stopped in order instead, so that it releases what it holds: a killed UMAP helper
        left a semaphore for multiprocessing's resource tracker to report as leaked on every exit."""
        for method, pool in list(self.pools.items()):
            if not any(not f.done() for f in list(self.futures.get(method, ()))):
                pool.shutdown(wait=True)
                continue
            terminate = getattr(pool, "terminate_workers", None)        # Python ≥ 3.14
            if terminate is not None:
                terminate()
                continue
            for process in list((pool._processes or {}).values()):    # before 3.14: its (long-stable) process map
                process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)    # quick now; frees the pool's semaphores

    # -- UMAP warm-up ------------------------------------------------------------------------------------------------
    def warm_umap(self) -> None:
        def warm() -> None:
            self.umap_state, self.umap_started = "warming", time.monotonic()
            # the t-SNE helper too: started with openTSNE loaded, its first layout waits for neither (a first
            # t-SNE of 20 filters took 25 s on the loaded machine, all of it the helper's start)
            self._submit("tsne", _warm_tsne)
            try:
                self._submit("umap", _warm_umap).result()
                self.umap_state = "ready"
            except Exception as error:  # an optional speed-up: report, never crash
                self.umap_state = f"unavailable ({type(error).__name__}: {error})"
            self.umap_seconds = time.monotonic() - self.umap_started

        threading.Thread(target=warm, name="revacnn-umap-warm", daemon=True).start()

    def umap_status(self) -> str:
        if self.umap_state == "warming":
            return f"UMAP warming up in the background ({time.monotonic() - self.umap_started:.0f} s so far; " \
                   "the first run compiles numba code)"
        if self.umap_state == "ready":
            return f"UMAP ready (warm-up took {self.umap_seconds:.1f} s)"
        return f"UMAP {self.umap_state}"

    # -- jobs ----------------------------------------------------------------------------------------------------------
    def request(self, run: str, snap_key: Any, arrays: dict[str, np.ndarray], ids: list[int], layer: str,
                source: str, method: str, probe: int, colour: str) -> dict[str, Any] | None:
        key = (run, snap_key, layer, source, method, probe, colour)
        with self.lock:
            if key in self.cache:
                return self.cache.get(key)
            if key not in self.pending:
                self.pending.add(key)
                self.jobs.put((key, arrays, list(ids)))
        return None

    def is_pending(self, key_parts: tuple) -> bool:
        with self.lock:
            return key_parts in self.pending

    def _run(self) -> None:
        # PCA's and k-means' libraries, loaded before the first request: their import took 8 s of the first PCA
        # of a 2,048-filter layer on the loaded 2-core machine
        import scipy.sparse.linalg  # noqa: F401
        import sklearn.cluster  # noqa: F401
        import sklearn.decomposition  # noqa: F401
        while True:
            try:
                key, arrays, ids = self.jobs.get(timeout=min(30.0, self.idle_s))
            except queue.Empty:
                self.retire_idle()
                continue
            run, _, layer, source, method, probe, colour = key
            started = time.monotonic()
            try:
                result = self._compute(run, arrays, ids, layer, source, method, probe, colour)
            except Exception as error:
                result = {"error": f"{type(error).__name__}: {error}"}
            result["seconds"] = time.monotonic() - started
            with self.lock:
                self.pending.discard(key)
                self.cache.put(key, result)

    def _compute(self, run: str, arrays: dict[str, np.ndarray], ids: list[int], layer: str, source: str,
                 method: str, probe: int, colour: str) -> dict[str, Any]:
        x = embedding_features(arrays, layer, source, probe)
        if x is None:
            return {"error": f"the latest snapshot has no {source} data for {layer}"}
        n = x.shape[0]
        if not n:
            return {"error": f"{layer} has no filters in the latest snapshot"}
        if len(ids) != n:
            ids = list(range(n))
        layout_key = (run, layer, source, method)
        previous = self.previous.get(layout_key)
        init = None
        if method == "tsne" and previous and all(i in previous for i in ids):
            init = np.array([previous[i] for i in ids])
        if method == "pca":
            coords = compute_embedding(x, method, init=init)
        else:
            coords = self._submit(method, compute_embedding, x, method, 0, init).result(timeout=600)
        coords = align_to_previous(coords, ids, previous)
        self.previous[layout_key] = {fid: (float(a), float(b)) for fid, (a, b) in zip(ids, coords)}
        grad = arrays.get("grad/" + layer)
        magnitude = np.zeros(n)
        if grad is not None and len(grad) == n and n:
            g = np.abs(np.asarray(grad, np.float64)).reshape(n, -1)
            with np.errstate(all="ignore"):   # NaN stays NaN (the figure draws it as the lowest colour)
                magnitude = (g / 2).mean(1) * 2 if g.shape[1] else np.zeros(n)
        result = {"coords": coords.tolist(), "ids": ids, "grad": magnitude.tolist(), "n": n,
                  "aligned": previous is not None, "not_finite": int((~np.isfinite(x)).any(axis=1).sum())}
        if colour == "cluster":
            # NaN and ±inf as 0, as in the layout (k-means refuses them)
            result["cluster"] = kmeans_labels(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0),
                                              k=min(4, n)).tolist()
        return result


def _helper_process_start() -> None:
    """Runs first in each t-SNE / UMAP helper process.

    Ctrl-C in a terminal signals every process of its group; the dashboard stops its helpers itself
    (``EmbeddingService.shutdown``), so they ignore SIGINT rather than print the traceback of an interrupted job.
    And a helper exits when the dashboard does, however that ends (SIGTERM, SIGKILL): otherwise it outlives it,
    holding ~0.5 GB, since it only notices a dead parent when it next looks for work.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["NUMBA_NUM_THREADS"] = "1"       # read when numba is first imported (by UMAP, not yet)
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)                        # BLAS and OpenMP, already loaded with numpy and scipy
    parent = multiprocessing.parent_process()
    if parent is not None:
        def exit_with_parent() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(0)

        threading.Thread(target=exit_with_parent, name="revacnn-exit-with-parent", daemon=True).start()


def _warm_tsne() -> bool:
    """Run once in the t-SNE helper process: load openTSNE and the scikit-learn parts the layout uses."""
    import openTSNE  # noqa: F401
    import sklearn.decomposition  # noqa: F401
    import sklearn.neighbors  # noqa: F401
    return True


def _warm_umap() -> bool:
    """Run once in the UMAP helper process: import umap and compile its numba code on a tiny problem."""
    import warnings

    import umap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        umap.UMAP(n_neighbors=5, random_state=0).fit_transform(np.random.default_rng(0).normal(size=(40, 8)))
    return True
