"""What a SuperNode can do, for a run with `devices: measured`: declared in its node config, or
measured here when the server asks (its `query` before round 1; never again in the run).

Node config keys, all optional (what is not declared is measured, or left unknown):
  throughput=FLOP/s       training throughput;
  memory-mib=MiB          free memory;
  uplink-mbps=, downlink-mbps=, link-mbps= (both)   link rates in Mbit/s.

Measured:
- throughput: a timed warm-up of real LoRA training steps on the node's own examples at the
  run's batch shape (model, target modules, batch size, max length, compute dtype, threads):
  one untimed step (first-call costs), then WARMUP_STEPS timed ones. The FLOPs are the simulated
  clock's count of those very steps (fedlora.clock), so the figure is in the clock's own unit and
  the clock's prediction for this node is its counted FLOPs over this throughput.
- free memory: MemAvailable (/proc/meminfo), or the room left under this process's cgroup
  memory limit when that is smaller.
Link rates are not measured: on flwr 1.41 every message starts a fresh ClientApp process, so a
timed transfer inside a query/reply would time that start-up (seconds) rather than the link. A
node that knows its link declares it (the testbed declares the rates it shapes); one that does
not leaves the server to assume the `reference` preset's rates, and the run's record says so.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from time import perf_counter
from typing import Any

from fedlora.flower.reports import Capability

WARMUP_STEPS = 2
"""Timed training steps of the warm-up (after one untimed step)."""
WARMUP_RANK = 8
"""The warm-up's LoRA rank on every target module (a FLOP/s figure barely depends on it: the
adapter is a small share of a step's FLOPs)."""
MIB = 2**20
DECLARED = {"throughput": ("throughput", 1.0), "memory-mib": ("free_memory", float(MIB)),
            "uplink-mbps": ("uplink_mbps", 1.0), "downlink-mbps": ("downlink_mbps", 1.0)}
"""Node config key → (Capability field, factor to the field's unit)."""


def declared(node_config: dict[str, Any]) -> dict[str, float]:
    """The figures the node config declares, in the Capability's units; ValueError naming a key
    whose value is not a number (the server gets the error as the node's answer and refuses it)."""
    out: dict[str, float] = {}
    items = dict(node_config)
    if "link-mbps" in items:
        for key in ("uplink-mbps", "downlink-mbps"):
            items.setdefault(key, items["link-mbps"])
    for key, (name, unit) in DECLARED.items():
        if key not in items:
            continue
        value = items[key]
        problem = ValueError(f"node config: {key}={str(value)[:40]!r} is not a number")
        if isinstance(value, bool):
            raise problem
        try:
            out[name] = float(value) * unit
        except (TypeError, ValueError):
            raise problem from None
    return out


def node_capability(cfg: Any, node_config: dict[str, Any], partition: int, data_file: str | None,
                    classes: list[str] | None) -> Capability:
    """Declared figures, the rest measured (throughput, free memory); link rates only if declared."""
    figures: dict[str, float | None] = dict(declared(node_config))
    sources = {name: "declared" for name in figures}
    if "free_memory" not in figures:
        figures["free_memory"], sources["free_memory"] = free_memory(), "measured"
    if "throughput" not in figures:
        figures["throughput"], sources["throughput"] = warmup_throughput(cfg, partition, data_file, classes), "measured"
    order = ("throughput", "free_memory", "uplink_mbps", "downlink_mbps")
    return Capability(**figures, sources=tuple((k, sources[k]) for k in order if k in sources))  # type: ignore[arg-type]


def warmup_throughput(cfg: Any, partition: int, data_file: str | None, classes: list[str] | None) -> float:
    """FLOP/s of real LoRA training steps on this node's examples at the run's batch shape."""
    import numpy as np

    from fedlora.algorithms.base import lora_init
    from fedlora.data.task import node_task
    from fedlora.devices import DevicesConfig
    from fedlora.models import load_tokenizer
    from fedlora.runtime.inprocess import Federation

    tokenizer = load_tokenizer(cfg.model.name)
    task = node_task(cfg, tokenizer, partition, data_file, classes)
    # the run's own model, adapters and client context; the devices are what is being measured
    fed = Federation.assemble(cfg.model_copy(update={"devices": DevicesConfig()}), tokenizer, task)
    fed.adapters.load(lora_init(fed.adapters.shapes(), WARMUP_RANK, cfg.seed), trainable=("A", "B"))
    groups = [(fed.adapters.trainable_parameters(), cfg.federation.lr)]
    ctx = fed.client(partition, 0)  # round 0: a seed stream no round of the run draws from
    replace(ctx, local_steps=1, seed=np.random.SeedSequence([cfg.seed, 0, partition, 1])).train(groups)
    timed = replace(ctx, local_steps=WARMUP_STEPS, flops=0.0)
    started = perf_counter()
    timed.train(groups)
    seconds = perf_counter() - started
    fed.adapters.clear()
    return timed.flops / max(seconds, 1e-9)


def free_memory(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> float:
    """Bytes this process could still use: MemAvailable, or less under its cgroup's memory limit."""
    available = None
    for line in (proc / "meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = float(line.split()[1]) * 1024
    if available is None:
        raise ValueError(f"{proc / 'meminfo'}: no MemAvailable line")
    room = cgroup_room(proc / "self" / "cgroup", cgroup_root)
    return min(available, room) if room is not None else available


def cgroup_room(own: Path, root: Path) -> float | None:
    """Limit minus usage of this process's memory cgroup (v2 `memory.max`/`memory.current`, v1
    `memory.limit_in_bytes`/`memory.usage_in_bytes`); None without a limit or a readable group."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2
            files = (root / rel / "memory.max", root / rel / "memory.current")
        elif "memory" in controllers.split(","):
            files = (root / "memory" / rel / "memory.limit_in_bytes", root / "memory" / rel / "memory.usage_in_bytes")
        else:
            continue
        try:
            limit, usage = (f.read_text().strip() for f in files)
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 2**60:  # v1 "no limit" is ~2^63
            return float(max(int(limit) - int(usage), 0))
    return None

