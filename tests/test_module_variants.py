"""Runs whose modules are not plain float32 image classifiers: the callback's own forwards (graph trace, probe pass,
predictions of the kept validation images) see the images as ``validation_step`` does, and a forward that cannot
take them costs that feature, never the run."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from revacnn import ReVACNNCallback
from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet
from revacnn.recording.reader import open_run

from helpers import quiet_trainer

KEPT = 40  # validation images whose predictions are published


class ValPredictionWitness(pl.Callback):
    """After each validation, the kept images' predicted classes, computed with independent code: the first
    ``KEPT`` validation images, cast to the module's own dtype, through the network."""

    def __init__(self, data: DigitsDataModule, transform=lambda x: x) -> None:
        self.data, self.transform = data, transform
        self.predictions: list[np.ndarray] = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        images = torch.cat([x for x, _ in self.data.val_dataloader()])[:KEPT]
        dtype = next(pl_module.parameters()).dtype
        was = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.predictions.append(pl_module.net(self.transform(images.to(dtype))).argmax(1).numpy())
        pl_module.train(was)


def fit(tmp_path, module, data, *extra_callbacks, precision="32-true"):
    """One epoch of 4 steps and a validation; ``data`` is a datamodule or a (train, val) pair of loaders."""
    torch.manual_seed(3)
    callback = ReVACNNCallback(filters_every=1, snapshot_every=4, val_subset=KEPT)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=3, precision=precision,
                            callbacks=[callback, *extra_callbacks], default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, *data) if isinstance(data, tuple) else trainer.fit(module, data)
    return open_run(callback.run_dir)


@pytest.mark.parametrize("precision", ["bf16-true", "64-true", "bf16-mixed"])
def test_the_callbacks_forwards_run_in_the_runs_precision(tmp_path, precision):
    """Under "-true" precisions the module's weights are bf16 / float64: float32 images made every validation
    end in an exception that ended the run."""
    data = DigitsDataModule(batch_size=16)
    witness = ValPredictionWitness(data)
    run = fit(tmp_path, ClassifierModule(ReVACNNNet()), data, witness, precision=precision)
    assert run.status()["state"] == "finished"
    val = run.val_predictions()
    np.testing.assert_array_equal(val["pred"], np.stack(witness.predictions))
    snapshot = run.snapshot(4)
    assert "probe_error" not in snapshot["body"]
    assert snapshot["arrays"]["act/net.conv1"].shape == (8, 16, 32, 32)
    assert run.structures()[-1][1]["edges"], "the graph was traced"


class NormalisesOnTheDevice(ClassifierModule):
    """Normalises batches in ``on_after_batch_transfer``, as many pipelines do on the GPU."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return normalise(x), y


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.25) * 3.0


def test_probe_and_kept_images_go_through_the_modules_batch_transfer_hooks(tmp_path):
    data = DigitsDataModule(batch_size=16)
    witness = ValPredictionWitness(data, transform=normalise)
    run = fit(tmp_path, NormalisesOnTheDevice(ReVACNNNet()), data, witness)
    first_images = torch.cat([x for x, _ in data.val_dataloader()])[:8]
    np.testing.assert_allclose(run.snapshot(4)["arrays"]["probe_images"], normalise(first_images).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(run.val_predictions()["pred"], np.stack(witness.predictions))


class DictBatches(torch.utils.data.Dataset):
    """Samples as dicts: ``{"image", "label"}`` by default, ``{"pixel_values", "labels"}`` as Hugging Face image
    datasets give them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, keys: tuple[str, str] = ("image", "label")) -> None:
        self.images, self.labels, self.keys = images, labels, keys

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return dict(zip(self.keys, (self.images[index], self.labels[index])))


class TakesPixelValues(ClassifierModule):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["pixel_values"]), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["pixel_values"]), batch["labels"]))


