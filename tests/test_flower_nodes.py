"""Real nodes on Flower: each SuperNode serves only its own data file (`fedlora partition`),
reports what it holds (checked like an update), stays warm through a base snapshot on its disk,
and survives faults; a faulty run's participation replays in-process to the same adapter.

The ServerApp and ClientApp code run over the in-process LoopbackGrid of test_flower (records
built and read as on Flower, only the wire skipped); test_real_nodes_* run real processes."""

import os
import shutil
import signal
import threading
import time

import pytest
import torch
from conftest import tiny_tree
from safetensors.torch import load_file
from test_flower import LoopbackGrid

from fedlora.config import build_config, load_config
from fedlora.data.node_files import node_file, write_partitions
from fedlora.flower.reports import InvalidReport, NodeReport
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import read_metrics
from fedlora.runtime.replay import Participation

NODES = 3


def _tree(synthetic_task, method="aflora", rounds=3, **federation):
    tree = tiny_tree(algorithm={"name": method}, threads=1, data=dict(synthetic_task, train_examples=120),
                     federation={"num_clients": NODES, "client_max_ranks": [8, 4, 2], "rounds": rounds,
                                 **federation})
    if method == "aflora":
        tree["algorithm"]["server_steps"] = 2
    return tree


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory, synthetic_task):
    """The synthetic task's clients written as files, its training file then moved away: a
    node-data run that read it would fail. (in-process config tree, node-data config, folder)"""
    folder = tmp_path_factory.mktemp("nodes")
    tree = _tree(synthetic_task)
    write_partitions(build_config(tree), folder / "parts")
    hidden = tmp_path_factory.mktemp("hidden")
    return tree, load_config(folder / "parts/config.yaml"), folder / "parts", hidden


def _final(run_dir):
    return load_file(str(run_dir / "final_state.safetensors"))


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _inprocess(tree, out, replay=None):
    """`fedlora run` of `tree` (the whole dataset), optionally replaying a recorded run."""
    Simulation(build_config(tree), out, progress=False,
               replay=Participation.read(replay) if replay else None).run()
    return _final(out)


def _node_run(cfg, folder, tmp_path, monkeypatch, **kw):
    from fedlora.flower.server_app import FlowerRun

    contexts = {100 + k: {"partition-id": k, "num-partitions": NODES, "state-dir": str(tmp_path / "clients"),
                          "data-file": str(node_file(folder, k))} for k in range(NODES)}
    grid = LoopbackGrid(contexts, monkeypatch)
    kw.setdefault("min_clients", 1)
    kw.setdefault("node_wait", 0.0)
    return FlowerRun(cfg, tmp_path / "flower", grid, round_timeout=1.0, **kw), grid


@pytest.fixture(scope="module")
def reference(partitioned, tmp_path_factory):
    """The in-process run of the whole dataset every node-data run is compared with."""
    tree = partitioned[0]
    return _inprocess(tree, tmp_path_factory.mktemp("ref") / "run")


def _hide_training_file(partitioned, monkeypatch):
    tree, _, _, hidden = partitioned
    train = tree["data"]["train_file"]
    shutil.move(train, hidden / "train.jsonl")
    return lambda: shutil.move(hidden / "train.jsonl", train)


def test_partition_files_hold_each_clients_shard(partitioned):
    """client_<k>.jsonl, config.yaml and manifest.json; the node-data config needs no training file."""
    import json

    tree, cfg, folder, _ = partitioned
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [c["file"] for c in manifest["clients"]] == [f"client_{k:03d}.jsonl" for k in range(NODES)]
    assert sum(c["examples"] for c in manifest["clients"]) == 120
    assert all(sum(c["label_counts"]) == c["examples"] for c in manifest["clients"])
    assert cfg.nodes.local_data and cfg.nodes.classes == manifest["classes"] and cfg.data.train_file is None


