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

from fedlora.class_metrics import classification_breakdown
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
    """(predicted class, log-probabilities over the label words: n × classes) per example, in
    input order. The cross-entropy over the label words is −logprob[target]."""
    preds = np.zeros(len(examples), dtype=np.int64)
    logprobs = np.zeros((len(examples), len(label_ids)), dtype=np.float32)
    device = model_device(model)
    for idx, batch in length_sorted_batches(list(examples), batch_size, pad_id):
        batch = on_device(batch, device)
        with autocast(compute_dtype, device):
            h = last_position(hidden_states(model, batch), batch)
        logits = project(model, h.float(), label_ids)
        preds[idx] = logits.argmax(-1).cpu().numpy()
        logprobs[idx] = F.log_softmax(logits, -1).cpu().numpy()
    return preds, logprobs


Items = dict[str, np.ndarray]
"""Per-item records of one evaluation (saved as eval/round_NNNN.npz): numpy arrays only."""


def classification_items(examples: Sequence[Encoded], preds: np.ndarray, logprobs: np.ndarray) -> Items:
    """Per example: `label`, `prediction`, `correct`, `logprob` (over the label words)."""
    labels = np.array([e.target for e in examples], dtype=np.int64)
    return {"label": labels, "prediction": preds, "correct": preds == labels, "logprob": logprobs}


def classification_metrics(items: Items) -> dict[str, float]:
    """{"accuracy", "loss"} (loss: mean cross-entropy over the label words)."""
    n = max(1, len(items["label"]))
    target_logprob = np.take_along_axis(items["logprob"], items["label"][:, None], 1)[:, 0]
    return {"accuracy": float(items["correct"].sum()) / n, "loss": float(-target_logprob.astype(np.float64).sum()) / n}


def evaluate_classification(
    model: nn.Module,
    examples: Sequence[Encoded],
    label_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 32,
    compute_dtype: str = "float32",
) -> dict[str, float]:
    """{"accuracy", "loss"} (loss: cross-entropy over the label words)."""
    preds, logprobs = predict_classes(model, examples, label_ids, pad_id, batch_size, compute_dtype)
    return classification_metrics(classification_items(examples, preds, logprobs))


def mmlu_items(
    model: nn.Module, mmlu: MMLUSet, pad_id: int, batch_size: int = 32, compute_dtype: str = "float32"
) -> tuple[Items, float]:
    """Per question: `mmlu_id`, `mmlu_subject`, `mmlu_label`, `mmlu_prediction`, `mmlu_correct`;
    and the seconds the scoring took."""
    t0 = time.perf_counter()
    preds, _ = predict_classes(model, mmlu.examples, mmlu.label_ids, pad_id, batch_size, compute_dtype)
    seconds = time.perf_counter() - t0
    labels = np.array([e.target for e in mmlu.examples], dtype=np.int64)
    items = {
        "mmlu_id": np.asarray(mmlu.ids or range(len(labels)), dtype=np.int64),
        "mmlu_subject": np.array(mmlu.subjects, dtype=str),
        "mmlu_label": labels,
        "mmlu_prediction": preds,
        "mmlu_correct": preds == labels,
    }
    return items, seconds


def mmlu_metrics(items: Items, seconds: float) -> dict[str, Any]:
    """Macro (mean over subjects) and micro accuracy, per-subject accuracy, questions/second."""
    correct, subjects = items["mmlu_correct"], items["mmlu_subject"]
    per_subject = {str(s): float(correct[subjects == s].mean()) for s in sorted(set(subjects.tolist()))}
    return {
        "mmlu_accuracy": float(np.mean(list(per_subject.values()))),
        "mmlu_micro_accuracy": float(correct.mean()),
        "mmlu_questions": len(correct),
        "mmlu_questions_per_second": len(correct) / seconds if seconds > 0 else None,
        "mmlu_subjects": per_subject,
    }


@torch.inference_mode()
def lm_items(
    model: nn.Module, examples: Sequence[Encoded], pad_id: int, batch_size: int = 32,
    compute_dtype: str = "float32",
) -> Items:
    """Per example: `loss` (mean causal-LM loss per response token) and `tokens` (response tokens)."""
    sums = np.zeros(len(examples), dtype=np.float64)
    tokens = np.zeros(len(examples), dtype=np.int64)
    device = model_device(model)
    for idx, batch in length_sorted_batches(list(examples), batch_size, pad_id):
        batch = on_device(batch, device)
        with autocast(compute_dtype, device):
            h = hidden_states(model, batch)[:, :-1]
        targets = batch["labels"][:, 1:]
        keep = targets != -100
        rows = np.asarray(idx)[keep.nonzero()[:, 0].cpu().numpy()]
        h, targets = h[keep].float(), targets[keep]
        for start in range(0, len(targets), LM_CHUNK):
            logits = project(model, h[start : start + LM_CHUNK])
            losses = F.cross_entropy(logits, targets[start : start + LM_CHUNK], reduction="none")
            np.add.at(sums, rows[start : start + LM_CHUNK], losses.double().cpu().numpy())
        np.add.at(tokens, rows, 1)
    return {"loss": sums / np.maximum(tokens, 1), "tokens": tokens}


def lm_metrics(items: Items) -> dict[str, float]:
    """Held-out loss per response token (token-weighted mean over items) and its perplexity."""
    loss = float((items["loss"] * items["tokens"]).sum()) / max(1, int(items["tokens"].sum()))
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def evaluate_task(
    model: nn.Module, task: FederatedTask, pad_id: int, batch_size: int = 32, compute_dtype: str = "float32"
) -> tuple[dict[str, Any], Items]:
    """The task's own evaluation ("loss" always; "accuracy" for classification, or MMLU's
    macro accuracy for instruction tasks judged on MMLU; classification adds the per-class,
    confusion and worst-client fields of fedlora.class_metrics) plus the MMLU details when
    enabled; and the per-item records (`id`: the test items' rows in the test split)."""
    if task.kind == "classification":
        preds, logprobs = predict_classes(model, task.test, task.label_ids, pad_id, batch_size, compute_dtype)
        items = classification_items(task.test, preds, logprobs)
        out: dict[str, Any] = classification_metrics(items)
        names = task.names or [str(c) for c in range(len(task.label_ids))]
        out.update(classification_breakdown(items["label"], items["prediction"], names, task.partition_table()))
    else:
        items = lm_items(model, task.test, pad_id, batch_size, compute_dtype)
        out = lm_metrics(items)
    items["id"] = np.asarray(task.test_ids or range(len(task.test)), dtype=np.int64)
    if task.mmlu is not None:
        mmlu, seconds = mmlu_items(model, task.mmlu, pad_id, batch_size, compute_dtype)
        out.update(mmlu_metrics(mmlu, seconds))
        items.update(mmlu)
        if task.kind != "classification":
            out["accuracy"] = out["mmlu_accuracy"]
    return out, items
