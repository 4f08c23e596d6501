"""Change log → replay on a fresh model → strict state_dict load → identical outputs (offline and resume-style)."""

from __future__ import annotations

import copy

import pytest
import torch
from steering_util import build, cmd, eval_out, make_optimizer, setup, step

from revacnn.demo.models import ReVACNNNet, SmallResNet
from revacnn.steering import SteeringError, load_steered, replay_changelog

SCRIPTS = {
    "revacnn": [cmd("widen", layer="net.conv1", count=2), cmd("remove_filters", layer="net.conv3", filters=[1, 4]),
                cmd("insert_layer", after="net.conv2", batchnorm=True), cmd("widen", layer="net.conv2", count=3),
                cmd("widen", layer="net.conv3", count=1, init="random"),
                cmd("insert_layer", after="net.conv1"), cmd("remove_layer", layer="net.conv1.inserted.conv")],
    "resnet": [cmd("widen", layer="net.conv1", count=2), cmd("remove_filters", layer="net.layer2.0.conv1", filters=[0]),
               cmd("insert_layer", after="net.layer1.1.conv1", batchnorm=True),
               cmd("widen", layer="net.layer2.1.conv2", count=2, init="random"),
               cmd("remove_layer", layer="net.layer1.1.bn1.inserted.bn")],
}


@pytest.mark.parametrize("kind", ["revacnn", "resnet"])
def test_checkpoint_round_trip(kind, tmp_path):
    module, optimizer, x, y, engine = setup(kind, "adamw")
    for c in SCRIPTS[kind]:
        ack = engine.apply(c)
        assert ack["ok"], ack["error"]
        step(module, optimizer, x, y)
    expected = eval_out(module, x)
    path = tmp_path / "steered.ckpt"
    torch.save({"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()],
                "revacnn": {"changelog": engine.changelog}}, path)

    fresh = build(kind, seed=123)
    with pytest.raises(RuntimeError):  # the original class alone cannot take it
        fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    fresh = load_steered(str(path), build(kind, seed=123))
    assert torch.equal(eval_out(fresh, x), expected)

    # bare network: the "net." prefix is stripped automatically
    bare = ReVACNNNet() if kind == "revacnn" else SmallResNet()
    load_steered(path, bare)
    bare.eval()
    with torch.no_grad():
        assert torch.equal(bare(x), expected)

    # resume-style: replay, fresh optimizer over module.parameters(), load optimizer state, keep training identically
    resumed = replay_changelog(build(kind, seed=5), torch.load(path, weights_only=True)["revacnn"]["changelog"])
    resumed.load_state_dict(module.state_dict())
    opt2 = make_optimizer(resumed, "adamw")
    opt2.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # load shares tensors
    step(module, optimizer, x, y)
    step(resumed, opt2, x, y)
    for (n, a), (_, b) in zip(module.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_changelog_is_plain_types():
    module, optimizer, x, y, engine = setup("resnet", "sgd")
    for c in SCRIPTS["resnet"]:
        assert engine.apply(c)["ok"]

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (str, int, float, bool))

    assert len(engine.changelog) == len(SCRIPTS["resnet"])
    assert plain(engine.changelog)


def test_failed_command_adds_nothing_to_changelog():
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    assert not engine.apply(cmd("widen", layer="net.fc", count=1))["ok"]
    assert engine.changelog == []


def test_replay_bad_log_raises_clear_error():
    with pytest.raises(SteeringError, match="unknown op"):
        replay_changelog(build("revacnn"), [{"op": "explode"}])
    with pytest.raises(SteeringError, match="cannot replay"):
        replay_changelog(build("revacnn"), [{"op": "remove_layer", "layer": "net.nope.x"}])


def test_acks_are_plain_types():
    module, optimizer, x, y, engine = setup("revacnn", "sgd")
    import json
    for c in SCRIPTS["revacnn"] + [cmd("freeze", layers=["net.fc"]), cmd("set_hparams", lr=0.1)]:
        ack = engine.apply(c)
        assert ack["ok"], ack["error"]
        json.dumps(ack)  # only plain types
        assert set(ack) == {"id", "op", "ok", "error", "structural", "changes", "filter_maps"}
        assert ack["id"] == c["id"] and ack["op"] == c["op"]
