"""Measured step time vs fine-tuning depth (HierFedLoRA's d): does skipping the backward pass
below the last d layers save what the simulated clock says it saves?

One process, SmolLM2-135M-Instruct, one batch of AG News prompts (BATCH × LENGTH tokens),
LoRA rank 4 on q_proj and v_proj in every layer (forward), A and B trained only in the last
d layers, exactly as a HierFedLoRA client does. Depths are timed round-robin (d1 d2 … d1 d2 …)
so machine noise hits all; we report the median step time, its ratio to full depth, and the
clock's FLOP ratio (fedlora.clock) for the same step.

    python bench/depth_step_time.py [--repeats 7] [--threads 1] [--out docs/bench/depth_step_time.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fedlora.adapters import Adapters, layer_index
from fedlora.algorithms.base import kaiming_rows
from fedlora.clock import train_flops
from fedlora.config import build_config
from fedlora.hardware import cpu_model, preferred_compute_dtype
from fedlora.data.encode import collate
from fedlora.data.task import build_task
from fedlora.models import load_base_model
from fedlora.train import classification_loss, train_steps

RANK, BATCH, LENGTH, TARGETS = 4, 8, 64, ["q_proj", "v_proj"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--depths", default="30,22,15,8,4,1")
    ap.add_argument("--dtype", default=preferred_compute_dtype(), help="default: what compute_dtype auto picks here")
    ap.add_argument("--out", default="docs/bench/depth_step_time.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = build_config({"algorithm": {"name": "fedit"},
                        "data": {"test_examples": 8, "max_length": LENGTH, "train_examples": 2000,
                                 "data_dir": str(Path(__file__).resolve().parents[2] / "shared" / "data")}})
    model, tok = load_base_model("smollm2-135m")
    task = build_task(cfg, tok)
    pool = [e for c in task.clients for e in c if len(e.input_ids) == LENGTH][:BATCH]
    batch = collate(pool, tok.pad_token_id)
    adapters = Adapters.inject(model, TARGETS, 1.0)
    g = torch.Generator().manual_seed(0)
    factors = {}
    for name, (m, n) in adapters.shapes().items():
        factors[f"{name}.A"] = kaiming_rows(RANK, n, g)
        factors[f"{name}.B"] = torch.zeros(m, RANK)
    layers = 1 + max(layer_index(n) for n in adapters.layers)
    depths = [int(d) for d in args.depths.split(",")]

    def load(depth: int) -> None:
        adapters.load(factors)
        for name, layer in adapters.layers.items():
            if layer_index(name) >= layers - depth:
                layer.set_factors(factors[f"{name}.A"], factors[f"{name}.B"], trainable={"A", "B"})

    def step() -> None:
        train_steps([(adapters.trainable_parameters(), 1e-3)], [batch],
                    lambda b: classification_loss(model, b, task.label_ids, "classes"), None, args.dtype)

    flops, times = {}, {d: [] for d in depths}
    for d in depths:
        load(d)
        flops[d] = train_flops(model, adapters, [batch], len(task.label_ids))
        step()  # warm-up
    for _ in range(args.repeats):
        for d in depths:
            load(d)
            t = time.perf_counter()
            step()
            times[d].append(time.perf_counter() - t)
    full = max(depths)
    rows = []
    for d in depths:
        med = statistics.median(times[d])
        rows.append({"depth": d, "median_seconds": med, "time_ratio": med / statistics.median(times[full]),
                     "flop_ratio": flops[d] / flops[full], "gflops": flops[d] / 1e9, "times": times[d]})
        print(f"depth {d:>2}: median {med:.3f} s  time ratio {rows[-1]['time_ratio']:.3f}  "
              f"FLOP ratio {rows[-1]['flop_ratio']:.3f}  ({flops[d] / 1e9:.1f} GFLOP)")
    result = {"model": "smollm2-135m", "layers": layers, "rank": RANK, "batch": BATCH, "length": LENGTH,
              "targets": TARGETS, "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats,
              "machine": cpu_model() or platform.machine(), "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
