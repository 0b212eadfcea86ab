"""The Flower ServerApp: the in-process runtime's rounds, with clients reached through a Grid.

`FlowerRun` is the in-process `Simulation` with one part replaced, the transport
(`_train_stage`, driven by the one stage loop): sampling, validation, aggregation, merging, evaluation, checkpoints,
metrics and resume are the very same code, so a Flower run of a config gives the same
global adapter as `fedlora run` when the same clients answer.

With nodes.local_data the server first asks every node what it holds (a NodeReport: example
count, label histogram, checked like an update: fedlora.flower.reports) and starts once every
partition has a valid report; it never reads a client's data. With `devices: measured` it also
asks what each node can do (throughput, free memory, link rates: fedlora.flower.capability)
and writes the figures into the run's config (`devices.measured`) before anything is built, so
the clock, HierFedLoRA's grouping and `client_max_ranks: auto` use them as they would use
profiles, and a resume continues with the same figures; round 1's record lists them (`devices`).

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
import re
import time
import uuid
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.aggregation.secagg import secure_sum
from fedlora.algorithms.base import InvalidUpdate, Update
from fedlora.config import ConfigError, build_config, dump_config, parse_tree
from fedlora.flower import secagg
from fedlora.flower.records import checked_run_key, from_arrays, merge_key, to_arrays
from fedlora.flower.reports import InvalidReport, NodeReport
from fedlora.runtime.checkpoint import merge_path
from fedlora.files import RunFileError, load_tensors, read_json
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import write_json
from fedlora.runtime.progress import setup_logging
from fedlora.runtime.rebuild import base_digest
from fedlora.runtime.rounds import Result

log = logging.getLogger("fedlora")

app = ServerApp()

RUN_KEY_FILE = "flower_run.json"
REPORTS_FILE = "node_reports.json"
QUERY_TIMEOUT = 60.0
"""At least this long for nodes to answer a query (a node reading its data file imports the
data stack first); the round timeout when that is longer."""
SERVER_LOG = "flower/server.log"


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    rc = context.run_config
    log_file = Path(str(rc["out"])) / SERVER_LOG  # the ServerApp's own lines, on the server host
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedlora").addHandler(handler)
    cfg = build_config(parse_tree(str(rc["config-yaml"]), "run config config-yaml"))
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

    hides_updates = True  # privacy.secure_aggregation: the SecAgg protocol (fedlora.flower.secagg)

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
        self.lock_wait = node_wait  # the ServerApp of a killed SuperLink exits once it meets the restarted one
        self.partition_node: dict[int, int] = {}  # partition-id → node id
        self.merged_through: dict[int, int] = {}  # partition-id → last round's base it holds
        self.reports: dict[int, NodeReport] = {}  # what each partition's node reported (local data, devices)
        self.measuring = cfg.devices.source == "measured" and cfg.devices.measured is None
        """The nodes' capability is asked for (once, before round 1; a resumed run has it in its config)."""
        self.classes: list[str] = []
        self._digest: tuple[int, str] | None = None  # (merges applied, SHA-256 of the base)

    def _run(self, resume: bool) -> dict[str, Any]:  # under the run directory's lock
        key_file = self.run_dir / RUN_KEY_FILE
        if not key_file.exists():
            write_json(key_file, {"run_key": uuid.uuid4().hex})
        try:
            self.run_key = checked_run_key(read_json(key_file, 10_000).get("run_key"))
        except (ValueError, AttributeError) as err:
            raise RunFileError(f"run error: {key_file}: {err}") from None
        if self.cfg.nodes.local_data or self.measuring:
            self._collect_reports(resume)
        if self.measuring:
            self.cfg = self._with_measurements()
            self.measuring = False  # a node that (re)joins later is not asked again
        return super()._run(resume)

    # -- node-local data: what the nodes report ----------------------------------------------
    def _collect_reports(self, resume: bool) -> None:
        """Every partition's report before the run starts (the example counts weight the
        updates; the devices shape ranks, groups and the clock); a resumed run keeps the reports
        it started with (REPORTS_FILE)."""
        from fedlora.data.task import run_classes

        if self.cfg.nodes.local_data:
            self.classes = run_classes(self.cfg)
        path = self.run_dir / REPORTS_FILE
        if resume and path.exists():
            try:
                saved = read_json(path, 10_000_000)
                self.reports = {int(k): NodeReport.from_record(
                    r, self.cfg.federation.num_clients, self._num_classes(), self.cfg.nodes.max_examples,
                    self.measuring) for k, r in saved.items()}
            except (InvalidReport, ValueError, TypeError, AttributeError) as err:
                raise RunFileError(f"run error: {path}: {err}") from None
        deadline = time.monotonic() + self.node_wait
        while len(self.reports) < self.cfg.federation.num_clients:
            self._discover()
            missing = sorted(set(range(self.cfg.federation.num_clients)) - set(self.reports))
            if missing and time.monotonic() > deadline:
                asked = "nodes.local_data" if self.cfg.nodes.local_data else "devices: measured"
                raise RuntimeError(f"{asked}: no valid report from partitions {missing} within "
                                   f"node-wait={self.node_wait:g}s; the run did not start")
            if missing:
                time.sleep(1.0)
        write_json(path, {str(k): r.to_record() for k, r in sorted(self.reports.items())})

    def _num_classes(self) -> int | None:
        return len(self.classes) if self.cfg.nodes.local_data else None

    def _with_measurements(self):
        """The run's config with every client's reported device (`devices.measured`; link rates a
        node did not report assumed to be the `reference` preset's), its ranks re-derived from them
        when they are `auto`; round 1's record will list the figures (`devices`)."""
        from fedlora.devices import PRESETS, MeasuredDevices

        reference, clients = PRESETS["reference"], []
        for k in range(self.cfg.federation.num_clients):
            cap = self.reports[k].capability
            assert cap is not None  # from_record(capability=True) required it
            sources = dict(cap.sources)
            up, down = cap.uplink_mbps, cap.downlink_mbps
            if up is None:
                up, sources["uplink_mbps"] = reference.uplink_mbps, "assumed"
            if down is None:
                down, sources["downlink_mbps"] = reference.downlink_mbps, "assumed"
            clients.append({"throughput": cap.throughput, "free_memory": cap.free_memory, "uplink_mbps": up,
                            "downlink_mbps": down, "sources": sources})
        per_rank = self._bytes_per_rank() if any(c["free_memory"] is not None for c in clients) else None
        tree = self.cfg.model_dump(mode="json")
        tree["devices"]["measured"] = MeasuredDevices.model_validate(
            {"clients": clients, "bytes_per_rank": per_rank}).model_dump(mode="json")
        if tree["devices"]["max_ranks"] == "auto":
            del tree["federation"]["client_max_ranks"]  # the provisional ones: derived again from the figures
        cfg = build_config(tree)
        self.record_once["devices"] = [{"client": k, **c.model_dump(mode="json")}
                                       for k, c in enumerate(cfg.devices.measured.clients)]
        log.info("measured devices: %s; client max ranks %s", json.dumps(self.record_once["devices"]),
                 cfg.federation.client_max_ranks)
        return cfg

    def _bytes_per_rank(self) -> float:
        """The adapter's training memory per unit of rank on this run's model (loaded once here)."""
        from fedlora.adapters import find_targets, module_shape
        from fedlora.devices import adapter_bytes_per_rank
        from fedlora.models import load_model, load_tokenizer

        name = self.cfg.model.name
        model = load_model(name, self.cfg.seed, len(load_tokenizer(name)))
        return adapter_bytes_per_rank(module_shape(m) for m in find_targets(model, self.cfg.model.target_modules).values())

    def _reported(self) -> list[list[int]] | None:
        if not self.cfg.nodes.local_data:
            return None
        return [list(self.reports[k].label_counts or ()) for k in range(self.cfg.federation.num_clients)]

    def _event(self, kind: str, **fields: Any) -> None:
        """Something that happened between rounds (a node joined, was refused, replaced):
        logged now, and listed in the next round's `events` in metrics.jsonl."""
        self.events.append({"event": kind, **fields})

    # -- which node serves which partition -------------------------------------------------
    def _query(self) -> RecordDict:
        if not (self.cfg.nodes.local_data or self.measuring):
            return RecordDict({})
        conf: dict[str, Any] = {"config-yaml": dump_config(self.cfg)}
        if self.cfg.nodes.local_data:
            conf["classes"] = self.classes
        if self.measuring:
            conf["capability"] = True
        return RecordDict({"config": ConfigRecord(conf)})

    def _discover(self) -> None:
        live = set(self.grid.get_node_ids())
        self.partition_node = {k: n for k, n in self.partition_node.items() if n in live}
        known = set(self.partition_node.values())
        unknown = sorted(live - known)
        if not unknown:
            return
        msgs = [Message(self._query(), dst_node_id=n, message_type="query") for n in unknown]
        local, keep = self.cfg.nodes.local_data, self.cfg.nodes.local_data or self.measuring
        for reply in self.grid.send_and_receive(msgs, timeout=max(QUERY_TIMEOUT, self.round_timeout)):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._refuse(node, f"no report: {reply.error.reason}")
                continue
            try:
                report = NodeReport.from_record(
                    dict(reply.content.config_records.get("info") or {}), self.cfg.federation.num_clients,
                    self._num_classes(), self.cfg.nodes.max_examples, self.measuring)
            except InvalidReport as err:
                self._refuse(node, str(err))
                continue
            k = report.partition
            if local and k in self.reports and self.reports[k].data != report.data:
                self._refuse(node, f"partition {k}: report {report.to_record()} differs from the one the run "
                                   f"started with {self.reports[k].to_record()}")
                continue
            if k in self.partition_node:
                log.warning("partition %d: node %d replaces node %d", k, node, self.partition_node[k])
            self.partition_node[k] = node
            if keep and k not in self.reports:
                self.reports[k] = report
            self.merged_through.pop(k, None)  # a (re)joining node: send it every base update
            log.info("node %d serves partition %d", node, k)
            self._event("node joined", node=node, partition=k)

    def _refuse(self, node: int, reason: str) -> None:
        log.warning("node %d refused: %s", node, reason)
        self._event("node refused", node=node, reason=reason)

    def _wait_for_nodes(self) -> None:
        deadline = time.monotonic() + self.node_wait
        while True:
            self._discover()
            if len(self.partition_node) >= self.min_clients or time.monotonic() > deadline:
                return
            time.sleep(2.0)

    def _base_sha256(self, fed, ckpt) -> str:
        """The digest of the server's base (after ckpt's merges), computed once per change."""
        if self._digest is None or self._digest[0] != len(ckpt.merges):
            self._digest = (len(ckpt.merges), base_digest(fed.adapters))
        return self._digest[1]

    # -- the transport ------------------------------------------------------------------------
    def _train_stage(self, fed, t, stage, state, jobs, ckpt, client_states, earlier):
        """Flower as the stage loop's transport: one message round for the stage's jobs, their
        replies read back as Results in job order. Client state stays on the clients: each
        message names the round whose state to continue from (this round's, for a client
        accepted in an earlier stage: methods with intra-round stages keep no private client
        state today, so a rejected later stage cannot leave one ahead)."""
        if stage == 0:
            self._wait_for_nodes()
        config_yaml = dump_config(self.cfg)
        base = self._base_sha256(fed, ckpt)
        secure = self._secure_round(fed, t, [job.client for job in jobs if job.client in self.partition_node])
        messages, node_of = [], {}
        for job in jobs:
            k = job.client
            node = self.partition_node.get(k)
            if node is None or (secure is not None and k in secure.failures):
                continue
            state_round = t if k in earlier else _last_accepted(ckpt.history, k)
            content = RecordDict({
                "payload": to_arrays(job.payload.tensors),
                "payload-config": ConfigRecord(dict(job.payload.config)),
                "config": ConfigRecord({
                    "round": t, "stage": stage, "state-round": state_round,
                    "state-sha256": _state_sha256(ckpt.history, k, state_round),
                    "base-sha256": base, "run-key": self.run_key, "config-yaml": config_yaml,
                    **({"classes": self.classes} if self.classes else {}),
                }),
            })
            for r in range(self.merged_through.get(k, 0) + 1, t):
                if merge_path(self.run_dir, r).exists():
                    content[merge_key(r)] = to_arrays(load_tensors(merge_path(self.run_dir, r), inside=self.run_dir)[0])
            if secure is not None:
                content[secagg.RECORD] = secure.train_record(k)
            messages.append(Message(content, dst_node_id=node, message_type="train", ttl=self.round_timeout))
            node_of[k] = node

        replies = self._exchange(messages)
        for job in jobs:  # in job order: the same sums as in-process
            k = job.client
            if k not in node_of:
                yield Result(failure=secure.failures[k] if secure is not None and k in secure.failures
                             else f"no SuperNode serves partition {k}")
                continue
            reply, seconds = replies.get(node_of[k], (None, 0.0))
            if reply is None or reply.has_error():
                self.partition_node.pop(k, None)  # ask again next round: it may be gone or replaced
                if reply is not None and "resync" in reply.error.reason:
                    self.merged_through.pop(k, None)  # its base is lost: send every merge
                yield Result(failure=(f"no reply within {self.round_timeout:g}s" if reply is None
                                      else f"client error: {reply.error.reason}"))
                continue
            self.merged_through[k] = t - 1
            try:
                update, flops = update_from_reply(reply, k)
                notes = node_notes(reply.content.config_records["info"], reply.content.metric_records["metrics"])
            except InvalidUpdate as err:
                yield Result(failure=str(err))
                continue
            if "state_reset" in notes:
                log.warning("round %d: client %d lost its state (%s): it started afresh", t, k, notes["state_reset"])
            yield Result(update, seconds=seconds, flops=flops, record=notes)

    def _secure_round(self, fed, t: int, clients: list[int]) -> secagg.ServerRound | None:
        """With secure aggregation: steps 1-2 of the protocol with the round's clients, and its
        unmasking handed to the pipeline's SecureSum stage (None without)."""
        stage = secure_sum(fed.algorithm)
        if stage is None:
            return None
        secure = secagg.ServerRound(t, clients, self._ask_clients)
        secure.setup()
        stage.unmask = secure.unmask
        return secure

    def _ask_clients(self, action: str, contents: dict[int, RecordDict]) -> dict[int, RecordDict | str]:
        """One `query.<action>` message to each client's node; each reply's content, or why none came."""
        node_of = {k: self.partition_node[k] for k in contents if k in self.partition_node}
        replies = self._exchange([Message(c, dst_node_id=node_of[k], message_type=f"query.{action}",
                                          ttl=self.round_timeout) for k, c in contents.items() if k in node_of])
        out: dict[int, RecordDict | str] = {}
        for k in contents:
            reply = replies.get(node_of.get(k), (None, 0.0))[0]
            if reply is None:
                out[k] = f"no reply within {self.round_timeout:g}s"
            elif reply.has_error():
                out[k] = f"client error: {reply.error.reason}"[:300]
            else:
                out[k] = reply.content
        return out

    def _check_participation(self, t, clients, rejected) -> None:
        accepted = len({c["id"] for c in clients})
        if accepted < self.min_clients:
            raise RuntimeError(
                f"round {t}: {accepted} accepted clients, fewer than "
                f"min-clients={self.min_clients} (failures: {rejected}); the run stopped after round {t - 1}: "
                "resume it with --resume"
            )

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
    for key in NODE_TIMINGS:  # the node's own timings: node_notes reads them for the record
        metrics.pop(key, None)
    flops = metrics.pop("flops", 0.0)  # for the clock, not part of the method's update
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 <= flops < math.inf:
        raise InvalidUpdate(f"reply: flops {flops!r} is not a finite count")
    try:
        tensors = from_arrays(content.array_records["update"])
    except Exception as err:  # noqa: BLE001 - whatever a client's arrays break, the round goes on
        raise InvalidUpdate(f"reply: update arrays unreadable: {type(err).__name__}: {err}") from None
    return Update(partition, tensors, num_examples, metrics), float(flops)