def test_node_data_run_equals_inprocess_bit_for_bit(partitioned, reference, tmp_path, monkeypatch):
    """Each node serves only its own file, the training file is gone: the Flower run's global
    adapter equals `fedlora run` of the whole dataset, bit for bit. Warm nodes: from round 2 on
    a node puts its base snapshot back and merges only the round it lacks (never every merge)."""
    from fedlora.runtime import checkpoint

    tree, cfg, folder, _ = partitioned
    restore = _hide_training_file(partitioned, monkeypatch)
    loaded: list[int] = []
    real = checkpoint.load_merges

    def counting(run_dir, up_to_round, expected=None, after=0):
        out = real(run_dir, up_to_round, expected, after)
        if expected is None:  # a node's own merges
            loaded.append(len(out))
        return out

    monkeypatch.setattr("fedlora.flower.node.load_merges", counting)
    try:
        run, _ = _node_run(cfg, folder, tmp_path, monkeypatch, min_clients=NODES)
        run.run()
    finally:
        restore()
    assert _same(_final(tmp_path / "flower"), reference), "the node-data run's global adapter differs"
    history = read_metrics(tmp_path / "flower")
    assert [sorted(c["id"] for c in r["clients"]) for r in history] == [[0, 1, 2]] * 3
    assert loaded and max(loaded) <= 1, f"a node merged {max(loaded)} rounds in one message"
    assert history[0]["events"][0]["event"] == "node joined"


def test_node_report_checks():
    """A report is checked like an update: positive counts, known classes, the cap."""
    ok = {"partition-id": 1, "num-partitions": 3, "num-examples": 5, "label-counts": [2, 3]}
    assert NodeReport.from_record(ok, 3, 2, 10).label_counts == (2, 3)
    for change, reason in [
        ({"num-examples": 0}, "not a positive integer"),
        ({"num-examples": True}, "not a positive integer"),
        ({"num-examples": 11, "label-counts": [5, 6]}, "exceeds nodes.max_examples=10"),
        ({"label-counts": [2, 2, 1]}, "has 3 classes; the run knows 2"),
        ({"label-counts": [2, -1]}, "not a list of non-negative integers"),
        ({"label-counts": [2, 2]}, "sum to 4, not num-examples=5"),
        ({"num-examples": None}, "no num-examples"),
        ({"partition-id": 3}, "does not fit federation.num_clients=3"),
    ]:
        with pytest.raises(InvalidReport, match=reason):
            NodeReport.from_record({**ok, **change}, 3, 2, 10)


def _lie_once(grid, node, change):
    """Node `node` answers its first query with `change` applied to its report."""
    from flwr.app import ConfigRecord

    told = []

    def tamper(n, msg, reply):
        if n == node and msg.metadata.message_type == "query" and not told:
            told.append(n)
            reply.content["info"] = ConfigRecord({**dict(reply.content.config_records["info"]), **change})
        return reply
    grid.tamper = tamper


@pytest.mark.parametrize("change, reason", [
    ({"num-examples": 10**7, "label-counts": [10**7, 0]}, "exceeds nodes.max_examples"),
    ({"label-counts": [1, 1, 1]}, "the run knows 2"),
])
def test_a_lying_report_is_refused_and_logged(partitioned, tmp_path, monkeypatch, change, reason):
    """Node 1's first report cannot be true: refused (logged, in round 1's events); its honest
    second report is accepted and the run is the honest one."""
    _, cfg, folder, _ = partitioned
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 1})})
    run, grid = _node_run(cfg, folder, tmp_path, monkeypatch, node_wait=30.0)
    _lie_once(grid, 101, change)
    run.run()
    (record,) = read_metrics(tmp_path / "flower")
    refused = [e for e in record["events"] if e["event"] == "node refused"]
    assert len(refused) == 1 and refused[0]["node"] == 101 and reason in refused[0]["reason"]
    assert sorted(c["id"] for c in record["clients"]) == [0, 1, 2]


def _replay_equals(partitioned, tmp_path):
    """The recorded (faulty) run replayed in-process ends with the same adapter."""
    tree = partitioned[0]
    replayed = _inprocess(tree, tmp_path / "replayed", replay=tmp_path / "flower")
    assert _same(_final(tmp_path / "flower"), replayed), "the replay's adapter differs from the Flower run's"


def test_missed_round_and_straggler_replay(partitioned, tmp_path, monkeypatch):
    """Node 2 gives no answer in round 2 (killed, or a straggler past the round timeout): the
    round goes on without it, round 3 has it again (its base caught up from its snapshot);
    `fedlora run --replay` gives the Flower run's adapter."""
    _, cfg, folder, _ = partitioned
    run, grid = _node_run(cfg, folder, tmp_path, monkeypatch)
    grid.down = {102: {2}}
    run.run()
    history = read_metrics(tmp_path / "flower")
    assert [sorted(c["id"] for c in r["clients"]) for r in history] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    assert history[1]["rejected"] == [{"client": 2, "reason": "no reply within 1s"}]
    assert history[1]["screened"] == [[0, 0], [0, 1]]
    _replay_equals(partitioned, tmp_path)


