"""Steering through grouped convs whose output channels are not their input channels: a grouped conv reading the
resized channels (GroupedNet's 16 → 32 in 4 groups), a depthwise conv with a channel multiplier as reader and as
producer, a grouped conv as producer (GroupedStackNet), and SqueezeBERT's grouped 1×1 Conv1d (a transformers model).

The expectations are computed here from the old tensors, by loops over filters and groups, independently of the
surgery: new channels sit at the end of their conv group and copy a channel of that group; every member of the
coupled group follows that order; a reader's weights of a source are divided between it and its copies.
"""

from __future__ import annotations

import pytest
import torch
import zoo
from steering_util import assert_optimizer_consistent, assert_same_state, cmd, eval_out, snapshot, step

from revacnn.checkpoint import ModelHistory
from revacnn.steering import SteeringEngine

SQ = "model.transformer.encoder.layers.0."


def _setup(net: torch.nn.Module, x: torch.Tensor):
    """``net``, an AdamW after one step (so state exists), and an engine on it."""
    y = torch.randint(0, zoo.CLASSES, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    step(net, optimizer, x, y)
    return optimizer, y, SteeringEngine(net, [optimizer], example_input=x)


def _images() -> torch.Tensor:
    return torch.randn(2, *zoo.IMAGE, generator=torch.Generator().manual_seed(1))


def _train_finite(net, optimizer, x, y) -> None:
    assert_optimizer_consistent(net, optimizer)
    losses = [step(net, optimizer, x, y) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses))), losses


def _origin(width: int, added_at: list[int], sources: list[int]) -> list[int]:
    """The old channel at every new position: the copies' sources at ``added_at``, the old channels in order at
    the others."""
    copies, kept = dict(zip(added_at, sources)), iter(range(width))
    return [copies[p] if p in copies else next(kept) for p in range(width + len(added_at))]


def _expected_reader(old: torch.Tensor, groups: int, origin: list[int], divide: bool) -> torch.Tensor:
    """A reader's new weight, filter by filter: filter o of conv group g reads, at its column j, new channel
    g·(new per group) + j, i.e. the old column of that channel's origin in the group, divided by how many channels
    now share that origin (``divide``: weights; not for optimizer state, which copies re-index unscaled)."""
    out, old_per = old.shape[0], old.shape[1]
    new_per = len(origin) // groups
    expected = torch.empty(out, new_per, *old.shape[2:], dtype=old.dtype)
    for o in range(out):
        g = o // (out // groups)
        for j in range(new_per):
            c = origin[g * new_per + j]
            expected[o, j] = old[o, c - g * old_per] / (origin.count(c) if divide else 1)
    return expected


# (model, layer widened, count, members whose rows follow, the reader and its groups, the conv groups of the
# channels, where the new channels go)
WIDEN = [
    ("grouped", "stem", 8, ["stem"], ("grouped", 4), 4, [4, 5, 10, 11, 16, 17, 22, 23]),
    ("grouped_stack", "stem", 16, ["stem", "bn0"], ("multiplier", 16), 16, list(range(1, 32, 2))),
    ("grouped_stack", "multiplier", 16, ["multiplier", "bn1"], ("grouped", 4), 16, list(range(2, 48, 3))),
    ("grouped_stack", "grouped", 8, ["grouped", "bn2"], ("pointwise", 1), 4, [12, 13, 26, 27, 40, 41, 54, 55]),
]


def _rows(net, members: list[str]) -> dict[str, torch.Tensor]:
    """Every per-filter tensor of ``members`` (weight, bias, BatchNorm statistics), copied."""
    return {f"{m}.{attr}": t.detach().clone() for m in members
            for attr, t in [*net.get_submodule(m).named_parameters(), *net.get_submodule(m).named_buffers()]
            if t.dim() >= 1}


@pytest.mark.parametrize(("model", "layer", "count", "members", "reader", "slices", "added_at"), WIDEN,
                         ids=[f"{c[0]}-{c[1]}" for c in WIDEN])
