"""Steering through the callback and the wire: loop ops, errors as acks, checkpoints of steered runs that resume
with ``trainer.fit(ckpt_path=…)`` and load offline with ``revacnn.load_steered``."""

from __future__ import annotations

import time

import pytest
import pytorch_lightning as pl
import torch

from revacnn import ReVACNNCallback, load_steered
from revacnn.wire.client import RunClient
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet, SmallResNet

from helpers import quiet_trainer


class Script(pl.Callback):
    """Sends commands over the run's control socket at given steps and collects every final ack."""

    def __init__(self, callback: ReVACNNCallback, plan: dict[int, list[tuple[str, dict]]]) -> None:
        self.callback = callback
        self.plan = plan
        self.client: RunClient | None = None
        self.acks: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        self.client = RunClient(self.callback.connection_file)
        self.client.connect()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for op, args in self.plan.get(trainer.global_step, []):
            self.client.send_command(op, args)
        self._drain(0.0)

    def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            message = self.client.recv(0.01)
            if message is not None and message.type == "ack" and message.body["status"] != "queued":
                if all(ack["id"] != message.body["id"] for ack in self.acks):
                    self.acks.append(message.body)
            if message is None and time.monotonic() >= deadline:
                return

    def on_train_end(self, trainer, pl_module):
        self._drain(1.0)
        self.client.close()

    def on_exception(self, trainer, pl_module, exception):
        if self.client is not None:  # a socket left open keeps its context's term() waiting at garbage collection
            self.client.close()


def fit(root, plan, epochs=2, batches=10, ckpt_path=None, model=None, **callback_args):
    callback = ReVACNNCallback(filters_every=5, snapshot_every=0, record=False, **callback_args)
    script = Script(callback, plan)
    model = model or ClassifierModule(ReVACNNNet(), lr=0.05)
    trainer = quiet_trainer(max_epochs=epochs, limit_train_batches=batches, limit_val_batches=2,
                            callbacks=[callback, script], default_root_dir=root, num_sanity_val_steps=0)
    trainer.fit(model, DigitsDataModule(batch_size=32), ckpt_path=ckpt_path)
    return trainer, model, script


def test_errors_come_back_as_acks_and_training_goes_on(tmp_path):
    trainer, model, script = fit(tmp_path, {2: [("explode", {}), ("widen", {"layer": "net.nope", "count": 1}),
                                                ("set_batch_size", {"batch_size": 0}), ("pause", {"x": 1})]})
    assert trainer.global_step == 20
    errors = {ack["op"]: ack["error"] for ack in script.acks}
    assert [ack["status"] for ack in script.acks] == ["error"] * 4
    assert "explode" in errors["explode"]
    assert "net.nope" in errors["widen"]
    assert "batch_size" in errors["set_batch_size"]
    assert "x" in errors["pause"]
    assert model.net.conv2.weight.shape[0] == 20


def test_stop_ends_fit_gracefully(tmp_path):
    trainer, _, script = fit(tmp_path, {3: [("stop", {})]}, epochs=5)
    assert [(ack["op"], ack["status"]) for ack in script.acks] == [("stop", "done")]
    # applied before a batch (the ack's step); that batch completes, then fit ends
    assert trainer.global_step == script.acks[0]["step"] + 1 < 50


def test_batch_size_changes_at_the_next_epoch_and_is_acknowledged_then(tmp_path):
    seen = []

    class Sizes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, len(batch[0])))

    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    script = Script(callback, {2: [("set_batch_size", {"batch_size": 16})]})
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=1,
                            callbacks=[callback, script, Sizes()], default_root_dir=tmp_path, num_sanity_val_steps=0,
                            enable_model_summary=True)
    trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=32))
    assert {size for epoch, size in seen if epoch == 0} == {32}
    assert {size for epoch, size in seen if epoch == 1} == {16}
    ack = next(ack for ack in script.acks if ack["op"] == "set_batch_size")
    assert ack["status"] == "done" and ack["result"] == {"batch_size": 16, "epoch": 1}


