"""2-process CPU (gloo) DDP: the engine's surgery is identical on every rank, freezing by grad=None works under DDP,
and after a re-wrap and further steps all parameters are bitwise equal across ranks."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

pytestmark = pytest.mark.ddp


def _worker(rank, world, rendezvous, result_path):
    # A file rendezvous: no port chosen in advance that another process could take in the meantime.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from steering_util import batch, build
    from revacnn.steering import SteeringEngine

    module = build("resnet")
    ddp = DDP(module)
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    x, y = batch(seed=10 + rank, n=4)  # different data per rank

    def train(k):
        for _ in range(k):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), y).backward()
            opt.step()

    train(2)
    engine = SteeringEngine(module, [opt], example_input=x[:2], distributed=True)
    torch.manual_seed(1000 + rank)  # global RNGs differ per rank: surgery must not depend on them
    import random
    random.seed(1000 + rank)
    acks = [engine.apply({"id": "1", "op": "freeze", "args": {"layers": ["net.layer1.0.conv1"]}}),
            engine.apply({"id": "2", "op": "freeze", "args": {"layer": "net.layer2.0.conv1", "filters": [0, 2]}})]
    frozen = module.net.layer1[0].conv1.weight.detach().clone()
    rows = module.net.layer2[0].conv1.weight.detach()[[0, 2]].clone()
    train(2)  # no "expected to have finished reduction" error: requires_grad untouched
    kept = [torch.equal(module.net.layer1[0].conv1.weight, frozen),
            torch.equal(module.net.layer2[0].conv1.weight[[0, 2]], rows)]
    acks.append(engine.apply({"id": "3", "op": "widen", "args": {"layer": "net.conv1", "count": 2}}))
    acks.append(engine.apply({"id": "4", "op": "insert_layer", "args": {"after": "net.layer2.1.conv1"}}))
    # surgery alone (before the re-wrap broadcast) must already agree across ranks
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same_after_surgery = all(torch.equal(gathered[0], g) for g in gathered)
    frozen = module.net.layer1[0].conv1.weight.detach().clone()  # widened as a reader of net.conv1's stream
    ddp = DDP(module)  # the callback's re-wrap
    train(3)
    flat = torch.cat([p.detach().flatten() for p in module.parameters()] +
                     [s["momentum_buffer"].flatten() for s in opt.state.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"acks_ok": [a["ok"] for a in acks], "errors": [a["error"] for a in acks],
                    "same_after_surgery": same_after_surgery,
                    "same_after_training": all(torch.equal(gathered[0], g) for g in gathered),
                    "frozen_kept": kept[0] and torch.equal(module.net.layer1[0].conv1.weight, frozen),
                    "rows_kept": kept[1]}, result_path)
    # Neither rank tears gloo down while the other may still use its connections: a rank that exits first closes
    # them under the other's feet, which can abort it (std::terminate in a gloo thread, seen once on CI).
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_ranks_identical(tmp_path):
    out = tmp_path / "result.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True)
    r = torch.load(out, weights_only=True)
    assert r["acks_ok"] == [True] * 4, r["errors"]
    assert r["same_after_surgery"]
    assert r["same_after_training"]
    assert r["frozen_kept"] and r["rows_kept"]


BLOCKS = "net.model.mobilenet_v2.layer"
BLOCK1 = f"{BLOCKS}.1"


def test_structural_steering_of_mobilenet_v2_under_ddp_keeps_ranks_bitwise_equal(tmp_path):
    """HF MobileNetV2 (tf_padding, ReLU6, depthwise convs) steered mid-run through the callback on 2 gloo ranks:
    a layer inserted after a depthwise conv and after the head, a depthwise conv removed, and the expand conv whose
    reader is that depthwise conv widened (a depthwise reader widens with its producer)."""
    import time

    from test_ddp import connection, finish, send_and_wait, start

    from revacnn.wire.client import RunClient

    process = start(tmp_path, "--model", "mobilenet_v2_small", "--epochs", "1", "--batches", "30", "--slow", "0.05")
    deadline = time.monotonic() + 180
    while connection(tmp_path) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with RunClient(tmp_path) as client:
        client.connect(timeout=60)
        acks = send_and_wait(client, [("insert_layer", {"after": f"{BLOCK1}.conv_3x3.convolution",
                                                         "batchnorm": True}),
                                      ("insert_layer", {"after": "net.model.classifier"}),
                                      ("remove_layer", {"layer": f"{BLOCKS}.2.conv_3x3.convolution"}),
                                      ("widen", {"layer": f"{BLOCK1}.expand_1x1.convolution", "count": 4})],
                             timeout=180)
    finish(process, timeout=400)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 30
    assert [ack["status"] for ack in acks[:3]] == ["done"] * 3, acks
    model = ranks[0]["model"]
    assert f"{BLOCK1}.conv_3x3.normalization.inserted.conv.weight" in model
    assert f"{BLOCK1}.conv_3x3.convolution.weight" in model          # the anchor kept its name
    assert "net.model.classifier.inserted.linear.weight" in model
    assert f"{BLOCKS}.2.conv_3x3.convolution.weight" not in model
    assert model.keys() == ranks[1]["model"].keys()
    for name, tensor in model.items():
        assert torch.equal(tensor, ranks[1]["model"][name]), f"{name} differs between ranks"
    for key, state in ranks[0]["optimizer"]["state"].items():
        for field, value in state.items():
            other = ranks[1]["optimizer"]["state"][key][field]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer {key}.{field} differs"
    # Widening through a depthwise reader comes with the coupling analysis of branch i27-graph (issue 27); until
    # then it is refused, and this is the one assertion that fails.
    assert acks[3]["status"] == "done", acks[3]
    assert model[f"{BLOCK1}.expand_1x1.convolution.weight"].shape[0] == 4 + 48
