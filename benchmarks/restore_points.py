"""What restore points cost: memory, disk and time per point, and the training throughput at the defaults.

Per model — the ReVACNN demo CNN (16-20-20) and a ResNet-50-sized one (transformers' ``ResNetConfig()``: 25.6 M
parameters), both with SGD momentum state, so a point holds weights, buffers and one momentum buffer per parameter:

- bytes of tensors one point holds in host memory (``RestorePoint.nbytes``),
- ``capture`` time (the only part in the training step's path; median of ``--repeats``),
- ``restore`` time from memory and from the spilled file, and the safetensors file's size and write time (done by
  the spill thread, off the training thread).

Throughput at the defaults (``RestorePolicy()``: a periodic point every 500 steps, up to 4 in RAM within 64 MiB,
the rest spilled): the demo CNN trains in a plain PyTorch loop (its Lightning step's forward, backward and SGD step) in windows of 500
steps; every other window takes the default's one point at its start, through a real ``RestoreStore`` that spills
to a temporary directory, the windows between take none. Each "on" window's steps/s is divided by the mean of the
two "off" windows either side of it (the machine's drift cancels), and the median ratio is reported.

    python benchmarks/restore_points.py                  # both models, CPU
    python benchmarks/restore_points.py --windows 12     # more windows: a tighter throughput figure
    python benchmarks/restore_points.py --window 100     # a point every 100 steps: 5× the default's cost
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from revacnn.demo.models import ReVACNNNet  # noqa: E402
from revacnn.steering.restore import capture, restore  # noqa: E402
from revacnn.steering.restore_store import RestorePolicy, RestoreStore  # noqa: E402


def resnet50():
    from transformers import ResNetConfig, ResNetForImageClassification

    model = ResNetForImageClassification(ResNetConfig(num_labels=10))
    return lambda x: model(x).logits, model, (2, 3, 64, 64)


def demo():
    model = ReVACNNNet()
    return model, model, (32, 3, 32, 32)


def trained(builder):
    forward, model, shape = builder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        optimizer.step()

    step()   # momentum state exists
    return model, optimizer, step


def point_costs(name: str, builder, repeats: int) -> None:
    model, optimizer, _ = trained(builder)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        point = capture(i, 0, 0, "periodic", model, [optimizer], [])
        times.append(time.perf_counter() - start)
    restores = []
    for _ in range(repeats):
        start = time.perf_counter()
        restore(point, point.tensors, model, [optimizer], [])
        restores.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as spill:
        store = RestoreStore(RestorePolicy(ram_points=0), Path(spill))
        store.add(point)
        store.add(capture(repeats + 1, 0, 0, "periodic", model, [optimizer], []))   # the newest stays in RAM
        start = time.perf_counter()
        store.wait_spilled(600)
        written = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(spill).iterdir())
        start = time.perf_counter()
        restore(point, store.tensors(point), model, [optimizer], [])
        from_disk = time.perf_counter() - start
        store.close()
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params / 1e6:.2f} M parameters; one point holds {point.nbytes / 2**20:.2f} MiB "
          f"(weights, buffers, momentum); capture {statistics.median(times) * 1e3:.2f} ms (median of {repeats}); "
          f"restore from RAM {statistics.median(restores) * 1e3:.2f} ms; spilled file {size / 2**20:.2f} MiB, "
          f"written in ~{written * 1e3:.0f} ms (spill thread); restore from disk {from_disk * 1e3:.1f} ms")


def throughput(windows: int, every: int) -> None:
    model, optimizer, step = trained(demo)
    policy = RestorePolicy()
    rates = []
    with tempfile.TemporaryDirectory() as spill:
        store = RestoreStore(policy, Path(spill))
        for window in range(windows):
            on = window % 2 == 1
            for _ in range(20):   # settle: not timed
                step()
            start = time.perf_counter()
            if on:
                store.add(capture(window, window * every, 0, "periodic", model, [optimizer], []))
            for _ in range(every):
                step()
            rates.append((on, every / (time.perf_counter() - start)))
            print(f"  window {window + 1}/{windows} ({'one point' if on else 'none'}): {rates[-1][1]:.1f} steps/s",
                  flush=True)
        ram, disk = store.ram_usage(), store.disk_usage()
        store.close()
    ratios = [rates[i][1] / ((rates[i - 1][1] + rates[i + 1][1]) / 2)
              for i in range(1, len(rates) - 1) if rates[i][0]]
    base = statistics.mean(r for on, r in rates if not on)
    print(f"demo CNN, plain loop, {base:.1f} steps/s without points: with one point every {every} steps "
          f"(RestorePolicy's caps and spilling) throughput × {statistics.median(ratios):.4f} (median of {len(ratios)} paired "
          f"windows; min {min(ratios):.4f}, max {max(ratios):.4f}); at the end {ram[0]} points "
          f"({ram[1] / 2**20:.2f} MiB) in RAM, {disk[0]} ({disk[1] / 2**20:.2f} MiB) on disk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--windows", type=int, default=9, help="alternating off/on windows (odd: off at both ends)")
    parser.add_argument("--skip-resnet50", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--window", type=int, default=RestorePolicy().every_steps,
                        help="steps per window, one point per 'on' window (default: the default schedule, 500; a "
                             "shorter window takes points more often than the default: an upper bound on its cost)")
    args = parser.parse_args()
    torch.manual_seed(0)
    point_costs("demo CNN", demo, args.repeats)
    if not args.skip_resnet50:
        point_costs("ResNet-50-sized", resnet50, args.repeats)
    if not args.skip_throughput:
        throughput(args.windows, args.window)


if __name__ == "__main__":
    main()