@pytest.mark.parametrize("fault", ["deleted", "altered state", "altered base"])
def test_node_local_state_lost_or_altered(partitioned, tmp_path, monkeypatch, fault):
    """After round 1, node 1's files are deleted (or its AFLoRA state, or its base snapshot,
    altered). A lost base is rebuilt (or resynced: every merge sent again), a lost state starts
    afresh and says so (`state_reset`, logged); the replay gives the Flower run's adapter."""
    _, cfg, folder, _ = partitioned
    run, grid = _node_run(cfg, folder, tmp_path, monkeypatch)

    done = []

    def after_train(node):
        if node != 101 or done:
            return
        done.append(node)
        root = next((tmp_path / "clients").glob("*/partition-1"))
        if fault == "deleted":
            shutil.rmtree(root)
        elif fault == "altered state":
            path = next((root / "state").glob("round_*.safetensors"))
            data = bytearray(path.read_bytes())
            data[-1] ^= 0xFF
            path.write_bytes(bytes(data))
        else:
            from fedlora.files import load_tensors, tensors_to_bytes

            weights, meta = load_tensors(root / "base.safetensors")
            name = sorted(weights)[0]
            weights[name] = weights[name] + 1e-3
            (root / "base.safetensors").write_bytes(tensors_to_bytes(weights, meta))
    grid.after_train = after_train
    run.run()
    history = read_metrics(tmp_path / "flower")
    ids = [sorted(c["id"] for c in r["clients"]) for r in history]
    if fault == "altered base":  # rebuilt from the fresh base and the node's kept merges: no loss
        assert ids == [[0, 1, 2]] * 3
    else:  # the state starts afresh, recorded in the client's record
        resets = [c for r in history for c in r["clients"] if c.get("state_reset")]
        assert [c["id"] for c in resets] == [1] and resets[0]["state_reset"].startswith("client state of round 1")
    _replay_equals(partitioned, tmp_path)


# -- real processes ----------------------------------------------------------------------------

def _wait_rounds(run_dir, n, alive, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert alive(), "the run ended early"
        time.sleep(0.3)
    raise AssertionError(f"round {n} did not finish in {timeout}s")


def _real_run(cfg, folder, tmp_path):
    """(run folder, node files, run config) of a real-process run of `cfg` on the nodes' files."""
    from fedlora.config import dump_config

    out = tmp_path / "flower"
    rc = {"config-yaml": dump_config(cfg), "out": str(out), "round-timeout": 600.0, "min-clients": 2,
          "node-wait": 120.0}
    return out, [str(node_file(folder, k)) for k in range(NODES)], rc


def _submit(fed, rc, tmp_path, result):
    """`flwr run` in a thread (its CompletedProcess lands in result["p"])."""
    from fedlora.flower.launch import flwr_run

    thread = threading.Thread(target=lambda: result.update(p=flwr_run(tmp_path / "w", fed.address, rc, quiet=True)))
    thread.start()
    return thread


@pytest.mark.slow
def test_real_nodes_survive_a_killed_node_and_a_killed_superlink(partitioned, tmp_path):
    """Real SuperLink and SuperNodes, each node with only its file: node 2 is killed during
    round 2 and restarted (it rejoins once found again, from its snapshot); then the SuperLink is killed
    and the run resumed on a new one. Every round is in metrics.jsonl; the replay in-process
    gives the Flower run's adapter."""
    from fedlora.flower.launch import LocalFederation, flwr_run

    tree, cfg, folder, _ = partitioned
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 4})})
    out, files, rc = _real_run(cfg, folder, tmp_path)
    result: dict = {}
    with LocalFederation(tmp_path / "fed", nodes=NODES, data_files=files) as fed:
        thread = _submit(fed, rc, tmp_path, result)
        _wait_rounds(out, 1, thread.is_alive)
        os.killpg(fed.procs["supernode-2"].pid, signal.SIGKILL)
        fed.procs.pop("supernode-2").wait(10)
        _wait_rounds(out, 2, thread.is_alive)
        fed.start_node(2)
        _wait_rounds(out, 3, thread.is_alive)
        os.killpg(fed.procs["superlink"].pid, signal.SIGKILL)
        fed.procs.pop("superlink").wait(10)
        thread.join(120)
    assert len(read_metrics(out)) == 3
    # restarted on its address, as a real SuperLink would be; the nodes keep their disks. The old
    # ServerApp (its SuperExec's child, which outlives the kill) meets the new SuperLink, is refused and
    # exits; the resumed ServerApp waits for it to release run.lock (CI saw the resume refused otherwise)
    with LocalFederation(tmp_path / "fed", nodes=NODES, data_files=files, port=fed.port) as fed:
        done = flwr_run(tmp_path / "w2", fed.address, {**rc, "resume": True}, quiet=True, timeout=600)
    assert done.returncode == 0
    history = read_metrics(out)
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert [c["id"] for c in history[1]["clients"]].count(2) == 0
    # back once the server has found it again: round 3, or round 4 when it registered late
    assert 2 in [c["id"] for r in history[2:] for c in r["clients"]]
    assert 2 in [c["id"] for c in history[3]["clients"]]
    tree = {**tree, "federation": {**tree["federation"], "rounds": 4}}
    replayed = _inprocess(tree, tmp_path / "replayed", replay=out)
    assert _same(_final(out), replayed)