class FixedBatches(DigitsDataModule):
    """Has a ``batch_size`` attribute, but its training loader does not read it."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=32, shuffle=True)


def test_a_batch_size_the_training_loader_ignores_is_refused_and_put_back(tmp_path):
    """The ack said done, and every later batch still had 32 images."""
    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    script = Script(callback, {2: [("set_batch_size", {"batch_size": 16})]})
    data = FixedBatches(batch_size=32)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=1, callbacks=[callback, script],
                            default_root_dir=tmp_path, num_sanity_val_steps=0, enable_model_summary=True)
    trainer.fit(ClassifierModule(ReVACNNNet()), data)
    ack = next(ack for ack in script.acks if ack["op"] == "set_batch_size")
    assert ack["status"] == "error" and "still has batch size 32" in ack["error"], ack
    assert data.batch_size == 32


def test_per_filter_steps_match_the_structure_they_were_measured_with(tmp_path):
    """A step's per-filter data is published once Lightning has finished the step, after a command applied before
    the next batch may have changed the layers: its names and widths must still be those of its own revision."""
    from conftest import Listener

    callback = ReVACNNCallback(filters_every=1, snapshot_every=0, record=False)
    listener = Listener(lambda: callback.connection_file).start()
    script = Script(callback, {3: [("insert_layer", {"after": "net.conv1"})]})
    trainer = quiet_trainer(max_steps=8, callbacks=[callback, script], default_root_dir=tmp_path, limit_val_batches=0,
                            num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(ReVACNNNet(), lr=0.05), DigitsDataModule(batch_size=32))
    messages = listener.join()
    assert [ack["status"] for ack in script.acks] == ["done"], script.acks
    structures = {m.body["revision"]: m.body["layers"] for m in messages if m.type == "structure"}
    assert [layer["name"] for layer in structures[1]] == ["net.conv1", "net.conv1.inserted.conv", "net.conv2",
                                                          "net.conv3", "net.fc"]
    steps = [m for m in messages if m.type == "step"]
    assert [m.body["step"] for m in steps] == list(range(1, 9))
    revisions = [m.body["revision"] for m in steps]
    assert revisions == sorted(revisions) and revisions[0] == 0 and revisions[-1] == 1
    for m in steps:
        layers = structures[m.body["revision"]]
        assert m.body["layer_names"] == [layer["name"] for layer in layers], m.body["step"]
        assert m.arrays["filters"].shape == (5, sum(layer["out"] for layer in layers))
    # conv1 keeps its name and its filters' ids; the conv inserted after it gets fresh ids
    ids = {revision: {layer["name"]: layer["filter_ids"] for layer in layers} for revision, layers in structures.items()}
    assert ids[1]["net.conv1"] == ids[0]["net.conv1"] == list(range(16))
    assert ids[1]["net.conv2"] == ids[0]["net.conv2"]
    assert set(ids[1]["net.conv1.inserted.conv"]).isdisjoint(i for layer in ids[0].values() for i in layer)


def test_steered_checkpoint_resumes_and_loads_offline_with_identical_outputs(tmp_path):
    torch.manual_seed(3)
    plan = {3: [("widen", {"layer": "net.conv2", "count": 3})],
            5: [("remove_filters", {"layer": "net.conv3", "filters": [0, 7]})],
            6: [("insert_layer", {"after": "net.conv1"})]}
    trainer, model, script = fit(tmp_path, plan, epochs=1, batches=10)
    assert [ack["status"] for ack in script.acks] == ["done"] * 3, script.acks
    path = tmp_path / "steered.ckpt"
    trainer.save_checkpoint(path)
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        expected = model(images)

    offline = load_steered(path, ClassifierModule(ReVACNNNet())).eval()
    with torch.no_grad():
        assert torch.equal(offline(images), expected)

    resumed_model = ClassifierModule(ReVACNNNet(), lr=0.05)
    captured = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.eval()
            with torch.no_grad():
                captured["outputs"] = pl_module(images)
            pl_module.train()
            state = trainer.optimizers[0].state_dict()["state"]  # live tensors: clone before training moves them
            captured["optimizer"] = {key: {name: value.clone() for name, value in entry.items()}
                                     for key, entry in state.items()}

    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    resumed = quiet_trainer(max_epochs=2, limit_train_batches=10, limit_val_batches=1, callbacks=[callback, Capture()],
                            default_root_dir=tmp_path, num_sanity_val_steps=0, enable_model_summary=True)
    resumed.fit(resumed_model, DigitsDataModule(batch_size=32), ckpt_path=path)
    assert torch.equal(captured["outputs"], expected)
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]["state"]
    for key, state in saved.items():
        assert torch.equal(captured["optimizer"][key]["momentum_buffer"], state["momentum_buffer"])
    assert resumed.global_step == 20
    assert resumed_model.net.conv2.weight.shape[0] == 23


def test_a_weights_only_checkpoint_of_a_steered_model_loads_offline(tmp_path):
    """Lightning leaves callbacks out of ``save_weights_only`` checkpoints: the change log was missing there, and
    the steered weights could not be loaded into a fresh model."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    torch.manual_seed(3)
    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    script = Script(callback, {3: [("widen", {"layer": "net.conv2", "count": 2})]})
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True)
    model = ClassifierModule(ReVACNNNet(), lr=0.05)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=1,
                            callbacks=[callback, script, saver], default_root_dir=tmp_path, num_sanity_val_steps=0,
                            enable_checkpointing=True)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert [ack["status"] for ack in script.acks] == ["done"]
    checkpoint = torch.load(saver.best_model_path, weights_only=True)
    assert "optimizer_states" not in checkpoint and len(checkpoint["revacnn"]["changelog"]) == 1
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(images)
        assert torch.equal(load_steered(saver.best_model_path, ClassifierModule(ReVACNNNet())).eval()(images),
                           expected)
    assert "on_load_checkpoint" not in vars(model)                     # put back; the save hook stays (below)


