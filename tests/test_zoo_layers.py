"""insert_layer (±BatchNorm) and remove_layer on every layer role of the zoo's modern CNNs (issue 27): the stem
(also a 4×4 patchify conv), expand, depthwise, project, squeeze-excitation, residual stream, a ConvNeXt downsampling
2×2 conv, the MLP hidden Linear on channels-last tokens, the head.

Each op either works — eval output within 1e-5 of before where it promises it (insert_layer), the output change it
reports equal to the one measured here (remove_layer), the optimizer holding exactly the model's parameters with
their state, 5 more training steps finite, the layer's own name still steerable — or is refused with a reason, with
model and optimizer bitwise unchanged, and only where it must be (remove_layer of a layer whose input and output
widths differ, or whose even kernel has no centre tap)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import zoo
from steering_util import assert_optimizer_consistent, assert_same_state, cmd, snapshot
from torch import nn

from revacnn.steering import SteeringEngine
from revacnn.steering.insertion import INSERTED

MOBILENET = "model.mobilenet_v2"
CONVNEXT = "model.convnext.encoder.stages"
ROLES = [  # (model, role, layer)
    ("mobilenet_v2_small", "stem", f"{MOBILENET}.conv_stem.first_conv.convolution"),
    ("mobilenet_v2_small", "expand", f"{MOBILENET}.layer.1.expand_1x1.convolution"),
    ("mobilenet_v2_small", "depthwise", f"{MOBILENET}.layer.1.conv_3x3.convolution"),
    ("mobilenet_v2_small", "project (residual stream)", f"{MOBILENET}.layer.2.reduce_1x1.convolution"),
    ("mobilenet_v2_small", "head", "model.classifier"),
    ("efficientnet", "depthwise, same padding", "model.efficientnet.encoder.blocks.4.depthwise_conv.depthwise_conv"),
    ("efficientnet", "SE reduce", "model.efficientnet.encoder.blocks.4.squeeze_excite.reduce"),
    ("convnext", "patchify stem 4×4", "model.convnext.embeddings.patch_embeddings"),
    ("convnext", "downsampling 2×2", f"{CONVNEXT}.1.downsampling_layer.1"),
    ("convnext", "depthwise 7×7", f"{CONVNEXT}.0.layers.0.dwconv"),
    ("convnext", "MLP hidden Linear (tokens)", f"{CONVNEXT}.0.layers.0.pwconv1"),
    ("convnext", "residual stream Linear (tokens)", f"{CONVNEXT}.0.layers.0.pwconv2"),
    ("regnet_y", "grouped 3×3", "model.regnet.encoder.stages.1.layers.1.layer.1.convolution"),
    ("regnet_y", "SE expand", "model.regnet.encoder.stages.1.layers.1.layer.2.attention.2"),
    ("mobile_block", "SE expand", "block1.se.expand"),
    ("mobile_block", "project (residual stream)", "block1.project"),
    ("grouped_stack", "depthwise with channel multiplier 16 → 32", "multiplier"),
    ("grouped_stack", "grouped 32 → 48", "grouped"),
]


@functools.cache
def _built(name: str) -> nn.Module:
    return zoo.calibrate(zoo.mobilenet_v2_small()) if name == "mobilenet_v2_small" else zoo.build(name)


def _setup(name: str):
    torch.manual_seed(0)
    net = copy.deepcopy(_built(name))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, y = torch.randn(4, *zoo.IMAGE), torch.randint(0, zoo.CLASSES, (4,))
    _steps(net, optimizer, x, y, 1)  # optimizer state exists
    return net, optimizer, x, y, SteeringEngine(net, [optimizer], example_input=x)


def _steps(net, optimizer, x, y, n: int) -> list[float]:
    net.train()
    losses = []
    for _ in range(n):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _eval(net, x) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        out = net(x)
    net.train()
    return out


def _removal_must_refuse(layer: nn.Module) -> str | None:
    """What makes replacing ``layer`` by an identity impossible, from its shape alone (None: nothing)."""
    if isinstance(layer, nn.Linear):
        return "features" if layer.in_features != layer.out_features else None
    if layer.in_channels != layer.out_channels:
        return "channels"
    return "even kernel" if any(k % 2 == 0 for k in layer.kernel_size) else None


@pytest.mark.parametrize("model,role,name", ROLES, ids=[f"{m}-{r}" for m, r, _ in ROLES])
def test_insert_and_remove_layer_on_every_role(model, role, name):
    net, optimizer, x, y, engine = _setup(model)
    layer = net.get_submodule(name)
    kind = type(layer)

    before = _eval(net, x)
    first = engine.apply(cmd("insert_layer", after=name))
    assert first["ok"], first["error"]
    second = engine.apply(cmd("insert_layer", after=name, batchnorm=True))
    if not second["ok"]:  # only a Linear on tokens: a BatchNorm needs [batch, features]
        assert isinstance(layer, nn.Linear) and "[batch, features]" in second["error"], second["error"]
    assert (_eval(net, x) - before).abs().max().item() <= 1e-5
    assert net.get_submodule(name) is layer and type(layer) is kind          # the anchor stays, name and type
    for ack in (first, second):
        for new in ack["changes"].get("inserted", []):
            assert new.startswith(ack["changes"]["anchor"] + f".{INSERTED}.")
            assert isinstance(net.get_submodule(new), (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d))
    new_conv = net.get_submodule(first["changes"]["inserted"][0])
    if isinstance(layer, nn.Conv2d):
        assert all(k % 2 == 1 for k in new_conv.kernel_size) and new_conv.groups == layer.groups
    assert_optimizer_consistent(net, optimizer)
    for op in ("freeze", "unfreeze"):                                   # later commands on the original name
        ack = engine.apply(cmd(op, layers=[name]))
        assert ack["ok"] and list(ack["changes"]["frozen"]) == ([name] if op == "freeze" else []), ack

    must_refuse = _removal_must_refuse(layer)
    kept = snapshot(net, optimizer)
    mid = _eval(net, x)
    removed = engine.apply(cmd("remove_layer", layer=name))
    if must_refuse:
        assert not removed["ok"] and must_refuse in removed["error"], removed
        assert_same_state(kept, snapshot(net, optimizer))
    else:
        assert removed["ok"], removed["error"]
        change = (_eval(net, x) - mid).abs().max().item()
        assert removed["changes"]["output_max_abs_change"] == pytest.approx(change, rel=1e-5, abs=1e-7)
        layer = net.get_submodule(name)  # its replacement; the layers inserted after it stay
        assert getattr(layer, INSERTED, None) is not None or first["changes"]["anchor"] != name

    undo = engine.apply(cmd("remove_layer", layer=first["changes"]["inserted"][0]))
    assert undo["ok"] and undo["changes"]["undid_insertion"], undo
    assert_optimizer_consistent(net, optimizer)
    losses = _steps(net, optimizer, x, y, 5)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert torch.isfinite(_eval(net, x)).all()


def test_a_mobilenet_v2_with_inserted_layers_resumes_and_loads_offline_identically(tmp_path):
    """Layers inserted (and a depthwise conv removed) mid-run through the callback: the checkpoint replays the
    change log — the hooks that run the inserted layers included — on resume and in ``load_steered``."""
    import pytorch_lightning as pl
    from helpers import quiet_trainer
    from test_steering_callback import fit

    from revacnn import ReVACNNCallback, load_steered
    from revacnn.demo import ClassifierModule, DigitsDataModule

    depthwise = f"net.{MOBILENET}.layer.1.conv_3x3.convolution"
    plan = {2: [("insert_layer", {"after": depthwise, "batchnorm": True}),
                ("insert_layer", {"after": "net.model.classifier"})],
            3: [("remove_layer", {"layer": f"net.{MOBILENET}.layer.2.conv_3x3.convolution"}),
                ("insert_layer", {"after": depthwise})]}
    torch.manual_seed(3)
    trainer, model, script = fit(tmp_path, plan, epochs=1, batches=6,
                                 model=ClassifierModule(copy.deepcopy(_built("mobilenet_v2_small")), lr=0.01))
    assert [ack["status"] for ack in script.acks] == ["done"] * 4, script.acks
    chain_end = f"net.{MOBILENET}.layer.1.conv_3x3.normalization.inserted.bn"   # a second insert goes after the first
    assert script.acks[3]["result"]["changes"]["anchor"] == chain_end
    path = tmp_path / "steered.ckpt"
    trainer.save_checkpoint(path)
    images = torch.randn(4, *zoo.IMAGE)
    model.eval()
    with torch.no_grad():
        expected = model(images)

    offline = load_steered(path, ClassifierModule(zoo.mobilenet_v2_small())).eval()
    with torch.no_grad():
        assert torch.equal(offline(images), expected)
    assert type(offline.net.get_submodule(depthwise[len("net."):])) is nn.Conv2d

    captured = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.eval()
            with torch.no_grad():
                captured["outputs"] = pl_module(images)
            pl_module.train()

    callback = ReVACNNCallback(filters_every=0, snapshot_every=0, record=False)
    resumed_model = ClassifierModule(zoo.mobilenet_v2_small(), lr=0.01)
    resumed = quiet_trainer(max_epochs=2, limit_train_batches=6, limit_val_batches=0, callbacks=[callback, Capture()],
                            default_root_dir=tmp_path, num_sanity_val_steps=0)
    resumed.fit(resumed_model, DigitsDataModule(batch_size=32), ckpt_path=path)
    assert torch.equal(captured["outputs"], expected)
    assert resumed.global_step == 12 and torch.isfinite(resumed_model(images)).all()
