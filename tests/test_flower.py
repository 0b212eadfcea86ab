"""Flower: a real SuperLink and SuperNodes on 127.0.0.1 give the in-process runtime's numbers;
a killed SuperNode does not stop the run and rejoins; TLS certificates and node auth work."""

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_tree
from safetensors.torch import load_file

from fedlora.algorithms import ALGORITHMS
from fedlora.config import build_config, dump_config
from fedlora.flower.launch import (
    LocalFederation,
    flwr_run,
    make_certificates,
    make_node_keys,
)
from fedlora.algorithms.base import InvalidUpdate
from fedlora.flower.server_app import _last_accepted, update_from_reply
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import read_metrics

NODES = 3


def _tree(method: str, rounds: int = 2, nodes: int = NODES) -> dict:
    tree = tiny_tree(algorithm={"name": method}, threads=1,
                     federation={"num_clients": nodes, "client_max_ranks": [8, 4, 2][:nodes], "rounds": rounds})
    if method == "aflora":
        tree["algorithm"]["server_steps"] = 2
    return tree


def _run_config(tree: dict, out, **extra) -> dict:
    return {"config-yaml": dump_config(build_config(tree)), "out": str(out), "round-timeout": 300.0, **extra}


# -- fast ------------------------------------------------------------------------------------

def test_certificates_give_a_working_tls_handshake(tmp_path):
    """The `fedlora flower certs` files: a server with server.pem/key is trusted via ca.crt
    for the names given, and not for others."""
    paths = make_certificates(tmp_path, ["localhost", "127.0.0.1"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths["cert"], paths["key"])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(paths["ca"]))
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.recv(2) == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError), socket.create_connection(("127.0.0.1", port)) as raw:
        client_ctx.wrap_socket(raw, server_hostname="superlink.example.org")
    thread.join(5)
    listener.close()
    keys = make_node_keys(tmp_path, 2)
    assert all(pub.read_text().startswith("ecdsa-sha2-nistp384 ") for _, pub in keys)


def test_last_accepted_round_names_the_client_state_to_continue_from():
    history = [{"round": 1, "clients": [{"id": 0}, {"id": 1}]}, {"round": 2, "clients": [{"id": 1}]}]
    assert [_last_accepted(history, k) for k in (0, 1, 2)] == [1, 2, 0]


@pytest.mark.parametrize("args, msg", [
    (["--insecure"], "give one of --superlink HOST:PORT, --local N, --testbed PROFILE"),
    (["--superlink", "127.0.0.1:9"], "give --root-certificates CA (TLS) or --insecure"),
    (["--local", "2", "--min-clients", "0"], "--min-clients: must be >= 1"),
])
def test_flower_run_bad_arguments_exit_2(data_dir, tmp_path, capsys, args, msg):
    from fedlora.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_tree("fedit")))
    assert main(["flower", "run", str(cfg), "--out", str(tmp_path / "run"), *args]) == 2
    assert msg in capsys.readouterr().err


# -- fast: the ServerApp and ClientApp code over an in-process Grid ---------------------------

class LoopbackGrid:
    """A Grid that hands each message to the ClientApp's handler in this process (records
    are built and read as on Flower; only the wire is skipped). A node never answers the
    train messages of the rounds listed for it in `down`."""

    def __init__(self, node_configs: dict[int, dict], monkeypatch):
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        monkeypatch.setattr(TaskIdentity, "_run_id", 1)
        monkeypatch.setattr(TaskIdentity, "_task_id", 1)
        monkeypatch.setattr(TaskIdentity, "_node_id", 0)
        self.identity = TaskIdentity
        self.contexts = {n: Context(1, n, nc, RecordDict(), {}) for n, nc in node_configs.items()}
        self.down: dict[int, set[int]] = {}
        self.replies: dict = {}
        self.after_train = lambda node: None
        self.tamper = lambda node, msg, reply: reply  # what a faulty client replies instead

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        from fedlora.flower import client_app, secagg

        ids = []
        for i, msg in enumerate(messages):
            node, mid = msg.metadata.dst_node_id, f"m{len(self.replies)}-{i}-{time.monotonic_ns()}"
            msg.metadata.__dict__["_message_id"] = mid  # the SuperLink assigns ids on Flower
            ids.append(mid)
            if msg.metadata.message_type == "train" and \
                    int(msg.content.config_records["config"]["round"]) in self.down.get(node, ()):
                continue
            self.identity._node_id = node
            handler = {"query": client_app.query, "train": client_app.train,
                       **{f"query.{a}": getattr(client_app, a) for a in secagg.ACTIONS}}[msg.metadata.message_type]
            self.replies[mid] = self.tamper(node, msg, handler(msg, self.contexts[node]))
            self.identity._node_id = 0
            if msg.metadata.message_type == "train":
                self.after_train(node)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture
