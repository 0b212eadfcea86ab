"""Shortcuts only tests use: evaluation in one call (the runtime keeps the per-item records
between fedlora.evaluate's items and metrics), and seeded subsets by the runtime's draws."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasets import Dataset
from torch import nn

from fedlora.data.alpaca import public_indices
from fedlora.data.encode import Encoded
from fedlora.data.mmlu import MMLUSet, per_subject_rows
from fedlora.evaluate import lm_items, lm_metrics, mmlu_items, mmlu_metrics


def evaluate_mmlu(model: nn.Module, mmlu: MMLUSet, pad_id: int, batch_size: int = 32) -> dict[str, Any]:
    """Macro (mean over subjects) and micro accuracy, per-subject accuracy, questions/second."""
    return mmlu_metrics(*mmlu_items(model, mmlu, pad_id, batch_size))


def evaluate_lm(model: nn.Module, examples: Sequence[Encoded], pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Held-out causal-LM loss per response token (token-weighted mean) and its perplexity."""
    return lm_metrics(lm_items(model, examples, pad_id, batch_size))


def per_subject_subset(ds: Dataset, per_subject: int | None, seed: int) -> Dataset:
    """A seeded draw of at most `per_subject` questions from each subject (order kept)."""
    if per_subject is None:
        return ds
    return ds.select(per_subject_rows(list(ds["subject"]), per_subject, seed))


def public_subset(records: list[dict[str, str]], fraction: float, seed: int) -> list[dict[str, str]]:
    """The records the server's public draw takes."""
    return [records[i] for i in public_indices(len(records), fraction, seed)]