def test_a_steered_model_saves_its_change_log_after_the_fit_and_into_the_next_one(tmp_path):
    """Once the fit was over, the module's hooks were put back: a weights-only checkpoint saved then, or any
    checkpoint of a second fit with a new callback, held steered shapes without the log that rebuilds them."""
    import copy
    import pickle

    torch.manual_seed(3)
    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    script = Script(callback, {3: [("widen", {"layer": "net.conv2", "count": 2})]})
    model = ClassifierModule(ReVACNNNet(), lr=0.05)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=6, limit_val_batches=0, callbacks=[callback, script],
                            default_root_dir=tmp_path)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert [ack["status"] for ack in script.acks] == ["done"]
    images = torch.randn(4, 3, 32, 32)
    after_fit = tmp_path / "after_fit.ckpt"
    trainer.save_checkpoint(after_fit, weights_only=True)
    with torch.no_grad():
        expected = model.eval()(images)
        assert torch.equal(load_steered(after_fit, ClassifierModule(ReVACNNNet())).eval()(images), expected)
    assert copy.deepcopy(model).net.conv2.weight.shape[0] == 22 and pickle.loads(pickle.dumps(model)) is not None

    second = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)   # a new Trainer, a new callback
    script = Script(second, {2: [("widen", {"layer": "net.conv3", "count": 1})]})
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, callbacks=[second, script],
                            default_root_dir=tmp_path)
    trainer.fit(model.train(), DigitsDataModule(batch_size=32))
    assert [ack["status"] for ack in script.acks] == ["done"]
    full = tmp_path / "second.ckpt"
    trainer.save_checkpoint(full)
    assert [entry["layer"] for entry in torch.load(full, weights_only=True)["revacnn"]["changelog"]] == \
        ["net.conv2", "net.conv3"]
    with torch.no_grad():
        assert torch.equal(load_steered(full, ClassifierModule(ReVACNNNet())).eval()(images), model.eval()(images))
    assert len(vars(model)["on_save_checkpoint"].changelog) == 2      # one hook left, not one per fit
    assert vars(model)["on_save_checkpoint"].own_hook is None