def test_dict_batches_with_pixel_values_give_probe_images_and_predictions(tmp_path):
    """``pixel_values`` was not a key the callback looked for: no probe images, no predictions."""
    digits = DigitsDataModule(batch_size=16)
    digits.setup()
    loaders = tuple(torch.utils.data.DataLoader(DictBatches(*data.tensors, keys=("pixel_values", "labels")),
                                                batch_size=16)
                    for data in (digits.train_set, digits.val_set))
    witness = ValPredictionWitness(digits)
    run = fit(tmp_path, TakesPixelValues(ReVACNNNet()), loaders, witness)
    np.testing.assert_allclose(run.snapshot(4)["arrays"]["probe_images"], digits.val_set.tensors[0][:8].numpy())
    np.testing.assert_array_equal(run.val_predictions()["pred"], np.stack(witness.predictions))


class ForwardTakesTheBatch(ClassifierModule):
    """``forward`` takes the whole batch dict: the callback cannot call it on images."""

    def forward(self, batch):
        return self.net(batch["image"])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch), batch["label"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch), batch["label"]))


def test_a_forward_that_cannot_take_images_costs_the_predictions_not_the_run(tmp_path):
    digits = DigitsDataModule(batch_size=16)
    digits.setup()
    loader = torch.utils.data.DataLoader(DictBatches(*digits.val_set.tensors), batch_size=16)
    with pytest.warns(UserWarning, match="predicting the kept validation images failed .*IndexError"):
        run = fit(tmp_path, ForwardTakesTheBatch(ReVACNNNet()), (loader, loader))
    assert run.status()["state"] == "finished"
    np.testing.assert_array_equal(run.scalars()["step"], [1, 2, 3, 4])
    val = run.val_predictions()
    assert val["pred"].shape == (1, 0) and np.isfinite(val["metrics"]["val_loss"]).all()
    assert "IndexError" in val["error"]
    assert "probe_error" in run.snapshot(4)["body"]
    summary = explorer_validation_summary(tmp_path, str(run.path))
    assert summary.startswith("1 validation samples, no image predictions: predicting the kept validation images "
                              "failed (IndexError"), summary


@contextlib.contextmanager
def replaying_dashboard(logdir):
    """The dashboard replaying the one run recorded under ``logdir``: ``(call, key)``, where ``call(output, inputs,
    state)`` makes one Dash callback request through Flask's test client and ``key`` is the run's menu value."""
    from revacnn_dash.app import create_app
    from revacnn_dash.data.hub import Hub
    from test_analysis import dash_call

    hub = Hub([], logdir=str(logdir), warm_umap=False)
    try:
        hub.scan_logdir()
        (key,) = list(hub.runs)
        client = create_app(hub).server.test_client()
        deps = client.get("/_dash-dependencies").get_json()
        yield (lambda output, inputs, state=(): dash_call(client, deps, output, inputs, state)), key
    finally:
        hub.stop()


def explorer_validation_summary(logdir, run: str) -> str:
    """The line the dashboard's log explorer shows above its validation charts."""
    with replaying_dashboard(logdir) as (call, _):
        out = call("ane-val-summary.children", [
            ("ane-run", "value", run), ("ane-window", "value", 3), ("ane-threshold", "value", 5),
            ("ane-direction", "value", "backward"), ("ane-class", "value", 0), ("ane-pins", "data", []),
            ("ane-live", "data", None)])
    return out["ane-val-summary"]["children"]


