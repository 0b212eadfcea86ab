"""What Flower costs over the in-process runtime, with real nodes (each serving its own file).

Two measurements (both start a SuperLink and SuperNodes on 127.0.0.1 once, each node with only
its `fedlora partition` file, and check that Flower ends with the in-process adapter):

  overhead   client overhead per round, at rounds --at (default 1, 10, 30) of a --rounds-round
             tiny run: per client, the server-measured round trip minus the node's training
             seconds (`seconds - train_seconds` of metrics.jsonl), and the node's own work
             outside training (`node_seconds - train_seconds`: model load, data, base snapshot).
             Flat in the round number means warm nodes: no replay of every merge.
  compare    whole-command wall time of `fedlora run CONFIG` against `fedlora flower run` of the
             same config on --nodes local nodes, alternating (in-process, Flower, ...) so machine
             noise hits both, each alone on the machine (the federation is started for each Flower
             run and stopped after it; its start-up is reported apart); medians and their ratio.
             Where the Flower run's CPU goes: every process under this one is sampled from /proc
             each 0.5 s, its CPU seconds summed by role (ServerApp, SuperLink, SuperNodes, the
             node executors, their training forks, the CLIs), beside the in-process run's.

Run on an idle machine (nothing else running); the JSON names the CPU:

    python bench/flower_overhead.py overhead --out docs/bench/flower_client_overhead.json
    python bench/flower_overhead.py compare --config configs/quickstart.yaml --nodes 10 \\
        --repeats 2 --out docs/bench/flower_vs_inprocess_quickstart.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from fedlora.flower.launch import LocalFederation, flower_env
from fedlora.hardware import cpu_family, cpu_model

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "fedlora.cli"]
NODE_RUNTIME = {
    "warm": "warm node executors: each ClientApp message in a fork of a process that keeps torch, fedlora and "
            "the base model loaded (fedlora flower node-executor)",
    "subprocess": "Flower 1.41 subprocess isolation: a new flwr-clientapp process per message",
}


def tiny_config(data_dir: str, rounds: int, nodes: int) -> dict:
    return {
        "seed": 0, "threads": 1,
        "model": {"name": "tiny-llama", "compute_dtype": "float32"},
        "data": {"data_dir": data_dir, "train_examples": 400, "test_examples": 48, "max_length": 32},
        "federation": {"num_clients": nodes, "client_max_ranks": [8, 4, 2][:nodes], "rounds": rounds,
                       "local_steps": 2, "batch_size": 4, "lr": 0.01, "eval_every": rounds},
        "algorithm": {"name": "aflora", "server_steps": 2},
    }


def run(cmd: list[str], quiet: bool = True) -> float:
    t = time.perf_counter()
    out = subprocess.DEVNULL if quiet else None
    subprocess.run(cmd, check=True, env=flower_env(), stdout=out, stderr=out)
    return time.perf_counter() - t


ROLES = [  # (what the command line contains, role); first match wins
    ("flwr-serverapp", "ServerApp"), ("flower-superlink", "SuperLink"), ("flower-superexec", "SuperExec"),
    ("flower-supernode", "SuperNodes"), ("node-executor", "node executors"), ("flwr run", "flwr run (CLI)"),
    ("fedlora.cli flower run", "fedlora flower run (CLI)"),
]


class CpuByRole:
    """CPU seconds of every process under this one, by role, sampled from /proc while it runs
    (a process's last sample counts; one shorter than the interval is missed). A node executor's
    forks, which run the ClientApp tasks (training among them), are their own role."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.seen, self.stop = interval, {}, threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CpuByRole:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        procs = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = text[text.rindex(")") + 2:].split()
            procs[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self.tick, cmd)
        mine, grew = {os.getpid()}, True  # descendants: add children until none joins
        while grew:
            new = {p for p, (ppid, _, _) in procs.items() if ppid in mine} - mine
            mine, grew = mine | new, bool(new)
        for pid in mine - {os.getpid()}:
            ppid, cpu, cmd = procs[pid]
            if pid in self.seen:  # its role from its first sample (an exited, unreaped one has no cmdline)
                self.seen[pid] = (self.seen[pid][0], cpu)
                continue
            role = next((r for key, r in ROLES if key in cmd), "other")
            if role == "node executors" and "node-executor" in procs.get(ppid, (0, 0, ""))[2]:
                role = "executor forks (ClientApp tasks, training included)"
            self.seen[pid] = (role, cpu)

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, cpu in self.seen.values():
            out[role] = round(out.get(role, 0.0) + cpu, 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def partition(config: Path, work: Path, overrides: list[str]) -> Path:
    parts = work / "parts"
    run([*CLI, "partition", str(config), "--out", str(parts), *overrides])
    return parts


def same_adapter(a: Path, b: Path) -> bool:
    x, y = (load_file(str(d / "final_state.safetensors")) for d in (a, b))
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": cpu_model(), "cpu_family": cpu_family().name,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def overhead(args: argparse.Namespace, work: Path) -> dict:
    at = [int(r) for r in args.at.split(",")]
    cfg = work / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(args.data_dir, max(at), args.nodes)))
    parts = partition(cfg, work, [])
    files = [str(parts / f"client_{k:03d}.jsonl") for k in range(args.nodes)]
    fl, ip = work / "flower", work / "inprocess"
    with LocalFederation(work / "federation", nodes=args.nodes, data_files=files,
                         warm=args.isolation == "warm") as fed:
        seconds = run([*CLI, "flower", "run", str(parts / "config.yaml"), "--out", str(fl), "--superlink",
                       fed.address, "--insecure", "--min-clients", str(args.nodes), "--quiet"])
    run([*CLI, "run", str(cfg), "--out", str(ip), "--quiet"])
    history = [json.loads(line) for line in (fl / "metrics.jsonl").read_text().splitlines()]
    per_round = {}
    for r in history:
        if r["round"] in at:
            cs = r["clients"]
            per_round[str(r["round"])] = {
                "round_trip_minus_training_seconds": statistics.median(c["seconds"] - c["train_seconds"] for c in cs),
                "node_work_outside_training_seconds": statistics.median(c["node_seconds"] - c["train_seconds"]
                                                                        for c in cs),
                "training_seconds": statistics.median(c["train_seconds"] for c in cs),
                "round_wall_seconds": r["wall_seconds"],
            }
    return {
        "what": f"{max(at)} rounds, AFLoRA, tiny-llama, {args.nodes} nodes each with its own file, threads=1; "
                "medians over the round's clients",
        "per_round": per_round,
        "flower_command_seconds": seconds,
        "same_final_adapter_as_inprocess": same_adapter(fl, ip),
    }


