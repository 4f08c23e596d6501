"""Training throughput with ReVACNNCallback ÷ without it, measured side by side in one run.

Each configuration trains the ReVACNN demo CNN (16-20-20, 3×32×32 digits, batch 32) in one fit whose steps are cut
into windows of ``--window`` steps: in every other window the configuration's callbacks run, in the windows between
they are switched off (their per-batch hooks are not called; their threads and sockets stay up, idle). Each "on"
window's steps/s is divided by the mean of the two "off" windows either side of it, so the machine's drift — large
and slow on a shared VM, ±15 % from one fresh run to the next here — cancels within seconds instead of across
whole runs. Reported: the median of those paired ratios with a bootstrap 95 % confidence interval, and the mean
with its 95 % normal interval. The first ``--settle`` steps of every window are not timed: the work an on window
queued (the recorder writes every 0.5 s) drains there, not in the next window's figures. What the pairing cannot
see — the CPU the callback's idle threads take in off windows too (their periodic wakes) — is measured and reported
beside the ratio, in ms per step: subtract it from the ratio as a fraction of the step.

``--ablate`` adds the every-step configuration three more times with parts of its per-filter measurement replaced by
stand-ins that cost next to nothing: the mean |activation| per channel (the forward hooks' reduction), the per-filter
sums over weights and gradients (``FilterProbe.measure``), and both. What those configurations publish is wrong
(zeros; one step's values repeated): they exist to price each part, and the last one measures the floor that the
rest of the machinery — scalars, per-filter messages, the recorder, snapshots — sets on its own.

``--floor`` prices the other side: the per-filter measurement alone, with nothing of the callback around it. The same
model and optimizer train in a plain PyTorch loop, in blocks of 30 steps that measure nothing, that call
``FilterProbe.measure`` after every backward pass (the per-filter sums), or that also arm its forward hooks (mean
|activation|); each measuring block is paired with the blocks either side that measure nothing. However the
publishing, recording and snapshots were done, every-step telemetry could not cost less than that.

``--breakdown`` then runs each revacnn configuration once more, instrumented, and prints where its time goes per
step: wall and CPU time in each callback hook and forward hook on the training thread, and the CPU time of the I/O
and recorder threads (Linux: read from /proc) — the figures to act on when a ratio is short — and their sum as an
implied ratio, a second estimate of the same quantity.

    python benchmarks/overhead.py                       # CPU, the figures in benchmarks/RESULTS.md
    python benchmarks/overhead.py --breakdown           # … and where the time goes
    python benchmarks/overhead.py --also filters_every=20,snapshot_every=200   # … and what another cadence costs
    python benchmarks/overhead.py --ablate              # … and what each part of every-step telemetry costs
    python benchmarks/overhead.py --floor               # … and what measuring alone costs, outside Lightning
    python benchmarks/overhead.py --device cuda --sync-debug --model resnet   # on a GPU: proves no host sync
    python benchmarks/overhead.py --model resnet50 --batch-size 8 --settle 10 --pairs 20 --tensorboard-pairs 0
                                                        # a ResNet-50 (26,570 filters) on the CPU
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import random
import statistics
import sys
import tempfile
import threading
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from revacnn import ReVACNNCallback
from revacnn.telemetry import probes
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet, SmallResNet


def _drain_device() -> None:
    """Wait for the GPU's queued work (a no-op on CPU); the timer's own wait is exempt from sync debug mode."""
    if torch.cuda.is_available():
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(mode)


class StepTimer(pl.Callback):
    """Times training steps from ``warmup`` on."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.started = 0.0
        self.steps = 0
        self.elapsed = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            _drain_device()
            self.started = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        _drain_device()
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
    "revacnn default (budget 2 %: the cadence it plans on this run, recording on)": {},
    "revacnn every step (filters every step, snapshots every 50)": {"filters_every": 1, "snapshot_every": 50},
}


