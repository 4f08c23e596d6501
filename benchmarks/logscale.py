"""Log-scale benchmark of the analysis views: a synthetic ResNet-50-shaped run written through the real recording path.

    python benchmarks/logscale.py                  # ~2-4 minutes on 2 cores
    python benchmarks/logscale.py --append         # also append the results to benchmarks/RESULTS.md

The run: torchvision ResNet-50 module names and widths (53 conv layers, 26,560 filters, plus fc: 27,560 filters),
``--steps`` (10,000) step messages shaped like the callback's (docs/protocol.md "step"), per-filter data every
``--filters-every`` (10, the callback's default) steps, a validation message (1,000 images) every 100 steps, and one
steering event (widen layer3.0.conv1 by 2 at the middle: a new structure and an ack), all through
``RunRecorder.submit`` with the default retention policy and disk budget, waiting for the writer every 100 steps. Per-filter values follow smooth random walks so the charts
have structure. Then, with a fresh reader (cold) and again (warm):

  layer overview     ``layer_overview`` of every node of the hierarchy over the whole run (budget 200 ms)
  filter chart       ``filter_chart`` of the widest layer (2,048 filters) — cosine, derived from two fields, ordered
                     by 1-D MDS — over the whole run at 600 columns, and raw over the whole run (budget 1 s)
  disk               the run directory (budget 1 GB)
plus the validation anomaly rule and the cube over all 54 layers, and a CNNComparator comparison of two
ResNet-50-sized weight sets (in memory: snapshots are not part of this synthetic log).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dashboard"))

from revacnn.wire.protocol import FILTER_FIELDS, Message  # noqa: E402
from revacnn.recording import RunRecorder  # noqa: E402
from revacnn.recording.reader import open_run  # noqa: E402
from revacnn_dash.analysis.compare import compare_snapshots  # noqa: E402
from revacnn_dash.analysis.explorer import build_tree, filter_chart, layer_overview  # noqa: E402
from revacnn_dash.analysis.tracking import anomalies, cube  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # ResNet-50 layer shapes, shared with the tests
from model_shapes import resnet50_layers  # noqa: E402


def structure(layers, ids, revision, step):
    out = []
    for layer in layers:
        shape = [layer["out"], layer["in"]] + ([layer["k"], layer["k"]] if layer["k"] else [])
        out.append({"name": layer["name"], "type": "Conv2d" if layer["k"] else "Linear",
                    "kind": "conv" if layer["k"] else "linear", "in": layer["in"], "out": layer["out"],
                    "weight_shape": shape, "filter_ids": ids[layer["name"]]})
    return {"step": step, "revision": revision, "model": "ResNet50", "layers": out, "layer_edges": []}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_run(run_dir: Path, steps: int, filters_every: int, val_every: int = 100, val_images: int = 1000,
              seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    layers = resnet50_layers()
    names = [layer["name"] for layer in layers]
    ids, next_id = {}, 0
    for layer in layers:
        ids[layer["name"]] = list(range(next_id, next_id + layer["out"]))
        next_id += layer["out"]
    total = sum(layer["out"] for layer in layers)
    rec = RunRecorder(run_dir, queue_size=steps + 1000)
    seq = 1
    rec.submit(Message("structure", structure(layers, ids, 0, 0), run="logscale", seq=seq, time=time.time()))
    # per-filter state: log-normal random walks (weights' norms slowly drift, update ratios decay with noise)
    level = rng.normal(size=(5, total)).astype(np.float32) * 0.3
    labels = rng.integers(0, 10, val_images).astype(np.int16)
    skill = rng.random(val_images)
    right = rng.random(val_images) < 0.1
    widened_at = steps // 2
    wide = "layer3.0.conv1"
    started = time.perf_counter()
    submitted = 0
    for step in range(1, steps + 1):
        seq += 1
        if step == widened_at:
            ids[wide] = ids[wide] + [next_id, next_id + 1]
            next_id += 2
            end = sum(l["out"] for l in layers[:names.index(wide) + 1])     # the new columns go after the layer's
            layers[names.index(wide)]["out"] += 2
            total += 2
            level = np.concatenate([level[:, :end], level[:, end - 2:end], level[:, end:]], axis=1)  # copies
            rec.submit(Message("structure", structure(layers, ids, 1, step), run="logscale", seq=seq,
                               time=time.time()))
            seq += 1
            rec.submit(Message("ack", {"req": "w", "id": "widen-1", "op": "widen", "status": "done", "step": step,
                                       "error": None, "result": {"changes": {"layer": wide}, "revision": 1}},
                               run="logscale", seq=seq, time=time.time()))
            seq += 1
        per_filter = step % filters_every == 0
        body = {"step": step, "epoch": step // 500, "batch": step % 500, "loss": 2.3 * np.exp(-step / 4000) + 0.1,
                "metrics": {"train_acc": float(1 - np.exp(-step / 3000))},
                "groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}], "batch_size": 256,
                "samples_per_s": 900.0, "drops": {"telemetry": 0, "recording": 0}, "per_filter": per_filter}
        arrays = {}
        if per_filter:
            level += rng.normal(scale=0.05, size=level.shape).astype(np.float32)
            values = np.exp(level)
            values[3] *= np.float32(np.exp(-step / 5000) * 0.01)          # update_ratio
            values[2] += 1.0                                                # weight_norm ≥ 1
            body["filter_fields"] = list(FILTER_FIELDS)
            body["layer_names"] = names
            arrays = {"filters": values.astype(np.float32),
                      "layers": np.exp(rng.normal(size=len(names)) * 0.2 - 4 - step / 8000).astype(np.float32)}
        rec.submit(Message("step", body, arrays, run="logscale", seq=seq, time=time.time()))
        submitted += 1
        if step % 100 == 0:        # as training would, leave the writer time to keep up (its inbox is bounded)
            rec.flush()
        if step % val_every == 0:
            seq += 1
            # sticky correctness: most images keep their state; some re-draw it from a rising skill curve; now
            # and then one class is disturbed (a third of its images flip) — the events the anomaly rule finds
            p_right = 1 / (1 + np.exp(-(step / steps * 6 - 3 + 3 * (skill - 0.5))))
            redraw = rng.random(val_images) < 0.05
            right = np.where(redraw, rng.random(val_images) < p_right, right)
            if rng.random() < 0.15:
                hit = (labels == rng.integers(0, 10)) & (rng.random(val_images) < 0.35)
                right = np.where(hit, ~right, right)
            pred = np.where(right, labels, (labels + 1 + rng.integers(0, 9, val_images)) % 10).astype(np.int16)
            rec.submit(Message("val", {"step": step, "epoch": step // 500, "metrics": {"val_acc": float(right.mean())},
                                       "count": val_images}, {"pred": pred, "label": labels}, run="logscale",
                               seq=seq, time=time.time()))
    rec.close()
    assert rec.error is None and rec.drops == 0, (rec.error, rec.drops)
    return {"seconds": time.perf_counter() - started, "filters": total}


def timed(fn, repeat=3):
    t = time.perf_counter()
    value = fn()
    cold = time.perf_counter() - t
    warm = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t)
    return value, cold * 1e3, min(warm) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--filters-every", type=int, default=10)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="revacnn-logscale-"))
    run_dir = scratch / "resnet50"
    lines = []

    def out(text=""):
        print(text, flush=True)
        lines.append(text)

    written = write_run(run_dir, args.steps, args.filters_every)
    disk = dir_bytes(run_dir)
    records = args.steps // args.filters_every
    out(f"Run: ResNet-50 shape, 54 layers (53 conv + fc), {written['filters']:,} filters after one widen, "
        f"{args.steps:,} steps, per-filter data every {args.filters_every} steps ({records:,} records, float32, "
        f"default retention), validation of 1,000 images every 100 steps. Written in {written['seconds']:.0f} s.")
    out()
    out("| measure | budget | cold | warm | notes |")
    out("| --- | --- | --- | --- | --- |")
    out(f"| disk (whole run directory) | ≤ 1 GB | {disk / 1e9:.2f} GB | | {disk / args.steps / 1e3:.0f} kB/step |")

    def fresh():
        return open_run(run_dir)

    run = fresh()
    tree = build_tree(run.layer_names())
    # cold = a new reader each time the measurement starts; warm = the same reader again
    cold_run = fresh()
    t = time.perf_counter()
    overview = layer_overview(cold_run, build_tree(cold_run.layer_names()), resolution=400)
    cold = (time.perf_counter() - t) * 1e3
    _, _, warm = timed(lambda: layer_overview(run, tree, resolution=400))
    out(f"| layer overview, whole run, all {len(tree['nodes'])} nodes (‖g‖/‖w‖ stream) | ≤ 200 ms | {cold:.0f} ms | "
        f"{warm:.0f} ms | {overview['steps']:,} rows → 400 buckets, min/q1/median/q3/max per node |")
    zoom_lo = args.steps // 2 - 1000
    _, c2, w2 = timed(lambda: layer_overview(fresh(), tree, zoom_lo, zoom_lo + 2000, resolution=400), repeat=1)
    out(f"| layer overview, zoomed to 2,000 steps | ≤ 200 ms | {c2:.0f} ms | {w2:.0f} ms | raw per-filter steps |")
    cold_run = fresh()
    t = time.perf_counter()
    layer_overview(cold_run, tree, resolution=200, field="update_ratio")
    cold = (time.perf_counter() - t) * 1e3
    _, _, warm = timed(lambda: layer_overview(run, tree, resolution=200, field="update_ratio"), repeat=1)
    out(f"| layer overview of a per-filter field (update_ratio, 54 layers' pyramids) | (none) | {cold:.0f} ms | "
        f"{warm:.0f} ms | mean over filters per layer, 200 rows |")
    widest = "layer4.0.conv3"
    for label, kwargs in (("600 columns (pyramid)", {"resolution": 600}),
                          ("raw, every record", {"resolution": None}),
                          ("zoomed to 2,000 steps, raw", {"resolution": 600, "start": zoom_lo,
                                                          "stop": zoom_lo + 2000})):
        cold_run = fresh()
        t = time.perf_counter()
        chart = filter_chart(cold_run, widest, "cosine", order="pca", **kwargs)
        cold = (time.perf_counter() - t) * 1e3
        _, _, warm = timed(lambda: filter_chart(run, widest, "cosine", order="pca", **kwargs), repeat=2)
        import plotly.graph_objects as go

        t = time.perf_counter()
        go.Figure(go.Heatmap(z=chart["values"], x=chart["step"])).to_json()
        fig_ms = (time.perf_counter() - t) * 1e3
        out(f"| filter × iteration chart, {widest} (2,048 filters), cosine, MDS order, {label} | ≤ 1 s | "
            f"{cold:.0f} ms | {warm:.0f} ms | {chart['values'].shape[1]} columns; + {fig_ms:.0f} ms to build and "
            f"serialise the Plotly heatmap |")
    val = run.val_predictions()
    info, cold, warm = timed(lambda: anomalies(val, window=5, threshold=20), repeat=1)
    out(f"| anomaly rule, {val['pred'].shape[0]} samples × {val['pred'].shape[1]:,} images | | {cold:.0f} ms | "
        f"{warm:.0f} ms | {len(info['flagged_pairs'])} flagged (class, step) pairs (d=5, threshold=20) |")
    cube_data, cold, warm = timed(lambda: cube(run, run.layer_names(), info, k=50, max_steps=12), repeat=1)
    out(f"| cube, 54 layers × {len(cube_data['steps'])} validation intervals, top-50 | | "
        f"{cold:.0f} ms | {warm:.0f} ms | per interval: Σ(1−cos) of every filter over it |")
    # a comparison of two ResNet-50-sized weight sets (in memory)
    rng = np.random.default_rng(1)
    layers = resnet50_layers()
    ids = {}
    nid = 0
    for layer in layers:
        ids[layer["name"]] = list(range(nid, nid + layer["out"]))
        nid += layer["out"]
    body = structure(layers, ids, 0, 0)
    snaps = []
    for k in range(2):
        arrays = {}
        for layer in layers:
            shape = [layer["out"], layer["in"]] + ([layer["k"], layer["k"]] if layer["k"] else [])
            arrays[f"weight/{layer['name']}"] = rng.normal(size=shape).astype(np.float32)
        snaps.append({"body": {"revision": 0}, "arrays": arrays})
    params = sum(a.size for a in snaps[0]["arrays"].values())
    t = time.perf_counter()
    comp = compare_snapshots(snaps[0], snaps[1], [(0, body)])
    comp_ms = (time.perf_counter() - t) * 1e3
    out(f"| snapshot comparison, ResNet-50 weights ({params / 1e6:.1f} M parameters, in memory) | | {comp_ms:.0f} ms "
        f"| | {len(comp.layers)} layers, every measure of every filter |")
    out()
    out(f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores ({_cpu()}), Python {platform.python_version()}; "
        f"load average at the end {' / '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs shared the machine)")
    if args.append:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        text = (f"\n### {stamp}\n\nCommand: `python benchmarks/logscale.py --append`  \n" + "\n".join(lines) + "\n")
        results = ROOT / "benchmarks" / "RESULTS.md"
        current = results.read_text() if results.exists() else "# Benchmark results\n"
        if "\n## Log scale\n" not in current:
            current = current.rstrip("\n") + "\n\n## Log scale\n"
        results.write_text(current.rstrip("\n") + "\n" + text)
    if not args.keep:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
