"""Our client training step and evaluation vs plain PEFT / full-logit scoring, in ONE process.

Same model (SmolLM2-135M-Instruct), same batch (8 AG News prompts, padded to 64 tokens),
same rank (16 on q_proj, v_proj). Timings alternate between the contenders (A B A B …)
so machine noise hits both; we report medians and their ratio.

    python bench/step_time.py [--repeats 7] [--dtypes float32,bfloat16] [--eval-repeats 3] [--out docs/bench/step_time.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from fedlora.adapters import Adapters
from fedlora.algorithms.aflora import column_norm_penalty
from fedlora.config import build_config
from fedlora.hardware import cpu_model, preferred_compute_dtype
from fedlora.data.encode import Encoded, collate, length_sorted_batches
from fedlora.data.task import build_task
from fedlora.evaluate import evaluate_classification
from fedlora.models import load_base_model
from fedlora.train import autocast, classification_loss

RANK, BATCH, LENGTH, TARGETS = 16, 8, 64, ["q_proj", "v_proj"]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def causal_lm_examples(examples: list[Encoded], label_ids: list[int]) -> list[Encoded]:
    """Each prompt followed by its label word, loss on that word only: how a PEFT / FedIT /
    OpenFedLLM client formats a classification example for causal-LM training."""
    return [Encoded([*e.input_ids, label_ids[e.target]], e.target, len(e.input_ids)) for e in examples]


def peft_step(model, optimizer, lm_batch: dict, dtype: str) -> None:
    """One plain PEFT step: full-vocabulary logits at every position, causal-LM loss."""
    with autocast(dtype):
        loss = model(input_ids=lm_batch["input_ids"], attention_mask=lm_batch["attention_mask"],
                     labels=lm_batch["labels"]).loss
    loss.backward(); optimizer.step(); optimizer.zero_grad()


def full_logit_eval(model, examples: list[Encoded], label_ids: list[int], pad_id: int, dtype: str) -> int:
    """Correct predictions when scoring as usually done: the model's logits at every position,
    log-softmax over the vocabulary, then the label tokens at the last prompt position."""
    correct = 0
    with torch.inference_mode():
        for _, b in length_sorted_batches(examples, 32, pad_id):
            with autocast(dtype):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            ll = F.log_softmax(logits.float(), -1)[torch.arange(len(b["last"])), b["last"]]
            correct += int((ll[:, label_ids].argmax(-1) == b["target"]).sum())
    return correct


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--eval-examples", type=int, default=256)
    ap.add_argument("--eval-repeats", type=int, default=3, help="0 skips the evaluation timing")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default="docs/bench/step_time.json")
    args = ap.parse_args()

    cfg = build_config({"algorithm": {"name": "aflora", "dlf": False},
                        "data": {"test_examples": args.eval_examples, "max_length": LENGTH,
                                 "data_dir": str(Path(__file__).resolve().parents[2] / "shared" / "data")}})
    base, tok = load_base_model("smollm2-135m")
    task = build_task(cfg, tok)
    examples = [e for e in task.clients[0] if len(e.input_ids) == LENGTH][:BATCH]
    batch = collate(examples, tok.pad_token_id)
    # PEFT trains causal-LM style on prompt + label word; HF computes logits at all positions
    lm_batch = collate(causal_lm_examples(examples, task.label_ids), tok.pad_token_id)

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS))
    peft_opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ours = base
    adapters = Adapters.inject(ours, TARGETS, scaling=16 / RANK)
    g = torch.Generator().manual_seed(0)
    factors = {}
    for name, (m, n) in adapters.shapes().items():
        factors.update({f"{name}.A": torch.randn(RANK, n, generator=g) / n**0.5,
                        f"{name}.B": torch.zeros(m, RANK), f"{name}.lam": torch.ones(RANK),
                        f"{name}.mask": torch.ones(RANK)})
    adapters.load(factors, trainable={"B", "lam"})
    layers = list(adapters.layers.values())
    our_opt = torch.optim.Adam(adapters.trainable_parameters(), lr=1e-4)

    def our_step(dtype):
        with autocast(dtype):
            loss = classification_loss(ours, batch, task.label_ids, "classes")
        loss = loss + sum(column_norm_penalty(l.B, l.mask, 0.01) for l in layers)
        loss.backward(); our_opt.step(); our_opt.zero_grad()

    def our_eval(dtype):
        return evaluate_classification(ours, task.test, task.label_ids, tok.pad_token_id, 32, dtype)

    results = {"machine": {"processor": cpu_model() or platform.machine(),
                           "native_bfloat16": preferred_compute_dtype() == "bfloat16",
                           "threads": torch.get_num_threads(), "torch": torch.__version__},
               "setup": {"model": "SmolLM2-135M-Instruct", "batch": BATCH, "tokens": LENGTH,
                         "rank": RANK, "targets": TARGETS, "repeats": args.repeats,
                         "eval_examples": len(task.test)}}
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        peft_step(peft_model, peft_opt, lm_batch, dtype); our_step(dtype)  # warm-up
        p, o = [], []
        for _ in range(args.repeats):
            p += timed(lambda: peft_step(peft_model, peft_opt, lm_batch, dtype), 1)
            o += timed(lambda: our_step(dtype), 1)
        results[dtype] = {"peft_step_s": statistics.median(p), "our_step_s": statistics.median(o),
                          "step_ratio": statistics.median(o) / statistics.median(p), "peft_runs": p, "our_runs": o}
        if args.eval_repeats:
            fe, oe = [], []
            for _ in range(args.eval_repeats):
                fe += timed(lambda: full_logit_eval(peft_model, task.test, task.label_ids, tok.pad_token_id, dtype), 1)
                oe += timed(lambda: our_eval(dtype), 1)
            n = len(task.test)
            results[dtype].update(full_logit_eval_per_s=n / statistics.median(fe), our_eval_per_s=n / statistics.median(oe),
                                  eval_speedup=statistics.median(fe) / statistics.median(oe))
        print(dtype, json.dumps(results[dtype], indent=1))
    # headline: our default (compute_dtype auto, resolved for this CPU) vs a plain PEFT step as
    # usually run (float32)
    default = preferred_compute_dtype()
    if default in results and "float32" in results:
        headline = {"default_dtype": default,
                    "step_ratio": results[default]["our_step_s"] / results["float32"]["peft_step_s"]}
        if args.eval_repeats:
            headline["eval_speedup"] = results[default]["our_eval_per_s"] / results["float32"]["full_logit_eval_per_s"]
        results["default_vs_plain_fp32"] = headline
        print(json.dumps(headline, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
