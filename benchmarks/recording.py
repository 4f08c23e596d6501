"""Recording benchmark: bytes per step, write throughput, whole-run per-filter queries, and the disk budget.

    python benchmarks/recording.py                 # default run, ~3-5 minutes on 2 cores
    python benchmarks/recording.py --only-disk     # just the disk budget at ResNet-50 size (~1-2 minutes)
    python benchmarks/recording.py --append        # also append the results to benchmarks/RESULTS.md

Models (per-filter data on every step, i.e. filters_every=1, the worst case):
  demo       ReVACNN demo: conv 16, 20, 20 + linear 10 = 66 filters, 4 layers
  resnet50   ResNet-50 sized: 53 conv layers (26,560 filters) + fc 1000 = 27,560 filters, 54 layers
Query: one layer's per-filter series (one field) over a 10k-record run, for the demo's conv2 (20 filters) and for
ResNet-50's widest layer (2048 filters), with the default retention policy and with everything kept at full
resolution; cold (fresh reader) and warm (second call on the same reader).
Disk budget: ResNet-50 (torchvision shapes, 25.6 M parameters) × 10,000 steps at the callback's defaults — scalars
every step, per-filter data every 50 steps, a snapshot (every weight and gradient, per-layer statistics and probe
maps of 8 images of 32×32) every 500 — fed to a ``RunRecorder`` with its default disk budget, waiting for the writer
after every per-filter step as a real run's 50 training steps would (so nothing is dropped for backlog): bytes on
disk at the end and at most during the run, the snapshots kept, and the recorder's extra RSS (the process's peak RSS,
sampled every 20 ms, minus its RSS before the run; the messages' own buffers are allocated before).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from revacnn.wire.protocol import FILTER_FIELDS, Message
from revacnn.recording import RunRecorder
from revacnn.recording.reader import open_run
from revacnn.recording.snapshots import snapshot_files
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # ResNet-50 layer shapes, shared with the tests
from model_shapes import resnet50_layers  # noqa: E402


MODELS = {"demo": [16, 20, 20, 10], "resnet50": [layer["out"] for layer in resnet50_layers()]}


def structure_for(widths):
    layers, next_id = [], 0
    for i, width in enumerate(widths):
        layers.append({"name": f"layer{i}", "out": width, "filter_ids": list(range(next_id, next_id + width))})
        next_id += width
    return Message("structure", {"step": 0, "revision": 0, "layers": layers}, run="bench", seq=1, time=time.time())


def step_messages(widths, steps, seed=0):
    """Pre-built step messages (a pool of 16 random buffers reused) so generation is not timed."""
    rng = np.random.default_rng(seed)
    total = sum(widths)
    names = [f"layer{i}" for i in range(len(widths))]
    pool = [rng.random((5, total), dtype=np.float32) for _ in range(16)]
    layer_pool = [rng.random(len(widths), dtype=np.float32) for _ in range(16)]
    for step in range(1, steps + 1):
        body = {"step": step, "epoch": 0, "batch": step, "loss": 1.0 / step, "metrics": {"train_acc": 0.5},
                "groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}], "batch_size": 128,
                "samples_per_s": 1000.0, "drops": {"telemetry": 0, "recording": 0}, "per_filter": True,
                "filter_fields": list(FILTER_FIELDS), "layer_names": names}
        yield Message("step", body, {"filters": pool[step % 16], "layers": layer_pool[step % 16]}, run="bench",
                      seq=step + 1, time=time.time())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_run(run_dir, widths, steps, float16=False, flush_every=None, **policy):
    messages = list(step_messages(widths, steps))
    # every message is queued at once to time the writer alone: its inbox is not bounded in bytes here
    rec = RunRecorder(run_dir, float16_filters=float16, queue_size=steps + 10, max_inbox_bytes=1 << 40, **policy)
    start = time.perf_counter()
    rec.submit(structure_for(widths))
    submit_time = 0.0
    for i, message in enumerate(messages):
        t = time.perf_counter()
        ok = rec.submit(message)
        submit_time += time.perf_counter() - t
        assert ok
        if flush_every and (i + 1) % flush_every == 0:
            rec.flush()
    rec.close()
    elapsed = time.perf_counter() - start
    assert rec.error is None and rec.drops == 0, rec.error
    return {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed, "bytes": dir_bytes(Path(run_dir)),
            "submit_us": submit_time / steps * 1e6}


def snapshot_arrays(seed=0):
    """One snapshot's buffers at ResNet-50 size (docs/protocol.md, ``snapshot``), reused for every snapshot."""
    rng = np.random.default_rng(seed)
    arrays = {}
    layers = resnet50_layers()
    for layer in layers:
        name = layer["name"]
        shape = (layer["out"], layer["in"]) + ((layer["k"], layer["k"]) if layer["k"] else ())
        arrays[f"weight/{name}"] = rng.standard_normal(shape, dtype=np.float32) * 0.05
        arrays[f"grad/{name}"] = rng.standard_normal(shape, dtype=np.float32) * 1e-4
        stage = int(name[5]) if name.startswith("layer") else (0 if name == "conv1" else 5)
        side = 16 if stage == 0 else 1 if stage == 5 else 8 >> (stage - 1)     # its map side for 32×32 inputs
        maps = (8, layer["out"]) + ((side, side) if layer["k"] else ())
        arrays[f"act/{name}"] = rng.standard_normal(maps, dtype=np.float32)
        arrays[f"actgrad/{name}"] = rng.standard_normal(maps, dtype=np.float32) * 1e-3
        arrays[f"cosine/{name}"] = np.ones(layer["out"], np.float32)
        arrays[f"delta_ratio/{name}"] = np.zeros(layer["out"], np.float32)
    arrays["weight_stats"] = rng.standard_normal((len(layers), 11), dtype=np.float32)
    arrays["grad_stats"] = rng.standard_normal((len(layers), 11), dtype=np.float32)
    arrays["probe_images"] = rng.standard_normal((8, 3, 32, 32), dtype=np.float32)
    return arrays