class NoMonitoredLayer(pl.LightningModule):
    """A linear model held as a bare parameter: nothing for per-filter telemetry or snapshots."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3 * 32 * 32, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(x.flatten(1) @ self.weight, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_without_monitored_layers_publishes_its_scalars(tmp_path):
    """It ended in ``torch.cat`` of no tensors at the first per-filter step."""
    with pytest.warns(UserWarning, match="NoMonitoredLayer has no layer to monitor"):
        run = fit(tmp_path, NoMonitoredLayer(), DigitsDataModule(batch_size=16))
    assert run.status()["state"] == "finished"
    np.testing.assert_array_equal(run.scalars()["step"], [1, 2, 3, 4])
    assert run.layer_names() == [] and run.snapshot_steps() == []


def test_a_layer_name_not_in_the_model_is_refused_with_the_names_there_are(tmp_path):
    callback = ReVACNNCallback(layers=["conv9"])
    trainer = quiet_trainer(max_steps=1, callbacks=[callback], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"not found in ClassifierModule: conv9 \(its Conv2d and Linear layers: "
                                         r"net.conv1, net.conv2, net.conv3, net.fc\)"):
        trainer.fit(ClassifierModule(ReVACNNNet()), DigitsDataModule(batch_size=16))


def test_the_dashboard_shows_a_run_without_monitored_layers(tmp_path):
    """Its layer menus raised IndexError on every tick (HTTP 500); the views now say why they are empty."""
    from revacnn_dash.figures.network import NO_LAYER

    with pytest.warns(UserWarning, match="no layer to monitor"):
        fit(tmp_path, NoMonitoredLayer(), DigitsDataModule(batch_size=16))
    with replaying_dashboard(tmp_path) as (call, key):
        menus = call("emb-layer.options", [("tick-layers", "data", [1, 0]), ("run-select", "value", key)],
                     [("emb-layer", "value", None), ("fil-layer", "value", None), ("emb-layer", "options", None),
                      ("emb-probe", "options", None)])
        assert menus["emb-layer"]["options"] == [] and menus["fil-layer"]["value"] is None
        network = call("net-graph.figure", [("tick-network", "data", [1, 0]), ("net-expanded", "data", None),
                                            ("run-select", "value", key), ("net-zoom", "data", None)],
                       [("tabs", "value", "network"), ("net-sig", "data", None)])
        assert NO_LAYER in [note["text"] for note in network["net-graph"]["figure"]["layout"]["annotations"]]
        embedding = call("emb-status.children", [
            ("tick-embedding", "data", [1, 0]), ("emb-layer", "value", None), ("emb-source", "value", "weights"),
            ("emb-method", "value", "pca"), ("emb-colour", "value", "grad"), ("emb-probe", "value", None)],
            [("tabs", "value", "embedding"), ("run-select", "value", key), ("emb-data", "data", None)])
        assert embedding["emb-status"]["children"] == NO_LAYER
        filters = call("fil-caption.children", [
            ("tick-filters", "data", [1, 0]), ("fil-layer", "value", None), ("fil-probe", "value", None)],
            [("tabs", "value", "filters"), ("run-select", "value", key), ("fil-sig", "data", None)])
        assert filters["fil-caption"]["children"] == NO_LAYER


def one_hot_batches(tensors) -> torch.utils.data.TensorDataset:
    images, labels = tensors
    return torch.utils.data.TensorDataset(images, F.one_hot(labels, 10).float())


class MultiLabel(ClassifierModule):
    """Trained against float targets of one column per class (multi-label), as with BCE."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.binary_cross_entropy_with_logits(self(x), y))


class Unlabelled(ClassifierModule):
    """Validation batches of images alone (``TensorDataset(images)``)."""

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val_mean_logit", self(x).mean())


def probe_gradient_of_the_output_sum(module: ClassifierModule, images: torch.Tensor) -> torch.Tensor:
    """d(sum of the outputs)/d(conv1's output) on ``images``, in eval mode, computed here with a forward hook."""
    kept = {}
    handle = module.net.conv1.register_forward_hook(lambda _module, _inputs, output: kept.update(out=output))
    module.eval()
    try:
        (grad,) = torch.autograd.grad(module.net(images).sum(), [kept["out"]])
    finally:
        handle.remove()
    return grad


