"""The Flower ServerApp: the in-process runtime's rounds, with clients reached through a Grid.

`FlowerRun` is the in-process `Simulation` with one part replaced, the transport
(`_train_clients`): sampling, validation, aggregation, merging, evaluation, checkpoints,
metrics and resume are the very same code, so a Flower run of a config gives the same
global adapter as `fedlora run` when the same clients answer.

Per round the server
  1. asks nodes it does not know yet which partition they serve (`query` messages),
  2. sends each selected partition's node its payload, the config, the base updates it may
     lack (catch-up, from run_dir/merges) and the round whose client state to continue from
     (a method with intra-round stages, HierFedLoRA's τ_g cycles, gets one such exchange per
     stage, with the method's `aggregate_stage` between them),
  3. waits up to `round-timeout` seconds; clients that fail, time out or have no node are
     logged with the reason (in the round's `rejected` list) and the round goes on with the
     others, as long as at least `min-clients` updates were accepted; below that the run stops
     with the previous round's checkpoint intact (resume with --resume).
A node that comes back (same partition-id) is found by step 1 and rejoins; step 2 brings its
base up to date.

Run config keys (set by `fedlora flower run`): config-yaml (the resolved YAML), out (run
directory on the server host), resume (bool), min-clients, round-timeout, node-wait.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.algorithms.base import InvalidUpdate, Update
from fedlora.config import ConfigError, build_config, dump_config, load_yaml
from fedlora.flower.records import checked_run_key, from_arrays, merge_key, to_arrays
from fedlora.runtime.checkpoint import merge_path
from fedlora.files import RunFileError, load_tensors, read_json
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import write_json
from fedlora.runtime.rounds import Accepted, accept_update, reject, screen_norms

log = logging.getLogger("fedlora")

app = ServerApp()

RUN_KEY_FILE = "flower_run.json"
QUERY_TIMEOUT = 60.0


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rc = context.run_config
    cfg = build_config(load_yaml(str(rc["config-yaml"])))
    run = FlowerRun(
        cfg, Path(str(rc["out"])), grid,
        min_clients=int(rc.get("min-clients", 1)),
        round_timeout=float(rc.get("round-timeout", 600)),
        node_wait=float(rc.get("node-wait", 300)),
    )
    summary = run.run(resume=bool(rc.get("resume", False)))
    log.info("flower run finished: %s", json.dumps(summary))


class FlowerRun(Simulation):
    """Simulation whose clients are Flower SuperNodes."""

    def __init__(self, cfg, run_dir: Path, grid: Grid, min_clients: int = 1,
                 round_timeout: float = 600.0, node_wait: float = 300.0) -> None:
        if cfg.evaluation.personalized:  # the held-out parts and private state live on the nodes
            raise ConfigError("config error: evaluation.personalized: in-process runtime only (`fedlora run`, "
                              "`compare`); on Flower each client's held-out part and private state stay on its node")
        super().__init__(cfg, run_dir, progress=False)
        self.grid = grid
        self.min_clients = min_clients
        self.round_timeout = round_timeout
        self.node_wait = node_wait
        self.partition_node: dict[int, int] = {}  # partition-id → node id
        self.merged_through: dict[int, int] = {}  # partition-id → last round's base it holds

    def _run(self, resume: bool) -> dict[str, Any]:  # under the run directory's lock
        key_file = self.run_dir / RUN_KEY_FILE
        if not key_file.exists():
            write_json(key_file, {"run_key": uuid.uuid4().hex})
        try:
            self.run_key = checked_run_key(read_json(key_file, 10_000).get("run_key"))
        except (ValueError, AttributeError) as err:
            raise RunFileError(f"run error: {key_file}: {err}") from None
        return super()._run(resume)

    # -- which node serves which partition -------------------------------------------------
    def _discover(self) -> None:
        live = set(self.grid.get_node_ids())
        self.partition_node = {k: n for k, n in self.partition_node.items() if n in live}
        known = set(self.partition_node.values())
        unknown = sorted(live - known)
        if not unknown:
            return
        msgs = [Message(RecordDict({}), dst_node_id=n, message_type="query") for n in unknown]
        for reply in self.grid.send_and_receive(msgs, timeout=QUERY_TIMEOUT):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d did not say which partition it serves: %s", node, reply.error.reason)
                continue
            info = reply.content.config_records.get("info") or {}
            k, n = info.get("partition-id"), info.get("num-partitions")
            if not (isinstance(k, int) and isinstance(n, int)) or isinstance(k, bool) or isinstance(n, bool):
                log.warning("node %d: malformed answer to which partition it serves (%s); ignored", node, dict(info))
                continue
            if n != self.cfg.federation.num_clients or not 0 <= k < n:
                log.warning("node %d: partition-id=%d num-partitions=%d does not fit federation.num_clients=%d; "
                            "ignored", node, k, n, self.cfg.federation.num_clients)
                continue
            if k in self.partition_node:
                log.warning("partition %d: node %d replaces node %d", k, node, self.partition_node[k])
            self.partition_node[k] = node
            self.merged_through.pop(k, None)  # a (re)joining node: send it every base update
            log.info("node %d serves partition %d", node, k)

    def _wait_for_nodes(self) -> None:
        deadline = time.monotonic() + self.node_wait
        while True:
            self._discover()
            if len(self.partition_node) >= self.min_clients or time.monotonic() > deadline:
                return
            time.sleep(2.0)

    # -- the transport ------------------------------------------------------------------------
    def _train_clients(self, fed, t, ckpt, selected, on_client):
        """Send the selected clients their round, collect what comes back in time (in-process
        `_train_clients` with Flower as the transport): one message round per stage, the
        method's `aggregate_stage` between stages. Client state stays on the clients."""
        self._wait_for_nodes()
        algo = fed.algorithm
        rejected: list[dict[str, Any]] = []
        clients: list[dict[str, Any]] = []
        state, updates = ckpt.state, []
        for stage, lanes in enumerate(algo.stages(ckpt.state, selected)):
            if stage:
                state = algo.aggregate_stage(state, updates, stage - 1)
            members = [(lane, k) for lane, ks in lanes.items() for k in ks]
            updates = self._stage(fed, t, stage, state, members, ckpt.history, clients, rejected, on_client)
        accepted = len({c["id"] for c in clients})
        if accepted < self.min_clients:
            raise RuntimeError(
                f"round {t}: {accepted} accepted clients, fewer than "
                f"min-clients={self.min_clients} (failures: {rejected}); the run stopped after round {t - 1}: "
                "resume it with --resume"
            )
        return state, updates, clients, rejected, ckpt.client_states

    def _stage(self, fed, t: int, stage: int, state, members: list[tuple[int, int]], history,
               clients: list[dict[str, Any]], rejected: list[dict[str, Any]], on_client) -> list[Update]:
        """One message round: each (lane, client) trains from `state`; returns the accepted
        updates (records appended to `clients`, failures to `rejected`). A client accepted in an
        earlier stage of this round continues from that state (methods with intra-round stages
        keep no private client state today, so a rejected later stage cannot leave one ahead)."""
        algo = fed.algorithm
        accepted_earlier = {c["id"] for c in clients}
        config_yaml = dump_config(self.cfg)
        sent: dict[int, tuple[int, int, Any]] = {}  # node → (lane, partition, payload)
        messages = []
        for lane, k in members:
            node = self.partition_node.get(k)
            if node is None:
                log.warning("round %d: client %d failed: no SuperNode serves partition %d", t, k, k)
                rejected.append({"client": k, "reason": f"no SuperNode serves partition {k}"})
                continue
            payload = algo.payload(state, k)
            content = RecordDict({
                "payload": to_arrays(payload.tensors),
                "payload-config": ConfigRecord(dict(payload.config)),
                "config": ConfigRecord({
                    "round": t, "stage": stage,
                    "state-round": t if k in accepted_earlier else _last_accepted(history, k),
                    "run-key": self.run_key, "config-yaml": config_yaml,
                }),
            })
            for r in range(self.merged_through.get(k, 0) + 1, t):
                if merge_path(self.run_dir, r).exists():
                    content[merge_key(r)] = to_arrays(load_tensors(merge_path(self.run_dir, r), inside=self.run_dir)[0])
            messages.append(Message(content, dst_node_id=node, message_type="train", ttl=self.round_timeout))
            sent[node] = (lane, k, payload)

        replies = self._exchange(messages)
        accepted: list[Accepted] = []
        for node, (lane, k, payload) in sent.items():  # in plan order: same sums as in-process
            reply, seconds = replies.get(node, (None, 0.0))
            if reply is None or reply.has_error():
                reason = (f"no reply within {self.round_timeout:g}s" if reply is None
                          else f"client error: {reply.error.reason}")
                log.warning("round %d: client %d (node %d) failed: %s", t, k, node, reason)
                rejected.append({"client": k, "reason": reason})
                self.partition_node.pop(k, None)  # ask again next round: it may be gone or replaced
                on_client()
                continue
            self.merged_through[k] = t - 1
            try:
                update, flops = update_from_reply(reply, k)
            except InvalidUpdate as err:
                reject(t, k, str(err), rejected)
                on_client()
                continue
            record = accept_update(fed, state, t, update, payload, seconds, rejected)
            if record is not None:
                accepted.append(Accepted(update, {**record, "flops": flops, "stage": stage, "lane": lane}))
            on_client()
        kept = screen_norms(fed, t, accepted, rejected)
        clients.extend(a.record for a in kept)
        return [a.update for a in kept]

    def _exchange(self, messages: list[Message]) -> dict[int, tuple[Message, float]]:
        """Push, then pull replies until all are in or round-timeout passed;
        {node: (reply, seconds from push to its arrival)}."""
        start = time.perf_counter()
        ids = list(self.grid.push_messages(messages))
        node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
        pending = set(ids)
        out: dict[int, tuple[Message, float]] = {}
        while True:  # pull at least once, however long the push took
            for reply in self.grid.pull_messages(list(pending)):
                # keyed by the message it answers: the SuperLink's own error replies (node
                # unavailable) do not come from the node
                mid = reply.metadata.reply_to_message_id
                pending.discard(mid)
                out[node_of[mid]] = (reply, time.perf_counter() - start)
            if not pending or time.perf_counter() - start >= self.round_timeout:
                return out
            time.sleep(0.2)