def in_child(function, *args, **kwargs):
    """``function(*args, **kwargs)`` in a fresh Python process, so that its RSS is not what an earlier measurement
    left in this one's heap."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args, kwargs)


class PeakRSS:
    """The process's peak RSS above what it was when made, sampled every 20 ms until ``stop``."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.base


def backlog_rss(run_dir, steps=2000):
    """ResNet-50-sized per-filter data on every step, submitted as fast as the loop goes (far faster than the writer's
    ~80 records/s): the recorder's extra RSS, and the messages it kept only the body of."""
    widths = MODELS["resnet50"]
    messages = list(step_messages(widths, steps))        # 16 buffers, reused: allocated before the measurement
    rec = RunRecorder(run_dir, queue_size=steps + 10)
    rec.submit(structure_for(widths))
    rss = PeakRSS()
    for message in messages:       # fresh buffers, as the callback's every message has
        rec.submit(Message(message.type, message.body, {key: array.copy() for key, array in message.arrays.items()},
                           run=message.run, seq=message.seq, time=message.time))
    rec.close()
    return {"extra_rss": rss.stop(), "stripped": rec.drops, "steps": steps}


def disk_at_defaults(run_dir, steps=10000, filters_every=50, snapshot_every=500, **options):
    """ResNet-50 × ``steps`` at the callback's default cadence through the real recorder (module docstring)."""
    widths = MODELS["resnet50"]
    names = [f"layer{i}" for i in range(len(widths))]
    rng = np.random.default_rng(1)
    pool = [rng.random((5, sum(widths)), dtype=np.float32) for _ in range(4)]
    snapshot = snapshot_arrays()
    snapshot_bytes = sum(a.nbytes for a in snapshot.values())
    rec = RunRecorder(run_dir, **options)
    rss = PeakRSS()
    started = time.perf_counter()
    rec.submit(structure_for(widths))
    most, seq = 0, 1
    for step in range(1, steps + 1):
        seq += 1
        per_filter = step % filters_every == 0
        body = {"step": step, "epoch": step // 1000, "batch": step % 1000, "loss": 1.0 / step,
                "metrics": {"train_acc": 0.5}, "groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}],
                "batch_size": 8, "samples_per_s": 30.0, "drops": {"telemetry": 0, "recording": 0},
                "per_filter": per_filter}
        arrays = {}
        if per_filter:
            body.update({"filter_fields": list(FILTER_FIELDS), "layer_names": names})
            arrays = {"filters": pool[step % 4], "layers": np.ones(len(widths), np.float32)}
        rec.submit(Message("step", body, arrays, run="bench", seq=seq, time=time.time()))
        if step % snapshot_every == 0:
            seq += 1
            rec.submit(Message("snapshot", {"step": step, "epoch": step // 1000, "revision": 0,
                                            "layer_names": [layer["name"] for layer in resnet50_layers()]},
                               snapshot, run="bench", seq=seq, time=time.time()))
        if per_filter:
            rec.flush()
            most = max(most, dir_bytes(Path(run_dir)))
    rec.close()
    elapsed = time.perf_counter() - started
    extra_rss = rss.stop()
    run = open_run(run_dir)
    dropped = run.dropped()
    stored = snapshot_files(Path(run_dir))[-1][2].stat().st_size
    return {"bytes": dir_bytes(Path(run_dir)), "most": most, "extra_rss": extra_rss, "seconds": elapsed,
            "snapshot_bytes": snapshot_bytes, "stored": stored, "kept": run.snapshot_steps(), "drops": rec.drops,
            "dropped_snapshots": len(dropped["snapshots"]) + len(dropped["snapshots_not_written"]),
            "filter_keep": run.disk()["filter_keep"],
            "filters_dropped": sum(e["count"] for e in dropped["filter_steps"]),
            "budget": run.disk()["budget"], "records": len(run.filter_series("layer0", "weight_norm")["step"])}


