"""The simulated clock against measured time on the emulated testbed (issue 26, item 3).

HierFedLoRA and FedIT run on `fedlora flower testbed`: one SuperNode per device in its own
network namespace (link shaped to its class's rates) and cgroup (a CPU quota), the 20-device
setting of configs/hierfedlora_tta.yaml scaled to what 2 cores carry. Every run has
`devices: measured`: each node times real LoRA steps under its quota before round 1, so the
clock predicts each round from the nodes' own figures, and the run records, per round, that
prediction (`sim_seconds`) beside what the round measurably took. The study writes:

  OUT/parts-s<seed>/                            each node's own data file for that seed
                                                (`fedlora partition`: a device holds only its data)
  OUT/profile-s<seed>.yaml, OUT/config-<method>-s<seed>.yaml   the testbed and the run configs
  OUT/runs/<method>-s<seed>/                    the runs (resumable: a finished run is kept, a
                                                stopped one resumed, a missing one started)
  OUT/results.json, OUT/results.md              per method, seed and round: the clock's seconds,
                                                the measured ones and the clock's error; per run:
                                                time to --target accuracy on either clock

Measured round time = Σ over the round's stages of the slowest reply in that stage (push to
arrival, as the server saw it) + the server's aggregation seconds: the part of a round the
clock models (its `sim_seconds`: FLOPs / throughput + bytes / link per client, lanes in parallel,
plus the server's FLOPs on the declared server device). Evaluation is outside both (the round's
`wall_seconds` includes it and is listed too). Note two things the clock does not model and
that this study measures: each Flower message passes through the SuperLink, the node's SuperNode
and a fork of its warm executor (docs/benchmarks.md, "Flower with real, warm nodes": seconds
per message, more under a small quota), and on Flower the stages of all of
HierFedLoRA's groups are synchronised by the server (stage s of every group is pushed together),
whereas the clock runs the groups' lanes independently.

Scaling (defaults): 5 nodes of the tta mix {high 0.25, mid 0.35, low 0.4} (1 high, 2 mid, 2 low,
by largest remainder), CPU quotas high 0.7, mid 0.35, low 0.2 cores (1.8 in all; the presets'
20:5:1 speed ratio is compressed to 3.5:1.75:1 because a node below ~0.2 core cannot start a
ClientApp within Flower's 30 s heartbeat window, docs/howto/testbed.md), links the presets'
rates. SmolLM2-135M, 4 rounds of 1 local step of batch 4 at 32 tokens, 100 test examples.
A check (1 round, HierFedLoRA, seed 0) took 294 s beside two other jobs (7 Dec 2026); the
study's 6 runs of 4 rounds, ~25-35 min on an idle 2-core machine (each run starts the testbed
and measures every node once). The script prints its own estimate after each
run; lower --rounds or --test-examples to fit a budget.

Needs root (namespaces, cgroups) and an idle machine. Everything the testbed creates is named
flt* and removed by the testbed command itself (also on Ctrl-C/SIGTERM, which this script
forwards to it by pid); after a SIGKILL: `fedlora flower testbed-cleanup RUN/flower/testbed`.

    sudo .venv/bin/python bench/testbed_clock_study.py --out docs/testbed_clock            # the study
    sudo .venv/bin/python bench/testbed_clock_study.py --out /tmp/tcs --seeds 0 --rounds 1 \\
        --methods hierfedlora                                                               # a check
    python bench/testbed_clock_study.py --out docs/testbed_clock --tables-only             # re-tabulate
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "hierfedlora_tta.yaml"
MIX = {"high": 0.25, "mid": 0.35, "low": 0.4}  # configs/hierfedlora_tta.yaml's devices.mix
CPU = {"high": 0.7, "mid": 0.35, "low": 0.2}   # cores per node of each class (see module doc)
RANK = {"high": 64, "mid": 16, "low": 4}       # the presets' max ranks, as in the tta study
METHODS = ("hierfedlora", "fedit")


def fedlora_bin() -> str:
    """The fedlora CLI beside this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).with_name("fedlora")
    return str(here) if here.exists() else "fedlora"