EVERY_STEP = REVACNN_CONFIGS["revacnn every step (filters every step, snapshots every 50)"]
ABLATIONS = {
    "ablation: every step, mean abs(activation) stood in (zeros)": {"activation"},
    "ablation: every step, per-filter sums stood in (one step's, repeated)": {"sums"},
    "ablation: every step, both stood in (the floor of the rest)": {"activation", "sums"},
}


@contextlib.contextmanager
def stand_ins(parts: set[str]):
    """Replace ``parts`` of the per-filter measurement with stand-ins that cost next to nothing, for pricing them:
    ``"activation"``, the forward hooks' |activation| reduction (a cached zero vector per channel count instead);
    ``"sums"``, ``FilterProbe.measure`` (its first result, returned again every step). Restored on exit."""
    original_reduction, original_measure = probes.channel_abs_sum, probes.FilterProbe.measure
    zeros: dict[int, torch.Tensor] = {}
    first: dict[int, tuple] = {}

    def zero_reduction(output: torch.Tensor, channels_first: bool) -> tuple[torch.Tensor, int]:
        channels = output.shape[1] if channels_first and output.dim() > 2 else output.shape[-1]
        if channels not in zeros:
            zeros[channels] = torch.zeros(channels, device=output.device)
        return zeros[channels], 1

    def repeated_measure(probe: probes.FilterProbe) -> tuple[torch.Tensor, torch.Tensor]:
        if id(probe) not in first:
            first[id(probe)] = original_measure(probe)
        probe.armed, probe._activations, probe._held = False, {}, {}  # what measure leaves behind
        return first[id(probe)]

    if "activation" in parts:
        probes.channel_abs_sum = zero_reduction
    if "sums" in parts:
        probes.FilterProbe.measure = repeated_measure
    try:
        yield
    finally:
        probes.channel_abs_sum, probes.FilterProbe.measure = original_reduction, original_measure


FLOOR_BLOCK = 30
#: The floor's modes: whether the forward hooks are armed (mean |activation|) besides the per-filter sums.
FLOOR_MODES = {
    "floor, plain PyTorch loop: per-filter sums alone (FilterProbe.measure every step)": False,
    "floor, plain PyTorch loop: per-filter sums and mean abs(activation) (FilterProbe armed every step)": True,
}


def measurement_floor(rounds: int, run_block, block: int = FLOOR_BLOCK) -> dict[str, PairedWindows]:
    """What the per-filter measurement costs on its own, with nothing published, recorded or snapshotted.

    ``run_block(mode, steps)`` trains ``steps`` steps and returns the seconds they took: ``mode`` None measures
    nothing, False calls ``FilterProbe.measure`` after each backward pass (the per-filter sums over weights and
    gradients), True also arms the forward hooks before each forward (mean |activation| per channel), as the
    callback does at every step. After one untimed block of each, blocks run off, the first mode, off, the second,
    off, … ``rounds`` times, and each mode's blocks are paired with the off blocks either side of them: ``1 −
    ratio`` is the least that every-step telemetry costs, however its publishing is done.
    """
    modes = list(FLOOR_MODES.values())
    for mode in (None, *modes):
        run_block(mode, block)
    timed = [(None, run_block(None, block))]
    for _ in range(rounds):
        for mode in modes:
            timed.append((mode, run_block(mode, block)))
            timed.append((None, run_block(None, block)))
    results = {}
    for name, mode in FLOOR_MODES.items():
        paired = PairedWindows()
        paired.windows.append([False, 0, 0.0])  # the warm-up's place
        for index, (this, seconds) in enumerate(timed):
            if this is not None and this == mode:
                paired.windows += [[False, block, timed[index - 1][1]], [True, block, seconds],
                                   [False, block, timed[index + 1][1]]]
        results[name] = paired
    return results


