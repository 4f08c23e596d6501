"""A real Lightning Trainer on CPU with ReVACNNCallback: published numbers equal ones computed independently.

A ``Witness`` callback runs after ReVACNNCallback and records the model's own tensors at the same moments with
numpy and plain autograd; the test then compares them with what a RunClient received over loopback.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from revacnn import ReVACNNCallback
from revacnn.telemetry.scalars import add_scalars, scalar_values
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from revacnn.wire.protocol import FILTER_FIELDS, STAT_FIELDS
from revacnn.telemetry.transfer import HostCopy

from helpers import quiet_trainer

LAYERS = ["net.conv1", "net.conv2", "net.conv3", "net.fc"]
FILTERS_EVERY, SNAPSHOT_EVERY = 5, 20
ACTIVATION_IMAGES = 12   # of each batch of 32: the mean |activation| is over these images only


class Witness(pl.Callback):
    """Records weights, gradients, activations, losses and predictions with independent code."""

    def __init__(self, data: DigitsDataModule) -> None:
        self.data = data
        self.pre_step: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.activations: dict[int, dict[str, np.ndarray]] = {}
        self.losses: dict[int, float] = {}
        self.post_step: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.probe: dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
        self.predictions: dict[int, np.ndarray] = {}
        self._current: dict[str, np.ndarray] = {}

    def on_train_start(self, trainer, pl_module):
        for name in LAYERS:
            module = pl_module.get_submodule(name)
            module.register_forward_hook(self._activation_hook(name))

    def _activation_hook(self, name):
        def hook(module, inputs, output):
            if module.training:
                out = output.detach()[:ACTIVATION_IMAGES].numpy().astype(np.float64)
                axes = (0, 2, 3) if out.ndim == 4 else (0,)
                self._current[name] = np.abs(out).mean(axis=axes)
        return hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            self.losses[trainer.global_step + 1] = F.cross_entropy(pl_module(x), y).item()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step + 1
        self.pre_step[step] = {name: (pl_module.get_submodule(name).weight.detach().numpy().copy(),
                                      pl_module.get_submodule(name).weight.grad.numpy().copy()) for name in LAYERS}
        self.activations[step] = dict(self._current)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in (1, SNAPSHOT_EVERY):
            self.post_step[step] = {name: (pl_module.get_submodule(name).weight.detach().numpy().copy(),
                                           pl_module.get_submodule(name).weight.grad.numpy().copy())
                                    for name in LAYERS}
        if step == SNAPSHOT_EVERY:
            self.probe[step] = self._probe(pl_module)

    def _probe(self, pl_module):
        """Activations and their loss gradients on the first 8 validation images, via retain_grad on a copy."""
        model = copy.deepcopy(pl_module).eval()
        images, labels = self.data.val_set.tensors[0][:8], self.data.val_set.tensors[1][:8]
        outputs = {}
        def keep(name):
            def hook(module, inputs, output):
                output.retain_grad()
                outputs[name] = output
            return hook

        for name in LAYERS:
            model.get_submodule(name).register_forward_hook(keep(name))
        F.cross_entropy(model(images), labels).backward()
        return ({n: o.detach().numpy() for n, o in outputs.items()},
                {n: o.grad.numpy() for n, o in outputs.items()})

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        with torch.no_grad():
            self.predictions[trainer.global_step] = pl_module(self.data.val_set.tensors[0]).argmax(1).numpy()


def deeptracker_stats(values: np.ndarray) -> np.ndarray:
    flat = values.astype(np.float64).ravel()
    return np.array([flat.min(), flat.max(), flat.mean(), np.median(flat), np.percentile(flat, 25),
                     np.percentile(flat, 75), flat.std(), np.abs(flat).sum(), np.sqrt((flat ** 2).sum()),
                     np.count_nonzero(flat), flat.size])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import Listener

    root = tmp_path_factory.mktemp("telemetry")
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=32)
    data.setup()
    witness = Witness(data)
    callback = ReVACNNCallback(filters_every=FILTERS_EVERY, snapshot_every=SNAPSHOT_EVERY, record=False,
                               activation_images=ACTIVATION_IMAGES)
    listener = Listener(lambda: callback.connection_file).start()
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=15, callbacks=[callback, witness], default_root_dir=root,
                            num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(ReVACNNNet(), lr=0.05), data)
    messages = listener.join()
    return {"callback": callback, "witness": witness, "listener": listener, "messages": messages, "root": root}


def by_step(messages, kind):
    return {m.body["step"]: m for m in messages if m.type == kind}


def step_bodies(messages):
    """Step number → its scalars, from ``step`` messages (steps with per-filter data) and ``steps`` rows; each step
    must come exactly once, in step order."""
    bodies = [body for m in messages if m.type in ("step", "steps")
              for body in (m.body["rows"] if m.type == "steps" else [m.body])]
    numbers = [body["step"] for body in bodies]
    assert numbers == sorted(set(numbers)), numbers
    return dict(zip(numbers, bodies))


def test_connection_file_lands_in_the_trainers_log_dir(run):
    assert run["callback"].connection_file == run["root"] / "revacnn" / "connection.json"


def test_structure_lists_the_layers_in_forward_order_with_shapes_and_graph(run):
    structure = [m for m in run["messages"] if m.type == "structure"][0].body
    layers = structure["layers"]
    assert [layer["name"] for layer in layers] == LAYERS
    assert [layer["out"] for layer in layers] == [16, 20, 20, 10]
    assert [layer["output_shape"] for layer in layers] == [[16, 32, 32], [20, 16, 16], [20, 8, 8], [10]]
    assert layers[1]["weight_shape"] == [20, 16, 5, 5] and layers[1]["params"] == 20 * 16 * 25 + 20
    ids = [i for layer in layers for i in layer["filter_ids"]]
    assert len(ids) == len(set(ids)) == 66
    assert structure["layer_edges"] == [["input", "net.conv1"], ["net.conv1", "net.conv2"],
                                        ["net.conv2", "net.conv3"], ["net.conv3", "net.fc"]]
    assert structure["total_params"] == sum(p.numel() for p in ReVACNNNet().parameters())


def test_every_step_is_published_once_in_order_with_the_loss_of_that_step(run):
    steps = step_bodies(run["messages"])
    assert sorted(steps) == list(range(1, 31))
    for step, loss in run["witness"].losses.items():
        assert steps[step]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        assert steps[step]["metrics"]["train_loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    group = steps[3]["groups"][0]
    assert group == {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    assert steps[3]["batch_size"] == 32
    assert [(steps[step]["epoch"], steps[step]["batch"]) for step in (15, 16)] == [(0, 14), (1, 0)]
    batches = [m for m in run["messages"] if m.type == "steps"]
    assert batches and all(m.body["first"] == m.body["rows"][0]["step"] and m.body["last"] == m.body["rows"][-1]["step"]
                           and m.body["drops"] == {"telemetry": 0, "recording": 0} for m in batches)


def test_metrics_are_those_of_their_own_step_when_lightning_keeps_no_dict(tmp_path, monkeypatch):
    """The fallback for a Lightning that keeps its computed metrics elsewhere: the public property, read at the
    step's own end, gives the same per-step values."""
    from conftest import Listener

    import revacnn.telemetry.messages

    monkeypatch.setattr(revacnn.telemetry.messages, "lightning_metrics", lambda trainer: None)
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=32)
    data.setup()
    witness = Witness(data)
    callback = ReVACNNCallback(filters_every=4, snapshot_every=0, record=False)
    listener = Listener(lambda: callback.connection_file).start()
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=6, callbacks=[callback, witness],
                            default_root_dir=tmp_path, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(ReVACNNNet(), lr=0.05), data)
    steps = step_bodies(listener.join())
    assert sorted(steps) == list(range(1, 13))
    for step, loss in witness.losses.items():
        assert steps[step]["metrics"]["train_loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_per_filter_statistics_equal_independent_values(run):
    steps = by_step(run["messages"], "step")
    per_filter = sorted(step for step, m in steps.items() if m.body["per_filter"])
    assert per_filter == [1, 5, 10, 15, 20, 25, 30]
    witness = run["witness"]
    for step, previous in ((1, None), (5, 1), (10, 5)):
        message = steps[step]
        assert message.body["filter_fields"] == list(FILTER_FIELDS)
        filters = message.arrays["filters"]
        assert filters.shape == (5, 66)
        column = 0
        for name in LAYERS:
            weight, grad = witness.pre_step[step][name]
            n = weight.shape[0]
            flat_w = weight.reshape(n, -1).astype(np.float64)
            flat_g = grad.reshape(n, -1).astype(np.float64)
            expected = {
                "grad_abs_mean": np.abs(flat_g).mean(1),
                "grad_sq_mean": (flat_g ** 2).mean(1),
                "weight_norm": np.sqrt((flat_w ** 2).sum(1)),
                "act_abs_mean": witness.activations[step][name],
            }
            if previous is None:
                expected["update_ratio"] = np.zeros(n)
            else:
                before = witness.pre_step[previous][name][0].reshape(n, -1).astype(np.float64)
                expected["update_ratio"] = np.linalg.norm(flat_w - before, axis=1) / np.linalg.norm(before, axis=1)
            for row, field in enumerate(FILTER_FIELDS):
                np.testing.assert_allclose(filters[row, column:column + n], expected[field], rtol=2e-4, atol=1e-9,
                                           err_msg=f"{field} of {name} at step {step}")
            ratio = np.sqrt((flat_g ** 2).sum()) / np.sqrt((flat_w ** 2).sum())
            assert message.arrays["layers"][LAYERS.index(name)] == pytest.approx(ratio, rel=2e-4)
            column += n


def test_snapshot_holds_weights_grads_stats_changes_and_probe_maps(run):
    snapshots = by_step(run["messages"], "snapshot")
    assert sorted(snapshots) == [1, 20]
    snapshot = snapshots[20]
    witness = run["witness"]
    assert snapshot.body["stat_fields"] == list(STAT_FIELDS)
    for index, name in enumerate(LAYERS):
        weight, grad = witness.post_step[20][name]
        np.testing.assert_array_equal(snapshot.arrays[f"weight/{name}"], weight)
        np.testing.assert_array_equal(snapshot.arrays[f"grad/{name}"], grad)
        np.testing.assert_allclose(snapshot.arrays["weight_stats"][index], deeptracker_stats(weight), rtol=1e-4,
                                   atol=1e-7)
        np.testing.assert_allclose(snapshot.arrays["grad_stats"][index], deeptracker_stats(grad), rtol=1e-4,
                                   atol=1e-9)
        before = witness.post_step[1][name][0].reshape(weight.shape[0], -1).astype(np.float64)
        now = weight.reshape(weight.shape[0], -1).astype(np.float64)
        cosine = (before * now).sum(1) / np.linalg.norm(before, axis=1) / np.linalg.norm(now, axis=1)
        np.testing.assert_allclose(snapshot.arrays[f"cosine/{name}"], cosine, rtol=1e-5)
        np.testing.assert_allclose(snapshot.arrays[f"delta_ratio/{name}"],
                                   np.linalg.norm(now - before, axis=1) / np.linalg.norm(before, axis=1), rtol=1e-4)
        activations, activation_grads = witness.probe[20]
        np.testing.assert_allclose(snapshot.arrays[f"act/{name}"], activations[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(snapshot.arrays[f"actgrad/{name}"], activation_grads[name], rtol=1e-3,
                                   atol=1e-7)
    np.testing.assert_array_equal(snapshot.body["probe_labels"], run["witness"].data.val_set.tensors[1][:8].numpy())


def test_probe_maps_past_max_activation_bytes_are_left_out_and_named(tmp_path):
    """A budget that holds conv1's maps and gradients (8 probes × 16 × 32 × 32 × 2 float32) exactly: conv1's maps
    are sent, every later layer's are left out and named in ``probe_skipped``."""
    from revacnn.recording.reader import open_run

    conv1_bytes = 8 * 16 * 32 * 32 * 4 * 2
    callback = ReVACNNCallback(filters_every=0, snapshot_every=2, max_activation_bytes=conv1_bytes)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[callback],
                            default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=16))
    snapshot = open_run(callback.run_dir).snapshot(2)
    assert snapshot["arrays"]["act/net.conv1"].shape == (8, 16, 32, 32)
    assert snapshot["arrays"]["actgrad/net.conv1"].shape == (8, 16, 32, 32)
    assert not [key for key in snapshot["arrays"] if key.startswith("act") and not key.endswith("net.conv1")]
    assert snapshot["body"]["probe_skipped"] == ["net.conv2", "net.conv3", "net.fc"]


def test_validation_publishes_metrics_and_the_prediction_of_every_subset_image(run):
    vals = by_step(run["messages"], "val")
    assert sorted(vals) == [15, 30]
    labels = run["witness"].data.val_set.tensors[1].numpy()
    for step, message in vals.items():
        assert message.body["count"] == 300
        np.testing.assert_array_equal(message.arrays["pred"], run["witness"].predictions[step])
        np.testing.assert_array_equal(message.arrays["label"], labels)
        accuracy = (run["witness"].predictions[step] == labels).mean()
        assert message.body["metrics"]["val_acc"] == pytest.approx(accuracy, abs=1e-6)
        assert "train_loss" not in message.body["metrics"]


def test_run_ends_with_a_finished_status_and_no_drops(run):
    statuses = [m.body for m in run["messages"] if m.type == "status"]
    assert statuses[-1]["state"] == "finished"
    assert statuses[-1]["drops"]["telemetry"] == 0
    assert run["listener"].client.gaps == 0


def test_scalars_pack_single_values_in_name_order_and_skip_the_rest():
    """CPU tensors are read in place, numbers join them, vectors and booleans are left out, names match values."""
    loss = torch.tensor(0.5, requires_grad=True) * 1.0       # still attached to a graph: read without complaint
    values = {"loss": loss, "acc": torch.tensor([0.25]), "count": 3, "flag": True, "vector": torch.ones(2),
              "half": torch.tensor(1.5, dtype=torch.bfloat16), "text": "x"}
    copy = HostCopy()
    names = add_scalars(copy, values.items())
    arrays = copy.launch().arrays()
    assert names == ["loss", "acc", "count", "half"]
    assert list(arrays) == ["host_scalars"] and arrays["host_scalars"].dtype == np.float32
    np.testing.assert_array_equal(arrays["host_scalars"], np.array([0.5, 0.25, 3.0, 1.5], np.float32))
    assert scalar_values(names, arrays) == {"loss": 0.5, "acc": 0.25, "count": 3.0, "half": 1.5}
    assert arrays == {}                                   # taken out: what is left are the message's arrays
    not_finite = set()
    assert scalar_values(["a", "b", "c", "d"], {"scalars": np.array([1.0, np.nan], np.float32),
                                                 "host_scalars": np.array([3.0, -np.inf], np.float32)},
                         not_finite) == {"a": 1.0, "b": None, "c": 3.0, "d": None}  # device values first; NaN → None
    assert not_finite == {"b", "d"}


def test_host_copy_carries_numpy_parts_beside_the_packed_tensors():
    weights = torch.arange(6.0).reshape(2, 3)
    copy = HostCopy()
    copy.add("weights", weights)
    copy.add("already_on_host", np.array([7.0, 8.0], np.float32))
    arrays = copy.launch().arrays()
    weights += 1                      # the packed copy no longer depends on the source tensor
    np.testing.assert_array_equal(arrays["weights"], np.arange(6.0, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(arrays["already_on_host"], [7.0, 8.0])
    only_host = HostCopy()
    only_host.add("x", np.array([1.0], np.float32))
    assert bool(only_host) and list(only_host.launch().arrays()) == ["x"]


def test_every_argument_has_its_own_docstring_entry():
    """LightningCLI (jsonargparse) builds ``--trainer.callbacks.<arg>`` help from the Args section, one entry per
    argument: an entry that names several arguments at once leaves them without help."""
    import inspect
    import re

    documented = re.findall(r"^        (\w+): ", ReVACNNCallback.__doc__.split("Args:")[1], flags=re.MULTILINE)
    assert documented == list(inspect.signature(ReVACNNCallback.__init__).parameters)[1:]


def test_a_snapshot_sends_the_weights_it_keeps_for_the_next_one_without_a_second_copy():
    """The weights a snapshot keeps for the next one's per-filter change are its message's own buffer (one copy, not
    two); the next snapshot's cosine and delta ratio against them are exact, and the message already sent is left
    as it was."""
    from types import SimpleNamespace

    from revacnn.telemetry.snapshot import Snapshots
    from revacnn.telemetry.validation import ValidationImages

    torch.manual_seed(0)
    conv, linear = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(5, 2)
    conv.weight.grad = torch.randn_like(conv.weight)
    layers = [("conv", conv), ("linear", linear)]
    snapshots, trainer = Snapshots(1 << 20), SimpleNamespace(current_epoch=0)
    first = snapshots.message(trainer, None, 1, 0, layers, ValidationImages()).resolve()
    assert set(first.arrays) == {f"{kind}/{name}" for kind in ("weight", "grad", "cosine", "delta_ratio")
                                 for name in ("conv", "linear")} | {"weight_stats", "grad_stats"}
    before = {name: module.weight.detach().numpy().copy() for name, module in layers}
    for name, _ in layers:
        np.testing.assert_array_equal(first.arrays[f"weight/{name}"], before[name])
        assert np.shares_memory(first.arrays[f"weight/{name}"], snapshots.previous[name].numpy())
        np.testing.assert_array_equal(first.arrays[f"cosine/{name}"], 1.0)
        np.testing.assert_array_equal(first.arrays[f"delta_ratio/{name}"], 0.0)
    np.testing.assert_array_equal(first.arrays["grad/conv"], conv.weight.grad.numpy())
    np.testing.assert_array_equal(first.arrays["grad/linear"], 0.0)
    with torch.no_grad():
        for _, module in layers:
            module.weight.add_(torch.randn_like(module.weight) * 0.3)
    second = snapshots.message(trainer, None, 2, 0, layers, ValidationImages()).resolve()
    for name, module in layers:
        old = before[name].reshape(len(before[name]), -1).astype(np.float64)
        new = module.weight.detach().numpy().reshape(len(old), -1).astype(np.float64)
        cosine = (old * new).sum(1) / np.linalg.norm(old, axis=1) / np.linalg.norm(new, axis=1)
        delta = np.linalg.norm(new - old, axis=1) / np.linalg.norm(old, axis=1)
        np.testing.assert_allclose(second.arrays[f"cosine/{name}"], cosine, rtol=1e-5)
        np.testing.assert_allclose(second.arrays[f"delta_ratio/{name}"], delta, rtol=1e-5)
        np.testing.assert_array_equal(first.arrays[f"weight/{name}"], before[name])   # the sent message is intact