@pytest.mark.parametrize("labels", ["multi-label", "none"])
def test_labels_that_are_not_class_indices_cost_the_predictions_not_the_recording(tmp_path, labels):
    """Multi-label targets (float [N, 10]) made the ``val`` message's label buffer 2-D: the recorder failed on it and
    stopped recording the run. Images without labels gave no probe at all. Now the probe keeps the images and
    differentiates the sum of the outputs, and ``pred_error`` says why there are no image predictions."""
    digits = DigitsDataModule(batch_size=16)
    digits.setup()
    if labels == "multi-label":
        train, val = one_hot_batches(digits.train_set.tensors), one_hot_batches(digits.val_set.tensors)
        module, why = MultiLabel(ReVACNNNet()), "the validation labels are float32 [N, 10], not one class index"
    else:
        train, val = digits.train_set, torch.utils.data.TensorDataset(digits.val_set.tensors[0])
        module, why = Unlabelled(ReVACNNNet()), "the validation batches carry no labels"
    loaders = tuple(torch.utils.data.DataLoader(data, batch_size=16) for data in (train, val))
    run = fit(tmp_path, module, loaders)
    status = run.status()
    assert status["state"] == "finished" and "recording_error" not in status, status
    np.testing.assert_array_equal(run.scalars()["step"], [1, 2, 3, 4])
    val_run = run.val_predictions()
    assert val_run["steps"].tolist() == [4] and val_run["pred"].shape == (1, 0)
    assert val_run["error"].startswith(why), val_run["error"]
    snapshot = run.snapshot(4)
    assert "probe_error" not in snapshot["body"] and snapshot["body"]["probe_labels"] == []
    probe_images = digits.val_set.tensors[0][:8]
    np.testing.assert_allclose(snapshot["arrays"]["probe_images"], probe_images.numpy())
    np.testing.assert_allclose(snapshot["arrays"]["actgrad/net.conv1"],
                               probe_gradient_of_the_output_sum(module, probe_images).numpy(), rtol=1e-4, atol=1e-7)
    network, embedding, filters = probe_menus(tmp_path)
    assert network == [{"label": f"#{p}", "value": p} for p in range(8)], network  # no made-up labels
    assert embedding == filters == [{"label": str(p), "value": p} for p in range(8)], (embedding, filters)


def probe_menus(logdir) -> tuple[list[dict], list[dict], list[dict]]:
    """The probe-image menus of the network view (for conv1), the embedding view and the filters view, the
    dashboard replaying the run recorded under ``logdir``."""
    with replaying_dashboard(logdir) as (call, key):
        out = call("net-probe.options", [
            ("net-selected", "data", {"layer": "net.conv1", "filters": [0]}), ("tick-network", "data", 1),
            ("net-probe", "value", 0)], [("run-select", "value", key), ("tabs", "value", "network")])
        menus = call("emb-probe.options", [("tick-layers", "data", [1, 0]), ("run-select", "value", key)],
                     [("emb-layer", "value", None), ("fil-layer", "value", None), ("emb-layer", "options", None),
                      ("emb-probe", "options", None)])
    return out["net-probe"]["options"], menus["emb-probe"]["options"], menus["fil-probe"]["options"]


class LazyNet(torch.nn.Module):
    """Its first conv and its classifier learn their input sizes in the first forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.LazyConv2d(8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.LazyLinear(10)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


def test_lazy_layers_are_watched_from_the_step_that_gives_them_their_shapes(tmp_path):
    """Reading an uninitialised parameter's shape stopped all telemetry at the start (no step was recorded). The
    callback now starts once the first batch has initialised them, and the model trains exactly as without it."""
    def train(callbacks):
        torch.manual_seed(5)
        module = ClassifierModule(LazyNet())
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2, callbacks=callbacks,
                                default_root_dir=tmp_path, num_sanity_val_steps=0)
        trainer.fit(module, DigitsDataModule(batch_size=16))
        return module

    callback = ReVACNNCallback(filters_every=1, snapshot_every=4, val_subset=KEPT)
    watched, alone = train([callback]), train([])
    for (name, value), (_, expected) in zip(watched.state_dict().items(), alone.state_dict().items()):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    run = open_run(callback.run_dir)
    assert run.status()["state"] == "finished" and "telemetry_error" not in run.status()
    np.testing.assert_array_equal(run.scalars()["step"], [1, 2, 3, 4])
    np.testing.assert_array_equal(run.filter_series("net.conv1", "weight_norm")["step"], [2, 3, 4])
    conv1 = next(layer for layer in run.structures()[-1][1]["layers"] if layer["name"] == "net.conv1")
    assert (conv1["in"], conv1["out"]) == (3, 8)
    np.testing.assert_allclose(run.snapshot(4)["arrays"]["weight/net.fc"], watched.net.fc.weight.detach().numpy())
    assert run.val_predictions()["pred"].shape == (1, KEPT)


class BinaryClassifier(ClassifierModule):
    """One logit per image (BCE with logits): is the digit 5 or more?"""

    def __init__(self) -> None:
        super().__init__(ReVACNNNet(num_classes=1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self(x)[:, 0], y.float())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.binary_cross_entropy_with_logits(self(x)[:, 0], y.float()))


def test_a_binary_classifier_with_one_logit_gets_its_predictions_and_probe_maps(tmp_path):
    """argmax over one logit made every prediction class 0, and the probe's cross-entropy over one class failed on
    label 1, so the snapshots had no activation maps."""
    digits = DigitsDataModule(batch_size=16)
    digits.setup()
    binary = [torch.utils.data.TensorDataset(images, (labels >= 5).long())
              for images, labels in (digits.train_set.tensors, digits.val_set.tensors)]
    loaders = tuple(torch.utils.data.DataLoader(data, batch_size=16) for data in binary)
    module = BinaryClassifier()
    run = fit(tmp_path, module, loaders)
    images, labels = binary[1].tensors
    module.eval()
    with torch.no_grad():
        expected = (module.net(images[:KEPT])[:, 0] > 0).long().numpy()
    val = run.val_predictions()
    np.testing.assert_array_equal(val["pred"], [expected])
    np.testing.assert_array_equal(val["label"], labels[:KEPT].numpy())
    snapshot = run.snapshot(4)
    assert "probe_error" not in snapshot["body"]
    probe = images[:8].clone().requires_grad_(True)
    kept = {}
    handle = module.net.conv1.register_forward_hook(lambda _module, _inputs, output: kept.update(out=output))
    try:
        logit = module.net(probe)[:, 0]
        (grad,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(logit, labels[:8].float()), [kept["out"]])
    finally:
        handle.remove()
    np.testing.assert_allclose(snapshot["arrays"]["actgrad/net.conv1"], grad.numpy(), rtol=1e-4, atol=1e-8)


class Int32Labels(ClassifierModule):
    """Its datasets store classes as int32 (as numpy arrays on some platforms do); its steps cast them."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y.long())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y.long()))