def compare(args: argparse.Namespace, work: Path) -> dict:
    config = Path(args.config).resolve()
    sets = [x for s in args.set for x in ("--set", s)]
    parts = partition(config, work, sets)
    nodes = args.nodes
    files = [str(parts / f"client_{k:03d}.jsonl") for k in range(nodes)]
    times: dict[str, list[float]] = {"inprocess": [], "flower": []}
    startups: list[float] = []
    inprocess_cpu: list[float] = []
    flower_cpu: list[dict[str, float]] = []
    train_seconds: list[float] = []
    same = True
    for i in range(args.repeats):
        # each contender alone on the machine: the in-process run with no federation up (ten idle
        # nodes still poll), then a federation started for the Flower run and stopped after it
        ip, fl = work / f"inprocess-{i}", work / f"flower-{i}"
        before = child_cpu_seconds()
        times["inprocess"].append(run([*CLI, "run", str(config), *sets, "--out", str(ip), "--quiet"]))
        inprocess_cpu.append(round(child_cpu_seconds() - before, 1))
        t = time.perf_counter()
        with LocalFederation(work / f"federation-{i}", nodes=nodes, data_files=files,
                             warm=args.isolation == "warm") as fed:
            startups.append(time.perf_counter() - t)
            with CpuByRole() as cpu:
                times["flower"].append(run([*CLI, "flower", "run", str(parts / "config.yaml"), *sets, "--out",
                                            str(fl), "--superlink", fed.address, "--insecure", "--min-clients",
                                            str(nodes), "--quiet"]))
                cpu.sample()
            flower_cpu.append(cpu.totals())
        history = [json.loads(line) for line in (fl / "metrics.jsonl").read_text().splitlines()]
        train_seconds.append(round(sum(c["train_seconds"] for r in history for c in r["clients"]), 1))
        same = same and same_adapter(ip, fl)
        print(f"repeat {i}: in-process {times['inprocess'][-1]:.1f} s, Flower {times['flower'][-1]:.1f} s "
              f"(+ {startups[-1]:.1f} s to start the federation)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "what": f"{config.name} {' '.join(args.set)} on {nodes} local nodes, each with only its own file",
        "repeats": args.repeats,
        "superlink_and_supernodes_startup_seconds": startups,
        "command_seconds": times,
        "median_command_seconds": med,
        "ratio_flower_over_inprocess": med["flower"] / med["inprocess"],
        "inprocess_cpu_seconds": inprocess_cpu,
        "flower_cpu_seconds_by_role": flower_cpu,
        "flower_clients_train_seconds_sum": train_seconds,
        "same_final_adapter": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead", help="client overhead per round at rounds --at")
    o.add_argument("--at", default="1,10,30", help="rounds to report (the run has the largest)")
    o.add_argument("--nodes", type=int, default=3)
    o.add_argument("--out", default="docs/bench/flower_client_overhead.json")
    c = sub.add_parser("compare", help="Flower against in-process, whole commands")
    c.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (both runs)")
    c.add_argument("--nodes", type=int, default=10, help="must equal the config's federation.num_clients")
    c.add_argument("--repeats", type=int, default=2)
    c.add_argument("--out", default="docs/bench/flower_vs_inprocess_quickstart.json")
    for p in (o, c):
        p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
        p.add_argument("--isolation", choices=sorted(NODE_RUNTIME), default="warm",
                       help="how the local nodes run ClientApps (fedlora flower run --isolation)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="flower-bench-") as work:  # removed after, also on failure
        result = overhead(args, Path(work)) if args.what == "overhead" else compare(args, Path(work))
    result.update(machine=machine(), warm_executors=args.isolation == "warm", node_runtime=NODE_RUNTIME[args.isolation],
                  command="python " + " ".join(sys.argv))
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