def plain_loop(args, data):
    """``run_block`` for ``measurement_floor``: the benchmark's model and optimizer trained in plain PyTorch on
    ``args.device``, on the first 16 training batches in turn, with a ``FilterProbe`` on its monitored layers (its
    forward hooks attached only for the armed mode, so the other modes pay nothing for them)."""
    device = torch.device(args.device)
    module = _model(args).to(device)
    optimizer = module.configure_optimizers()
    probe = probes.FilterProbe(probes.discover_layers(module))
    batches = [(images.to(device), labels.to(device))
               for images, labels in itertools.islice(iter(data.train_dataloader()), 16)]

    def run_block(mode: bool | None, steps: int) -> float:
        if mode:
            probe.attach()
        else:
            probe.detach()
        _drain_device()
        started = time.perf_counter()
        for index in range(steps):
            images, labels = batches[index % len(batches)]
            if mode:
                probe.arm()
            optimizer.zero_grad()
            F.cross_entropy(module(images), labels).backward()
            if mode is not None:
                probe.measure()
            optimizer.step()
        _drain_device()
        return time.perf_counter() - started

    return run_block


def configurations(logdir: str, revacnn_configs: dict[str, dict]):
    return {
        **{name: (lambda kwargs=kwargs: [ReVACNNCallback(**kwargs)]) for name, kwargs in revacnn_configs.items()},
        "TensorBoard histograms of every weight and gradient, every step": lambda: [
            TensorBoardHistograms(tempfile.mkdtemp(dir=logdir), every=1)],
    }


class PairedWindows:
    """Timed windows, on and off in turn, each on window paired with the off windows either side of it.

    ``windows`` holds ``[on, timed steps, timed seconds]`` per window; the first is a warm-up and never used.
    ``idle_thread_s`` over ``idle_steps`` is CPU that the pairing cannot see (threads busy in off windows too).
    """

    def __init__(self) -> None:
        self.windows: list[list] = []
        self.idle_thread_s = 0.0
        self.idle_steps = 0

    def ratios(self) -> list[float]:
        """Steps/s of each on window ÷ the mean of its two neighbouring off windows'."""
        rates = [(on, steps / seconds) for on, steps, seconds in self.windows[1:] if steps and seconds > 0]
        return [rates[i][1] / ((rates[i - 1][1] + rates[i + 1][1]) / 2) for i in range(1, len(rates) - 1)
                if rates[i][0] and not rates[i - 1][0] and not rates[i + 1][0]]

    def rate(self, on: bool) -> float:
        """Median steps/s of the on (or off) windows."""
        return statistics.median(steps / seconds for state, steps, seconds in self.windows[1:]
                                 if state == on and steps and seconds > 0)