def test_int32_class_labels_are_class_indices(tmp_path):
    """The probe's cross-entropy refused int32 targets, so the snapshots had no activation maps."""
    digits = DigitsDataModule(batch_size=16)
    digits.setup()
    small = [torch.utils.data.TensorDataset(images, labels.to(torch.int32))
             for images, labels in (digits.train_set.tensors, digits.val_set.tensors)]
    run = fit(tmp_path, Int32Labels(ReVACNNNet()),
              tuple(torch.utils.data.DataLoader(data, batch_size=16) for data in small))
    snapshot = run.snapshot(4)
    assert "probe_error" not in snapshot["body"], snapshot["body"]["probe_error"]
    assert snapshot["body"]["probe_labels"] == digits.val_set.tensors[1][:8].tolist()
    np.testing.assert_array_equal(run.val_predictions()["label"], digits.val_set.tensors[1][:KEPT].numpy())


class TwoValidationSets(ClassifierModule):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


@pytest.mark.parametrize("container", [list, dict])
def test_several_validation_loaders_give_images_from_the_first(tmp_path, container):
    """A dict of validation loaders (``{"clean": …, "noisy": …}``) was iterated as its keys: no probe images and no
    predictions. A list gave the first loader's; a dict now gives its first loader's too."""
    digits = DigitsDataModule(batch_size=16)
    digits.setup()
    train, val = (torch.utils.data.DataLoader(data, batch_size=16) for data in (digits.train_set, digits.val_set))
    flipped = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(digits.val_set.tensors[0].flip(-1),
                                                                         digits.val_set.tensors[1]), batch_size=16)
    loaders = [val, flipped] if container is list else {"clean": val, "flipped": flipped}
    witness = ValPredictionWitness(digits)
    run = fit(tmp_path, TwoValidationSets(ReVACNNNet()), (train, loaders), witness)
    snapshot = run.snapshot(4)
    assert "probe_error" not in snapshot["body"], snapshot["body"]["probe_error"]
    np.testing.assert_allclose(snapshot["arrays"]["probe_images"], digits.val_set.tensors[0][:8].numpy())
    np.testing.assert_array_equal(run.val_predictions()["pred"], np.stack(witness.predictions))


