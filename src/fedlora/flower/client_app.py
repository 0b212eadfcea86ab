"""The Flower ClientApp: one client's round with the same algorithm code as the in-process runtime.

Identity comes from the SuperNode's node config: `partition-id` (which client of the
federation this node is) and `num-partitions` (must equal federation.num_clients); then
either `data-file` (the node's own examples, CSV or JSONL: a run with nodes.local_data) or
`data-dir` (where this host keeps the shared dataset, cut with the global partitioner);
optional `state-dir` (where the node keeps its base snapshot and private state: see
fedlora.flower.node) and the device figures it declares instead of measuring (`throughput`,
`memory-mib`, `uplink-mbps`, `downlink-mbps`, `link-mbps`: fedlora.flower.capability).

`query` answers who the node is and, serving its own data, what that data is (a NodeReport:
example count, label histogram), and in a run with `devices: measured` what the node can do
(fedlora.flower.capability: throughput, free memory, link rates); `train` runs the method's
client_train on the node's own examples from its up-to-date base. With
`privacy.secure_aggregation` the `query.secagg_*` actions run the protocol's other steps and
`train` masks the upload (fedlora.flower.secagg).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.flower.records import checked_run_key, from_arrays, to_arrays
from fedlora.flower.reports import NodeReport

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


def data_file(context: Context) -> str | None:
    value = context.node_config.get("data-file")
    return None if value in (None, "") else os.path.expanduser(str(value))


def run_config(conf: Any, context: Context):
    """The run's config as the server sent it (size-limited, validated), with this host's
    data folder when the node config names one."""
    from fedlora.config import build_config, parse_tree

    tree = parse_tree(str(conf["config-yaml"]), "message config-yaml")
    if "data-dir" in context.node_config:
        tree.setdefault("data", {})["data_dir"] = str(context.node_config["data-dir"])
    return build_config(tree)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who am I, (serving my own file) how many examples of which classes, and (when the run
    has `devices: measured` and asks) what I can do: the server maps partitions to nodes with
    this. Only the capability's warm-up loads the model; the data file is read, not tokenised."""
    k, n = node_identity(context)
    report = NodeReport(k, n)
    conf = msg.content.config_records.get("config")
    path = data_file(context)
    cfg = run_config(conf, context) if conf is not None and "config-yaml" in conf else None
    classes = [str(c) for c in conf["classes"]] if conf is not None and "classes" in conf else None
    if path is not None and cfg is not None and classes is not None:
        from fedlora.data.custom import load_node_file

        labels = load_node_file(Path(path), cfg.data, classes)["label"]
        counts = [0] * len(classes)
        for label in labels:
            counts[label] += 1
        report = NodeReport(k, n, len(labels), tuple(counts))
    if cfg is not None and conf.get("capability"):
        from fedlora.flower.capability import node_capability

        capability = node_capability(cfg, dict(context.node_config), k, path, classes)
        report = replace(report, capability=capability)
    return Message(RecordDict({"info": ConfigRecord(report.to_record())}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Bring the node's base up to date (fedlora.flower.node), run the method's client_train on
    the node's own examples, return the update. (torch and the runtime are imported here, not at
    module level, so a `query` stays cheap.)"""
    from fedlora.algorithms.base import Message as Payload
    from fedlora.data.task import node_task
    from fedlora.flower import secagg
    from fedlora.flower.node import NodeStore, bring_base_up_to_date
    from fedlora.models import load_tokenizer
    from fedlora.runtime.inprocess import Federation

    started = time.perf_counter()
    k, n = node_identity(context)
    conf = msg.content.config_records["config"]
    round_, state_round = int(conf["round"]), int(conf["state-round"])
    cfg = run_config(conf, context)
    if n != cfg.federation.num_clients:
        raise ValueError(f"node config: num-partitions={n}, but the run has federation.num_clients="
                         f"{cfg.federation.num_clients}")
    state_dir = Path(os.path.expanduser(str(context.node_config.get("state-dir", DEFAULT_STATE_DIR))))
    store = NodeStore(state_dir / checked_run_key(conf["run-key"]) / f"partition-{k}")
    store.save_merges(msg.content)

    tokenizer = load_tokenizer(cfg.model.name)
    classes = [str(c) for c in conf["classes"]] if "classes" in conf else None
    fed = Federation.assemble(cfg, tokenizer, node_task(cfg, tokenizer, k, data_file(context), classes))
    how = bring_base_up_to_date(store, fed.adapters, round_ - 1, str(conf["base-sha256"]))
    payload = Payload(
        tensors=from_arrays(msg.content.array_records["payload"]),
        config=dict(msg.content.config_records["payload-config"]),
    )
    state, lost = store.load_state(state_round, str(conf.get("state-sha256", "")) or None)
    if lost:
        log.warning("partition %d: %s: starting from the method's initial client state", k, lost)
    secure = msg.content.config_records.get(secagg.RECORD)
    if secure is not None:  # the shares addressed to this client, checked before any training
        secagg.receive_shares(context.state, k, secure)
    ctx = fed.client(k, round_, int(conf.get("stage", 0)))
    t0 = time.perf_counter()
    update, new_state = fed.algorithm.client_train(ctx, payload, state)
    train_seconds = time.perf_counter() - t0
    if secure is not None:
        update = replace(update, tensors=secagg.masked_upload(context.state, k, int(secure["round"]), update.tensors))
    state_sha256 = store.save_state(round_, new_state, keep_from=state_round)

    metrics = {key: float(v) for key, v in update.metrics.items()}
    metrics["flops"] = float(ctx.flops)  # the server's simulated clock
    # where the node's time went (docs/howto/real-nodes.md: warm nodes): the whole handler, training
    metrics.update({"node-seconds": time.perf_counter() - started, "train-seconds": train_seconds})
    info: dict[str, Any] = {"partition-id": k, "num-examples": int(update.num_examples),
                            "state-sha256": state_sha256, "base": how}
    if lost:
        info["state-reset"] = lost
    content = RecordDict({"update": to_arrays(update.tensors), "metrics": MetricRecord(metrics),
                          "info": ConfigRecord(info)})
    return Message(content, reply_to=msg)


def _secagg_step(name: str, msg: Message, context: Context) -> Message:
    from fedlora.flower import secagg  # (no torch: a protocol step stays cheap)

    k, _ = node_identity(context)
    reply = getattr(secagg, name)(context.state, k, msg.content.config_records[secagg.RECORD])
    return Message(RecordDict({secagg.RECORD: reply}), reply_to=msg)


@app.query("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 1: this round's public keys."""
    return _secagg_step("client_keys", msg, context)


@app.query("secagg_shares")
def secagg_shares(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 2: shares of this client's secrets, encrypted for each peer."""
    return _secagg_step("client_shares", msg, context)


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Secure aggregation, step 4: the shares the server needs to remove the masks."""
    return _secagg_step("client_unmask", msg, context)
