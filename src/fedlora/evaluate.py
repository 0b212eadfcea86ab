"""Evaluation, computed with logits only where scored, batched, without gradients.

Classification and MMLU: every label word (or answer letter) is one token at the same
position, so the log-softmax normaliser is common to all labels: the label with the highest
log-likelihood is the label whose output-layer row gives the highest logit. We therefore
project the last hidden state on the label rows only (4 rows instead of the vocabulary) and
never materialise full logits. Instruction data: full-vocabulary logits at response
positions only, in chunks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlora.data.encode import Encoded, length_sorted_batches
from fedlora.data.mmlu import MMLUSet
from fedlora.train import autocast, hidden_states, last_position, model_device, on_device, project

if TYPE_CHECKING:
    from fedlora.data.task import FederatedTask

LM_CHUNK = 1024  # response positions projected on the vocabulary at once (memory bound)


@torch.inference_mode()
def predict_classes(
    model: nn.Module,
    examples: Sequence[Encoded],
    label_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 32,
    compute_dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, cross-entropy over the label words) per example, in input order."""
    preds = np.zeros(len(examples), dtype=np.int64)
    losses = np.zeros(len(examples), dtype=np.float64)
    device = model_device(model)
    for idx, batch in length_sorted_batches(list(examples), batch_size, pad_id):
        batch = on_device(batch, device)
        with autocast(compute_dtype, device):
            h = last_position(hidden_states(model, batch), batch)
        logits = project(model, h.float(), label_ids)
        preds[idx] = logits.argmax(-1).cpu().numpy()
        losses[idx] = F.cross_entropy(logits, batch["target"], reduction="none").double().cpu().numpy()
    return preds, losses


def evaluate_classification(
    model: nn.Module,
    examples: Sequence[Encoded],
    label_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 32,
    compute_dtype: str = "float32",
) -> dict[str, float]:
    """{"accuracy", "loss"} (loss: cross-entropy over the label words)."""
    preds, losses = predict_classes(model, examples, label_ids, pad_id, batch_size, compute_dtype)
    targets = np.array([e.target for e in examples])
    n = max(1, len(examples))
    return {"accuracy": float((preds == targets).sum()) / n, "loss": float(losses.sum()) / n}


def evaluate_mmlu(
    model: nn.Module, mmlu: MMLUSet, pad_id: int, batch_size: int = 32, compute_dtype: str = "float32"
) -> dict[str, Any]:
    """Macro (mean over subjects) and micro accuracy, per-subject accuracy, questions/second."""
    t0 = time.perf_counter()
    preds, _ = predict_classes(model, mmlu.examples, mmlu.label_ids, pad_id, batch_size, compute_dtype)
    seconds = time.perf_counter() - t0
    correct = preds == np.array([e.target for e in mmlu.examples])
    subjects = np.array(mmlu.subjects)
    per_subject = {s: float(correct[subjects == s].mean()) for s in sorted(set(mmlu.subjects))}
    return {
        "mmlu_accuracy": float(np.mean(list(per_subject.values()))),
        "mmlu_micro_accuracy": float(correct.mean()),
        "mmlu_questions": len(correct),
        "mmlu_questions_per_second": len(correct) / seconds if seconds > 0 else None,
        "mmlu_subjects": per_subject,
    }


@torch.inference_mode()
def evaluate_lm(
    model: nn.Module, examples: Sequence[Encoded], pad_id: int, batch_size: int = 32,
    compute_dtype: str = "float32",
) -> dict[str, float]:
    """Held-out causal-LM loss per response token (token-weighted mean) and its perplexity."""
    total, tokens = 0.0, 0
    device = model_device(model)
    for _, batch in length_sorted_batches(list(examples), batch_size, pad_id):
        batch = on_device(batch, device)
        with autocast(compute_dtype, device):
            h = hidden_states(model, batch)[:, :-1]
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        h, targets = h[keep].float(), targets[keep]
        for start in range(0, len(targets), LM_CHUNK):
            logits = project(model, h[start : start + LM_CHUNK])
            total += float(F.cross_entropy(logits, targets[start : start + LM_CHUNK], reduction="sum"))
        tokens += len(targets)
    loss = total / max(1, tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def evaluate_task(
    model: nn.Module, task: FederatedTask, pad_id: int, batch_size: int = 32, compute_dtype: str = "float32"
) -> dict[str, Any]:
    """The task's own evaluation ("loss" always; "accuracy" for classification, or MMLU's
    macro accuracy for instruction tasks judged on MMLU) plus the MMLU details when enabled."""
    if task.kind == "classification":
        out: dict[str, Any] = evaluate_classification(
            model, task.test, task.label_ids, pad_id, batch_size, compute_dtype
        )
    else:
        out = evaluate_lm(model, task.test, pad_id, batch_size, compute_dtype)
    if task.mmlu is not None:
        out.update(evaluate_mmlu(model, task.mmlu, pad_id, batch_size, compute_dtype))
        if task.kind != "classification":
            out["accuracy"] = out["mmlu_accuracy"]
    return out