def node_classes(nodes: int) -> list[str]:
    """The tta mix scaled to `nodes` devices (largest remainder), fastest first."""
    from fedlora.devices import mix_counts

    counts = mix_counts(MIX, nodes)
    return [c for c in ("high", "mid", "low") for _ in range(counts[c])]


def write_inputs(args: argparse.Namespace, out: Path, seed: int) -> tuple[Path, dict[str, Path]]:
    """For one seed: every node's own data file (`fedlora partition` of the seed's shards, as a
    device would hold them), the testbed profile naming them, and one run config per method."""
    from fedlora.config import build_config
    from fedlora.data.node_files import node_file, write_partitions

    classes = node_classes(args.nodes)
    total = sum(CPU[c] for c in classes)
    if total > args.max_cores:
        raise SystemExit(f"the profile asks {total:g} cores, more than --max-cores {args.max_cores:g}")
    base = yaml.safe_load(BASE_CONFIG.read_text())
    base.pop("methods", None)
    base["seed"] = seed
    base["model"]["name"] = args.model
    base["data"].update(data_dir=str(Path(args.data_dir).resolve()), max_length=args.max_length,
                        test_examples=args.test_examples)
    base["federation"].update(num_clients=len(classes), rounds=args.rounds, local_steps=args.local_steps,
                              batch_size=args.batch_size, eval_every=1, client_max_ranks=[RANK[c] for c in classes])
    base["devices"] = {"source": "measured"}  # each node's figures, measured under its quota
    base["algorithm"] = {"name": "fedit"}
    parts = out / f"parts-s{seed}"
    if not (parts / "manifest.json").exists():  # (a partial folder from an interrupted write is redone)
        if parts.exists():
            shutil.rmtree(parts)
        write_partitions(build_config(base), parts)
    node_tree = yaml.safe_load((parts / "config.yaml").read_text())
    profile = {"nodes": [{"device": c, "cpu": CPU[c], "data_file": str(node_file(parts, i))}
                         for i, c in enumerate(classes)]}
    profile_path = out / f"profile-s{seed}.yaml"
    profile_path.write_text(yaml.safe_dump(profile, sort_keys=False))
    configs = {}
    for method in args.methods:
        tree = {**node_tree, "algorithm": {"name": method}}
        if method == "hierfedlora":
            tree["algorithm"]["groups"] = max(2, round(4 * len(classes) / 20))
        path = out / f"config-{method}-s{seed}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        configs[method] = path
    return profile_path, configs


def run_state(run_dir: Path, rounds: int) -> str:
    """`done`, `stopped` (a checkpoint to resume) or `new`."""
    summary = run_dir / "summary.json"
    if summary.exists() and len(read_records(run_dir)) >= rounds:
        return "done"
    return "stopped" if (run_dir / "checkpoint.safetensors").exists() else "new"


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_child: subprocess.Popen | None = None
_stopped: int | None = None


def _forward(signum, frame) -> None:
    """SIGTERM/SIGINT to this script: the running testbed command gets it once (by pid), cleans
    up and exits, and run_one stops the study then (no wait here: the handler interrupts the
    main thread's own wait on the child, and Popen.wait is not re-entrant)."""
    global _stopped
    _stopped = signum
    if _child is None or _child.returncode is not None:
        raise SystemExit(128 + signum)
    os.kill(_child.pid, signum)