class AlternatingWindows(PairedWindows, pl.Callback):
    """Calls ``callbacks``' per-batch hooks only in every other window of ``window`` steps, and times each window.

    Window 0 (off, not timed) is the warm-up; then off and on windows alternate, starting and ending off. Lifecycle
    hooks (set-up, train start and end, epochs, validation, tear-down) always reach the callbacks, so their threads
    and sockets live for the whole fit; their CPU in the off windows' timed steps is measured too
    (``idle_thread_s`` over ``idle_steps``), since it is cost that the pairing cannot see. Put this callback first:
    its ``on_train_batch_start`` stamps the time before any other callback runs.
    """

    PER_BATCH = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                 "on_before_zero_grad", "on_train_batch_end")
    LIFECYCLE = ("setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_train_epoch_start",
                 "on_train_epoch_end", "on_validation_start", "on_validation_end")

    def __init__(self, callbacks: list[pl.Callback], window: int, settle: int, sync_debug: bool = False) -> None:
        if not 0 <= settle < window:
            raise ValueError(f"settle must be in [0, window), got {settle} with window {window}")
        self.callbacks, self.window, self.settle, self.sync_debug = callbacks, window, settle, sync_debug
        self.on = False
        PairedWindows.__init__(self)         # idle: the revacnn threads' CPU in the off windows' timed steps
        self._last: float | None = None
        self._threads_at: dict[str, float] | None = None
        for hook in self.LIFECYCLE:
            setattr(self, hook, self._forward(hook, gated=False))
        for hook in self.PER_BATCH[1:]:
            setattr(self, hook, self._forward(hook, gated=True))

    def _forward(self, hook: str, gated: bool):
        def forward(*args, **kwargs):
            if self.on or not gated:
                for callback in self.callbacks:
                    getattr(callback, hook)(*args, **kwargs)
        return forward

    def _close_step(self, now: float, step: int) -> None:
        """Book the step that just ended (it started at ``self._last``) to its window, if it is a timed one."""
        if self._last is not None and (step - 1) % self.window >= self.settle:
            record = self.windows[-1]
            record[1] += 1
            record[2] += now - self._last

    def _threads(self) -> None:
        """Add the revacnn threads' CPU since the last call to the idle total (off windows' timed steps only)."""
        now = Breakdown.thread_cpu()
        if self._threads_at is not None:
            self.idle_thread_s += sum(value - self._threads_at.get(name, 0.0) for name, value in now.items())
        self._threads_at = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step % self.window in (0, self.settle):
            _drain_device()                  # a window's timed steps start and end with the device's queue empty
        now = time.perf_counter()
        self._close_step(now, step)
        position = step % self.window
        if position == 0:
            if self._threads_at is not None:
                self._threads()
            index = step // self.window
            self.on = index > 0 and index % 2 == 0
            self.windows.append([self.on, 0, 0.0])
            if step == self.window and self.sync_debug:
                torch.cuda.set_sync_debug_mode("error")
        if position == self.settle and not self.on and step >= self.window:
            self._threads_at = Breakdown.thread_cpu()
            self.idle_steps += self.window - self.settle
        self._last = time.perf_counter() if position in (0, self.settle) else now
        if self.on:
            for callback in self.callbacks:
                callback.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_exception(self, trainer, pl_module, exception):
        if self.sync_debug:  # Lightning's tear-down after an error moves the optimizer's state to the CPU
            torch.cuda.set_sync_debug_mode(0)
        for callback in self.callbacks:
            callback.on_exception(trainer, pl_module, exception)

    def on_train_end(self, trainer, pl_module):
        _drain_device()
        self._close_step(time.perf_counter(), trainer.global_step)
        if self.sync_debug:
            torch.cuda.set_sync_debug_mode(0)
        if self._threads_at is not None:
            self._threads()
        for callback in self.callbacks:
            callback.on_train_end(trainer, pl_module)


class Breakdown(StepTimer):
    """StepTimer that also times ReVACNNCallback's hooks and forward hooks, and the CPU of its threads."""

    HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")

    def __init__(self, warmup: int, callback: ReVACNNCallback) -> None:
        super().__init__(warmup)
        self.wall: collections.Counter = collections.Counter()
        self.cpu: collections.Counter = collections.Counter()
        self.threads_before: dict[str, float] = {}
        self.threads_after: dict[str, float] = {}
        for hook in self.HOOKS:
            setattr(callback, hook, self._timed(hook, getattr(callback, hook)))
        original = probes.channel_abs_sum
        self._restore = lambda: setattr(probes, "channel_abs_sum", original)
        probes.channel_abs_sum = self._timed("forward hooks (|activation| per channel)", original)

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


def breakdown(args, data, root: str, revacnn_configs: dict[str, dict]) -> None:
    print("\nWhere the time goes (one instrumented run per configuration; ms per timed step)\n")
    if args.device == "cuda":  # what the host-side timers cannot see
        print("On a GPU the hooks' times are their host side only. Where the GPU is the bottleneck, the training "
              "thread runs ahead until CUDA's launch queue is full and every launch then waits for a slot, the "
              "hooks' included: their times hold GPU time that is not theirs, and the implied ratio is no "
              "estimate. The windowed ratios above are.\n")
    for name, kwargs in revacnn_configs.items():
        callback = ReVACNNCallback(**kwargs)
        timer = Breakdown(args.warmup, callback)
        _trainer(args, root, args.warmup + args.steps, [callback, timer]).fit(_model(args), data)
        print(f"{name}\n\n| part | wall ms/step | CPU ms/step |\n| --- | --- | --- |")
        print("\n".join(timer.report()) + "\n")