def fast_builds(monkeypatch):
    """The data read and partitioned once per config (every node and the server cut the same
    pool; the model is loaded each time, as in a fresh ClientApp process). Yields the
    Federations assembled (server and nodes), in order."""
    from fedlora.data import task as task_module
    from fedlora.runtime import inprocess

    pools, built = {}, []
    real_check, real_assemble = task_module.check_data, inprocess.Federation.assemble.__func__

    def cached_check(cfg):
        key = cfg.model_dump_json()
        if key not in pools:
            pools[key] = real_check(cfg)
        return pools[key]

    def assemble(cls, cfg, tokenizer, task):
        fed = real_assemble(cls, cfg, tokenizer, task)
        built.append(fed)
        return fed

    monkeypatch.setattr(task_module, "check_data", cached_check)
    monkeypatch.setattr(inprocess.Federation, "assemble", classmethod(assemble))
    return built


def _loopback_run(tree, tmp_path, monkeypatch, **kw):
    from fedlora.flower.server_app import FlowerRun

    n = tree["federation"]["num_clients"]
    grid = LoopbackGrid({100 + k: {"partition-id": k, "num-partitions": n, "state-dir": str(tmp_path / "clients")}
                         for k in range(n)}, monkeypatch)
    run = FlowerRun(build_config(tree), tmp_path / "flower", grid, round_timeout=1.0, node_wait=0.0, **kw)
    return run, grid


