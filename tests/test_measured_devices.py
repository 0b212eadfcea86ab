"""`devices: measured`: nodes measure (or declare) throughput, free memory and link rates and
report them in their `query` reply; the server checks them like an update, records them, and
`client_max_ranks: auto`, HierFedLoRA's grouping and the simulated clock use them by the same
rule as device profiles. The apps run over test_flower's in-process LoopbackGrid."""

import math
import time

import pytest
import torch
import yaml
from conftest import tiny_tree
from safetensors.torch import load_file
from test_flower import LoopbackGrid

from fedlora.config import ConfigError, build_config
from fedlora.devices import MBIT, PRESETS, adapter_bytes_per_rank, capability_ranks
from fedlora.flower.reports import InvalidReport, NodeReport
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import read_metrics


def _tree(synthetic_task, n=3, method=None, **federation):
    return tiny_tree(algorithm=method or {"name": "aflora", "server_steps": 0}, threads=1,
                     data=dict(synthetic_task, train_examples=120), devices="measured",
                     federation={"num_clients": n, "client_max_ranks": "auto", "rounds": 1, **federation})


def _run(tree, tmp_path, monkeypatch, declared, node_wait=0.0):
    """A Flower run over loopback nodes; node k's node config adds declared[k]."""
    from fedlora.flower.server_app import FlowerRun

    n = tree["federation"]["num_clients"]
    grid = LoopbackGrid({100 + k: {"partition-id": k, "num-partitions": n, "state-dir": str(tmp_path / "clients"),
                                   **declared[k]} for k in range(n)}, monkeypatch)
    run = FlowerRun(build_config(tree), tmp_path / "flower", grid, round_timeout=30.0, node_wait=node_wait,
                    min_clients=n)
    return run, grid


def _recorded(tmp_path):
    return yaml.safe_load((tmp_path / "flower/config.yaml").read_text())


FIGURES = {"memory-mib": 8192, "link-mbps": 20}


def test_slow_node_gets_the_smaller_aflora_rank_and_its_clock(data_dir, synthetic_task, tmp_path, monkeypatch):
    """Declared throughputs 1, 4 and 0.25 GFLOP/s: the capability rule gives 16, 64 and 4 (the
    same rule as profiles), AFLoRA trains at those ranks, the clock charges each client its
    FLOPs over its reported throughput plus its bytes over its link (node 2 declares none: the
    reference preset's rates, marked `assumed`), and round 1's record carries the figures."""
    tp = [1e9, 4e9, 2.5e8]
    declared = [{"throughput": tp[0], **FIGURES}, {"throughput": tp[1], **FIGURES},
                {"throughput": tp[2], "memory-mib": 8192}]
    run, _ = _run(_tree(synthetic_task), tmp_path, monkeypatch, declared)
    run.run()
    assert capability_ranks(tp) == [16, 64, 4]
    recorded = _recorded(tmp_path)
    assert recorded["federation"]["client_max_ranks"] == [16, 64, 4]
    assert recorded["devices"]["max_ranks"] == "auto"
    assert [c["throughput"] for c in recorded["devices"]["measured"]["clients"]] == tp
    (record,) = read_metrics(tmp_path / "flower")
    assert record["ranks"] == {"0": 16, "1": 64, "2": 4}
    links = [(20, 20), (20, 20), (PRESETS["reference"].uplink_mbps, PRESETS["reference"].downlink_mbps)]
    for c in record["clients"]:
        k = c["id"]
        want = c["flops"] / tp[k] + c["uplink_bytes"] / (links[k][0] * MBIT) + c["downlink_bytes"] / (links[k][1] * MBIT)
        assert c["flops"] > 0 and c["sim_seconds"] == pytest.approx(want, rel=1e-9)
    devices = record["devices"]
    assert [d["client"] for d in devices] == [0, 1, 2]
    assert [d["throughput"] for d in devices] == tp and all(d["free_memory"] == 8192 * 2**20 for d in devices)
    assert devices[0]["sources"] == {"throughput": "declared", "free_memory": "declared", "uplink_mbps": "declared",
                                     "downlink_mbps": "declared"}
    assert devices[2]["sources"]["uplink_mbps"] == "assumed" and devices[2]["uplink_mbps"] == links[2][0]
    # `fedlora report` tabulates them, with each client's simulated and measured seconds
    from fedlora.report import write_report

    text = write_report(tmp_path / "flower").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 2 | 0.25 | 8192 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:6] == ["100.0/100.0", "downlink assumed, free declared, throughput declared, uplink assumed", "4"]
    assert float(cells[6]) == pytest.approx(record["clients"][2]["sim_seconds"], rel=1e-2)