SHA256 = re.compile(r"[0-9a-f]{64}")
NODE_TIMINGS = ("node-seconds", "train-seconds")
"""Seconds a node spent in its train handler and in training (what warm nodes keep small:
the rest). Diagnostics only; a value that is not a finite, non-negative number is dropped."""


def node_notes(info, metrics) -> dict[str, Any]:
    """What a train reply says beside the update, for the client's record: the SHA-256 of the
    client state it saved (sent back when that state is next used), the node's timings and, if
    its state was lost, why (the run then continues from the method's initial state: `fedlora run
    --replay` repeats it)."""
    out: dict[str, Any] = {}
    digest = info.get("state-sha256")
    if digest is not None:
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise InvalidUpdate(f"reply: state-sha256 {str(digest)[:80]!r} is not a SHA-256")
        out["state_sha256"] = digest
    for key in NODE_TIMINGS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf:
            out[key.replace("-", "_")] = float(value)
    reset = info.get("state-reset")
    if reset is not None:
        if not isinstance(reset, str) or len(reset) > 300:
            raise InvalidUpdate("reply: state-reset is not a short reason")
        out["state_reset"] = reset
    return out


def _state_sha256(history: list[dict[str, Any]], client: int, round_: int) -> str:
    """The SHA-256 the node reported for its state after `round_` ('' if none was recorded)."""
    for r in history:
        if r["round"] == round_:
            for c in r["clients"]:
                if c["id"] == client:
                    return str(c.get("state_sha256", ""))
    return ""


def _last_accepted(history: list[dict[str, Any]], client: int) -> int:
    """The last round whose update of `client` the server accepted (0: never): the client
    continues from its private state of that round."""
    rounds = [r["round"] for r in history if any(c["id"] == client for c in r["clients"])]
    return max(rounds, default=0)
