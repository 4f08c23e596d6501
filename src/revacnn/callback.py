"""``ReVACNNCallback``: watch and steer a Lightning run while it trains.

Hooks stay thin: they decide what is due (``Schedule``), ask ``revacnn.telemetry.probes`` for device tensors, hand one packed
host copy to the I/O thread (``revacnn.wire.publisher``), and apply steering commands at the safe point before each
batch (``revacnn.steering``). Only global rank 0 measures, publishes and records; every rank takes part in the
command broadcast so that all of them steer identically at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.parameter import is_lazy

from revacnn.wire.connection import CONNECTION_FILE_NAME, ConnectionInfo, CurveServerKeys
from revacnn.telemetry.probes import (FilterProbe, discover_layers, eval_mode, filter_change, filter_count, filters_first,
                            logits_of, probe_pass, tensor_stats)
from revacnn.wire.protocol import FILTER_FIELDS, STAT_FIELDS, Message
from revacnn.wire.publisher import Publisher
from revacnn.telemetry.scalars import StepBatch, add_scalars, scalar_values
from revacnn.steering.commands import STRUCTURAL_OPS
from revacnn.telemetry.structure import layer_description, trace
from revacnn.telemetry.transfer import HostCopy, PendingMessage

log = logging.getLogger(__name__)

#: Commands the training loop applies itself; everything else goes to the steering engine.
LOOP_OPS = frozenset({"pause", "resume", "stop", "snapshot", "set_batch_size"})


@dataclass(frozen=True)
class Schedule:
    """When each quantity is measured, in optimizer steps (0 turns a quantity off)."""

    scalars_every: int = 1
    filters_every: int = 50
    snapshot_every: int = 500

    def due(self, previous: int, step: int, every: int) -> bool:
        """Whether the optimizer steps after ``previous`` up to ``step`` include step 1 (the first) or a multiple of
        ``every``. One batch makes several steps when the module steps several optimizers (Lightning counts each)."""
        return every > 0 and step > previous and (previous < 1 <= step or step // every > previous // every)


def _first_batch_tensors(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(images, labels) of a batch given as a tuple/list or a dict with image/label-like keys."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    if isinstance(batch, dict):
        images = next((batch[k] for k in ("image", "images", "img", "pixel_values", "x", "input", "inputs")
                       if k in batch), None)
        labels = next((batch[k] for k in ("label", "labels", "y", "target", "targets") if k in batch), None)
        if isinstance(images, torch.Tensor):
            return images, labels if isinstance(labels, torch.Tensor) else None
    return None


def _class_labels(labels: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, str | None]:
    """The kept images' labels as one class index per image — what image predictions and the probe's loss need —
    or None and why they are not."""
    if any(batch is None for batch in labels):
        return None, "the validation batches carry no labels"
    shapes = {tuple(batch.shape[1:]) for batch in labels}
    dtype = str(labels[0].dtype).removeprefix("torch.")
    if shapes != {()} or labels[0].is_floating_point() or labels[0].is_complex():
        shape = f"[{', '.join(['N', *map(str, next(iter(shapes)))])}]" if len(shapes) == 1 else "of several shapes"
        return None, f"the validation labels are {dtype} {shape}, not one class index per image"
    return torch.cat(labels).long(), None  # int32 or bool classes too: cross-entropy wants int64


def _as_validation_step_gets_it(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """A validation batch as Lightning hands it to ``validation_step``: converted to the run's precision, through
    the module's (or datamodule's) batch-transfer hooks, on the module's device — what the model expects."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


@contextlib.contextmanager
def _randomness_kept(device: torch.device) -> Iterator[None]:
    """Put the global random generators back afterwards (torch's CPU one and the module's CUDA device's, Python's,
    NumPy's): the callback's own work — iterating the validation data draws a DataLoader seed, a forward may sample
    noise — must leave the training's random draws, and so its results, as they are without the callback."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _own_forward(pl_module: pl.LightningModule) -> Iterator[None]:
    """A forward of the callback's own (graph trace, probe pass, predictions): in the run's precision, and leaving
    the random generators as it found them."""
    with _randomness_kept(pl_module.device), pl_module.trainer.precision_plugin.forward_context():
        yield


def _has_lazy_parameters(module: nn.Module) -> bool:
    return any(is_lazy(tensor) for tensor in (*module.parameters(), *module.buffers()))


def _holds_run(directory: Path) -> bool:
    from revacnn.recording.format import MARKER  # here: pyarrow loads only where a recording is made

    return (directory / MARKER).exists() or (directory / CONNECTION_FILE_NAME).exists()


def _unused_run_dir(log_dir: Path) -> Path:
    """``<log_dir>/revacnn``, or ``revacnn-2``, ``-3``, … where a run was recorded before (a Trainer without a
    logger uses the same log directory every time; each run gets its own recording)."""
    candidate, number = log_dir / "revacnn", 1
    while _holds_run(candidate):
        number += 1
        candidate = log_dir / f"revacnn-{number}"
    return candidate


def _shaped_like(module: nn.Module, state_dict: Mapping[str, Any]) -> bool:
    """Whether ``module`` has exactly the entries and shapes of a saved ``state_dict`` (not while it has lazy,
    still shapeless, parameters)."""
    own = module.state_dict()
    return own.keys() == state_dict.keys() and not any(is_lazy(value) for value in own.values()) and all(
        tuple(value.shape) == tuple(getattr(state_dict[key], "shape", ())) for key, value in own.items())


class _SavesChangelog:
    """Left as the ``on_save_checkpoint`` of a module that a fit steered, once the fit is over: the module's shapes
    are no longer its class's, and a checkpoint saved later (``trainer.save_checkpoint(path, weights_only=True)``)
    still needs the change log that rebuilds them. It then calls the module's own hook. A later fit takes the log
    over and takes this off. Plain attributes, so the module still pickles and deep-copies."""

    def __init__(self, module: nn.Module, changelog: list[dict[str, Any]], run_id: str, own_hook: Any) -> None:
        self.module = module
        self.changelog = changelog
        self.run_id = run_id
        self.own_hook = own_hook          # the module's instance-level hook, if it had one

    def __call__(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["revacnn"] = {"changelog": list(self.changelog), "run_id": self.run_id}
        (self.own_hook or type(self.module).on_save_checkpoint.__get__(self.module))(checkpoint)


class _AwaitingStep(NamedTuple):
    """A step read at its end, waiting for Lightning to finish it (its logged metrics)."""

    row: dict[str, Any]                                     # the plain fields of a ``steps`` row
    loss: torch.Tensor | None
    filters: tuple[torch.Tensor, torch.Tensor] | None       # per-filter data (FilterProbe.measure), if measured
    metrics: dict[str, Any] | None                          # read at the step's end when Lightning keeps none


def _lightning_metrics(trainer: pl.Trainer) -> dict[str, Any] | None:
    """The metrics Lightning computed at the end of the last batch it finished, as it keeps them (None if this
    Lightning keeps them elsewhere).

    Not ``trainer.callback_metrics``: that property recomputes every logged result on each call, and converts the
    progress-bar ones with ``.item()`` — a device sync per metric, per call.
    """
    metrics = getattr(getattr(trainer, "_logger_connector", None), "_callback_metrics", None)
    return metrics if isinstance(metrics, dict) else None


def _momentum(group: dict[str, Any]) -> float | None:
    if "momentum" in group:
        return _plain_float(group["momentum"])
    if "betas" in group:
        return _plain_float(group["betas"][0])
    return None


def _plain_float(value: Any) -> float | None:
    """A float from a Python number or a CPU tensor (CUDA tensors are not read: that would sync)."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.device.type == "cpu" and value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) else None