class TokenNet(torch.nn.Module):
    """A patch embedding, then Linear layers on the tokens (``[N, T, C]``, features last), as a small ViT has."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 12, 8, stride=8)            # 16 tokens of 12 features
        self.mlp = torch.nn.Linear(12, 20)
        self.head = torch.nn.Linear(20, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(F.gelu(self.mlp(tokens)).mean(1))


def test_a_linear_on_tokens_has_its_activation_maps_channels_first(tmp_path):
    """``act/<L>`` of a Linear on tokens was ``[P, T, C]``: every view that takes dim 1 as the filter (the filters
    image, the embedding of activation maps, snapshot comparison) showed the 16 tokens as filters of a 20-filter
    layer. It is now ``[P, C, T]`` like a conv's ``[P, C, H, W]``."""
    module = ClassifierModule(TokenNet())
    run = fit(tmp_path, module, DigitsDataModule(batch_size=16))
    snapshot = run.snapshot(4)
    images = torch.from_numpy(snapshot["arrays"]["probe_images"])
    seen = {}
    handle = module.net.mlp.register_forward_hook(lambda _m, _i, output: seen.update(mlp=output.detach()))
    module.eval()
    with torch.no_grad():
        module(images)
    handle.remove()
    assert seen["mlp"].shape == (8, 16, 20)
    np.testing.assert_allclose(snapshot["arrays"]["act/net.mlp"], seen["mlp"].transpose(1, 2).numpy(), rtol=1e-5,
                               atol=1e-6)
    assert snapshot["arrays"]["actgrad/net.mlp"].shape == (8, 20, 16)
    assert snapshot["arrays"]["act/net.patch"].shape == (8, 12, 4, 4)
    assert snapshot["arrays"]["act/net.head"].shape == (8, 10)


class UpsamplingNet(torch.nn.Module):
    """A decoder-style net: a strided conv, a grouped transposed conv back up, a Conv1d over the flattened map."""

    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 12, 2, stride=2, groups=2)
        self.mix = torch.nn.Conv1d(12, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 10)

    def forward(self, x):
        x = F.relu(self.up(F.relu(self.down(x))))
        return self.fc(F.relu(self.mix(x.flatten(2))).mean(2))