def test_a_resumed_measured_run_keeps_its_figures_and_asks_no_node(data_dir, synthetic_task, tmp_path, monkeypatch):
    """Resumed (its saved config, one more round), the run continues with the figures it started
    with: no query asks for capability, though the nodes now declare other figures, and the
    ranks and the clock are the first round's."""
    from fedlora.flower.server_app import FlowerRun
    from fedlora.runtime.rundir import saved_config, verify_run

    first = [{"throughput": t, **FIGURES} for t in (1e9, 4e9, 2.5e8)]
    run, _ = _run(_tree(synthetic_task), tmp_path, monkeypatch, first)
    run.run()
    cfg = saved_config(tmp_path / "flower", {"federation.rounds": 2})
    verify_run(tmp_path / "flower", cfg)
    grid = LoopbackGrid({100 + k: {"partition-id": k, "num-partitions": 3, "state-dir": str(tmp_path / "clients"),
                                   "throughput": 1e12, "link-mbps": 1000} for k in range(3)}, monkeypatch)
    asked = []

    def watch(node, msg, reply):
        conf = msg.content.config_records.get("config")
        if msg.metadata.message_type == "query" and conf is not None and conf.get("capability"):
            asked.append(node)
        return reply
    grid.tamper = watch
    FlowerRun(cfg, tmp_path / "flower", grid, round_timeout=30.0, node_wait=0.0, min_clients=3).run(resume=True)
    assert asked == []
    recorded = _recorded(tmp_path)
    assert [c["throughput"] for c in recorded["devices"]["measured"]["clients"]] == [1e9, 4e9, 2.5e8]
    assert recorded["federation"]["client_max_ranks"] == [16, 64, 4]
    first_record, second = read_metrics(tmp_path / "flower")
    assert "devices" not in second and second["ranks"] == first_record["next_ranks"]  # AFLoRA goes on from round 1
    c = second["clients"][1]
    assert c["sim_seconds"] == pytest.approx(c["flops"] / 4e9 + (c["uplink_bytes"] + c["downlink_bytes"]) / (20 * MBIT))