def _children(pid):
    """(pid, state) of the processes whose parent is `pid` (from /proc)."""
    from pathlib import Path

    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append((int(stat.parent.name), fields[0]))
    return out


@pytest.mark.slow
def test_warm_nodes_keep_their_executor_and_a_killed_task_is_a_failed_client(partitioned, tmp_path):
    """Real SuperNodes with warm node executors, each node with only its file: every executor
    keeps its pid for the whole run and loads the model once (its first task; later tasks take
    the executor's warm copy); node 2's round-2 task is killed mid-task: Flower answers for it
    ('ClientApp stopped responding'), the round goes on without client 2 and round 3 has it
    again from the same executor; no child is left behind; the replay in-process gives the
    Flower run's adapter."""
    from fedlora.flower.launch import LocalFederation

    _, cfg, folder, _ = partitioned
    out, files, rc = _real_run(cfg, folder, tmp_path)
    result: dict = {}
    with LocalFederation(tmp_path / "fed", nodes=NODES, data_files=files) as fed:
        executors = {i: fed.procs[f"executor-{i}"] for i in range(NODES)}
        logs = {i: tmp_path / "fed/logs" / f"executor-{i}.log" for i in range(NODES)}
        thread = _submit(fed, rc, tmp_path, result)
        _wait_rounds(out, 1, thread.is_alive)
        warm_before = logs[2].read_text().count("the warm copy")
        deadline = time.time() + 300
        while logs[2].read_text().count("the warm copy") == warm_before:  # round 2's task has its model
            assert thread.is_alive() and time.time() < deadline, "node 2 got no round-2 task"
            time.sleep(0.01)
        for pid, _ in _children(executors[2].pid):
            os.kill(pid, signal.SIGKILL)
        thread.join(900)
        assert all(executors[i].poll() is None and fed.procs[f"executor-{i}"] is executors[i] for i in range(NODES))
        leftovers = {i: _children(executors[i].pid) for i in range(NODES)}
        texts = {i: logs[i].read_text() for i in range(NODES)}
    assert result["p"].returncode == 0
    history = read_metrics(out)
    assert [sorted(c["id"] for c in r["clients"]) for r in history] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    (failure,) = history[1]["rejected"]
    assert failure["client"] == 2 and "stopped responding" in failure["reason"], failure
    for i, text in texts.items():
        assert text.count("node executor ready") == 1, i
        assert text.count("loading it from its source") == 1, i  # round 1's task
        assert text.count("keeping base model tiny-llama warm") == 1, i
        assert text.count("the warm copy") == 2, i  # rounds 2 and 3
    assert "killed by signal 9" in texts[2]
    assert all(state != "Z" for kids in leftovers.values() for _, state in kids), leftovers
    _replay_equals(partitioned, tmp_path)


def test_partition_and_node_data_bad_inputs_exit_2(partitioned, tmp_path, capsys):
    """One line and exit code 2: a non-empty --out, a --replay folder that is no run, a
    --node-data folder without a node's file, node files for a config that reads shared data."""
    import yaml

    from fedlora.cli import main

    tree, _, folder, _ = partitioned
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("")
    cases = [
        (["partition", str(cfg), "--out", str(tmp_path / "full")], "not empty"),
        (["run", str(cfg), "--out", str(tmp_path / "r"), "--replay", str(tmp_path / "full")], "no metrics.jsonl"),
        (["flower", "run", str(folder / "config.yaml"), "--out", str(tmp_path / "f"), "--local", "4",
          "--node-data", str(folder)], "4 nodes for 3 partitions"),
        (["flower", "run", str(cfg), "--out", str(tmp_path / "g"), "--local", "3", "--node-data", str(folder)],
         "must set nodes.local_data"),
    ]
    for args, msg in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