def _run_both_and_compare(tree, tmp_path, monkeypatch):
    """Run `tree` in-process and through the apps (every client answering); assert both end
    with the same global state; return their metrics (flower, in-process)."""
    Simulation(build_config(tree), tmp_path / "inprocess", progress=False).run()
    run, _ = _loopback_run(tree, tmp_path, monkeypatch, min_clients=NODES)
    run.run()
    a = load_file(str(tmp_path / "inprocess/final_state.safetensors"))
    b = load_file(str(tmp_path / "flower/final_state.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    return read_metrics(tmp_path / "flower"), read_metrics(tmp_path / "inprocess")


@pytest.mark.parametrize("method", sorted(ALGORITHMS))
def test_server_and_client_apps_equal_inprocess_for_every_method(data_dir, tmp_path, monkeypatch, fast_builds, method):
    """Every registered method, unchanged, through the ServerApp/ClientApp code: the same
    global adapter and metrics as the in-process runtime (3 clients, 2 rounds)."""
    tree = _tree(method)
    fl, ip = _run_both_and_compare(tree, tmp_path, monkeypatch)
    for key in ("accuracy", "train_loss", "ranks", "next_ranks", "uplink_bytes", "downlink_bytes"):
        assert [r.get(key) for r in fl] == [r.get(key) for r in ip], key


def test_multi_stage_rounds_on_flower_equal_inprocess(data_dir, tmp_path, monkeypatch, fast_builds):
    """HierFedLoRA with τ = (1, 2): one message round per stage, intra-group aggregation between
    them; the same global adapter and per-client records (stage, lane) as in-process."""
    tree = _tree("hierfedlora", nodes=3)
    tree["algorithm"] = {"name": "hierfedlora", "groups": 2, "plan": "fixed", "tau": [1, 2], "depth": [2, 1]}
    fl, ip = _run_both_and_compare(tree, tmp_path, monkeypatch)
    key = [(c["id"], c["stage"], c["lane"], c["train_loss"]) for r in fl for c in r["clients"]]
    assert key == [(c["id"], c["stage"], c["lane"], c["train_loss"]) for r in ip for c in r["clients"]]
    assert {c["stage"] for r in fl for c in r["clients"]} == {0, 1}


def test_missed_rounds_are_caught_up_and_state_continues(data_dir, tmp_path, monkeypatch, fast_builds):
    """Client 2 is down in round 2: the round goes on with two (failure logged); in round 3 it
    rebuilds the base with the merges it missed (its base equals the server's, bit for bit)
    and continues from its own round-1 state."""
    tree = _tree("aflora", rounds=3)
    run, grid = _loopback_run(tree, tmp_path, monkeypatch, min_clients=2)
    checked = []

    def compare_bases(node):
        client_model = fast_builds[-1].model
        server = {k: v for k, v in run.fed.model.state_dict().items()}
        assert all(torch.equal(server[k], v) for k, v in client_model.state_dict().items())
        checked.append(node)

    grid.down = {102: {2}}
    grid.after_train = compare_bases
    run.run()
    history = read_metrics(tmp_path / "flower")
    assert [sorted(c["id"] for c in r["clients"]) for r in history] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    assert history[1]["rejected"] == [{"client": 2, "reason": "no reply within 1s"}]
    assert checked.count(102) == 2  # rounds 1 and 3; in round 3 after catching up on merges 1 and 2
    state_files = sorted(p.name for p in (tmp_path / "clients").glob("*/partition-2/state/*"))
    assert state_files == ["round_0001.safetensors", "round_0003.safetensors"]


def test_too_few_clients_stops_the_run_resumable(data_dir, tmp_path, monkeypatch, fast_builds):
    tree = _tree("fedit", rounds=2)
    run, grid = _loopback_run(tree, tmp_path, monkeypatch, min_clients=3)
    grid.down = {101: {1}}
    with pytest.raises(RuntimeError, match="fewer than min-clients=3"):
        run.run()
    assert not (tmp_path / "flower/checkpoint.safetensors").exists()


def test_stopped_flower_run_resumes_to_the_inprocess_result(data_dir, tmp_path, monkeypatch, fast_builds):
    """Round 2 has too few clients: the run stops after round 1 (clients 0 and 1 already
    trained round 2 and saved that state). Resumed with all clients, it ends exactly where an
    uninterrupted in-process run does: the server names the client state to continue from."""
    tree = _tree("aflora", rounds=2)
    run, grid = _loopback_run(tree, tmp_path, monkeypatch, min_clients=3)
    grid.down = {102: {2}}
    with pytest.raises(RuntimeError, match="fewer than min-clients"):
        run.run()
    assert len(read_metrics(tmp_path / "flower")) == 1
    resumed, _ = _loopback_run(tree, tmp_path, monkeypatch, min_clients=3)  # a new ServerApp
    resumed.run(resume=True)
    Simulation(build_config(tree), tmp_path / "inprocess", progress=False).run()
    a = load_file(str(tmp_path / "inprocess/final_state.safetensors"))
    b = load_file(str(tmp_path / "flower/final_state.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _set_tensor(reply, fn):
    """Replace the reply's update by fn(tensors)."""
    from flwr.app import ArrayRecord

    tensors = dict(reply.content.array_records["update"].to_torch_state_dict())
    reply.content["update"] = ArrayRecord(torch_state_dict=fn(tensors))


def _first(tensors):
    return next(iter(tensors))


def _with_info(reply, **changes):
    from flwr.app import ConfigRecord

    reply.content["info"] = ConfigRecord({**dict(reply.content.config_records["info"]), **changes})


def _without_metric(reply, key):
    from flwr.app import MetricRecord

    reply.content["metrics"] = MetricRecord({k: v for k, v in reply.content.metric_records["metrics"].items()
                                             if k != key})


def _error_reply(msg):
    from flwr.app import Error, Message

    return Message(Error(code=0, reason="ClientApp raised RuntimeError: out of memory"), reply_to=msg)


def _drop(reply, key):
    del reply.content[key]
    return reply


MALFORMED = {  # kind → (how client 1 breaks its reply, the reason the server logs)
    "no trained_params": (lambda m, r: _without_metric(r, "trained_params") or r, "metrics: trained_params missing"),
    "nan": (lambda m, r: _set_tensor(r, lambda t: {**t, _first(t): t[_first(t)] * float("nan")}) or r,
            "contains NaN or Inf"),
    "no info record": (lambda m, r: _drop(r, "info"), "reply: record 'info' missing"),
    "no metrics record": (lambda m, r: _drop(r, "metrics"), "reply: record 'metrics' missing"),
    "wrong shape": (lambda m, r: _set_tensor(r, lambda t: {**t, _first(t): t[_first(t)][:, :-1]}) or r,
                    "expected"),
    "int64": (lambda m, r: _set_tensor(r, lambda t: {**t, _first(t): t[_first(t)].long()}) or r,
              "dtype torch.int64, expected a real floating-point tensor"),
    "extra tensor": (lambda m, r: _set_tensor(r, lambda t: {**t, "extra.A": torch.zeros(2)}) or r,
                     "unexpected ['extra.A']"),
    "negative num-examples": (lambda m, r: _with_info(r, **{"num-examples": -5}) or r,
                              "num_examples -5 differs from the partition table's"),
    "huge num-examples": (lambda m, r: _with_info(r, **{"num-examples": 10**9}) or r,
                          "num_examples 1000000000 differs from the partition table's"),
    "x1e6": (lambda m, r: _set_tensor(r, lambda t: {k: v * 1e6 for k, v in t.items()}) or r,
             "exceeds 10 × the round's median update norm"),
    "error reply": (lambda m, r: _error_reply(m), "client error: ClientApp raised RuntimeError: out of memory"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_server_app_survives_a_malformed_reply(data_dir, tmp_path, monkeypatch, fast_builds, kind):
    """Client 1 sends a broken reply: the ServerApp rejects it with the reason (logged, in the
    round's `rejected`) and the round goes on with client 0."""
    tamper, reason = MALFORMED[kind]
    run, grid = _loopback_run(_tree("fedit", rounds=1, nodes=2), tmp_path, monkeypatch, min_clients=1)
    grid.tamper = lambda node, msg, reply: (tamper(msg, reply) if node == 101 and msg.metadata.message_type == "train"
                                            else reply)
    run.run()
    (record,) = read_metrics(tmp_path / "flower")
    assert [r["client"] for r in record["rejected"]] == [1]
    assert reason in record["rejected"][0]["reason"]
    assert [c["id"] for c in record["clients"]] == [0]
    final = load_file(str(tmp_path / "flower/final_state.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_a_malformed_partition_answer_is_ignored(data_dir, tmp_path, monkeypatch, fast_builds):
    """A node that does not say properly which partition it serves is left out (logged); the
    run goes on with the others."""
    run, grid = _loopback_run(_tree("fedit", rounds=1, nodes=2), tmp_path, monkeypatch, min_clients=1)
    grid.tamper = lambda node, msg, reply: (_drop(reply, "info") if node == 101 and msg.metadata.message_type == "query"
                                            else reply)
    run.run()
    (record,) = read_metrics(tmp_path / "flower")
    assert [c["id"] for c in record["clients"]] == [0]
    assert record["rejected"] == [{"client": 1, "reason": "no SuperNode serves partition 1"}]


def _reply(**changes):
    """The content of a well-formed train reply of partition 1, with `changes` (None: drop)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    records = {
        "update": ArrayRecord(torch_state_dict={"m.A": torch.zeros(2, 3)}),
        "metrics": MetricRecord({"train_loss": 1.0, "trained_params": 6.0, "uploaded_params": 6.0, "flops": 1e6}),
        "info": ConfigRecord({"partition-id": 1, "num-examples": 40}),
        **changes,
    }
    return SimpleNamespace(content=RecordDict({k: v for k, v in records.items() if v is not None}))


def test_update_from_reply_reads_a_well_formed_reply():
    update, flops = update_from_reply(_reply(), 1)
    assert (update.client_id, update.num_examples, flops) == (1, 40, 1e6)
    assert "flops" not in update.metrics and update.tensors["m.A"].shape == (2, 3)


@pytest.mark.parametrize("changes, reason", [
    ({"update": None}, "reply: record 'update' missing or of the wrong kind"),
    ({"update": "metrics"}, "reply: record 'update' missing or of the wrong kind"),
    ({"extra": "metrics"}, "reply: unexpected record 'extra'"),
    ({"info": {"partition-id": 0, "num-examples": 40}}, "reply: partition-id 0, expected 1"),
    ({"info": {"partition-id": 1, "num-examples": 1e9}}, "reply: num-examples 1000000000.0 is not an integer"),
    ({"info": {"partition-id": 1, "num-examples": True}}, "reply: num-examples True is not an integer"),
    ({"metrics": {"trained_params": 1.0, "flops": float("nan")}}, "reply: flops nan is not a finite count"),
    ({"metrics": {"trained_params": 1.0, "flops": -1.0}}, "reply: flops -1.0 is not a finite count"),
])
def test_update_from_reply_names_what_is_malformed(changes, reason):
    """The reply kinds the loopback runs above do not cover, at the parser."""
    from flwr.app import ConfigRecord, MetricRecord

    whole = _reply()
    built = {}
    for key, value in changes.items():
        if value == "metrics":  # a record of the wrong kind under this name
            built[key] = whole.content.metric_records["metrics"]
        elif isinstance(value, dict):
            built[key] = (ConfigRecord if key == "info" else MetricRecord)(value)
        else:
            built[key] = value
    with pytest.raises(InvalidUpdate) as err:
        update_from_reply(_reply(**built), 1)
    assert str(err.value) == reason


# -- slow: real SuperLink and SuperNodes ------------------------------------------------------

@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    with LocalFederation(tmp_path_factory.mktemp("flower"), nodes=NODES) as fed:
        yield fed


@pytest.mark.slow
@pytest.mark.parametrize("method", ["aflora", "fedit"])
def test_flower_run_equals_inprocess(data_dir, tmp_path, federation, method):
    """`fedlora flower run` on 3 SuperNodes (all clients every round) ends with the same global
    adapter, bit for bit, as `fedlora run` of the same config and seed."""
    tree = _tree(method)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "fedlora.cli", "flower", "run", str(cfg_path), "--out", str(tmp_path / "flower"),
           "--superlink", federation.address, "--insecure", "--min-clients", str(NODES), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr + (tmp_path / "flower/flower/flwr_run.log").read_text()

    Simulation(build_config(tree), tmp_path / "inprocess", progress=False).run()
    a = load_file(str(tmp_path / "inprocess/final_state.safetensors"))
    b = load_file(str(tmp_path / "flower/final_state.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "the Flower run's global adapter differs"
    fl, ip = read_metrics(tmp_path / "flower"), read_metrics(tmp_path / "inprocess")
    for key in ("accuracy", "test_loss", "train_loss", "ranks", "next_ranks", "uplink_bytes", "downlink_bytes"):
        assert [r.get(key) for r in fl] == [r.get(key) for r in ip], key
    assert [sorted(c["id"] for c in r["clients"]) for r in fl] == [[0, 1, 2]] * 2
    if method == "aflora":
        assert sorted(p.name for p in (tmp_path / "flower/merges").iterdir()) == [
            "round_0001.safetensors", "round_0002.safetensors"]


def _wait_rounds(run_dir, n: int, proc_thread: threading.Thread, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc_thread.is_alive(), "the run ended early"
        time.sleep(0.5)
    raise AssertionError(f"round {n} did not finish in {timeout}s")


@pytest.mark.slow
def test_killed_supernode_run_completes_and_node_rejoins(data_dir, tmp_path):
    """SIGKILL one SuperNode after round 1 and start it again: round 2 goes on with the two
    others (the failure logged with its reason), round 3 has all three again (the restarted
    node caught up on the base updates it missed, its AFLoRA state read from its disk)."""
    out = tmp_path / "run"
    result: dict = {}
    with LocalFederation(tmp_path / "fed", nodes=NODES) as fed:
        rc = _run_config(_tree("aflora", rounds=3), out, **{"min-clients": 2, "round-timeout": 600.0})
        thread = threading.Thread(target=lambda: result.update(p=flwr_run(tmp_path, fed.address, rc, quiet=True)))
        thread.start()
        _wait_rounds(out, 1, thread)
        os.killpg(fed.procs["supernode-2"].pid, signal.SIGKILL)
        fed.procs.pop("supernode-2").wait(10)
        fed.start_node(2)
        thread.join(900)
    assert result["p"].returncode == 0
    history = read_metrics(out)
    assert [r["round"] for r in history] == [1, 2, 3]
    assert [sorted(c["id"] for c in r["clients"]) for r in history] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    (failure,) = history[1]["rejected"]
    assert failure["client"] == 2 and failure["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["final_accuracy"] is not None


@pytest.mark.slow
def test_tls_and_node_authentication_on_localhost(data_dir, tmp_path):
    """The certificate step of docs/howto/deploy-flower.md on localhost: a TLS SuperLink with SuperNode
    authentication, two registered SuperNodes run a round; an unregistered key is refused."""
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"])
    keys = make_node_keys(tmp_path / "certs", 3)
    out = tmp_path / "run"
    with LocalFederation(tmp_path / "fed", nodes=2, certs=certs, node_keys=keys[:2]) as fed:
        fed.node_keys.append(keys[2])  # never registered
        intruder = fed.start_node(2)
        rc = _run_config(_tree("fedit", rounds=1, nodes=2), out, **{"min-clients": 2})
        proc = flwr_run(tmp_path, fed.address, rc, root_certificates=str(certs["ca"]), quiet=True, timeout=600)
        assert intruder.wait(120) != 0, "a SuperNode with an unregistered key was admitted"
    assert proc.returncode == 0
    (record,) = read_metrics(out)
    assert sorted(c["id"] for c in record["clients"]) == [0, 1]