def test_the_same_steered_instance_resumes_from_its_own_checkpoint(tmp_path):
    """Fitting the steered module itself again from its checkpoint replayed the change log onto shapes that had
    it already (removing filters a second time), and the weights no longer fitted."""
    torch.manual_seed(3)
    plan = {3: [("remove_filters", {"layer": "net.conv2", "filters": [0, 5]})]}
    model = ClassifierModule(ReVACNNNet(), lr=0.05)
    trainer, model, script = fit(tmp_path, plan, epochs=1, batches=6, model=model)
    assert [ack["status"] for ack in script.acks] == ["done"]
    path = tmp_path / "steered.ckpt"
    trainer.save_checkpoint(path)
    trainer, model, _ = fit(tmp_path, {}, epochs=2, batches=6, model=model, ckpt_path=path)
    assert trainer.global_step == 12 and model.net.conv2.weight.shape[0] == 18


class DecayGroups(ClassifierModule):
    """Weight decay by name (every ``…weight``, biases none) or by ndim (``p.ndim > 1``: conv and linear weights
    only, timm's rule), as recipes configure it."""

    def __init__(self, net, rule: str) -> None:
        super().__init__(net, lr=0.05)
        self.rule = rule

    def configure_optimizers(self):
        decays = [name.endswith("weight") if self.rule == "name" else p.ndim > 1 for name, p in self.named_parameters()]
        params = list(self.parameters())
        return torch.optim.AdamW([{"params": [p for p, d in zip(params, decays) if d], "weight_decay": 0.05},
                                  {"params": [p for p, d in zip(params, decays) if not d], "weight_decay": 0.0}],
                                 lr=1e-3)


@pytest.mark.parametrize("net, rule, after, batchnorm", [
    (ReVACNNNet, "name", "net.conv2", False), (ReVACNNNet, "ndim", "net.conv2", True),
    (SmallResNet, "name", "net.layer1.0.conv2", True), (SmallResNet, "ndim", "net.layer1.0.conv1", True)])
def test_a_run_with_decay_groups_resumes_after_insert_layer(tmp_path, net, rule, after, batchnorm):
    """An inserted layer's parameters joined the group of the parameter before them: the new conv's weight went
    with the anchor's bias (no decay), so the optimizer ``configure_optimizers`` builds on resume had groups of
    other sizes than the saved state, and the resume failed ("a parameter group that doesn't match the size")."""
    torch.manual_seed(3)
    trainer, model, script = fit(tmp_path, {3: [("insert_layer", {"after": after, "batchnorm": batchnorm})]},
                                 epochs=1, batches=6, model=DecayGroups(net(), rule))
    assert [ack["status"] for ack in script.acks] == ["done"], script.acks
    decayed = {name for name, p in model.named_parameters()
               if any(p is q for q in trainer.optimizers[0].param_groups[0]["params"])}
    inserted = script.acks[0]["result"]["changes"]["inserted"][0]
    assert f"{inserted}.weight" in decayed and f"{inserted}.bias" not in decayed
    path = tmp_path / "steered.ckpt"
    trainer.save_checkpoint(path)
    resumed, resumed_model, _ = fit(tmp_path, {}, epochs=2, batches=6, ckpt_path=path,
                                    model=DecayGroups(net(), rule))
    assert resumed.global_step == 12
    for mine, saved in zip(resumed.optimizers[0].param_groups, trainer.optimizers[0].param_groups):
        assert [p.shape for p in mine["params"]] == [p.shape for p in saved["params"]]