def test_a_measured_flower_run_replays_in_process_from_its_config(data_dir, synthetic_task, tmp_path, monkeypatch):
    """The run's config.yaml carries the figures: `fedlora run` of it, replaying the Flower run's
    participation, trains at the same ranks and ends with the same global adapter."""
    from fedlora.config import load_config
    from fedlora.runtime.replay import Participation

    declared = [{"throughput": t, **FIGURES} for t in (1e9, 4e9, 2.5e8)]
    run, _ = _run(_tree(synthetic_task), tmp_path, monkeypatch, declared)
    run.run()
    cfg = load_config(tmp_path / "flower/config.yaml")
    Simulation(cfg, tmp_path / "replayed", progress=False, replay=Participation.read(tmp_path / "flower")).run()
    a = load_file(str(tmp_path / "flower/final_state.safetensors"))
    b = load_file(str(tmp_path / "replayed/final_state.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    flower, replayed = read_metrics(tmp_path / "flower")[0], read_metrics(tmp_path / "replayed")[0]
    assert replayed["ranks"] == flower["ranks"] == {"0": 16, "1": 64, "2": 4}
    assert replayed["sim_seconds"] == pytest.approx(flower["sim_seconds"])


def test_memory_caps_the_measured_rank(data_dir, synthetic_task, tmp_path, monkeypatch):
    """Three equally fast nodes; node 1 has free memory for 2.5 units of adapter rank in the
    rule's quarter: it gets 2, the others the cap (64)."""
    from fedlora.adapters import find_targets, module_shape
    from fedlora.models import load_model, load_tokenizer

    model = load_model("tiny-llama", 0, len(load_tokenizer("tiny-llama")))
    per_rank = adapter_bytes_per_rank(module_shape(m) for m in find_targets(model, ["q_proj", "v_proj"]).values())
    small = 4 * 2.5 * per_rank / 2**20
    declared = [{"throughput": 1e9, "link-mbps": 20, "memory-mib": m} for m in (8192, small, 8192)]
    run, _ = _run(_tree(synthetic_task), tmp_path, monkeypatch, declared)
    run.run()
    recorded = _recorded(tmp_path)
    assert recorded["devices"]["measured"]["bytes_per_rank"] == per_rank
    assert recorded["federation"]["client_max_ranks"] == [64, 2, 64]


def test_a_throttled_node_measures_slower_and_gets_a_smaller_rank(data_dir, synthetic_task, tmp_path, monkeypatch):
    """Nothing declared but the link: every node times real LoRA steps on its own examples. Node
    2's steps are held up 1.5 s (a slow device): its measured throughput is far lower, so its
    rank is smaller than both others'."""
    from fedlora.runtime.context import LocalClient

    real = LocalClient.train

    def throttled(self, *args, **kw):
        if self.client_id == 2:
            time.sleep(1.5)
        return real(self, *args, **kw)

    monkeypatch.setattr(LocalClient, "train", throttled)
    run, _ = _run(_tree(synthetic_task), tmp_path, monkeypatch, [{"link-mbps": 20}] * 3)
    run.run()
    recorded = _recorded(tmp_path)
    clients = recorded["devices"]["measured"]["clients"]
    assert all(c["sources"]["throughput"] == "measured" and c["sources"]["free_memory"] == "measured"
               for c in clients)
    tp = [c["throughput"] for c in clients]
    assert all(math.isfinite(t) and t > 0 for t in tp)
    assert tp[2] * 5 < min(tp[:2]), tp
    ranks = recorded["federation"]["client_max_ranks"]
    assert ranks[2] < min(ranks[:2]) and ranks[2] <= 16, ranks


@pytest.mark.parametrize("fast", [(0, 2), (0, 3)])
def test_hierfedlora_groups_follow_measured_speeds(data_dir, synthetic_task, tmp_path, monkeypatch, fast):
    """Four nodes, two 1000× faster than the others; groups that also weigh speed
    (speed_weight 1) gather the fast pair and the slow pair, whichever nodes are fast."""
    tree = _tree(synthetic_task, n=4, method={"name": "hierfedlora", "groups": 2, "speed_weight": 1.0},
                 client_max_ranks=[4] * 4)
    declared = [{"throughput": 1e12 if k in fast else 1e9, **FIGURES} for k in range(4)]
    run, _ = _run(tree, tmp_path, monkeypatch, declared)
    run.run()
    groups = load_file(str(tmp_path / "flower/final_state.safetensors"))["groups"].tolist()
    members = {frozenset(k for k in range(4) if groups[k] == g) for g in set(groups)}
    assert members == {frozenset(fast), frozenset(set(range(4)) - set(fast))}


def _lie_once(grid, node, change):
    from flwr.app import ConfigRecord

    told = []

    def tamper(n, msg, reply):
        if n == node and msg.metadata.message_type == "query" and not told:
            told.append(n)
            info = {**dict(reply.content.config_records["info"]), **change}
            reply.content["info"] = ConfigRecord({k: v for k, v in info.items() if v is not None})
        return reply
    grid.tamper = tamper


def test_a_hostile_capability_report_is_refused_and_logged(data_dir, synthetic_task, tmp_path, monkeypatch, caplog):
    """Node 1 first reports an impossible throughput: refused with the reason (logged, in round
    1's events); its honest second report is the one the run uses."""
    declared = [{"throughput": 1e9, **FIGURES}] * 3
    run, grid = _run(_tree(synthetic_task), tmp_path, monkeypatch, declared, node_wait=30.0)
    _lie_once(grid, 101, {"throughput": float("nan")})
    with caplog.at_level("WARNING", logger="fedlora"):
        run.run()
    (record,) = read_metrics(tmp_path / "flower")
    refused = [e for e in record["events"] if e["event"] == "node refused"]
    assert len(refused) == 1 and refused[0]["node"] == 101
    assert "throughput=nan is not a finite positive number" in refused[0]["reason"]
    assert any("node 101 refused" in r.getMessage() and "throughput=nan" in r.getMessage() for r in caplog.records)
    assert [d["throughput"] for d in record["devices"]] == [1e9] * 3


OK = {"partition-id": 1, "num-partitions": 3, "throughput": 1e10, "free-memory": 2.0**30, "uplink-mbps": 10.0,
      "downlink-mbps": 50.0, "capability-sources": ["throughput=measured", "free_memory=measured"]}


@pytest.mark.parametrize("change, reason", [
    ({"throughput": float("nan")}, "throughput=nan is not a finite positive number"),
    ({"throughput": float("inf")}, "throughput=inf is not a finite positive number"),
    ({"throughput": -1e9}, "throughput=-1000000000.0 is not a finite positive number"),
    ({"throughput": 0}, "throughput=0 is not a finite positive number"),
    ({"throughput": 1e30}, "throughput=1e+30 exceeds what any device has"),
    ({"throughput": 10**400}, "throughput=inf exceeds what any device has"),
    ({"throughput": "fast"}, "throughput='fast' is not a number"),
    ({"throughput": True}, "throughput=True is not a number"),
    ({"throughput": [1e9]}, "throughput=[1000000000.0] is not a number"),
    ({"throughput": None}, "no throughput"),
    ({"free-memory": -1.0}, "free-memory=-1.0 is not a finite positive number"),
    ({"free-memory": 2.0**60}, "free-memory=1.15292e+18 exceeds what any device has"),
    ({"uplink-mbps": float("nan")}, "uplink-mbps=nan is not a finite positive number"),
    ({"downlink-mbps": 1e9}, "downlink-mbps=1e+09 exceeds what any device has"),
    ({"downlink-mbps": "50"}, "downlink-mbps='50' is not a number"),
    ({"capability-sources": "measured"}, "capability-sources is not a list of short strings"),
    ({"capability-sources": ["throughput=guessed"]}, "'throughput=guessed' names no reported figure"),
    ({"capability-sources": ["speed=measured"]}, "'speed=measured' names no reported figure"),
])
def test_impossible_capability_figures_are_refused_with_the_reason(change, reason):
    info = {k: v for k, v in {**OK, **change}.items() if v is not None}
    with pytest.raises(InvalidReport, match="partition 1: ") as err:
        NodeReport.from_record(info, 3, capability=True)
    assert reason in str(err.value)


def test_possible_capability_figures_are_kept():
    report = NodeReport.from_record(OK, 3, capability=True)
    assert report.capability.throughput == 1e10 and report.capability.uplink_mbps == 10.0
    assert dict(report.capability.sources) == {"throughput": "measured", "free_memory": "measured"}
    assert NodeReport.from_record(report.to_record(), 3, capability=True) == report
    bare = {"partition-id": 1, "num-partitions": 3, "throughput": 1e9}
    assert NodeReport.from_record(bare, 3, capability=True).capability.free_memory is None
    # a report that carries figures unasked is checked all the same
    with pytest.raises(InvalidReport, match="not a finite positive number"):
        NodeReport.from_record({**bare, "throughput": -1.0}, 3)


def test_inprocess_measured_without_figures_is_one_line(data_dir, synthetic_task, tmp_path):
    """In-process there is no node to ask: refused with one line (profiles go through the same
    rule); a config that records a Flower run's figures uses them as profiles."""
    cfg = build_config(_tree(synthetic_task))
    assert cfg.federation.client_max_ranks == [64] * 3  # provisional until nodes report
    with pytest.raises(ConfigError, match="devices: measured takes each client's device") as err:
        Simulation(cfg, tmp_path / "run", progress=False).run()
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()

    recorded = _tree(synthetic_task)
    recorded["devices"] = {"source": "measured", "measured": {"clients": [
        {"throughput": t, "uplink_mbps": 8, "downlink_mbps": 16} for t in (1e9, 4e9, 2.5e8)]}}
    cfg = build_config(recorded)
    assert cfg.federation.client_max_ranks == [16, 64, 4]
    profiles = cfg.device_profiles()
    assert [p.flops for p in profiles] == [1e9, 4e9, 2.5e8] and profiles[0].uplink == 8 * MBIT


@pytest.mark.parametrize("devices, reason", [
    ({"source": "measured", "assign": ["high", "low", "mid"]}, "assign: describes device profiles"),
    ({"source": "measured", "spread": 0.2}, "spread: describes device profiles"),
    ({"source": "measured", "max_ranks": "devices"}, "measured devices declare none"),
    ({"measured": {"clients": [{"throughput": 1e9, "uplink_mbps": 1, "downlink_mbps": 1}] * 3}},
     "node figures need source: measured"),
    ({"source": "measured", "measured": {"clients": [{"throughput": float("nan"), "uplink_mbps": 1,
                                                      "downlink_mbps": 1}] * 3}}, "throughput"),
    ({"source": "measured", "measured": {"clients": [{"throughput": 1e9, "uplink_mbps": 1, "downlink_mbps": 1,
                                                      "free_memory": 10.0}] * 3, "bytes_per_rank": 100.0}},
     "client 0: free memory 0 MiB cannot hold a rank-1 adapter"),
])
def test_measured_device_configs_that_cannot_be_are_one_line(synthetic_task, devices, reason):
    tree = _tree(synthetic_task)
    tree["devices"] = devices
    if devices.get("max_ranks") == "devices":  # (with `auto` ranks that is refused as two answers first)
        tree["federation"]["client_max_ranks"] = [4] * 3
    with pytest.raises(ConfigError, match="config error: ") as err:
        build_config(tree)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_declared_figures_and_free_memory(tmp_path):
    """Node config figures in the report's units; MemAvailable, or the cgroup's room when
    smaller (v1 and v2); a figure that is not a number is named."""
    from fedlora.flower.capability import declared, free_memory

    assert declared({"throughput": 5e10, "memory-mib": 512, "link-mbps": 4, "downlink-mbps": "8"}) == {
        "throughput": 5e10, "free_memory": 512.0 * 2**20, "uplink_mbps": 4.0, "downlink_mbps": 8.0}
    with pytest.raises(ValueError, match="node config: throughput='fast' is not a number"):
        declared({"throughput": "fast"})
    proc, root = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    4000 kB\n")
    (proc / "self/cgroup").write_text("0::/flt/n1\n")
    assert free_memory(proc, root) == 4000 * 1024  # no readable group: MemAvailable
    (root / "flt/n1").mkdir(parents=True)
    (root / "flt/n1/memory.max").write_text("1048576\n")
    (root / "flt/n1/memory.current").write_text("524288\n")
    assert free_memory(proc, root) == 524288
    (root / "flt/n1/memory.max").write_text("max\n")
    assert free_memory(proc, root) == 4000 * 1024
    (proc / "self/cgroup").write_text("7:cpu,cpuacct:/x\n5:memory:/flt/n2\n")
    (root / "memory/flt/n2").mkdir(parents=True)
    (root / "memory/flt/n2/memory.limit_in_bytes").write_text("2097152\n")
    (root / "memory/flt/n2/memory.usage_in_bytes").write_text("1048576\n")
    assert free_memory(proc, root) == 1048576


def test_warmup_throughput_is_the_clocks_flops_over_the_timed_seconds(data_dir, synthetic_task, monkeypatch):
    """The figure is FLOPs counted by the clock over the timed steps' seconds: the same steps
    timed twice as long give half the throughput."""
    from fedlora.flower import capability

    cfg = build_config(_tree(synthetic_task))
    figures = []
    for seconds in (2.0, 4.0):
        ticks = iter([100.0, 100.0 + seconds])
        monkeypatch.setattr(capability, "perf_counter", lambda ticks=ticks: next(ticks))
        figures.append(capability.warmup_throughput(cfg, 0, None, None))
    assert figures[0] > 0 and figures[0] == pytest.approx(2 * figures[1], rel=1e-12)


def test_testbed_nodes_declare_their_shaped_links():
    from types import SimpleNamespace

    from fedlora.testbed import Testbed, TestbedNode, TestbedProfile

    profile = TestbedProfile(nodes=[TestbedNode(device="low", cpu=0.2), TestbedNode(cpu=0.5, uplink_mbps=3)])
    fake = SimpleNamespace(profile=profile)
    assert Testbed.declared_devices(fake, 0) == " uplink-mbps=5.0 downlink-mbps=20.0"
    assert Testbed.declared_devices(fake, 1) == " uplink-mbps=3.0 downlink-mbps=100.0"


def test_testbed_profile_data_files_reach_the_nodes(tmp_path):
    """`nodes[].data_file` (relative to the profile's folder) becomes each node's data-file: all
    or none, each an existing file, else one line."""
    from fedlora.flower.cli import profile_files
    from fedlora.testbed import TestbedNode, TestbedProfile

    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.jsonl").write_text("{}\n")
    path = tmp_path / "profile.yaml"

    def profile(*files):
        return TestbedProfile(nodes=[TestbedNode(cpu=0.5, data_file=f) for f in files])

    assert profile_files(profile(None, None), path) is None
    assert profile_files(profile("a.jsonl", str(tmp_path / "b.jsonl")), path) == [
        str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(ConfigError, match="give every node a data_file, or none"):
        profile_files(profile("a.jsonl", None), path)
    with pytest.raises(ConfigError, match="c.jsonl: file not found"):
        profile_files(profile("a.jsonl", "c.jsonl"), path)
