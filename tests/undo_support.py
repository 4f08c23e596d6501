"""Helpers of the undo and rewind tests (not a test module): a script that sends commands one at a time over the
run's control socket, and observers that copy the whole training state at each batch's start, before and after the
revacnn callback steered."""

from __future__ import annotations

import copy
import time

import pytorch_lightning as pl
import torch

from revacnn.demo import ClassifierModule
from revacnn.wire.client import RunClient


class ScheduledClassifier(ClassifierModule):
    """The demo classifier with a StepLR scheduler stepped every optimizer step (so its state moves)."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def training_state(trainer: pl.Trainer, pl_module: pl.LightningModule, callback=None) -> dict:
    """Everything undo must put back, copied: the module tree, weights, requires_grad, frozen filters, optimizer
    and scheduler state, and the step."""
    engine = getattr(callback, "engine", None)
    return {"step": trainer.global_step, "frozen": engine.frozen() if engine is not None else {},
            "modules": [(name, type(m).__name__) for name, m in pl_module.named_modules()],
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "requires_grad": {n: p.requires_grad for n, p in pl_module.named_parameters()},
            "optimizers": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
            "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs]}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype.is_floating_point else flat


def same(a, b) -> bool:
    """Bitwise equality of nested states (tensors: same dtype, shape and bits)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bits(a), _bits(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


class Observer(pl.Callback):
    """Copies the training state at every batch's start (placed before the revacnn callback: the state it steers
    from; after it: the state it left)."""

    def __init__(self, callback) -> None:
        self.callback = callback
        self.states: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append(training_state(trainer, pl_module, self.callback))


def steered_batches(before: Observer, after: Observer) -> list[int]:
    """The batches at whose start the callback changed something."""
    return [i for i, (a, b) in enumerate(zip(before.states, after.states)) if not same(a, b)]


class Sequence(pl.Callback):
    """Sends ``commands`` one at a time: each once the previous one's final ack came back and ``gap`` more batches
    trained; collects the final acks and the losses."""

    def __init__(self, callback, commands: list[tuple[str, dict]], gap: int = 3, start: int = 2) -> None:
        self.callback, self.commands, self.gap = callback, list(commands), gap
        self.client: RunClient | None = None
        self.acks: list[dict] = []
        self.losses: list[float] = []
        self.steps: list[int] = []     # the step each loss was recorded at (trainer.global_step at batch end)
        self._wait = start
        self._outstanding: str | None = None

    def on_train_start(self, trainer, pl_module):
        self.client = RunClient(self.callback.connection_file)
        self.client.connect()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.steps.append(trainer.global_step)
        self._drain(0.0)
        if self._outstanding is None and self.commands:
            self._wait -= 1
            if self._wait <= 0:
                op, args = self.commands.pop(0)
                self._outstanding = self.client.send_command(op, args)
                self._wait = self.gap
        elif self._outstanding is not None:   # the command waits for its ack: give the I/O thread a moment
            self._drain(0.5)

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            message = self.client.recv(0.01)
            if (message is not None and message.type == "ack" and message.body["status"] != "queued"
                    and all(ack["id"] != message.body["id"] for ack in self.acks)):   # (a reply repeats it)
                self.acks.append(message.body)
                if message.body["id"] == self._outstanding:
                    self._outstanding = None
                    return
            if message is None and time.monotonic() >= deadline:
                return

    def on_train_end(self, trainer, pl_module):
        self._drain(1.0)
        self.client.close()

    def on_exception(self, trainer, pl_module, exception):
        if self.client is not None:
            self.client.close()