@pytest.mark.parametrize("holder", ["StochasticWeightAveraging", "ModelPruning"])
def test_structural_changes_are_refused_next_to_a_callback_that_copies_the_parameters(tmp_path, holder):
    """SWA averages into a copy of the model and ModelPruning keeps original weights: a widen was acknowledged and
    the run then died in that callback (SWA at its first average, ModelPruning at the first checkpoint) with a
    shape mismatch. Structural commands are now refused with the reason; the others still apply."""
    from pytorch_lightning.callbacks import ModelPruning, StochasticWeightAveraging

    other = (StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1) if holder == "StochasticWeightAveraging"
             else ModelPruning("l1_unstructured", amount=0.2))
    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    script = Script(callback, {2: [("widen", {"layer": "net.conv2", "count": 2}),
                                   ("remove_filters", {"layer": "net.conv2", "filters": [0]}),
                                   ("insert_layer", {"after": "net.conv2"}), ("remove_layer", {"layer": "net.conv3"}),
                                   ("freeze", {"layers": ["net.conv1"]})]})
    model = ClassifierModule(ReVACNNNet())
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=1,
                            callbacks=[callback, script, other], default_root_dir=tmp_path, num_sanity_val_steps=0,
                            enable_checkpointing=True)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert trainer.global_step == 12
    acks = {ack["op"]: ack for ack in script.acks}
    assert acks["freeze"]["status"] == "done"
    for op in ("widen", "remove_filters", "insert_layer", "remove_layer"):
        assert acks[op]["status"] == "error"
        assert acks[op]["error"].startswith(f"{op}: the {holder} callback keeps"), acks[op]["error"]
    assert sorted(tuple(p.shape) for p in model.net.conv2.parameters()) == [(20,), (20, 16, 5, 5)]
    assert isinstance(model.net.conv3, torch.nn.Conv2d)


class FreezeConv2At(pl.Callback):
    """Freezes ``net.conv2`` the way fine-tuning code does (``requires_grad=False``) at a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.net.conv2.requires_grad_(False)


def test_layers_the_module_freezes_are_shown_frozen_and_can_be_unfrozen(tmp_path):
    """Layers frozen by the user's code (a fine-tuning backbone) were shown as training, and ``unfreeze`` left
    them frozen. The structure now marks them, follows a freeze made during the run (at the next per-filter step),
    and ``unfreeze`` makes such a layer train again."""
    from revacnn.recording.reader import open_run

    model = ClassifierModule(ReVACNNNet(), lr=0.05)
    model.net.conv1.requires_grad_(False)                # configure_optimizers still passes every parameter
    callback = ReVACNNCallback(filters_every=2, snapshot_every=0)
    script = Script(callback, {12: [("unfreeze", {"layers": ["net.conv1"]})]})
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=10, limit_val_batches=0,
                            callbacks=[callback, script, FreezeConv2At(5)], default_root_dir=tmp_path)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    frozen = [{layer["name"]: layer["frozen"] for layer in body["layers"] if layer["frozen"]}
              for _, body in open_run(callback.run_dir).structures()]
    assert frozen == [{"net.conv1": "all"}, {"net.conv1": "all", "net.conv2": "all"},
                                              {"net.conv2": "all"}], frozen
    assert [ack["result"]["changes"]["were_frozen_by_the_module"] for ack in script.acks] == [["net.conv1"]]
    assert model.net.conv1.weight.requires_grad and not model.net.conv2.weight.requires_grad


class HiddenLayerNet(torch.nn.Module):
    """A conv feature extractor with a hidden fully connected layer before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = torch.nn.Linear(8 * 8 * 8, 24), torch.nn.Linear(24, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 4)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def test_the_neurons_of_a_hidden_linear_layer_are_steered_like_filters(tmp_path):
    """Widening, pruning and freezing a hidden Linear layer's neurons went through the callback's structure,
    per-filter telemetry and change log: the ids follow the neurons, and a checkpoint loads into a fresh model."""
    from conftest import Listener

    callback = ReVACNNCallback(filters_every=1, snapshot_every=0, record=False)
    listener = Listener(lambda: callback.connection_file).start()
    script = Script(callback, {2: [("widen", {"layer": "net.fc1", "count": 4})],
                               4: [("remove_filters", {"layer": "net.fc1", "filters": [0, 1]})],
                               5: [("freeze", {"layer": "net.fc1", "filters": [2]})]})
    model = ClassifierModule(HiddenLayerNet(), lr=0.05)
    trainer = quiet_trainer(max_steps=9, callbacks=[callback, script], default_root_dir=tmp_path, limit_val_batches=0,
                            num_sanity_val_steps=0)
    frozen_row = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 7:
                frozen_row["before"] = pl_module.net.fc1.weight[2].detach().clone()

    trainer.callbacks.append(Watch())
    trainer.fit(model, DigitsDataModule(batch_size=32))
    messages = listener.join()
    assert [(ack["op"], ack["status"]) for ack in script.acks] == [("widen", "done"), ("remove_filters", "done"),
                                                                    ("freeze", "done")], script.acks
    assert model.net.fc1.weight.shape == (26, 512) and model.net.fc2.weight.shape == (10, 26)
    assert torch.equal(model.net.fc1.weight[2], frozen_row["before"])
    structures = {m.body["revision"]: {layer["name"]: layer for layer in m.body["layers"]}
                  for m in messages if m.type == "structure"}
    ids = [structures[revision]["net.fc1"]["filter_ids"] for revision in sorted(structures)]
    assert [len(i) for i in ids] == [24, 28, 26]
    assert ids[1][:24] == ids[0] and ids[2] == ids[1][2:]                  # the removed two were neurons 0 and 1
    assert structures[max(structures)]["net.fc1"]["frozen"] == [2]
    last = [m for m in messages if m.type == "step"][-1]
    assert last.arrays["filters"].shape[1] == 8 + 26 + 10

    path = tmp_path / "steered.ckpt"
    trainer.save_checkpoint(path)
    images = torch.randn(4, 3, 32, 32)
    model.eval()
    offline = load_steered(path, ClassifierModule(HiddenLayerNet())).eval()
    with torch.no_grad():
        assert torch.equal(offline(images), model(images))


