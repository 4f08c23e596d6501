"""Undo and rewind in a Lightning run: restore points taken before every changing command and on a schedule, the
``undo`` and ``rewind`` commands, and the tree of branches a run becomes when it goes back.

``RunHistory`` keeps the current *path*: the restore points the present state descends from. ``undo`` restores the
most recent point on the path that was taken before a command (the command is taken back, with every step trained
since); ``rewind`` restores a point by id, or the latest point on the path at or before a step. Either way the
trainer's step goes back to the point's and training goes on as a new branch (``branches``); the data loader goes
on where it was (the epoch is not rewound).

What the callback adds to a point (``extra``): the change log, filter ids, frozen layers and filters, and the
``batch_size`` attribute; the model, optimizers, schedulers and RNG states are ``restore.capture``'s.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from . import commands as C
from .errors import SteeringError
from .restore import RestorePoint, capture, restore
from .restore_store import RestorePolicy, RestoreStore

UNDO, REWIND = "undo", "rewind"


def set_global_step(trainer: pl.Trainer, step: int) -> None:
    """Set ``trainer.global_step`` (the optimizer steps Lightning counts; also the logger's step) to ``step``."""
    loop = trainer.fit_loop.epoch_loop
    if trainer.lightning_module.automatic_optimization:
        progress = loop.automatic_optimization.optim_progress.optimizer.step
    else:
        progress = loop.manual_optimization.optim_step_progress
    delta = step - trainer.global_step
    for tracker in (progress.total, progress.current):
        for attr in ("ready", "started", "processed", "completed"):
            if hasattr(tracker, attr):
                setattr(tracker, attr, max(0, getattr(tracker, attr) + delta))
    loop._batches_that_stepped = max(0, loop._batches_that_stepped + delta)


class RunHistory:
    """Restore points of one run, the current path through them and the branches."""

    def __init__(self, policy: RestorePolicy, spill_dir: Path | None) -> None:
        self.policy = policy
        self._temp = None
        if spill_dir is None:   # a rank without the run directory spills to a directory of its own
            self._temp = tempfile.TemporaryDirectory(prefix="revacnn-restore-")
            spill_dir = Path(self._temp.name)
        self.store = RestoreStore(policy, spill_dir)
        self.path: list[int] = []          # ids of the points the present state descends from, oldest first
        self.commands: dict[int, dict[str, Any] | None] = {}   # point id -> the command it was taken before
        self.branch = 0
        self.branches: list[dict[str, Any]] = [{"branch": 0, "parent": None, "from_step": 0, "at_step": None,
                                                "restore_point": None, "reason": "start"}]
        self._next_id = 1
        self._last_periodic: int | None = None

    # --------------------------------------------------------------------------------------- taking points
    def take(self, trainer: pl.Trainer, pl_module: pl.LightningModule, kind: str,
             extra: tuple[dict[str, Any], dict[str, Any]], command: dict[str, Any] | None = None) -> RestorePoint:
        """A restore point now; ``extra`` is ``steering_extra``'s ``(plain, objects)``."""
        extra, objects = extra
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        point = capture(self._next_id, trainer.global_step, trainer.current_epoch, kind, pl_module,
                        trainer.optimizers, schedulers,
                        command={k: command.get(k) for k in ("id", "op", "args")} if command else None, extra=extra)
        self._next_id += 1
        point.ancestors, point.branch, point.objects = list(self.path), self.branch, objects
        self.path.append(point.id)
        self.commands[point.id] = point.command   # kept after the point itself is dropped (undo says so)
        self.store.add(point)
        return point

    def periodic_due(self, step: int) -> bool:
        every = self.policy.every_steps
        return every > 0 and step % every == 0 and step != self._last_periodic

    def take_periodic(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      extra: tuple[dict[str, Any], dict[str, Any]]) -> None:
        self._last_periodic = trainer.global_step
        self.take(trainer, pl_module, "periodic", extra)

    def discard(self, point: RestorePoint) -> None:
        """Forget the point taken before a command that was refused (nothing changed)."""
        if self.path and self.path[-1] == point.id:
            self.path.pop()
        self.commands.pop(point.id, None)
        self.store.discard(point.id)

    # --------------------------------------------------------------------------------------- going back
    def target(self, op: str, args: dict[str, Any]) -> RestorePoint:
        """The point ``undo`` or ``rewind`` with ``args`` goes back to."""
        if op == UNDO:
            if args:
                raise SteeringError(f"undo takes no arguments, got {', '.join(sorted(map(str, args)))}")
            last = next((i for i in reversed(self.path) if self.commands.get(i)), None)
            if last is None:
                raise SteeringError("undo: no change to take back on this branch")
            point = self.store.get(last)
            if point is None:
                raise SteeringError(f"undo: the restore point before the last change ({self.commands[last]['op']}) "
                                    "was dropped (the caps of RestorePolicy were reached); rewind to an older one")
            return point
        unknown = sorted(set(map(str, args)) - {"point", "step"})
        if unknown or len(args) != 1:
            raise SteeringError(f"rewind: give exactly one of 'point' (a restore point id) or 'step', got "
                                f"{', '.join(sorted(map(str, args))) or 'none'}")
        if "point" in args:
            point_id = C.get_int(args, "point", REWIND, minimum=1)
            point = self.store.get(point_id)
            if point is None:
                raise SteeringError(f"rewind: no restore point {point_id} (kept: {self.kept_ids() or 'none'})")
            return point
        step = C.get_int(args, "step", REWIND, minimum=0)
        for point_id in reversed(self.path):
            point = self.store.get(point_id)
            if point is not None and point.step <= step:
                return point
        raise SteeringError(f"rewind: no restore point at or before step {step} on this branch "
                            f"(kept: {self.kept_ids() or 'none'})")

    def before_divergence(self, bad_from: int) -> RestorePoint | None:
        """The latest point on the path whose state came before the state at step ``bad_from`` that diverged: one
        at an earlier step, or one taken before a command at that step (the command may have made it diverge)."""
        for point_id in reversed(self.path):
            point = self.store.get(point_id)
            if point is not None and (point.step < bad_from or point.step == bad_from and point.kind == "command"):
                return point
        return None

    def kept_ids(self) -> str:
        return ", ".join(f"{p.id} (step {p.step})" for p in sorted(self.store.points.values(), key=lambda p: p.id))

    def go_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: RestorePoint,
                reason: str) -> dict[str, Any]:
        """Restore ``point`` (model, optimizers, schedulers, RNG, step) and start a new branch from it; returns
        what the ack says was restored (``extra`` is the caller's to put back)."""
        at_step = trainer.global_step
        # the changes in effect now that the point's state lacks: those after its ancestors on the current path
        earlier = set(point.ancestors)
        taken_back = [self.commands[i] for i in self.path if i not in earlier and self.commands.get(i)]
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        restore(point, self.store.tensors(point), pl_module, trainer.optimizers, schedulers)
        set_global_step(trainer, point.step)
        self.path = list(point.ancestors) + ([] if point.kind == "command" else [point.id])
        parent, self.branch = self.branch, len(self.branches)
        branch = {"branch": self.branch, "parent": parent, "from_step": point.step, "at_step": at_step,
                  "restore_point": point.id, "reason": reason}
        self.branches.append(branch)
        return {"restore_point": point.summary(), "step": point.step, "taken_back": copy.deepcopy(taken_back),
                "steps_taken_back": max(0, at_step - point.step), "branch": dict(branch)}

    # ------------------------------------------------------------------------------- the callback's entry points
    def before_command(self, trainer, pl_module, command, engine, model_history) -> RestorePoint:
        """The restore point taken before a changing command (``discard`` it if the command is refused)."""
        return self.take(trainer, pl_module, "command", steering_extra(engine, model_history, pl_module), command)

    def periodic(self, trainer, pl_module, engine, model_history) -> None:
        """A periodic restore point, if one is due at this step."""
        if self.periodic_due(trainer.global_step):
            self.take_periodic(trainer, pl_module, steering_extra(engine, model_history, pl_module))

    def apply(self, trainer, pl_module, command, engine, model_history, loop, ack) -> dict[str, Any]:
        """Apply ``undo`` or ``rewind``; returns the ack's result (raises ``SteeringError`` for a refused one,
        having changed nothing). ``command["reason"]`` (the divergence guard's) names the branch's reason."""
        point = self.target(command["op"], command.get("args") or {})
        result = self.go_back(trainer, pl_module, point, command.get("reason") or command["op"])
        put_back_extra(point, engine, model_history)
        if "batch_size" in point.extra:
            loop.put_back_batch_size(pl_module, point.extra["batch_size"], ack)
        return result

    def close(self) -> None:
        self.store.close()
        if self._temp is not None:
            self._temp.cleanup()
            self._temp = None