def run_one(args: argparse.Namespace, out: Path, profile: Path, config: Path, method: str, seed: int) -> Path:
    global _child
    run_dir = out / "runs" / f"{method}-s{seed}"
    state = run_state(run_dir, args.rounds)
    if state == "done":
        print(f"{run_dir.name}: done, kept")
        return run_dir
    cmd = [fedlora_bin(), "flower", "testbed", str(profile)]
    cmd += (["--resume", str(run_dir), "--set", f"federation.rounds={args.rounds}"] if state == "stopped"
            else [str(config), "--out", str(run_dir)])
    n = len(yaml.safe_load(profile.read_text())["nodes"])
    cmd += ["--min-clients", str(n), "--node-wait", str(args.timeout), "--round-timeout", str(args.timeout), "--quiet"]
    print(f"{run_dir.name}: {'resuming' if state == 'stopped' else 'starting'}: {' '.join(cmd)}", flush=True)
    started = time.time()
    # its own session: a terminal's Ctrl-C reaches it once, forwarded by _forward, never twice
    _child = subprocess.Popen(cmd, start_new_session=True)
    code = _child.wait()
    _child = None
    print(f"{run_dir.name}: exit {code} after {time.time() - started:.0f} s", flush=True)
    if _stopped is not None:
        raise SystemExit(128 + _stopped)
    if code != 0:
        raise SystemExit(f"{run_dir.name} failed (exit {code}); its logs: {run_dir}/flower/; rerun this "
                         "command to resume it")
    return run_dir


def round_rows(records: list[dict]) -> list[dict]:
    """Per round: the clock's seconds, the measured ones (module doc), the error, accuracy."""
    rows = []
    for r in records:
        stages: dict[int, float] = {}
        for c in r.get("clients", []):
            stages[c.get("stage", 0)] = max(stages.get(c.get("stage", 0), 0.0), float(c.get("seconds", 0.0)))
        measured = sum(stages.values()) + float(r.get("server_seconds", 0.0))
        sim = float(r.get("sim_seconds", 0.0))
        compute_pred = [c["flops"] / d["throughput"] for c in r.get("clients", [])
                        for d in [_device(records, c["id"])] if d and c.get("flops")]
        compute_meas = [c["train_seconds"] for c in r.get("clients", []) if "train_seconds" in c]
        rows.append({
            "round": r["round"], "sim_seconds": sim, "measured_seconds": measured,
            "clock_error": (sim - measured) / measured if measured > 0 else None,
            "wall_seconds": float(r.get("wall_seconds", 0.0)), "stages": len(stages),
            "accuracy": r.get("accuracy"),
            "client_compute_sim": statistics.fmean(compute_pred) if compute_pred else None,
            "client_compute_measured": statistics.fmean(compute_meas) if compute_meas else None,
        })
    return rows


def _device(records: list[dict], client: int) -> dict | None:
    devices = next((r["devices"] for r in records if isinstance(r.get("devices"), list)), [])
    return next((d for d in devices if d.get("client") == client), None)


def time_to(rows: list[dict], target: float, key: str) -> float | None:
    """Cumulative `key` seconds at the first round whose accuracy reaches `target`."""
    total = 0.0
    for row in rows:
        total += row[key]
        if row["accuracy"] is not None and row["accuracy"] >= target:
            return total
    return None