class ReVACNNCallback(Callback):
    """Publish per-filter telemetry over ZeroMQ, record the run, and apply steering commands between batches.

    Args:
        layers: monitored layers, as module names or types (default: every Conv2d and Linear).
        scalars_every: publish step scalars (loss, logged metrics, lr, samples/s) every this many optimizer steps
            (0 = off).
        filters_every: publish per-filter gradients, weight norms, update ratios and mean |activation| every this
            many optimizer steps (0 = off). The defaults (50 here, 500 for snapshots) cost the demo CNN ~1–2 % of
            its CPU throughput (benchmarks/RESULTS.md) and still refresh per-filter values about every 0.55 s at
            the demo's ~90 steps/s (the dashboard polls every 0.5 s). ``filters_every=20, snapshot_every=200``
            costs it ~2–3.5 %; a model whose step is longer pays proportionally less.
        snapshot_every: publish full weights, gradients, DeepTracker statistics and probe activation maps every
            this many optimizer steps (0 = off).
        probe_images: validation images kept for activation maps (chosen once, kept for the whole run).
        val_subset: validation images whose predictions are published after each validation (DeepTracker's
            image × iteration view).
        max_activation_bytes: the most probe activation maps (with their gradients) one snapshot carries; layers
            past it are left out and named in the snapshot's ``probe_skipped``.
        host: the address both sockets bind (127.0.0.1 by default; see ``insecure_bind``).
        telemetry_port: the PUB socket's port (0: a free port, written to the connection file).
        control_port: the ROUTER socket's port for commands and snapshot requests (0: a free port).
        run_dir: where the recording and the connection file go (default: ``<trainer.log_dir>/revacnn``, or
            ``revacnn-2``, ``-3``, … where a run was recorded before). Each ``fit`` is a run of its own.
        record: write the run to ``run_dir`` (see revacnn.recording).
        sign: sign every message with a per-run HMAC key kept in the connection file (mode 0600).
        steering: accept steering commands.
        command_every: under DDP, how often (in optimizer steps) rank 0 broadcasts received commands to the other
            ranks (default 10: the broadcast is a collective that syncs the host with NCCL, so not every step; a
            command waits at most that many steps). Without DDP commands apply before the next batch.
        queue_size: bound of the telemetry queue between the training thread and the sending thread (messages
            past it are dropped and counted).
        send_hwm: bound of ZeroMQ's queue per subscriber (a subscriber that stops reading loses messages, never
            slows training).
        insecure_bind: allow a non-loopback ``host`` without CURVE (anyone who reaches it can read and steer).
        curve: CURVE encryption and authentication of both sockets (docs/remote.md), with the keys in
            ``$REVACNN_KEYS_DIR`` or ``~/.revacnn/keys`` unless ``keys_dir`` is given.
        keys_dir: holds the trainer's keypair (``server.key_secret``, made when missing) and ``allowed/``, the
            public keys of the clients that may connect (``revacnn keys allow``); giving it turns CURVE on. The
            connection file then carries the trainer's public key, never its secret.
        on_recording_error: ``"warn"`` (default: warn once, keep training, the recording stops) or ``"stop"``
            (end ``fit`` gracefully, on every rank, at the next batch after the recording failed).
    """

    def __init__(self, layers: Iterable[str | type[nn.Module]] | None = None, *, scalars_every: int = 1,
                 filters_every: int = 50, snapshot_every: int = 500, probe_images: int = 8, val_subset: int = 1000,
                 max_activation_bytes: int = 64 << 20, host: str = "127.0.0.1", telemetry_port: int = 0,
                 control_port: int = 0, run_dir: str | os.PathLike | None = None, record: bool = True,
                 sign: bool = False, steering: bool = True, command_every: int = 10, queue_size: int = 64,
                 send_hwm: int = 100, insecure_bind: bool = False, curve: bool = False,
                 keys_dir: str | os.PathLike | None = None, on_recording_error: str = "warn") -> None:
        super().__init__()
        if on_recording_error not in ("warn", "stop"):
            raise ValueError(f"on_recording_error must be 'warn' or 'stop', got {on_recording_error!r}")
        for name, value in (("scalars_every", scalars_every), ("filters_every", filters_every),
                            ("snapshot_every", snapshot_every), ("probe_images", probe_images),
                            ("val_subset", val_subset)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if command_every < 1:
            raise ValueError(f"command_every must be ≥ 1, got {command_every!r}")
        self.layer_selectors = list(layers) if layers is not None else None
        self.schedule = Schedule(scalars_every, filters_every, snapshot_every)
        self.probe_images = probe_images
        self.val_subset = val_subset
        self.max_activation_bytes = max_activation_bytes
        self.host, self.telemetry_port, self.control_port = host, telemetry_port, control_port
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.record = record
        self.on_recording_error = on_recording_error
        self._stopping_for_recording = False
        self.sign = sign
        self.steering = steering
        self.command_every = command_every
        self.queue_size, self.send_hwm = queue_size, send_hwm
        self.insecure_bind = insecure_bind
        self.curve = bool(curve) or keys_dir is not None
        self.keys_dir = keys_dir

        self.layers: list[tuple[str, nn.Module]] = []
        # The model's own history: kept from one fit to the next (a checkpoint must replay every change).
        self.filter_ids: dict[str, list[int]] = {}
        self.next_filter_id = 0
        self.revision = 0
        self.changelog: list[dict[str, Any]] = []
        self._patched_module: pl.LightningModule | None = None
        self._instance_hooks: dict[str, Any] = {}  # the module's own instance-level hooks, put back by ``_close``
        self._run_dir_given = self.run_dir
        self._fits = 0
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """What belongs to one run (one ``fit``): a second fit with this callback records a new run."""
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.run_dir = self._run_dir_given
        self.publisher: Publisher | None = None
        self._steps: StepBatch | None = None
        self._awaiting: _AwaitingStep | None = None
        self.recorder = None
        self.connection_file: Path | None = None
        self.probe: FilterProbe | None = None
        self.engine = None
        self.paused = False
        self._state = "starting"
        self._probe_batch: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._probe_labels: list[int] = []
        self._probe_error: str | None = None
        self._val_subset: tuple[torch.Tensor, np.ndarray] | None = None   # images (host), their classes
        self._val_error: str | None = None
        self._telemetry_error: str | None = None               # why telemetry stopped (an internal error)
        self._filter_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._snapshot_previous: dict[str, torch.Tensor] = {}
        self._snapshot_requested = False
        # (command, new size, the attribute's value before it)
        self._pending_batch_size: tuple[dict[str, Any], int, Any] | None = None
        self._batch_size_applied: tuple[dict[str, Any], int, Any] | None = None
        self._val_metric_names: set[str] = set()
        self._metrics_before_validation: dict[str, Any] = {}
        self._held_commands: list[dict[str, Any]] = []
        self._last_batch_end: float | None = None
        # Gradient accumulation: a step is an optimizer step, made of the batches since the last one.
        self._batch_start_step = 0                           # trainer.global_step when this batch started
        self._steps_per_batch = 1                            # optimizer steps the last batch that stepped made
        self._window_start = True                            # the next batch starts a step (no gradient accumulated)
        self._window_loss: torch.Tensor | None = None        # sum of the losses Lightning returned in this step
        self._window_batches = 0
        self._probe_armed = False                            # the probe's state while a validation runs
        self._awaiting_shapes = False                        # lazy layers: telemetry starts after the first batch
        self._samples_per_s = 0.0
        self._batch_size = 0
        self._resumed_run: str | None = None                 # the run id a resumed checkpoint was saved by
        self._untrainable_shown: list[str] = []              # layers without a trainable parameter, as last published

    # -- Lightning state ----------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layer_selectors and [str(s) for s in self.layer_selectors])

    def state_dict(self) -> dict[str, Any]:
        return {"changelog": self.changelog, "filter_ids": self.filter_ids, "next_filter_id": self.next_filter_id,
                "run_id": self.run_id, "revision": self.revision}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The change log itself was replayed in ``setup`` (shapes must change before the weights load).
        self.filter_ids = {name: list(ids) for name, ids in state_dict.get("filter_ids", {}).items()}
        self.next_filter_id = int(state_dict.get("next_filter_id", 0))
        self.revision = int(state_dict.get("revision", 0))
        self._resumed_run = state_dict.get("run_id")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Plain types only, at a fixed key, so ``revacnn.load_steered`` can rebuild the shapes offline.
        checkpoint["revacnn"] = {"changelog": list(self.changelog), "run_id": self.run_id}

    # -- set-up and tear-down -----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._fits:  # this callback recorded a run before: this fit is a new run, in a directory of its own
            self._reset_run_state()
        self._fits += 1
        self._wrap_checkpoint_hooks(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The run opens here, not in ``setup``: a Tuner's trial fit (``lr_find``, ``scale_batch_size``) ends inside
        # the finder's ``on_fit_start``, before this one, and must not leave an empty run behind.
        # On every rank: ``Trainer.log_dir`` is a collective (rank 0 broadcasts it); asked on rank 0 alone it hung.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir) if self.run_dir is None else None
        if trainer.is_global_zero:
            self._open_transport(trainer, log_dir)

    def _wrap_checkpoint_hooks(self, pl_module: pl.LightningModule) -> None:
        """Wrap the module's two checkpoint hooks on this instance (the user's class is untouched; ``_close`` puts
        the instance back as it was, but for a steered module's ``_SavesChangelog``).

        - ``on_load_checkpoint``: on resume, re-apply a steered run's structural changes before Lightning loads the
          weights (it calls this hook just before loading the state_dict; a callback's own hooks run after it, too
          late for shapes).
        - ``on_save_checkpoint``: write the change log into every checkpoint. Lightning calls a callback's
          ``on_save_checkpoint`` for full checkpoints only, so a ``ModelCheckpoint(save_weights_only=True)`` file
          held a steered model's weights without the log that rebuilds its shapes (``load_steered`` failed on it).
        """
        left = pl_module.__dict__.get("on_save_checkpoint")
        if isinstance(left, _SavesChangelog):     # an earlier fit steered this module: its changes go on from here
            if not self.changelog:
                self.changelog = list(left.changelog)
            del pl_module.__dict__["on_save_checkpoint"]
            if left.own_hook is not None:
                pl_module.on_save_checkpoint = left.own_hook
        original_load, original_save = pl_module.on_load_checkpoint, pl_module.on_save_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            changelog = (checkpoint.get("revacnn") or {}).get("changelog", [])
            if changelog and not _shaped_like(pl_module, checkpoint.get("state_dict") or {}):
                from revacnn.steering import replay_changelog

                replay_changelog(pl_module, changelog)
                rank_zero_info(f"revacnn: replayed {len(changelog)} structural change(s) before loading weights")
            if changelog:   # (a module already steered so, e.g. the same instance fitted again, is not re-steered)
                self.changelog = list(changelog)
            original_load(checkpoint)

        def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
            self.on_save_checkpoint(pl_module.trainer, pl_module, checkpoint)
            original_save(checkpoint)

        self._instance_hooks = {name: pl_module.__dict__[name] for name in ("on_load_checkpoint", "on_save_checkpoint")
                                if name in pl_module.__dict__}
        pl_module.on_load_checkpoint = on_load_checkpoint
        pl_module.on_save_checkpoint = on_save_checkpoint
        self._patched_module = pl_module

    def _open_transport(self, trainer: pl.Trainer, log_dir: Path | None) -> None:
        if self.run_dir is None:
            self.run_dir = _unused_run_dir(log_dir)
        elif _holds_run(self.run_dir):
            rank_zero_warn(f"revacnn: {self.run_dir} already holds a recorded run; this run is recorded into it too, "
                           "and from its first step on replaces what was recorded there (a run resumed from a "
                           "checkpoint goes on with its recording). Pass a fresh run_dir to keep runs apart")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        sinks = []
        if self.record:
            from revacnn.recording import RunRecorder

            self.recorder = RunRecorder(self.run_dir)
            sinks.append(self.recorder)
        key = secrets.token_bytes(32) if self.sign else None
        curve = CurveServerKeys.from_keys_dir(self.keys_dir) if self.curve else None
        self.publisher = Publisher(self.run_id, host=self.host, telemetry_port=self.telemetry_port,
                                   control_port=self.control_port, key=key, send_hwm=self.send_hwm,
                                   queue_size=self.queue_size, sinks=sinks, insecure_bind=self.insecure_bind,
                                   curve=curve).start()
        self.publisher.set_status(world_size=trainer.world_size)
        self._steps = StepBatch(self.publisher.publish, self.publisher._drop_counts)
        info = ConnectionInfo(self.run_id, self.publisher.telemetry_endpoint, self.publisher.control_endpoint,
                              key=key.hex() if key else "", security="curve" if curve else "none",
                              curve_server_key=curve.public.decode() if curve else "")
        self.connection_file = info.write(self.run_dir / CONNECTION_FILE_NAME)
        rank_zero_info(f"revacnn: run {self.run_id} — watch it with: revacnn-dash --connect {self.connection_file}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window_start = True
        self.layers = discover_layers(pl_module, self.layer_selectors)
        # Lazy layers (LazyConv2d, LazyLinear) get their shapes in the first forward: telemetry and steering start
        # after it, so the model is initialised by the training batch as it would be without this callback.
        self._awaiting_shapes = _has_lazy_parameters(pl_module)  # on every rank: steering follows it
        if self._awaiting_shapes:
            rank_zero_info("revacnn: the model has lazy layers; telemetry and steering start once the first batch has "
                           "given them their shapes")
        if trainer.is_global_zero:
            if trainer.ckpt_path:
                self._announce_resume(trainer)
            if not self._awaiting_shapes:
                self._telemetry(trainer, lambda: self._start_telemetry(trainer, pl_module))
            self._set_state("running", trainer)

    def _announce_resume(self, trainer: pl.Trainer) -> None:
        """Say which run a fit resumed from a checkpoint continues, and from which step: in the log, and in the
        heartbeat (so the dashboard and the recording show it). The step is known here, not in ``on_fit_start``:
        Lightning restores the loops' state in between."""
        resumed = {"run": self._resumed_run, "step": trainer.global_step, "checkpoint": str(trainer.ckpt_path)}
        earlier = f"run {self._resumed_run}" if self._resumed_run else "a checkpoint saved without this callback"
        rank_zero_info(f"revacnn: run {self.run_id} continues {earlier} from step {trainer.global_step} "
                       f"({trainer.ckpt_path})")
        if self.publisher is not None:
            self.publisher.set_status(resumed=resumed)

    def _start_telemetry(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect_validation_images(trainer, pl_module)
        if self.layers:
            self.probe = FilterProbe(self.layers)
            self.probe.attach()
        else:
            wanted = ", ".join(map(str, self.layer_selectors)) if self.layer_selectors else "Conv2d or Linear"
            rank_zero_warn(f"revacnn: {type(pl_module).__name__} has no layer to monitor ({wanted}); only its "
                           "scalars are published")
        self._publish_structure(pl_module)
        self._publish_hparams(trainer)

    def _collect_validation_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep ``probe_images`` and ``val_subset`` validation images (the same ones for the whole run), with their
        labels where the batches carry one class index per image."""
        wanted = max(self.probe_images, self.val_subset)
        if not wanted:
            return
        images: list[torch.Tensor] = []
        labels: list[torch.Tensor | None] = []
        with _randomness_kept(pl_module.device):  # a DataLoader iterator draws its seed from torch's generator
            try:
                loader = trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader()
                # Several validation loaders (a list, or a dict of named ones): images come from the first.
                loaders = list(loader.values()) if isinstance(loader, Mapping) else \
                    loader if isinstance(loader, (list, tuple)) else [loader]
                count = 0
                for batch in loaders[0] if loaders and loaders[0] is not None else []:
                    tensors = _first_batch_tensors(_as_validation_step_gets_it(trainer, pl_module, batch))
                    if tensors is None or (images and tensors[0].shape[1:] != images[0].shape[1:]):
                        break  # not images, or images of another size than the first batch's: keep what fits together
                    # Kept in host memory from the start: on a GPU, the kept images and their concatenation
                    # would otherwise both sit in device memory (1,000 ImageNet-sized images are 600 MB each time).
                    images.append(tensors[0][: wanted - count].cpu())
                    labels.append(None if tensors[1] is None else tensors[1][: wanted - count].cpu())
                    count += len(images[-1])
                    if count >= wanted:
                        break
            except Exception as error:  # a model without validation data still trains and publishes
                self._probe_error = f"validation images unavailable ({type(error).__name__}: {error})"
        if not images:
            self._probe_error = self._probe_error or "no validation batches of images to probe with"
            return
        device = pl_module.device
        all_images = torch.cat(images)
        all_labels, self._val_error = _class_labels(labels)
        if self._val_error:  # unlabelled, multi-label, soft or regression targets, masks: images only
            rank_zero_info(f"revacnn: {self._val_error}: validations are published without image predictions, and "
                           "the probe's activation gradients are those of the sum of the outputs")
        if self.probe_images:
            self._probe_batch = (all_images[: self.probe_images].to(device),
                                 None if all_labels is None else all_labels[: self.probe_images].to(device))
            # Read here, from host memory: a snapshot reading them off the device would sync.
            self._probe_labels = [] if all_labels is None else all_labels[: self.probe_images].tolist()
        if self.val_subset and all_labels is not None:
            # Each validation moves them over in chunks (pinned: the copies are asynchronous).
            kept = all_images[: self.val_subset]
            self._val_subset = (kept.pin_memory() if device.type == "cuda" else kept,
                                all_labels[: self.val_subset].numpy())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_state("stopped" if trainer.should_stop and self._state == "stopping" else "finished", trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            if isinstance(exception, KeyboardInterrupt):  # Ctrl-C: the user stopped the run
                self._set_state("stopped", trainer, message="interrupted (KeyboardInterrupt)")
            else:
                self._set_state("failed", trainer, message=f"{type(exception).__name__}: {exception}")
        except Exception as error:  # never hide the run's own exception behind one of ours
            rank_zero_warn(f"revacnn: could not publish the run's end: {type(error).__name__}: {error}")
        # Lightning calls no ``teardown`` after an exception or a Ctrl-C: close here, or the last steps and this
        # state never reach the dashboard and the recording (the process exits with its threads mid-work).
        self._close(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close(trainer)

    def _close(self, trainer: pl.Trainer) -> None:
        """Undo what ``setup`` and ``on_train_start`` did, and send and write what is queued; idempotent."""
        module = self._patched_module
        if module is not None:
            for name in ("on_load_checkpoint", "on_save_checkpoint"):
                module.__dict__.pop(name, None)
            module.__dict__.update(self._instance_hooks)
            if self.changelog:
                module.on_save_checkpoint = _SavesChangelog(module, list(self.changelog), self.run_id,
                                                            self._instance_hooks.get("on_save_checkpoint"))
            self._patched_module = None
        if self.probe is not None:
            self.probe.detach()
        if self.engine is not None:
            self.engine.close()  # removes its optimizer step hooks
            self.engine = None
        if self.publisher is not None:
            self._telemetry(trainer, lambda: self._flush_steps(trainer))
            self.publisher.close()
            self.publisher = None
        if self.recorder is not None:
            self.recorder.close()

    # -- every batch --------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_start_step = step = trainer.global_step  # this batch makes the steps after it
        if self.steering and self._window_start and not self._awaiting_shapes:  # never inside one accumulated step
            self._steer(trainer, pl_module, batch)
        if (self.probe is not None and self._window_start
                and self.schedule.due(step, step + self._steps_per_batch, self.schedule.filters_every)):
            self.probe.arm()  # until the step's measure: every batch of an accumulated gradient
        tensors = _first_batch_tensors(batch)
        if tensors is not None:
            self._batch_size = int(tensors[0].shape[0])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.probe is None or not self.probe.armed:
            return
        if len(trainer.optimizers) == 1:
            self._telemetry(trainer, self._measure)
        else:  # each layer as its own optimizer steps it; measured at the batch's end, once every optimizer has
            self._telemetry(trainer, lambda: self.probe.hold(optimizer))

    def _measure(self) -> None:
        self._filter_stats = self.probe.measure()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._awaiting_shapes:  # the first forward has given the lazy layers their shapes
            self._awaiting_shapes = False
            if trainer.is_global_zero:
                self._telemetry(trainer, lambda: self._start_telemetry(trainer, pl_module))
        step, previous = trainer.global_step, self._batch_start_step
        stepped = step != previous  # else this batch's gradient is accumulated for the next batch's
        if stepped and self.probe is not None and self.probe.holding:  # several optimizers stepped this batch
            self._telemetry(trainer, self._measure)
        self._window_start = stepped  # on every rank: steering follows it
        if stepped:
            self._steps_per_batch = step - previous
        if self.publisher is not None:
            self._telemetry(trainer, lambda: self._publish_batch(trainer, pl_module, outputs, batch_idx, previous))

    def _publish_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch_idx: int,
                       previous: int) -> None:
        """At a batch's end: publish the step before, and read this one if it is due (an optimizer step)."""
        step = trainer.global_step
        now = time.perf_counter()
        if self._last_batch_end is not None and now > self._last_batch_end:
            rate = self._batch_size / (now - self._last_batch_end)
            self._samples_per_s = rate if not self._samples_per_s else 0.9 * self._samples_per_s + 0.1 * rate
        self._last_batch_end = now
        self._complete_step(trainer, now)  # the previous step: Lightning has finished it, its metrics are final
        self._add_batch_loss(outputs)
        if step == previous:  # no optimizer step in this batch: its gradient is being accumulated
            return
        loss = self._step_loss(trainer)
        if self._filter_stats is not None and self._untrainable_layers() != self._untrainable_shown:
            self._publish_structure(pl_module)  # the module's code (or a fine-tuning callback) froze or thawed layers
        if self._filter_stats is not None or self.schedule.due(previous, step, self.schedule.scalars_every):
            self._awaiting = self._read_step(trainer, loss, step, batch_idx)
        if self._snapshot_requested or self.schedule.due(previous, step, self.schedule.snapshot_every):
            self._snapshot_requested = False
            self._publish_snapshot(trainer, pl_module, step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._telemetry(trainer, lambda: self._flush_steps(trainer))
        if self._pending_batch_size is not None:
            # The train iterator is made once per epoch: drop the loader so the next epoch builds one anew.
            trainer.fit_loop._combined_loader = None
            self._batch_size_applied, self._pending_batch_size = self._pending_batch_size, None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batch_size_applied is not None:
            command, size, before = self._batch_size_applied
            self._batch_size_applied = None
            loaded = _loader_batch_size(trainer)  # 0: not readable (a batch sampler, several loaders)
            if loaded and loaded != size:  # a train_dataloader() that does not read the attribute: put it back
                from pytorch_lightning.utilities.parsing import lightning_setattr

                lightning_setattr(pl_module, "batch_size", before)
                self._ack(command, "error", trainer, error=f"set_batch_size: the training loader rebuilt for epoch "
                          f"{trainer.current_epoch} still has batch size {loaded}: train_dataloader() does not read "
                          f"the 'batch_size' attribute, which is back at {before!r}")
                return
            self._ack(command, "done", trainer, result={"batch_size": size, "epoch": trainer.current_epoch})
            self._telemetry(trainer, lambda: self._publish_hparams(trainer))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is not None:  # a validation between accumulated batches is not the training's activation
            self._probe_armed, self.probe.armed = self.probe.armed, False
        self._telemetry(trainer, lambda: self._flush_steps(trainer))  # before validation's metrics join the training's
        self._metrics_before_validation = dict(trainer.callback_metrics)
        if not trainer.sanity_checking and self._state == "running":
            self._set_state("validating", trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is not None:
            self.probe.armed = self._probe_armed
        if trainer.sanity_checking or self.publisher is None:
            return
        if self._state == "validating":
            self._set_state("running", trainer)
        self._telemetry(trainer, lambda: self._publish_validation(trainer, pl_module))

    def _publish_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Metrics logged during this validation are the values that changed since it started.
        metrics = {name: value for name, value in trainer.callback_metrics.items()
                   if value is not self._metrics_before_validation.get(name)}
        self._val_metric_names.update(metrics)
        copy = HostCopy()
        scalar_names = add_scalars(copy, metrics.items())
        predictions = self._predict_val_subset(trainer, pl_module) if self._val_subset is not None else None
        if predictions is not None:
            copy.add("pred", predictions)
            copy.add("label", self._val_subset[1])
        body = {"step": trainer.global_step, "epoch": trainer.current_epoch,
                "count": 0 if predictions is None else int(predictions.shape[0])}
        if self._val_error:
            body["pred_error"] = self._val_error

        def finalize(body: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            not_finite: set = set()
            body["metrics"] = scalar_values(scalar_names, arrays, not_finite)
            if not_finite:
                body["not_finite"] = sorted(not_finite)
            return {name: array.astype(np.int16) for name, array in arrays.items()}

        self.publisher.publish(PendingMessage("val", body, copy.launch(), finalize))

    @torch.no_grad()
    def _predict_val_subset(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor | None:
        """The predicted class of every kept validation image; None, with a warning once, when the module's forward
        does not map those images to ``[N, classes]`` logits (the run goes on without predictions)."""
        images, _ = self._val_subset
        predictions = []
        try:
            with eval_mode(pl_module), _own_forward(pl_module):
                for chunk in images.split(256):
                    out = logits_of(pl_module(chunk.to(pl_module.device, non_blocking=True)))
                    if out.dim() != 2:
                        raise TypeError(f"forward returned logits of shape {list(out.shape)}, not [N, classes]")
                    # one output per image is a binary classifier's logit of class 1
                    predictions.append((out[:, 0] > 0).long() if out.shape[1] == 1 else out.argmax(dim=1))
            return torch.cat(predictions)
        except Exception as error:
            self._val_subset = None
            self._val_error = f"predicting the kept validation images failed ({type(error).__name__}: {error})"
            rank_zero_warn(f"revacnn: {self._val_error}; validations are published without them from now on")
            return None

    # -- telemetry ----------------------------------------------------------------------------------------------
    def _add_batch_loss(self, outputs: Any) -> None:
        """Add the loss a batch returned to its step's sum (on the device: no sync)."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            self._window_loss = loss if self._window_loss is None else self._window_loss + loss
            self._window_batches += 1

    def _step_loss(self, trainer: pl.Trainer) -> torch.Tensor | None:
        """The step's training loss: the mean over its batches of the loss each one returned.

        Under automatic optimization Lightning hands each batch's loss on divided by ``accumulate_grad_batches``
        (what it back-propagates), also in a last, shorter accumulation of an epoch; this undoes that.
        """
        total, count = self._window_loss, self._window_batches
        self._window_loss, self._window_batches = None, 0
        if total is None:
            return None
        divided_by = trainer.accumulate_grad_batches if trainer.lightning_module.automatic_optimization else 1
        return total if divided_by == count else total * (divided_by / count)

    def _read_step(self, trainer: pl.Trainer, loss: torch.Tensor | None, step: int, batch_idx: int) -> _AwaitingStep:
        """What is known of a step when it ends: its plain fields, its loss and its per-filter data, if any."""
        row = {"step": step, "epoch": trainer.current_epoch, "batch": batch_idx, "revision": self.revision,
               "groups": self._groups(trainer), "batch_size": self._batch_size,
               "samples_per_s": round(self._samples_per_s, 3), "time": time.time()}
        filters, self._filter_stats = self._filter_stats, None
        if filters is not None:  # named now: a structural change before the step is published changes the layers
            row["layer_names"] = [name for name, _ in self.layers]
        # Without Lightning's kept dict, the public property now: at the step's end it holds this step's values.
        metrics = dict(trainer.callback_metrics) if _lightning_metrics(trainer) is None else None
        return _AwaitingStep(row, loss, filters, metrics)

    def _complete_step(self, trainer: pl.Trainer, now: float | None = None) -> None:
        """Publish the step read last with the metrics it logged: as a ``steps`` row, or a ``step`` message when it
        has per-filter data.

        Called once Lightning has finished that step (at the next batch's end, or before anything that must follow
        it), because only then are its metrics in Lightning's own dict (see ``_lightning_metrics``).
        """
        awaiting, self._awaiting = self._awaiting, None
        if awaiting is None or self._steps is None:
            return
        values: dict[str, Any] = {} if awaiting.loss is None else {"loss": awaiting.loss}
        metrics = awaiting.metrics if awaiting.metrics is not None else _lightning_metrics(trainer) or {}
        values.update((name, value) for name, value in metrics.items() if name not in self._val_metric_names)
        if awaiting.filters is None:
            self._steps.add(awaiting.row, values.items(), time.perf_counter() if now is None else now)
        else:
            self._steps.flush()
            self._publish_step(awaiting, values)

    def _flush_steps(self, trainer: pl.Trainer) -> None:
        """Publish every step read so far, before a message that must follow them in step order. Only where
        Lightning has finished the last step: not in ``on_train_batch_end``."""
        self._complete_step(trainer)
        if self._steps is not None:
            self._steps.flush()

    def _publish_step(self, awaiting: _AwaitingStep, values: dict[str, Any]) -> None:
        """A step with per-filter data: its scalars and the filters, as one ``step`` message."""
        copy = HostCopy()
        scalar_names = add_scalars(copy, values.items())
        filters, layer_ratios = awaiting.filters
        copy.add("filters", filters)
        copy.add("layers", layer_ratios)
        body = dict(awaiting.row)
        body.update(per_filter=True, filter_fields=list(FILTER_FIELDS))
        publisher = self.publisher

        def finalize(body: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            not_finite: set = set()
            scalars = scalar_values(scalar_names, arrays, not_finite)
            if not_finite:
                body["not_finite"] = sorted(not_finite)
            body["loss"] = scalars.pop("loss", None)
            body["metrics"] = scalars
            body["drops"] = publisher._drop_counts()
            return arrays

        publisher.publish(PendingMessage("step", body, copy.launch(), finalize))

    def _groups(self, trainer: pl.Trainer) -> list[dict[str, Any]]:
        return [{"lr": _plain_float(group.get("lr")), "momentum": _momentum(group),
                 "weight_decay": _plain_float(group.get("weight_decay", 0.0))}
                for optimizer in trainer.optimizers for group in optimizer.param_groups]

    @torch.no_grad()
    def _publish_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if not self.layers:
            return
        if self._steps is not None:
            self._steps.flush()  # the steps before this one (this one's metrics are not final yet)
        copy = HostCopy()
        weight_stats, grad_stats = [], []
        for name, module in self.layers:
            weight = filters_first(module, module.weight.detach())
            grad = module.weight.grad
            grad = torch.zeros_like(weight) if grad is None else filters_first(module, grad.detach())
            copy.add(f"weight/{name}", weight)
            copy.add(f"grad/{name}", grad)
            flat = weight.reshape(weight.shape[0], -1).float()
            cosine, delta = filter_change(flat, self._snapshot_previous.get(name))
            self._snapshot_previous[name] = flat.clone()
            copy.add(f"cosine/{name}", cosine)
            copy.add(f"delta_ratio/{name}", delta)
            weight_stats.append(tensor_stats(weight))
            grad_stats.append(tensor_stats(grad))
        copy.add("weight_stats", torch.stack(weight_stats))
        copy.add("grad_stats", torch.stack(grad_stats))
        body = {"step": step, "epoch": trainer.current_epoch, "revision": self.revision,
                "layer_names": [name for name, _ in self.layers], "stat_fields": list(STAT_FIELDS)}
        if self._probe_batch is not None:
            self._add_probe_maps(copy, pl_module, body)
        elif self._probe_error:
            body["probe_error"] = self._probe_error
        self.publisher.publish(PendingMessage("snapshot", body, copy.launch()))

    def _add_probe_maps(self, copy: HostCopy, pl_module: pl.LightningModule, body: dict[str, Any]) -> None:
        images, labels = self._probe_batch
        try:
            with _own_forward(pl_module):
                activations, activation_grads = probe_pass(pl_module, self.layers, images, labels)
        except Exception as error:  # a forward that does not map images to logits: no maps, say why
            body["probe_error"] = f"probe pass failed ({type(error).__name__}: {error})"
            return
        budget = self.max_activation_bytes
        skipped = []
        for name, _ in self.layers:
            if name not in activations:
                continue
            size = activations[name].numel() * 8  # activation + its gradient, float32
            if size > budget:
                skipped.append(name)
                continue
            budget -= size
            copy.add(f"act/{name}", activations[name])
            copy.add(f"actgrad/{name}", activation_grads.get(name, torch.zeros_like(activations[name])))
        copy.add("probe_images", images)
        body["probe_labels"] = self._probe_labels
        if skipped:
            body["probe_skipped"] = skipped

    def _publish_structure(self, pl_module: pl.LightningModule) -> None:
        """Trace the model (on the probe images when there are any) and publish ``structure`` (rank 0)."""
        if self.publisher is None:
            return
        self._flush_steps(pl_module.trainer)  # steps measured before the change go out before it
        for name, module in self.layers:
            if name not in self.filter_ids or len(self.filter_ids[name]) != filter_count(module):
                count = filter_count(module)
                self.filter_ids[name] = list(range(self.next_filter_id, self.next_filter_id + count))
                self.next_filter_id += count
        images = self._probe_batch[0] if self._probe_batch is not None else None
        traced: dict[str, Any] = {"order": [name for name, _ in self.layers], "output_shapes": {}, "modules": [],
                                  "edges": [], "layer_edges": []}
        if images is not None:
            try:
                with _own_forward(pl_module):
                    traced = trace(pl_module, images, [name for name, _ in self.layers])
            except Exception as error:
                rank_zero_warn(f"revacnn: could not trace the model's graph ({type(error).__name__}: {error})")
        by_name = dict(self.layers)
        ordered = [name for name in traced["order"] if name in by_name]
        ordered += [name for name, _ in self.layers if name not in ordered]  # layers the forward never called
        self.layers = [(name, by_name[name]) for name in ordered]
        if self.probe is not None:
            self.probe.layers = list(self.layers)
        self._untrainable_shown = self._untrainable_layers()
        frozen = {**(self.engine.frozen() if self.engine is not None else {}),
                  **dict.fromkeys(self._untrainable_shown, "all")}
        layers = [layer_description(name, by_name[name], traced["output_shapes"].get(name, []),
                                    self.filter_ids[name], frozen.get(name)) for name in ordered]
        params = list(pl_module.parameters())
        body = {"revision": self.revision, "model": type(pl_module).__name__,
                "total_params": sum(p.numel() for p in params),
                "trainable_params": sum(p.numel() for p in params if p.requires_grad),
                "layers": layers, "modules": traced["modules"], "edges": traced["edges"],
                "layer_edges": traced["layer_edges"]}
        self.publisher.publish(Message("structure", body))

    def _untrainable_layers(self) -> list[str]:
        """Monitored layers none of whose parameters requires a gradient: frozen by the user's code (a fine-tuning
        backbone, ``BackboneFinetuning``) or, on one device, by a ``freeze`` command."""
        return [name for name, layer in self.layers if not any(p.requires_grad for p in layer.parameters())]

    def _publish_hparams(self, trainer: pl.Trainer) -> None:
        if self.publisher is None:
            return
        self._flush_steps(trainer)
        optimizers = trainer.optimizers
        body = {"step": trainer.global_step, "groups": self._groups(trainer),
                "optimizer": type(optimizers[0]).__name__ if optimizers else "",
                "batch_size": self._batch_size or _loader_batch_size(trainer), "max_epochs": trainer.max_epochs,
                "schedulers": [type(config.scheduler).__name__ for config in trainer.lr_scheduler_configs]}
        self.publisher.publish(Message("hparams", body))

    def _set_state(self, state: str, trainer: pl.Trainer, message: str = "") -> None:
        self._state = state
        self._flush_steps(trainer)  # a paused, stopped or failed run shows every step it took
        if self.publisher is not None:
            self.publisher.set_status(state=state, step=trainer.global_step, epoch=trainer.current_epoch,
                                      message=message)

    # -- steering -----------------------------------------------------------------------------------------------
    def _receive_commands(self, trainer: pl.Trainer, batch_idx_due: bool = True) -> list[dict[str, Any]]:
        """Commands to apply now, the same list on every rank (rank 0 broadcasts what it received)."""
        commands = self.publisher.poll_commands() if self.publisher is not None else []
        if (self.on_recording_error == "stop" and not self._stopping_for_recording and self.recorder is not None
                and self.recorder.error):
            # Rides the command broadcast, so every DDP rank stops at the same batch.
            self._stopping_for_recording = True
            rank_zero_warn(f"revacnn: the recording failed ({self.recorder.error}); stopping as asked "
                           "(on_recording_error='stop')")
            commands.append({"req": "", "id": f"recording-error-{self.run_id}", "op": "stop", "args": {}})
        if trainer.world_size > 1:
            if not batch_idx_due:
                # Nothing is applied between broadcasts: keep rank 0's commands for the next one.
                self._held_commands += commands
                return []
            commands, self._held_commands = self._held_commands + commands, []
            commands = trainer.strategy.broadcast(commands, src=0)
        return commands

    def _steer(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        due = trainer.world_size == 1 or trainer.global_step % self.command_every == 0
        for command in self._receive_commands(trainer, due):
            self._apply(trainer, pl_module, batch, command)
        while self.paused and not trainer.should_stop:
            time.sleep(0.05)
            for command in self._receive_commands(trainer):
                self._apply(trainer, pl_module, batch, command)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
               command: dict[str, Any]) -> None:
        op, args = command.get("op"), command.get("args", {})
        if op in LOOP_OPS:
            self._apply_loop_op(trainer, pl_module, command, op, args)
            return
        holder = _parameter_copy_holder(trainer) if op in STRUCTURAL_OPS else None
        if holder is not None:  # refused before anything changes, on every rank alike
            self._ack(command, "error", trainer, error=f"{op}: {holder}, which cannot follow a change of shapes (the "
                                                       "run would fail at its next use); train without it to change "
                                                       "the network's structure")
            return
        engine = self._steering_engine(trainer, pl_module, batch)
        ack = engine.apply({"id": command["id"], "op": op, "args": args})
        if not ack.get("ok"):
            self._ack(command, "error", trainer, error=ack.get("error") or "the steering engine refused it")
            return
        if ack.get("structural"):
            self._after_structural_change(trainer, pl_module, ack)
        elif op in ("freeze", "unfreeze"):
            self._telemetry(trainer, lambda: self._publish_structure(pl_module))  # the frozen marks changed
        if op == "set_hparams":
            self._telemetry(trainer, lambda: self._publish_hparams(trainer))
        result = {key: value for key, value in ack.items() if key not in ("id", "op", "ok", "error")}
        result["revision"] = self.revision
        self._ack(command, "done", trainer, result=result)

    def _apply_loop_op(self, trainer: pl.Trainer, pl_module: pl.LightningModule, command: dict[str, Any], op: str,
                       args: dict[str, Any]) -> None:
        unexpected = sorted(set(args) - ({"batch_size"} if op == "set_batch_size" else set()))
        if unexpected:
            self._ack(command, "error", trainer, error=f"{op} takes no argument(s) {', '.join(unexpected)}")
            return
        if op == "pause":
            self.paused = True
            self._set_state("paused", trainer)
        elif op == "resume":
            self.paused = False
            self._set_state("running", trainer)
        elif op == "stop":
            self.paused = False
            trainer.should_stop = True
            self._set_state("stopping", trainer)
        elif op == "snapshot":
            self._snapshot_requested = True
        elif op == "set_batch_size":
            self._set_batch_size(trainer, pl_module, command, args)
            return
        self._ack(command, "done", trainer)

    def _set_batch_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule, command: dict[str, Any],
                        args: dict[str, Any]) -> None:
        from pytorch_lightning.utilities.parsing import lightning_getattr, lightning_hasattr, lightning_setattr

        size = args.get("batch_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            self._ack(command, "error", trainer, error=f"batch_size must be an integer ≥ 1, got {size!r}")
            return
        if not lightning_hasattr(pl_module, "batch_size"):
            self._ack(command, "error", trainer, error="neither the LightningModule, its hparams nor the datamodule "
                                                       "has a 'batch_size' attribute to change")
            return
        before = lightning_getattr(pl_module, "batch_size")
        lightning_setattr(pl_module, "batch_size", size)
        self._pending_batch_size = (command, size, before)  # acknowledged when the next epoch starts with it

    def _steering_engine(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any):
        if self.engine is None:
            from revacnn.steering import SteeringEngine

            tensors = _first_batch_tensors(batch)
            example = (self._probe_batch[0] if self._probe_batch is not None
                       else tensors[0][:2] if tensors is not None else None)
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            self.engine = SteeringEngine(pl_module, list(trainer.optimizers), schedulers, example_input=example,
                                         distributed=trainer.world_size > 1)
            self.engine.changelog = self.changelog
        return self.engine

    def _after_structural_change(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 ack: dict[str, Any]) -> None:
        """Follow a change of shapes: filter ids, hooks, DDP wrapper, compiled graphs, and a new structure."""
        # insert_layer moves its anchor into a Sequential (``conv2`` → ``conv2.0``): the same filters, new name
        for old_name, new_name in ((ack.get("changes") or {}).get("renamed") or {}).items():
            for by_layer in (self.filter_ids, self._snapshot_previous):
                if old_name in by_layer:
                    by_layer[new_name] = by_layer.pop(old_name)
        for name, mapping in (ack.get("filter_maps") or {}).items():
            old = self.filter_ids.get(name, [])
            kept = [old[index] for index in mapping.get("kept", []) if index < len(old)]
            added = int(mapping.get("added", 0))
            self.filter_ids[name] = kept + list(range(self.next_filter_id, self.next_filter_id + added))
            self.next_filter_id += added
        self.revision += 1
        self.layers = discover_layers(pl_module, self.layer_selectors)
        self._snapshot_previous = {name: value for name, value in self._snapshot_previous.items()
                                   if name in dict(self.layers)}
        if trainer.world_size > 1:
            _rewrap_ddp(trainer)
        if hasattr(torch, "compiler"):
            torch.compiler.reset()
        if self.probe is not None:
            self.probe.reset(self.layers)
        if self.publisher is not None:
            self._telemetry(trainer, lambda: self._publish_structure(pl_module))
            self._telemetry(trainer, lambda: self._publish_hparams(trainer))

    # -- a fault in telemetry never ends the training ---------------------------------------------------------
    def _telemetry(self, trainer: pl.Trainer, work: Callable[[], None]) -> None:
        """Do ``work`` (measure or publish) unless telemetry has stopped. An error in it stops telemetry for the rest
        of the run — a warning, its traceback logged, ``telemetry_error`` in the heartbeat — instead of ending the
        training: steering, acks and the heartbeat go on."""
        if self._telemetry_error is not None:
            return
        try:
            work()
        except Exception as error:  # noqa: BLE001 - a fault of the tool must not cost the user's run
            self._telemetry_error = f"{type(error).__name__}: {error}"[:1000]
            log.error("revacnn: telemetry failed", exc_info=error)
            rank_zero_warn(f"revacnn: telemetry stopped after an internal error ({self._telemetry_error}); the "
                           "training goes on and commands still work. The traceback is logged above: please report it")
            if self.probe is not None:
                self.probe.detach()
                self.probe = None
            self._awaiting = self._filter_stats = None
            if self.publisher is not None:
                self.publisher.set_status(telemetry_error=self._telemetry_error)
            try:  # the steps read before the fault still go out
                if self._steps is not None:
                    self._steps.flush()
            except Exception:  # noqa: BLE001
                log.debug("revacnn: the steps read before the fault could not be sent", exc_info=True)

    def _ack(self, command: dict[str, Any], status: str, trainer: pl.Trainer, error: str | None = None,
             result: dict[str, Any] | None = None) -> None:
        if self.publisher is not None:
            self.publisher.send_ack(command, status, step=trainer.global_step, error=error, result=result)


def _parameter_copy_holder(trainer: pl.Trainer) -> str | None:
    """Which callback of the run keeps its own copy of the model's parameters, keyed to their shapes, and what."""
    from pytorch_lightning.callbacks import ModelPruning, StochasticWeightAveraging

    for callback in trainer.callbacks:
        if isinstance(callback, StochasticWeightAveraging):
            return "the StochasticWeightAveraging callback keeps a running average of the model's weights"
        if isinstance(callback, ModelPruning):
            return "the ModelPruning callback keeps masks and original weights of the layers it prunes"
    return None


def _loader_batch_size(trainer: pl.Trainer) -> int:
    loader = getattr(trainer, "train_dataloader", None)
    return int(getattr(loader, "batch_size", 0) or 0)


def _rewrap_ddp(trainer: pl.Trainer) -> None:
    """Re-register parameters with DDP after shapes changed (resizing without it lets ranks silently diverge)."""
    for parameter in trainer.lightning_module.parameters():
        parameter.grad = None
    trainer.strategy.model = trainer.lightning_module
    trainer.strategy.configure_ddp()
