"""Shared prompt prefix on vs off: one training step and one evaluation pass on SmolLM2-135M.

Alternates the two paths in one process (plain, shared, plain, shared, ...) and reports
medians of process CPU time with one thread, which a machine shared with other jobs
disturbs far less than wall time. The first repeat is a warm-up and is dropped.

    python bench/shared_prefix.py [--repeats 4] [--eval-examples 96]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import fedlora.train as train
from fedlora.adapters import Adapters
from fedlora.config import build_config
from fedlora.data.encode import collate
from fedlora.data.task import build_task
from fedlora.evaluate import evaluate_classification
from fedlora.models import load_base_model

RANK, BATCH, LENGTH, TARGETS = 16, 8, 64, ["q_proj", "v_proj"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--eval-examples", type=int, default=96)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data_dir = Path(__file__).resolve().parents[2] / "shared" / "data"
    cfg = build_config({"algorithm": {"name": "aflora", "dlf": False},
                        "data": {"test_examples": args.eval_examples, "max_length": LENGTH, "data_dir": str(data_dir)}})
    model, tok = load_base_model("smollm2-135m")
    task = build_task(cfg, tok)
    batch = collate([e for e in task.clients[0] if len(e.input_ids) == LENGTH][:BATCH], tok.pad_token_id)
    adapters = Adapters.inject(model, TARGETS, scaling=1.0)
    g = torch.Generator().manual_seed(0)
    factors = {}
    for name, (m, n) in adapters.shapes().items():
        factors.update({f"{name}.A": torch.randn(RANK, n, generator=g) / n**0.5, f"{name}.B": torch.zeros(m, RANK),
                        f"{name}.lam": torch.ones(RANK), f"{name}.mask": torch.ones(RANK)})
    adapters.load(factors, trainable={"B", "lam"})
    opt = torch.optim.Adam(adapters.trainable_parameters(), lr=1e-4)

    def step() -> None:
        train.classification_loss(model, batch, task.label_ids, "classes").backward()
        opt.step()
        opt.zero_grad()

    def evaluate() -> None:
        evaluate_classification(model, task.test, task.label_ids, tok.pad_token_id, 32)

    seconds: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):
        for shared in (False, True):
            train.MIN_SHARED_PREFIX = 4 if shared else 10**9
            for what, fn in (("step", step), ("eval", evaluate)):
                t = time.process_time()
                fn()
                seconds.setdefault((what, shared), []).append(time.process_time() - t)
    print(f"shared prefix: {train.shared_prefix_length(batch)} of {LENGTH} tokens; CPU seconds, one thread, "
          f"median of {args.repeats - 1} after a warm-up")
    for what in ("step", "eval"):
        plain, shared = (statistics.median(seconds[(what, s)][1:]) for s in (False, True))
        print(f"{what}: full pass {plain:.3f} s, shared prefix {shared:.3f} s, ratio {shared / plain:.3f}")


if __name__ == "__main__":
    main()
