"""`fedlora eval`: the untuned base model, or a finished run's global model, on the config's
evaluation (task test set, MMLU), with timings, so baselines and throughput are one command."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError, RunConfig
from fedlora.models import TINY_MODELS
from fedlora.runtime.checkpoint import CHECKPOINT, check_state
from fedlora.runtime.inprocess import Federation
from fedlora.runtime.outputs import environment, write_json
from fedlora.runtime.rebuild import read_run, replay_merges
from fedlora.runtime.rundir import changed_fields, saved_config

# What a run's factors and merges are only valid for; data and evaluation may differ (another
# test set), and so may the compute device and dtype.
MODEL_SECTIONS = ("model.", "lora.", "algorithm.")
FREE_MODEL_FIELDS = ("model.compute_dtype", "model.device")


def model_fields(cfg: RunConfig) -> tuple[str, ...]:
    """Prefixes of the fields a run's model depends on: a tiny model's weights are drawn from
    the run's seed, so for it the seed is part of the model."""
    return (*MODEL_SECTIONS, "seed") if cfg.model.name in TINY_MODELS else MODEL_SECTIONS


def refuse_other_model(run_dir: Path, cfg: RunConfig) -> None:
    """`eval CONFIG --run RUN` evaluates RUN's model: CONFIG must describe the same model."""
    saved = saved_config(run_dir)
    differ = [f for f in changed_fields(saved, cfg)
              if f.startswith(model_fields(saved)) and f not in FREE_MODEL_FIELDS]
    if differ:
        raise ConfigError(f"config error: --run {run_dir}: the config's {', '.join(differ)} differ from the run's; "
                          f"use the run's model, lora and algorithm sections (e.g. {run_dir / 'config.yaml'})")


def evaluate_command(cfg: RunConfig, run_dir: Path | None, repeat: int, out: Path | None) -> dict[str, Any]:
    merges, state = [], {}
    if run_dir is not None:  # read (and verified: SHA-256 of each merge) before the model loads
        saved = read_run(run_dir, final=True)
        refuse_other_model(run_dir, cfg)
        merges, state = saved.merges, saved.final_state  # its SHA-256 is the checkpoint's record
    t0 = time.perf_counter()
    fed = Federation.build(cfg)
    build_seconds = time.perf_counter() - t0
    if state:
        check_state(state, fed.adapters.shapes(), run_dir / CHECKPOINT)
    replay_merges(fed.adapters, merges)
    results, seconds, qps = [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        results.append(fed.evaluate(state)[0] if state else fed.evaluate_untuned())
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

