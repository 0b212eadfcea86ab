"""`fedlora eval`: the untuned base model, or a finished run's global model, on the config's
evaluation (task test set, MMLU), with timings, so baselines and throughput are one command."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.runtime.checkpoint import Checkpoint, load_merges
from fedlora.runtime.files import load_tensors
from fedlora.runtime.inprocess import Federation
from fedlora.runtime.outputs import environment, write_json


def evaluate_command(cfg: RunConfig, run_dir: Path | None, repeat: int, out: Path | None) -> dict[str, Any]:
    merges, state = [], {}
    if run_dir is not None:  # read (and verified: SHA-256 of each merge) before the model loads
        ckpt = Checkpoint.load(run_dir)
        merges = load_merges(run_dir, ckpt.round, ckpt.merges)
        state = load_tensors(run_dir / "final_state.safetensors")[0]
    t0 = time.perf_counter()
    fed = Federation.build(cfg)
    build_seconds = time.perf_counter() - t0
    for merge in merges:
        fed.adapters.merge(merge)
    results, seconds, qps = [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        results.append(fed.evaluate(state) if state else _untuned(fed))
        seconds.append(time.perf_counter() - t)
        if results[-1].get("mmlu_questions_per_second"):
            qps.append(results[-1]["mmlu_questions_per_second"])
    report = {
        "model": cfg.model.name,
        "run": str(run_dir) if run_dir else None,
        "dataset": cfg.data.dataset,
        "evaluation": cfg.evaluation.model_dump(mode="json"),
        "test_examples": len(fed.task.test),
        "repeats": repeat,
        "results": results[-1],
        "seconds_median": statistics.median(seconds),
        "seconds_all": seconds,
        "mmlu_questions_per_second_median": statistics.median(qps) if qps else None,
        "mmlu_questions_per_second_all": qps,
        "build_seconds": build_seconds,
        "environment": environment(),
    }
    shown = {k: v for k, v in results[-1].items() if k != "mmlu_subjects"}
    print(json.dumps(shown, indent=2))
    print(f"evaluation seconds (median of {repeat}): {report['seconds_median']:.1f}")
    if qps:
        print(f"MMLU questions/second (median of {repeat}): {report['mmlu_questions_per_second_median']:.2f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, report)
    return report


def _untuned(fed: Federation) -> dict[str, Any]:
    """The base model as loaded: no adapter factors loaded, so the LoRA layers pass through."""
    from fedlora.evaluate import evaluate_task

    fed.adapters.clear()
    return evaluate_task(fed.model, fed.task, fed.pad_id, fed.cfg.federation.eval_batch_size,
                         fed.cfg.model.compute_dtype)