def _model(args) -> ClassifierModule:
    torch.manual_seed(0)
    if args.model == "resnet50":
        return ClassifierModule(resnet50(), lr=0.02)
    return ClassifierModule(SmallResNet(args.widths) if args.model == "resnet" else ReVACNNNet(), lr=0.02)


class _PixelValues(torch.nn.Module):
    """A transformers image classifier called with images, returning logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def resnet50() -> torch.nn.Module:
    """ResNet-50 at transformers' ``ResNetConfig()`` defaults (54 layers, 26,570 filters, 23.5 M parameters; random
    init, no download), 10 classes."""
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    return _PixelValues(transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=10)))


def _trainer(args, root: str, max_steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """A Trainer that only trains: no validation, logger, checkpoints, progress bar or summary to time."""
    return pl.Trainer(accelerator=args.device, devices=1, max_steps=max_steps, max_epochs=-1, limit_val_batches=0,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, callbacks=callbacks)


def median_interval(values: list[float], resamples: int = 5000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95 % confidence interval of the median of ``values`` (percentile method)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def run_windows(make_callbacks, args, data, root: str, pairs: int, sync_debug: bool) -> AlternatingWindows:
    """One fit: the warm-up window, then ``pairs`` on windows, each between two off windows."""
    windows = AlternatingWindows(make_callbacks(), args.window, args.settle, sync_debug)
    _trainer(args, root, args.window * (2 * pairs + 2), [windows]).fit(_model(args), data)
    return windows


def report_row(name: str, windows: PairedWindows, started: float) -> None:
    """One configuration's row of the table, printed as soon as it is measured: a run cut short keeps its rows."""
    ratios = windows.ratios()
    low, high = median_interval(ratios)
    half = 1.96 * statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    idle = 1000.0 * windows.idle_thread_s / max(1, windows.idle_steps)
    plan = next((callback.telemetry.budget.report() for callback in getattr(windows, "callbacks", ())
                 if isinstance(callback, ReVACNNCallback)), None)
    cadence = (f"{plan['filters_every']} / {plan['snapshot_every']} ({100 * plan['cost']:.1f} %)"
               if plan is not None else "")
    print(f"| {name} | {statistics.median(ratios):.3f} | {low:.3f}–{high:.3f} | "
          f"{statistics.mean(ratios):.3f} ± {half:.3f} | {windows.rate(False):.1f} / "
          f"{windows.rate(True):.1f} | {len(ratios)} | {idle:.3f} | {cadence} |", flush=True)
    print(f"{name}: {len(ratios)} windows in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=60,
                        help="on windows per configuration, each between two off windows (default 60; the "
                             "TensorBoard comparison, far from 1, gets a quarter: --tensorboard-pairs)")
    parser.add_argument("--window", type=int, default=130,
                        help="steps per window (default 130: not a multiple of 100, so snapshots and per-filter "
                             "steps fall at every phase of the windows in turn; with windows of 100 steps, a cadence "
                             "of 200 puts every per-filter step in an off window, where its cost is never measured "
                             "again)")
    parser.add_argument("--settle", type=int, default=50,
                        help="untimed steps at the start of each window (default 50, ~0.5 s here)")
    parser.add_argument("--steps", type=int, default=600, help="timed steps of each --breakdown run (default 600)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before a --breakdown run's (default 20)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="revacnn", choices=("revacnn", "resnet", "resnet50"),
                        help="revacnn: the demo CNN; resnet: a small residual net of --widths; resnet50: transformers' "
                             "ResNetConfig() defaults (needs transformers; ~20 s a window of 130 steps on 2 CPU cores)")
    parser.add_argument("--widths", default="32,64,128",
                        help="--model resnet: channels of its stages, two basic blocks each (default 32,64,128; "
                             "64,128,256,512 is ResNet-18's shape)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32,
                        help="side of the (upsampled) digits images (default 32; larger images make a GPU's step "
                             "its own work rather than Python's)")
    parser.add_argument("--tensorboard-pairs", type=int, default=None,
                        help="on windows of the TensorBoard comparison (default a quarter of --pairs, at least 5; "
                             "0 leaves it out)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="torch.cuda.set_sync_debug_mode('error') from the first timed window to the end of "
                             "each revacnn fit, on and off windows alike (GPU only): any host sync fails the run")
    parser.add_argument("--ablate", action="store_true",
                        help="then price the parts of every-step telemetry: the every-step configuration again with "
                             "the mean |activation|, the per-filter sums, and both replaced by stand-ins that cost "
                             "next to nothing (what those runs publish is wrong; they exist to be timed)")
    parser.add_argument("--floor", action="store_true",
                        help="then the per-filter measurement alone, in a plain PyTorch loop (no Lightning, nothing "
                             "published or recorded; --pairs rounds of blocks of %d steps): the least that every-step "
                             "telemetry can cost" % FLOOR_BLOCK)
    parser.add_argument("--breakdown", action="store_true",
                        help="then time each part of the callback per step (hooks, forward hooks, threads)")
    parser.add_argument("--also", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE…]",
                        help="one more revacnn configuration with these ReVACNNCallback arguments (integers), e.g. "
                             "--also filters_every=20,snapshot_every=200 to price a cadence; repeatable")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.sync_debug and args.device != "cuda":
        parser.error("--sync-debug needs --device cuda")
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}")
    try:
        args.widths = tuple(int(width) for width in args.widths.split(","))
    except ValueError:
        parser.error(f"--widths takes channel counts separated by commas, e.g. 64,128,256,512, got {args.widths!r}")
    if args.tensorboard_pairs is None:
        args.tensorboard_pairs = max(5, args.pairs // 4)
    revacnn_configs = dict(REVACNN_CONFIGS)
    for spec in args.also:
        try:
            kwargs = {key.strip(): int(value) for key, value in (item.split("=") for item in spec.split(","))}
        except ValueError:
            parser.error(f"--also takes KEY=VALUE pairs with integer values, separated by commas, got {spec!r}")
        revacnn_configs["revacnn " + ", ".join(f"{key} {value}" for key, value in kwargs.items())] = kwargs
    data = DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size)
    data.setup()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    model = f"resnet {'-'.join(map(str, args.widths))}" if args.model == "resnet" else args.model
    if args.model == "resnet50":
        model = "ResNet-50 (transformers ResNetConfig(), 26,570 filters)"
    print(f"\n{model} on {args.device} ({device}), batch {args.batch_size} of {args.image_size}×{args.image_size}, "
          f"windows of {args.window} steps ({args.settle} untimed), torch {torch.__version__}"
          f"{'; sync debug mode error in the revacnn fits, from the first timed window on' if args.sync_debug else ''}"
          "\n")
    print("| configuration | ratio: median of on ÷ neighbouring off windows | 95 % CI of the median | "
          "mean ± 95 % | steps/s off / on (medians) | on windows | idle threads' CPU in off windows, ms/step | "
          "cadence at the end: filters / snapshots (the cost it measured) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory() as root:
        for name, make_callbacks in configurations(root, revacnn_configs).items():
            pairs = args.pairs if name.startswith("revacnn") else args.tensorboard_pairs
            if not pairs:
                continue
            started = time.perf_counter()
            # TensorBoard's histograms read every tensor back to the host, so only revacnn is held to no syncs
            sync_debug = args.sync_debug and name.startswith("revacnn")
            report_row(name, run_windows(make_callbacks, args, data, root, pairs, sync_debug), started)
        for name, parts in (ABLATIONS.items() if args.ablate else ()):
            started = time.perf_counter()
            with stand_ins(parts):
                windows = run_windows(lambda: [ReVACNNCallback(**EVERY_STEP)], args, data, root, args.pairs,
                                      args.sync_debug)
            report_row(name, windows, started)
    if args.floor:
        started = time.perf_counter()
        for name, paired in measurement_floor(args.pairs, plain_loop(args, data)).items():
            report_row(name, paired, started)
    if args.breakdown:
        with tempfile.TemporaryDirectory() as root:
            breakdown(args, data, root, revacnn_configs)


if __name__ == "__main__":
    main()