def tabulate(out: Path, methods: list[str], seeds: list[int], target: float) -> dict:
    runs = {}
    for method in methods:
        for seed in seeds:
            run_dir = out / "runs" / f"{method}-s{seed}"
            records = read_records(run_dir)
            if not records:
                continue
            rows = round_rows(records)
            runs[f"{method}-s{seed}"] = {
                "method": method, "seed": seed, "rounds": rows,
                "devices": next((r["devices"] for r in records if isinstance(r.get("devices"), list)), None),
                "tta_sim": time_to(rows, target, "sim_seconds"),
                "tta_measured": time_to(rows, target, "measured_seconds"),
            }
    result = {"target": target, "cpu": _cpu(), "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text("\n".join(markdown(result, methods, seeds)) + "\n")
    return result


def _cpu() -> str:
    try:
        from fedlora.hardware import cpu_family, cpu_model

        return f"{cpu_model()} ({cpu_family().name}, {os.cpu_count()} cores)"
    except Exception:  # noqa: BLE001 - a label only
        return "unknown"


def _cell(v, fmt="{:.3g}") -> str:
    return "–" if v is None else fmt.format(v)


def markdown(result: dict, methods: list[str], seeds: list[int]) -> list[str]:
    lines = ["# The simulated clock against measured time on the emulated testbed\n",
             (f"CPU: {result['cpu']}. Target accuracy {result['target']}. Measured = Σ stages of the slowest reply "
              "+ server aggregation (evaluation excluded, as on the clock); error = (clock − measured) / measured.\n"),
             "## Per round\n",
             "| run | round | stages | clock s | measured s | clock error | wall s | accuracy | client compute: clock s | node training s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        for row in run["rounds"]:
            lines.append(f"| {name} | {row['round']} | {row['stages']} | {_cell(row['sim_seconds'])} | "
                         f"{_cell(row['measured_seconds'])} | {_cell(row['clock_error'], '{:+.0%}')} | "
                         f"{_cell(row['wall_seconds'])} | {_cell(row['accuracy'], '{:.3f}')} | "
                         f"{_cell(row['client_compute_sim'])} | {_cell(row['client_compute_measured'])} |")
    lines += ["", "## Per method (over seeds and rounds)\n",
              "| method | runs | median clock error | mean abs clock error | time to target: clock s (mean) | measured s (mean) |",
              "|---|---|---|---|---|---|"]
    for method in methods:
        runs = [r for r in result["runs"].values() if r["method"] == method]
        errors = [row["clock_error"] for r in runs for row in r["rounds"] if row["clock_error"] is not None]
        sims = [r["tta_sim"] for r in runs if r["tta_sim"] is not None]
        meas = [r["tta_measured"] for r in runs if r["tta_measured"] is not None]
        lines.append(f"| {method} | {len(runs)} | {_cell(statistics.median(errors) if errors else None, '{:+.0%}')} | "
                     f"{_cell(statistics.fmean(abs(e) for e in errors) if errors else None, '{:.0%}')} | "
                     f"{_cell(statistics.fmean(sims) if sims else None)} ({len(sims)} reached) | "
                     f"{_cell(statistics.fmean(meas) if meas else None)} ({len(meas)} reached) |")
    if {"hierfedlora", "fedit"} <= set(methods):
        lines += ["", "## HierFedLoRA's speed-up over FedIT, per seed (time to target: FedIT ÷ HierFedLoRA)\n",
                  "| seed | on the clock | measured |", "|---|---|---|"]
        for seed in seeds:
            h, f = result["runs"].get(f"hierfedlora-s{seed}"), result["runs"].get(f"fedit-s{seed}")
            if h and f:
                ratio = {k: (f[k] / h[k] if f[k] and h[k] else None) for k in ("tta_sim", "tta_measured")}
                lines.append(f"| {seed} | {_cell(ratio['tta_sim'], '{:.2f}×')} | {_cell(ratio['tta_measured'], '{:.2f}×')} |")
        lines.append("\nThree seeds are a description, not a test: a verdict needs the paired calibrated test of "
                     "docs/concepts/statistics.md.")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--test-examples", type=int, default=100)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--target", type=float, default=0.5, help="accuracy for time to accuracy")
    ap.add_argument("--max-cores", type=float, default=1.8, help="refuse a profile whose quotas sum above this")
    ap.add_argument("--timeout", type=float, default=900.0, help="--node-wait and --round-timeout of each run")
    ap.add_argument("--tables-only", action="store_true", help="re-tabulate the runs in --out, run nothing")
    args = ap.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.tables_only:
        from fedlora.testbed import available

        why = available()
        if why:
            print(f"testbed unavailable: {why}", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, _forward)
        signal.signal(signal.SIGINT, _forward)
        started, done = time.time(), 0
        total = len(args.methods) * len(seeds)
        for seed in seeds:  # seed-major: an interrupted study has both methods of its first seeds
            profile, configs = write_inputs(args, args.out, seed)
            for method in args.methods:
                run_one(args, args.out, profile, configs[method], method, seed)
                done += 1
                tabulate(args.out, args.methods, seeds, args.target)
                per_run = (time.time() - started) / done
                print(f"{done}/{total} runs; about {per_run * (total - done) / 60:.0f} min to go", flush=True)
    tabulate(args.out, args.methods, seeds, args.target)
    print(f"results: {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
