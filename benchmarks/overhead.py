"""Training throughput with ReVACNNCallback ÷ without it, measured side by side in one process.

Configurations run interleaved (A B C D, A B C D, …) so drift of the machine hits all alike; each repetition is a
fresh Trainer on the ReVACNN demo CNN (16-20-20, 3×32×32 digits, batch 32). Throughput is timed from the 20th step
to the last (set-up, first-step compilation of caches, and validation excluded). Reported: median steps/s per
configuration, and the median over repetitions of its throughput ÷ the bare run's in the same repetition (pairing
cancels the drift of a shared machine, which is large on small VMs), with a bootstrap 95 % confidence interval of
that median, so a ratio is never read more precisely than the machine allows.

Configurations rotate their order from one repetition to the next, so none always runs right after the slow
TensorBoard one. ``--breakdown`` then runs each revacnn configuration once more, instrumented, and prints where its
time goes per step: wall and CPU time in each callback hook and forward hook on the training thread, and the CPU
time of the I/O and recorder threads (Linux: read from /proc) — the figures to act on when a ratio is short — and
their sum as an implied ratio, a second estimate far less noisy than the throughput ratio on a shared machine.

    python benchmarks/overhead.py                       # CPU, the figures in benchmarks/RESULTS.md
    python benchmarks/overhead.py --breakdown           # … and where the time goes
    python benchmarks/overhead.py --device cuda --sync-debug --model resnet   # on a GPU: proves no host sync
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import sys
import tempfile
import threading
import time

import pytorch_lightning as pl
import torch

from revacnn import ReVACNNCallback, probes
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet, SmallResNet


class StepTimer(pl.Callback):
    """Times training steps from ``warmup`` on; optionally turns CUDA's sync debug mode on around them."""

    def __init__(self, warmup: int, sync_debug: bool) -> None:
        self.warmup = warmup
        self.sync_debug = sync_debug
        self.started = 0.0
        self.steps = 0
        self.elapsed = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.started = time.perf_counter()
            if self.sync_debug:
                torch.cuda.set_sync_debug_mode("error")

    def on_train_end(self, trainer, pl_module):
        if self.sync_debug:
            torch.cuda.set_sync_debug_mode(0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.elapsed = time.perf_counter() - self.started
        self.steps = trainer.global_step - self.warmup


class TensorBoardHistograms(pl.Callback):
    """The usual alternative: TensorBoard histograms of every weight and gradient every ``every`` steps."""

    def __init__(self, logdir: str, every: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(logdir)
        self.every = every

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step + 1
        if step % self.every:
            return
        for name, parameter in pl_module.named_parameters():
            self.writer.add_histogram(f"weight/{name}", parameter.detach(), step)
            if parameter.grad is not None:
                self.writer.add_histogram(f"grad/{name}", parameter.grad, step)

    def on_train_end(self, trainer, pl_module):
        self.writer.close()


REVACNN_CONFIGS = {
    "revacnn default (filters every 10, snapshots every 100, recording on)": {},
    "revacnn every step (filters every step, snapshots every 50)": {"filters_every": 1, "snapshot_every": 50},
}


def configurations(logdir: str):
    return {
        "bare": lambda: [],
        **{name: (lambda kwargs=kwargs: [ReVACNNCallback(**kwargs)]) for name, kwargs in REVACNN_CONFIGS.items()},
        "TensorBoard histograms of every weight and gradient, every step": lambda: [
            TensorBoardHistograms(tempfile.mkdtemp(dir=logdir), every=1)],
    }


class Breakdown(StepTimer):
    """StepTimer that also times ReVACNNCallback's hooks and forward hooks, and the CPU of its threads."""

    HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")

    def __init__(self, warmup: int, callback: ReVACNNCallback) -> None:
        super().__init__(warmup, sync_debug=False)
        self.wall: collections.Counter = collections.Counter()
        self.cpu: collections.Counter = collections.Counter()
        self.threads_before: dict[str, float] = {}
        self.threads_after: dict[str, float] = {}
        for hook in self.HOOKS:
            setattr(callback, hook, self._timed(hook, getattr(callback, hook)))
        original = channel_abs_mean = probes.channel_abs_mean
        self._restore = lambda: setattr(probes, "channel_abs_mean", original)
        probes.channel_abs_mean = self._timed("forward hooks (mean abs activation per channel)", channel_abs_mean)

    def _timed(self, name, function):
        def timed(*args, **kwargs):
            if self.steps == 0 and self.started == 0.0:
                return function(*args, **kwargs)
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - wall
                self.cpu[name] += time.thread_time() - cpu
        return timed

    @staticmethod
    def thread_cpu() -> dict[str, float]:
        """CPU seconds of this process's revacnn threads, by name (Linux: /proc schedstat, in nanoseconds; empty
        elsewhere)."""
        names = {thread.native_id: thread.name for thread in threading.enumerate()}
        found: dict[str, float] = {}
        try:
            for tid in os.listdir("/proc/self/task"):
                name = names.get(int(tid), "")
                if name.startswith("revacnn"):
                    with open(f"/proc/self/task/{tid}/schedstat") as stat:
                        found[name.split("-2")[0]] = int(stat.read().split()[0]) / 1e9
        except OSError:
            pass
        return found

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.global_step == self.warmup:
            self.threads_before = self.thread_cpu()

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        self.threads_after = self.thread_cpu()
        self._restore()

    def report(self) -> list[str]:
        per_step = 1000.0 / max(1, self.steps)
        lines = [f"| {name} | {self.wall[name] * per_step:.3f} | {self.cpu[name] * per_step:.3f} |"
                 for name in self.wall]
        threads = 0.0
        for name, after in self.threads_after.items():
            threads += (after - self.threads_before.get(name, 0.0)) * per_step
            lines.append(f"| thread {name} | | {(after - self.threads_before.get(name, 0.0)) * per_step:.3f} |")
        step = self.elapsed * per_step
        lines.append(f"| whole step (for scale) | {step:.3f} | |")
        # The hooks run inside the step; the threads' CPU competes with torch's threads for the cores, so it is
        # counted in full. What this misses: cache and GIL effects on the training thread.
        accounted = sum(self.wall.values()) * per_step + threads
        lines.append(f"| accounted: hooks' wall + threads' CPU | {accounted:.3f} | implied ratio "
                     f"{(step - accounted) / step:.3f} |")
        return lines


def breakdown(args, data, root: str) -> None:
    print("\nWhere the time goes (one instrumented run per configuration; ms per timed step)\n")
    for name, kwargs in REVACNN_CONFIGS.items():
        callback = ReVACNNCallback(**kwargs)
        timer = Breakdown(args.warmup, callback)
        run_once(lambda: [callback], args, data, root, timer=timer)
        print(f"{name}\n\n| part | wall ms/step | CPU ms/step |\n| --- | --- | --- |")
        print("\n".join(timer.report()) + "\n")


def run_once(make_callbacks, args, data, root: str, timer: StepTimer | None = None) -> float:
    torch.manual_seed(0)
    net = SmallResNet((32, 64, 128)) if args.model == "resnet" else ReVACNNNet()
    model = ClassifierModule(net, lr=0.02)
    timer = timer or StepTimer(args.warmup, args.sync_debug)
    trainer = pl.Trainer(accelerator=args.device, devices=1, max_steps=args.warmup + args.steps, max_epochs=-1,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         callbacks=[*make_callbacks(), timer])
    trainer.fit(model, data)
    return timer.steps / timer.elapsed


def median_interval(values: list[float], resamples: int = 5000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95 % confidence interval of the median of ``values`` (percentile method)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per repetition (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (default 20)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (default 7)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="revacnn", choices=("revacnn", "resnet"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sync-debug", action="store_true",
                        help="torch.cuda.set_sync_debug_mode('error') around the timed steps (GPU only)")
    parser.add_argument("--breakdown", action="store_true",
                        help="then time each part of the callback per step (hooks, forward hooks, threads)")
    args = parser.parse_args(argv)
    data = DigitsDataModule(batch_size=args.batch_size)
    data.setup()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        configs = configurations(root)
        names = list(configs)
        for repeat in range(args.repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:   # rotate: no configuration always follows the same one
                results.setdefault(name, []).append(run_once(configs[name], args, data, root))
            print(f"repeat {repeat + 1}/{args.repeats}: " +
                  ", ".join(f"{results[name][-1]:.1f}" for name in names), file=sys.stderr, flush=True)
    print(f"\n{args.model} on {args.device}, batch {args.batch_size}, {args.steps} timed steps × {args.repeats} "
          f"interleaved repetitions, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| configuration | median steps/s | ratio to bare (median of paired ratios) | 95 % CI of that median | "
          "paired ratios min–max |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        values = results[name]
        # each repetition's configurations ran back to back: pairing them cancels the machine's drift
        ratios = [value / bare for value, bare in zip(values, results["bare"])]
        low, high = median_interval(ratios)
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(ratios):.3f} | "
              f"{low:.3f}–{high:.3f} | {min(ratios):.2f}–{max(ratios):.2f} |")
    if args.breakdown:
        with tempfile.TemporaryDirectory() as root:
            breakdown(args, data, root)


if __name__ == "__main__":
    main()