def test_what_freeze_froze_stays_frozen_after_the_checkpoint_resumes(tmp_path):
    """Issue 27: a layer frozen by ``freeze`` trained again after ``trainer.fit(ckpt_path=…)`` (requires_grad back
    to True, its weights moved ~2e-3 in 5 steps). The frozen set goes into the checkpoint and a new callback freezes
    it again before the resumed fit's first step: whole layers and single filters."""
    torch.manual_seed(3)
    plan = {2: [("freeze", {"layers": ["net.conv1"]}), ("freeze", {"layer": "net.conv3", "filters": [0, 3]})]}
    trainer, model, script = fit(tmp_path, plan, epochs=1, batches=5)
    assert [ack["status"] for ack in script.acks] == ["done"] * 2, script.acks
    path = tmp_path / "frozen.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["revacnn"]["frozen"] == {"layers": {"net.conv1": {"weight": True, "bias": True}},
                                               "filters": {"net.conv3": [0, 3]}}
    saved = checkpoint["state_dict"]

    resumed_model = ClassifierModule(ReVACNNNet(), lr=0.05)
    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    resumed = quiet_trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=0, callbacks=[callback],
                            default_root_dir=tmp_path, num_sanity_val_steps=0)
    resumed.fit(resumed_model, DigitsDataModule(batch_size=32), ckpt_path=path)
    assert resumed.global_step == 10                                    # 5 steps after the resume
    now = resumed_model.state_dict()
    assert torch.equal(now["net.conv1.weight"], saved["net.conv1.weight"])
    assert torch.equal(now["net.conv1.bias"], saved["net.conv1.bias"])
    assert not resumed_model.net.conv1.weight.requires_grad            # still frozen after the fit
    for key in ("net.conv3.weight", "net.conv3.bias"):
        assert torch.equal(now[key][[0, 3]], saved[key][[0, 3]]), key   # the frozen filters' rows
        others = [i for i in range(now[key].shape[0]) if i not in (0, 3)]
        assert not torch.equal(now[key][others], saved[key][others]), key
    assert not torch.equal(now["net.conv2.weight"], saved["net.conv2.weight"])
    assert not torch.equal(now["net.fc.weight"], saved["net.fc.weight"])

    # and a checkpoint of the resumed run holds the frozen set again (the freezes go on from resume to resume)
    again = tmp_path / "again.ckpt"
    resumed.save_checkpoint(again)
    assert torch.load(again, weights_only=True)["revacnn"]["frozen"] == checkpoint["revacnn"]["frozen"]


