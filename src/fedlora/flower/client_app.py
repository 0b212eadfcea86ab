"""The Flower ClientApp: one client's round with the same algorithm code as the in-process runtime.

Identity comes from the SuperNode's node config: `partition-id` (which shard of the
federation's partition this node holds) and `num-partitions` (must equal
federation.num_clients); optional `data-dir` (where this host keeps ../shared/data) and
`state-dir` (where the client keeps its private state).

Flower starts a fresh ClientApp process for every message, so nothing survives in memory.
The client keeps on its own disk, under state-dir/<run key>/partition-<k>/:
  merges/round_NNNN.safetensors   every base update the server sent (catch-up included),
                                  replayed in order onto a fresh base: the same float
                                  operations as the in-process runtime, hence the same base;
  state/round_NNNN.safetensors    the method's private client state after round N (AFLoRA's
                                  λ and mask, ...); the server names the round whose state to
                                  continue from (the last round it accepted this client's
                                  update), so a rejected update or a server resumed from an
                                  older checkpoint never leaves the client ahead of the server.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.flower.records import MERGE_PREFIX, checked_run_key, from_arrays, to_arrays

log = logging.getLogger("fedlora")

app = ClientApp()

DEFAULT_STATE_DIR = "~/.cache/fedlora/flower-clients"


def node_identity(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, with a one-line error if missing."""
    nc = context.node_config
    try:
        return int(nc["partition-id"]), int(nc["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config: {err.args[0]} missing; start the SuperNode with "
            "--node-config 'partition-id=0 num-partitions=3'"
        ) from None


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who am I: the server maps partitions to nodes with this (cheap: no model loaded)."""
    k, n = node_identity(context)
    return Message(RecordDict({"info": ConfigRecord({"partition-id": k, "num-partitions": n})}), reply_to=msg)


class ClientStore:
    """This client's files for one server run: received base updates and its private state."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def save_merges(self, content: RecordDict) -> None:
        from fedlora.files import atomic_write, tensors_to_bytes
        from fedlora.runtime.checkpoint import merge_path

        for key, record in content.array_records.items():
            if key.startswith(MERGE_PREFIX):
                path = merge_path(self.root, int(key[len(MERGE_PREFIX):]))
                atomic_write(path, tensors_to_bytes(from_arrays(record)), inside=self.root)

    def state_path(self, round_: int) -> Path:
        return self.root / "state" / f"round_{round_:04d}.safetensors"

    def load_state(self, round_: int):
        from fedlora.files import load_tensors

        if round_ == 0:
            return {}
        path = self.state_path(round_)
        if not path.exists():
            log.warning("client state of round %d not found in %s: starting from the initial state",
                        round_, path.parent)
            return {}
        return load_tensors(path, inside=self.root)[0]

    def save_state(self, round_: int, state, keep_from: int) -> None:
        """Save the state after `round_`; drop states older than `keep_from` (never needed again)."""
        from fedlora.files import atomic_write, tensors_to_bytes

        path = self.state_path(round_)
        atomic_write(path, tensors_to_bytes(state), inside=self.root)
        for old in path.parent.glob("round_*.safetensors"):
            if int(old.stem.split("_")[1]) < keep_from:
                old.unlink(missing_ok=True)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Rebuild the base as of the round, run the method's client_train, return the update.
    (torch and the runtime are imported here, not at module level, so a `query` stays cheap.)"""
    from fedlora.algorithms.base import Message as Payload
    from fedlora.config import build_config, load_yaml
    from fedlora.runtime.checkpoint import load_merges
    from fedlora.runtime.inprocess import Federation

    k, n = node_identity(context)
    conf = msg.content.config_records["config"]
    round_, state_round = int(conf["round"]), int(conf["state-round"])
    tree = load_yaml(str(conf["config-yaml"]))  # duplicate keys and alias bombs refused, as in a file
    if "data-dir" in context.node_config:
        tree.setdefault("data", {})["data_dir"] = str(context.node_config["data-dir"])
    cfg = build_config(tree)
    if n != cfg.federation.num_clients:
        raise ValueError(f"node config: num-partitions={n}, but the run has federation.num_clients="
                         f"{cfg.federation.num_clients}")
    state_dir = Path(os.path.expanduser(str(context.node_config.get("state-dir", DEFAULT_STATE_DIR))))
    store = ClientStore(state_dir / checked_run_key(conf["run-key"]) / f"partition-{k}")
    store.save_merges(msg.content)

    fed = Federation.build(cfg)
    for merge in load_merges(store.root, round_ - 1):
        fed.adapters.merge(merge)
    payload = Payload(
        tensors=from_arrays(msg.content.array_records["payload"]),
        config=dict(msg.content.config_records["payload-config"]),
    )
    ctx = fed.client(k, round_, int(conf.get("stage", 0)))
    update, new_state = fed.algorithm.client_train(ctx, payload, store.load_state(state_round))
    store.save_state(round_, new_state, keep_from=state_round)

    metrics = {key: float(v) for key, v in update.metrics.items()}
    metrics["flops"] = float(ctx.flops)  # the server's simulated clock
    content = RecordDict({
        "update": to_arrays(update.tensors),
        "metrics": MetricRecord(metrics),
        "info": ConfigRecord({"partition-id": k, "num-examples": int(update.num_examples)}),
    })
    return Message(content, reply_to=msg)