def time_query(run_dir, layer, field="weight_norm", resolution=None, repeat=3):
    run = open_run(run_dir)
    t = time.perf_counter()
    series = run.filter_series(layer, field, resolution=resolution)
    cold = time.perf_counter() - t
    warm = []
    for _ in range(repeat):
        t = time.perf_counter()
        run.filter_series(layer, field, resolution=resolution)
        warm.append(time.perf_counter() - t)
    return {"cold_ms": cold * 1e3, "warm_ms": min(warm) * 1e3, "rows": len(series["step"]),
            "filters": len(series["filter_ids"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-steps", type=int, default=10000)
    parser.add_argument("--resnet-steps", type=int, default=300)
    parser.add_argument("--query-steps", type=int, default=10000)
    parser.add_argument("--disk-steps", type=int, default=10000)
    parser.add_argument("--only-disk", action="store_true", help="only the disk budget at ResNet-50 size")
    parser.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="revacnn-bench-"))
    lines = []

    def out(text=""):
        print(text, flush=True)
        lines.append(text)

    out(f"Disk budget: ResNet-50 × {args.disk_steps:,} steps at the defaults (per-filter data every 50 steps, a "
        f"snapshot every 500), default `disk_budget`:")
    out()
    out("| snapshot storage | snapshot size | budget | on disk at the end | most on disk during the run | snapshots "
        "kept (steps) | snapshots dropped | pyramid keeps (levels 0–4) | per-filter rows of a layer | recorder extra "
        "RSS (peak) | written in |")
    out("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype in ("float32", "bfloat16", "float16"):
        run_dir = scratch / f"disk-{dtype}"
        r = in_child(disk_at_defaults, run_dir, args.disk_steps, snapshot_dtype=dtype)
        assert r["drops"] == 0 and r["filters_dropped"] == 0 and r["most"] <= r["budget"], r
        out(f"| {dtype} | {r['stored'] / 1e6:,.0f} MB | {r['budget'] / 1e9:.1f} GB | {r['bytes'] / 1e6:,.0f} MB | "
            f"{r['most'] / 1e6:,.0f} MB | {len(r['kept'])} ({', '.join(map(str, r['kept']))}) | "
            f"{r['dropped_snapshots']} | {', '.join(map(str, r['filter_keep']))} | {r['records']} | "
            f"{r['extra_rss'] / 1e6:,.0f} MB | {r['seconds']:.0f} s |")
        shutil.rmtree(run_dir)
    out()
    r = in_child(backlog_rss, scratch / "backlog")
    shutil.rmtree(scratch / "backlog")
    out(f"Backlog: ResNet-50-sized per-filter data on every step, {r['steps']:,} steps submitted as fast as the loop "
        f"goes: recorder extra RSS (peak) {r['extra_rss'] / 1e6:,.0f} MB; {r['stripped']:,} messages recorded "
        f"without their per-filter buffers (listed in run.json, reason `backlog`).")
    out()
    if args.only_disk:
        return _finish(args, argv, scratch, lines)

    out("Writing (per-filter data on every step; bytes = whole run directory at the end / steps, after retention):")
    out()
    out("| model | filters | steps | dtype | raw per-filter bytes/record | bytes on disk/step | steps/s written "
        "| submit µs/step |")
    out("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, steps in (("demo", args.demo_steps), ("resnet50", args.resnet_steps)):
        widths = MODELS[model]
        for float16 in (False, True):
            run_dir = scratch / f"{model}-{'f16' if float16 else 'f32'}"
            result = write_run(run_dir, widths, steps, float16=float16)
            out(f"| {model} | {sum(widths)} | {steps} | {'float16' if float16 else 'float32'} | "
                f"{sum(widths) * 5 * (2 if float16 else 4):,} | {result['bytes'] / steps:,.0f} | {result['steps_per_s']:,.0f} | {result['submit_us']:.1f} |")
            if model == "resnet50" or float16:
                shutil.rmtree(run_dir)
    out()
    out(f"Whole-run query of one layer, one field, {args.query_steps} per-filter records:")
    out()
    out("| layer | retention | batches on disk | resolution | rows returned | cold ms | warm ms |")
    out("| --- | --- | --- | --- | --- | --- | --- |")
    cases = [("demo conv2 (20)", [16, 20, 20, 10], "layer1", None),
             ("resnet50 widest (2048)", [2048], "layer0", None),
             ("resnet50 widest (2048)", [2048], "layer0", 1)]
    for label, widths, layer, flush_every in cases:
        for policy_name, policy in (("default (2000 raw)", {}), ("all raw", {"full_records": args.query_steps})):
            if flush_every and policy:
                continue
            run_dir = scratch / f"query-{len(widths)}-{len(policy)}-{flush_every}"
            steps = args.query_steps if not flush_every else args.query_steps
            write_run(run_dir, widths, steps, flush_every=flush_every, **policy)
            batching = "1 per record" if flush_every else "writer-batched"
            for resolution in (None, 1000):
                q = time_query(run_dir, layer, resolution=resolution)
                out(f"| {label} | {policy_name} | {batching} | {resolution or 'full'} | {q['rows']} | "
                    f"{q['cold_ms']:.0f} | {q['warm_ms']:.0f} |")
            shutil.rmtree(run_dir)
    return _finish(args, argv, scratch, lines)


def _finish(args, argv, scratch, lines) -> int:
    if not args.dir:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.append:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor() or "cpu")
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, "
                   f"pyarrow {__import__('pyarrow').__version__}, Linux {platform.release()}; load average at the "
                   f"end {load} (other jobs shared the machine)")
        command = "python benchmarks/recording.py " + " ".join(argv if argv is not None else sys.argv[1:])
        results = Path(__file__).with_name("RESULTS.md")
        text = results.read_text() if results.exists() else "# Benchmark results\n"
        if "## Recording" not in text:
            text = text.rstrip("\n") + "\n\n## Recording\n"
        block = (f"\n### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
                 f"Command: `{command.strip()}`  \nMachine: {machine}\n\n" + "\n".join(lines) + "\n")
        start = text.index("## Recording")
        end = text.find("\n## ", start + 1)          # keep the block inside the Recording section
        end = len(text) if end < 0 else end + 1
        text = text[:end].rstrip("\n") + "\n" + block + ("\n" + text[end:] if end < len(text) else "")
        results.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