def test_resuming_a_steered_checkpoint_without_the_callback_and_the_fix(tmp_path):
    """Issue 27: without the callback nothing replays the change log, and Lightning's own load fails with its list
    of keys (docs/steering.md quotes it). Nothing of revacnn runs on that path to say more; the fixes it names work:
    the callback, or ``load_steered`` into the model before ``fit(ckpt_path=…)``."""
    torch.manual_seed(3)
    plan = {2: [("widen", {"layer": "net.conv2", "count": 2})], 3: [("insert_layer", {"after": "net.conv1"})]}
    trainer, model, script = fit(tmp_path, plan, epochs=1, batches=4)
    assert [ack["status"] for ack in script.acks] == ["done"] * 2, script.acks
    path = tmp_path / "steered.ckpt"
    trainer.save_checkpoint(path)

    plain = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError) as error:
        plain.fit(ClassifierModule(ReVACNNNet(), lr=0.05), DigitsDataModule(batch_size=32), ckpt_path=path)
    message = str(error.value)
    assert message.startswith('Error(s) in loading state_dict for ClassifierModule:\n\tUnexpected key(s) in '
                              'state_dict: "net.conv1.inserted.conv.weight", "net.conv1.inserted.conv.bias". \n\t'
                              'size mismatch for net.conv2.weight: copying a param with shape '
                              'torch.Size([22, 16, 5, 5]) from checkpoint'), message

    steered = load_steered(path, ClassifierModule(ReVACNNNet(), lr=0.05))      # the fix without the callback
    plain = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0, default_root_dir=tmp_path)
    plain.fit(steered, DigitsDataModule(batch_size=32), ckpt_path=path)
    assert plain.global_step == 8 and steered.net.conv2.weight.shape[0] == 22


def test_a_steered_checkpoint_that_does_not_fit_the_model_says_why(tmp_path):
    """A model built unlike the trained one (other widths, or compiled where the run was not): ``load_steered`` and
    the callback's resume said only "Error(s) in loading state_dict"; now they name the layers and what to do."""
    from revacnn.steering import CheckpointMismatch

    torch.manual_seed(3)
    trainer, model, script = fit(tmp_path, {2: [("widen", {"layer": "net.conv2", "count": 2})]}, epochs=1,
                                 batches=4)
    assert [ack["status"] for ack in script.acks] == ["done"], script.acks
    path = tmp_path / "steered.ckpt"
    trainer.save_checkpoint(path)

    with pytest.raises(CheckpointMismatch) as error:
        load_steered(path, ClassifierModule(ReVACNNNet(widths=(16, 20, 24))))
    assert str(error.value).startswith(
        "load_steered: the checkpoint's weights do not fit the ClassifierModule given after replaying its 1 "
        "structural change(s): net.conv3.weight is [20, 22, 5, 5] in the checkpoint, [24, 22, 5, 5] in the "
        "ClassifierModule given;"), error.value
    assert str(error.value).endswith("build the module the way the trained model was built before it was steered: "
                                     "the same class with the same arguments (the change log replays only the "
                                     "steering on top of it)")
    assert isinstance(error.value, RuntimeError)                   # what load_state_dict raised before

    compiled = ClassifierModule(ReVACNNNet())
    compiled.net = torch.compile(compiled.net, backend="eager")
    with pytest.raises(CheckpointMismatch, match="the checkpoint's names lack torch.compile's '_orig_mod.': do not "
                                                 "compile the net before loading, as in the run"):
        load_steered(path, compiled)

    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    resumed = quiet_trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[callback],
                            default_root_dir=tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"^revacnn: the checkpoint's weights do not fit the "
                                                 r"ClassifierModule being fitted after replaying its 1 structural"):
        resumed.fit(ClassifierModule(ReVACNNNet(widths=(16, 20, 24))), DigitsDataModule(batch_size=32),
                    ckpt_path=path)