def test_transposed_and_1d_convs_chosen_by_type_are_watched_per_output_channel(tmp_path):
    """A transposed conv's weight is [in, out / groups, …]: reading its filters on dim 0, as for a conv, stopped
    all telemetry at the first step (8 weight rows against 12 activation channels)."""
    torch.manual_seed(2)
    module = ClassifierModule(UpsamplingNet())
    callback = ReVACNNCallback([torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Conv1d, torch.nn.Linear],
                               filters_every=1, snapshot_every=4)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, callbacks=[callback],
                            default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    run = open_run(callback.run_dir)
    assert run.status()["state"] == "finished" and "telemetry_error" not in run.status()
    layers = {layer["name"]: layer for layer in run.structures()[-1][1]["layers"]}
    assert [(layers[n]["in"], layers[n]["out"]) for n in ("net.down", "net.up", "net.mix", "net.fc")] == \
        [(3, 8), (8, 12), (12, 6), (6, 10)]
    weight = module.net.up.weight.detach().numpy()  # [8, 6, 2, 2]: output channel o = 6·(o // 6) + j
    by_output = np.stack([weight[o // 6 * 4:(o // 6 + 1) * 4, o % 6] for o in range(12)])
    snapshot = run.snapshot(4)["arrays"]
    np.testing.assert_array_equal(snapshot["weight/net.up"], by_output)
    assert snapshot["act/net.up"].shape == (8, 12, 32, 32) and snapshot["cosine/net.up"].shape == (12,)
    assert run.filter_series("net.up", "weight_norm")["values"].shape == (4, 12)  # values: test_probes.py


class TupleOrDictOutput(ClassifierModule):
    """A forward that returns ``(logits, features)`` or ``{"logits", "features"}``, as many real models do."""

    def __init__(self, wrap: str) -> None:
        super().__init__(ReVACNNNet())
        self.wrap = wrap

    def forward(self, x):
        logits = self.net(x)
        return (logits, x.mean((2, 3))) if self.wrap == "tuple" else {"logits": logits, "features": x.mean((2, 3))}

    def _logits(self, x):
        out = self(x)
        return out[0] if self.wrap == "tuple" else out["logits"]

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self._logits(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self._logits(x), y))


@pytest.mark.parametrize("wrap", ["tuple", "dict"])
def test_a_forward_returning_logits_with_other_outputs_gets_probe_maps_and_predictions(tmp_path, wrap):
    """``(logits, features)`` and ``{"logits": …}`` cost the probe maps and every image prediction."""
    data = DigitsDataModule(batch_size=16)
    witness = ValPredictionWitness(data)
    run = fit(tmp_path, TupleOrDictOutput(wrap), data, witness)
    assert run.status()["state"] == "finished"
    snapshot = run.snapshot(4)
    assert "probe_error" not in snapshot["body"] and snapshot["arrays"]["act/net.conv1"].shape == (8, 16, 32, 32)
    val = run.val_predictions()
    assert val["error"] is None
    np.testing.assert_array_equal(val["pred"], np.stack(witness.predictions))


class VolumeNet(torch.nn.Module):
    """A 3-D conv over the image's channels taken as depth (a video or volume model's first layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.conv = torch.nn.Conv2d(12, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        volume = F.relu(self.c3(x[:, None]))          # [N, 4, 3, 32, 32]
        return self.fc(F.relu(self.conv(volume.flatten(1, 2))).mean((2, 3)))


def test_the_dashboard_draws_a_3d_convs_filters_and_maps(tmp_path):
    """Its [in, d, h, w] filters and [C, D, H, W] maps made the Network view's details and the Filters view fail
    (HTTP 500) on every tick."""
    import base64

    torch.manual_seed(4)
    callback = ReVACNNCallback([torch.nn.Conv3d, torch.nn.Conv2d, torch.nn.Linear], filters_every=1, snapshot_every=4)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, callbacks=[callback],
                            default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(ClassifierModule(VolumeNet()), DigitsDataModule(batch_size=16))
    run = open_run(callback.run_dir)
    assert run.snapshot(4)["arrays"]["act/net.c3"].shape == (8, 4, 3, 32, 32)

    def png_size(uri: str) -> tuple[int, int]:
        header = base64.b64decode(uri.split(",", 1)[1])[16:24]
        return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")

    with replaying_dashboard(tmp_path) as (call, key):
        details = call("net-details.children", [("net-selected", "data", {"layer": "net.c3", "filters": [1]}),
                                                 ("tick-network", "data", [1, 0]), ("net-probe", "value", 0)],
                       [("run-select", "value", key), ("tabs", "value", "network")])
        # filter 1: its one input channel's 3 depth slices of 3×3 in a row, scaled to ~300 px (×23); its map: the
        # 3 slices of 32×32 in a row (×3)
        assert png_size(details["net-filter-img"]["src"]) == ((3 * 4 + 1) * 23, (3 + 2) * 23)
        assert png_size(details["net-act-img"]["src"]) == ((3 * 33 + 1) * 3, 34 * 3)
        filters = call("fil-caption.children", [
            ("tick-filters", "data", [1, 0]), ("fil-layer", "value", "net.c3"), ("fil-probe", "value", 0)],
            [("tabs", "value", "filters"), ("run-select", "value", key), ("fil-sig", "data", None)])
        assert "4 filters (rows, index at the left) × 3 slices" in filters["fil-caption"]["children"]
        assert png_size(filters["fil-acts"]["src"])[0] > 0 and png_size(filters["fil-weights"]["src"])[0] > 0

    # the snapshot comparison's filter view: A, B, B − A, ln(|b|/|a|) as tiles of the 3 depth slices, and the maps
    from revacnn_dash.analysis.compare import compare_snapshots
    from revacnn_dash.figures.comparison_charts import filter_figure as _filter_figure

    pair = compare_snapshots(run.snapshot(1), run.snapshot(4), run.structures()).filter_pair("net.c3", 1)
    figure = _filter_figure(pair, probe=0)
    weight = run.snapshot(4)["arrays"]["weight/net.c3"][1, 0]          # [3, 3, 3]: the 3 depth slices
    tile = np.asarray(figure.data[1].z)
    assert tile.shape == (2 * 4, 2 * 4)  # 3 slices on a 2 × 2 grid, NaN gutters
    np.testing.assert_allclose(tile[4:7, 0:3], weight[2], rtol=1e-6)
    assert np.asarray(figure.data[-1].z).shape == (2 * 33, 2 * 33)