REPLY_RECORDS = {"update", "metrics", "info"}


def update_from_reply(reply: Message, partition: int) -> tuple[Update, float]:
    """A train reply as the method's Update, and the client's training FLOPs (for the simulated
    clock); InvalidUpdate naming what is malformed. Only the form is checked here: the
    update's content goes through `accept_update` like an in-process one."""
    content = reply.content
    extra = sorted(set(content) - REPLY_RECORDS)
    if extra:
        raise InvalidUpdate(f"reply: unexpected record {extra[0]!r}")
    for key, records in (("update", content.array_records), ("metrics", content.metric_records),
                         ("info", content.config_records)):
        if key not in records:
            raise InvalidUpdate(f"reply: record {key!r} missing or of the wrong kind")
    info = content.config_records["info"]
    if info.get("partition-id") != partition:
        raise InvalidUpdate(f"reply: partition-id {info.get('partition-id')!r}, expected {partition}")
    num_examples = info.get("num-examples")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        raise InvalidUpdate(f"reply: num-examples {num_examples!r} is not an integer")
    metrics = dict(content.metric_records["metrics"])
    flops = metrics.pop("flops", 0.0)  # for the clock, not part of the method's update
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 <= flops < math.inf:
        raise InvalidUpdate(f"reply: flops {flops!r} is not a finite count")
    try:
        tensors = from_arrays(content.array_records["update"])
    except Exception as err:  # noqa: BLE001 - whatever a client's arrays break, the round goes on
        raise InvalidUpdate(f"reply: update arrays unreadable: {type(err).__name__}: {err}") from None
    return Update(partition, tensors, num_examples, metrics), float(flops)


def _last_accepted(history: list[dict[str, Any]], client: int) -> int:
    """The last round whose update of `client` the server accepted (0: never): the client
    continues from its private state of that round."""
    rounds = [r["round"] for r in history if any(c["id"] == client for c in r["clients"])]
    return max(rounds, default=0)