def test_new_channels_copy_their_own_conv_group_and_sit_at_its_end(model, layer, count, members, reader, slices,
                                                                   added_at):
    net, x = zoo.build(model), _images()
    optimizer, y, engine = _setup(net, x)
    (reader_name, groups), width = reader, net.get_submodule(layer).weight.shape[0]
    old = _rows(net, members)
    old_reader = net.get_submodule(reader_name).weight.detach().clone()
    state = {p: optimizer.state[net.get_submodule(p).weight]["exp_avg"].clone() for p in (layer, reader_name)}
    before = eval_out(net, x)
    history = ModelHistory()
    history.number_filters({layer: width})
    ids = list(history.filter_ids[layer])

    ack = engine.apply(cmd("widen", layer=layer, count=count, split="even", seed=4))
    assert ack["ok"], ack["error"]
    changes = ack["changes"]
    assert changes["added_at"] == added_at and changes["function_preserving"], changes
    assert ack["filter_maps"][layer] == {"kept": list(range(width)), "added": count, "added_at": added_at}
    origin = _origin(width, added_at, changes["sources"])
    old_size, new_size = width // slices, (width + count) // slices
    assert all(s // old_size == p // new_size for p, s in zip(added_at, changes["sources"]))  # its own group

    # the function (measured here), every member's rows, the reader's columns, optimizer state (even shares:
    # a copy starts from its source's state, unscaled)
    assert (eval_out(net, x) - before).abs().max().item() <= 1e-5
    for key, value in old.items():
        module, attr = key.rsplit(".", 1)
        assert torch.equal(getattr(net.get_submodule(module), attr).detach(), value[origin]), key
    torch.testing.assert_close(net.get_submodule(reader_name).weight.detach(),
                               _expected_reader(old_reader, groups, origin, divide=True))
    assert net.get_submodule(reader_name).groups == groups
    assert torch.equal(optimizer.state[net.get_submodule(layer).weight]["exp_avg"], state[layer][origin])
    assert torch.equal(optimizer.state[net.get_submodule(reader_name).weight]["exp_avg"],
                       _expected_reader(state[reader_name], groups, origin, divide=False))

    # filter ids: the old ones stay with their filters, fresh ones where the copies went
    history.follow(ack, [])
    new_ids = history.filter_ids[layer]
    assert [new_ids[p] for p in range(width + count) if p not in added_at] == ids
    assert len(set(new_ids)) == width + count and not {new_ids[p] for p in added_at} & set(ids)
    _train_finite(net, optimizer, x, y)


def test_grouped_channels_are_removed_and_added_the_same_number_per_group_or_refused_naming_the_groups():
    net, x = zoo.build("grouped_stack"), _images()
    optimizer, y, engine = _setup(net, x)
    state = snapshot(net, optimizer)
    ack = engine.apply(cmd("remove_filters", layer="grouped", filters=[0, 1, 12]))
    assert not ack["ok"] and "split these channels into 4 groups of 12" in ack["error"], ack
    assert "remove the same number of filters from every group, not [2, 1, 0, 0]" in ack["error"], ack
    ack = engine.apply(cmd("widen", layer="grouped", count=6))
    assert not ack["ok"] and "widen by a multiple of 4" in ack["error"], ack
    ack = engine.apply(cmd("remove_filters", layer="stem", filters=[3]))  # a depthwise reader: 1 channel per group
    assert not ack["ok"] and "16 groups of 1 (one filter each)" in ack["error"], ack
    assert_same_state(state, snapshot(net, optimizer))

    old, old_reader = _rows(net, ["grouped", "bn2"]), net.pointwise.weight.detach().clone()
    ack = engine.apply(cmd("remove_filters", layer="grouped", filters=[0, 12, 24, 36]))
    assert ack["ok"], ack["error"]
    kept = [c for c in range(48) if c % 12]
    assert ack["filter_maps"]["grouped"] == {"kept": kept, "added": 0, "added_at": []}
    assert net.grouped.groups == 4 and net.grouped.out_channels == 44 and net.bn2.num_features == 44
    for key, value in old.items():
        module, attr = key.rsplit(".", 1)
        assert torch.equal(getattr(net.get_submodule(module), attr).detach(), value[kept]), key
    assert torch.equal(net.pointwise.weight.detach(), old_reader[:, kept])
    # the depthwise conv with a multiplier loses one filter of each of its 16 groups: depthwise (16 → 16) again,
    # and the grouped conv reading it keeps 4 groups, now of 4 channels each
    old_reader = net.grouped.weight.detach().clone()
    ack = engine.apply(cmd("remove_filters", layer="multiplier", filters=list(range(1, 32, 2))))
    assert ack["ok"], ack["error"]
    assert net.multiplier.out_channels == 16 and net.multiplier.groups == 16
    assert net.grouped.in_channels == 16 and net.grouped.groups == 4
    assert torch.equal(net.grouped.weight.detach(), old_reader[:, 0::2])
    _train_finite(net, optimizer, x, y)


def test_frozen_filters_and_random_filters_follow_the_placement_inside_the_groups():
    net, x = zoo.build("grouped_stack"), _images()
    optimizer, y, engine = _setup(net, x)
    assert engine.apply(cmd("freeze", layer="grouped", filters=[13, 40]))["ok"]
    old, old_reader = net.grouped.weight.detach().clone(), net.pointwise.weight.detach().clone()
    ack = engine.apply(cmd("widen", layer="grouped", count=8, init="random", seed=3))
    assert ack["ok"], ack["error"]
    added = ack["changes"]["added_at"]
    kept = [p for p in range(56) if p not in added]
    # old filter 13 is the second of group 1 (now filters 14…27), 40 the fifth of group 3 (now 42…55)
    assert engine.frozen() == {"grouped": [15, 46]}
    assert torch.equal(net.grouped.weight[kept].detach(), old)
    assert torch.equal(net.pointwise.weight[:, kept].detach(), old_reader)
    new = net.grouped.weight[added].detach()
    assert new.abs().max() <= 0.2 and not any(torch.equal(new[0], old[c]) for c in range(48))
    frozen_before = net.grouped.weight[[15, 46]].detach().clone()
    _train_finite(net, optimizer, x, y)
    assert torch.equal(net.grouped.weight[[15, 46]].detach(), frozen_before)


def test_squeezebert_feed_forward_width_changes_by_whole_groups_exactly():
    """SqueezeBERT's intermediate Conv1d (32 → 64, 4 groups) and its reader, the output Conv1d (64 → 32, 4
    groups): the hidden width of its feed-forward block widens by 4k exactly and is pruned 1 per group."""
    torch.manual_seed(0)
    net = zoo.squeezebert()
    x = torch.randn(2, *zoo.TOKENS, generator=torch.Generator().manual_seed(1))
    optimizer, y, engine = _setup(net, x)
    layer, reader = SQ + "intermediate.conv1d", SQ + "output.conv1d"
    old, old_reader, before = net.get_submodule(layer).weight.detach().clone(), \
        net.get_submodule(reader).weight.detach().clone(), eval_out(net, x)
    state = snapshot(net, optimizer)
    ack = engine.apply(cmd("widen", layer=layer, count=6))
    assert not ack["ok"] and "4 groups of 16" in ack["error"], ack
    assert_same_state(state, snapshot(net, optimizer))
    ack = engine.apply(cmd("widen", layer=layer, count=8, split="even"))
    assert ack["ok"] and ack["changes"]["grouped"] == [layer, reader], ack
    assert ack["changes"]["added_at"] == [16, 17, 34, 35, 52, 53, 70, 71]
    assert (eval_out(net, x) - before).abs().max().item() <= 1e-5
    origin = _origin(64, ack["changes"]["added_at"], ack["changes"]["sources"])
    assert torch.equal(net.get_submodule(layer).weight.detach(), old[origin])
    torch.testing.assert_close(net.get_submodule(reader).weight.detach(),
                               _expected_reader(old_reader, 4, origin, divide=True))
    ack = engine.apply(cmd("remove_filters", layer=layer, filters=[0, 18, 36, 54]))
    assert ack["ok"] and net.get_submodule(reader).in_channels == 68, ack
    _train_finite(net, optimizer, x, y)


def test_filter_ids_of_an_ack_without_placement_are_appended():
    """Acks recorded before ``added_at`` existed (and a malformed one) place the new ids after the kept ones."""
    history = ModelHistory()
    history.number_filters({"conv": 4})
    history.follow({"filter_maps": {"conv": {"kept": [0, 2, 3], "added": 2}}}, [])
    assert history.filter_ids["conv"] == [0, 2, 3, 4, 5]
    history.follow({"filter_maps": {"conv": {"kept": [0, 1, 2, 3, 4], "added": 1, "added_at": [9]}}}, [])
    assert history.filter_ids["conv"] == [0, 2, 3, 4, 5, 6]
    history.follow({"filter_maps": {"conv": {"kept": [0, 1, 2, 3, 4, 5], "added": 2, "added_at": [1, 5]}}}, [])
    assert history.filter_ids["conv"] == [0, 7, 2, 3, 4, 8, 5, 6]
