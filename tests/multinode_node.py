"""The processes of tests/test_multinode_netns.py (not a test module): one per node of a 2-node DDP job, and the client.

    python tests/multinode_node.py node --node-rank R --out DIR --host ADDR --keys-dir KEYS [--max-steps N] ...
    python tests/multinode_node.py client CONNECTION_FILE CLIENT_KEY_SECRET

``node`` is one node of ``Trainer(strategy="ddp", accelerator="cpu", devices=1, num_nodes=2)`` launched by hand, as a
cluster without a scheduler does it: the rendezvous comes from the environment the test sets (MASTER_ADDR,
MASTER_PORT, NODE_RANK, WORLD_SIZE, LOCAL_RANK, GLOO_SOCKET_IFNAME). Rank 0 prints ``CONNECTION <path>`` once its
sockets are bound; at the end every rank saves its parameters, optimizer state and the step at which it first trained
the widened layer to DIR/rank<R>.pt.

``client`` connects with the connection file (CURVE), counts telemetry steps, widens ``net.conv2`` by 2 filters, lets
the run train on after it, stops the run and prints one JSON line of what it saw. It imports no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

LAYER = "net.conv2"


def node(args: argparse.Namespace) -> None:
    from datetime import timedelta
    from pathlib import Path

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.strategies import DDPStrategy

    from revacnn import ReVACNNCallback
    from revacnn.demo import ClassifierModule, DigitsDataModule, ReVACNNNet

    class Announce(pl.Callback):
        def __init__(self, callback: ReVACNNCallback) -> None:
            self.callback = callback

        def on_train_start(self, trainer, pl_module) -> None:
            if trainer.is_global_zero:
                print(f"CONNECTION {self.callback.connection_file}", flush=True)

    class Witness(pl.Callback):
        """Listed after ReVACNNCallback, so it sees each batch after the steering applied at its start: the step at
        which this rank first trains the widened layer. Saves the rank's whole state at the end."""

        def __init__(self, out: Path, slow: float) -> None:
            self.out, self.slow = out, slow
            self.width = None
            self.widened_at = None

        def on_train_start(self, trainer, pl_module) -> None:
            self.width = pl_module.get_submodule(LAYER).out_channels

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.widened_at is None and pl_module.get_submodule(LAYER).out_channels != self.width:
                self.widened_at = trainer.global_step

        def on_train_batch_end(self, *unused) -> None:
            if self.slow:
                time.sleep(self.slow)

        def on_train_end(self, trainer, pl_module) -> None:
            state = {"model": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                     "optimizer": trainer.optimizers[0].state_dict(), "step": trainer.global_step,
                     "widened_at": self.widened_at, "width_before": self.width,
                     "global_rank": trainer.global_rank, "node_rank": trainer.node_rank,
                     "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
                     "backend": torch.distributed.get_backend()}
            torch.save(state, self.out / f"rank{trainer.global_rank}.pt")
            print(f"SAVED {trainer.global_rank} {trainer.global_step}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = ClassifierModule(ReVACNNNet((4, 4, 4), in_channels=1, image_size=8), lr=0.02)
    data = DigitsDataModule(batch_size=8, image_size=8, channels=1)
    revacnn = ReVACNNCallback(host=args.host, keys_dir=args.keys_dir, run_dir=out / "run", filters_every=10,
                              snapshot_every=50, val_subset=50)
    # A bounded collective timeout: a node that never comes (or a lost peer) fails the run instead of hanging 30 min.
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=args.collective_timeout))
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, num_nodes=2, max_steps=args.max_steps,
                         max_epochs=-1, callbacks=[revacnn, Announce(revacnn), Witness(out, args.slow)],
                         default_root_dir=out, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(model, data)
    # Neither node tears gloo down while the other may still use its connections (see tests/test_steering_ddp.py).
    torch.distributed.barrier()
    print(f"DONE {trainer.global_rank}", flush=True)


def steps_in(message) -> list[int]:
    if message is None:
        return []
    if message.type == "step":
        return [message.body["step"]]
    if message.type == "steps":
        return [row["step"] for row in message.body["rows"]]
    return []


def client(connection: str, client_key: str, after: int, timeout: float) -> None:
    from revacnn.client import RunClient

    from revacnn_dash.data.hub import Hub

    seen = {"steps": [], "acks": {}, "final_state": None, "world_size": None, "security": None}
    deadline = time.monotonic() + timeout
    # the dashboard's own data side (torch-free), as `revacnn-dash --connect … --client-key …` runs it, beside the
    # steering client: it must see the run from this host too
    dashboard = Hub([connection], warm_umap=False, client_options={"client_keys": client_key})
    with RunClient(connection, client_keys=client_key) as run:
        seen["welcome"] = run.connect(timeout=30)
        widen_id = stop_id = None
        widen_step = None
        while time.monotonic() < deadline:
            message = run.recv(0.2)
            seen["steps"] += steps_in(message)
            if widen_id is None and len(seen["steps"]) >= 5:
                widen_id = run.send_command("widen", {"layer": LAYER, "count": 2})
            if message is None:
                continue
            if message.type == "ack" and message.body["status"] != "queued":
                seen["acks"][message.body["op"]] = message.body
                if message.body["id"] == widen_id:
                    widen_step = message.body.get("step")
            if message.type == "status":
                seen["world_size"] = message.body.get("world_size", seen["world_size"])
                seen["security"] = message.body.get("security", seen["security"])
                if message.body.get("state") in ("stopped", "finished", "failed"):
                    seen["final_state"] = message.body["state"]
                    break
            # trains on for `after` steps with the widened layer (several command broadcasts), then stops the run
            if (stop_id is None and widen_step is not None and seen["steps"]
                    and max(seen["steps"]) >= widen_step + after):
                stop_id = run.send_command("stop")
    seen["timed_out"] = time.monotonic() >= deadline
    state = next(iter(dashboard.runs.values()))
    shown = state.summary()
    with state.lock:
        layers = {layer["name"]: layer["out"] for layer in (state.structure or {}).get("layers", [])}
    seen["dashboard"] = {"run_id": shown["run_id"], "state": shown["state"], "step": shown["step"],
                         "security": (shown["security"] or {}).get("mode"), "layers": layers}
    dashboard.stop()
    seen["steps"] = sorted(set(seen["steps"]))
    print(json.dumps(seen, default=str), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    n = sub.add_parser("node")
    n.add_argument("--out", required=True)
    n.add_argument("--host", required=True)
    n.add_argument("--keys-dir", required=True)
    n.add_argument("--max-steps", type=int, default=3000)
    n.add_argument("--slow", type=float, default=0.02)
    n.add_argument("--collective-timeout", type=float, default=120.0)
    c = sub.add_parser("client")
    c.add_argument("connection")
    c.add_argument("client_key")
    c.add_argument("--after", type=int, default=30)
    c.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args()
    if args.role == "node":
        node(args)
    else:
        client(args.connection, args.client_key, args.after, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