def steering_extra(engine, history, pl_module: pl.LightningModule) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a restore point keeps besides tensors, as ``(plain, objects)``: the change log, the filter ids and the
    ``batch_size`` attribute (deep-copied), and what is frozen, keyed by module object (the objects come back with
    the point, so they are kept as they are)."""
    from pytorch_lightning.utilities.parsing import lightning_getattr, lightning_hasattr

    plain: dict[str, Any] = {"changelog": history.changelog, "filter_ids": history.filter_ids}
    if lightning_hasattr(pl_module, "batch_size"):
        plain["batch_size"] = lightning_getattr(pl_module, "batch_size")
    objects = engine.freezer.held() if engine is not None else {"layers": {}, "filters": {}}
    return plain, objects


def put_back_extra(point: RestorePoint, engine, history) -> None:
    """Put the change log, filter ids and frozen sets of ``point`` back (the change log in place: the engine and
    the checkpoints share the list). Filter ids are the point's; new ids keep counting up (never reused), and the
    structure's revision goes up (the structure changed)."""
    history.changelog[:] = copy.deepcopy(point.extra["changelog"])
    history.filter_ids = copy.deepcopy(point.extra["filter_ids"])
    history.revision += 1
    if engine is not None:
        engine.freezer.hold(point.objects)

