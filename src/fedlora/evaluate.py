"""Classification accuracy by label log-likelihood, computed with logits only where scored.

Every label word is one token at the same position, so the log-softmax normaliser is
common to all labels: the label with the highest log-likelihood is the label whose
output-layer row gives the highest logit. We therefore project the last hidden state on
the label rows only (4 rows instead of the vocabulary) and never materialise full logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedlora.data.encode import Encoded, length_sorted_batches
from fedlora.train import autocast, hidden_states, last_position, project


@torch.inference_mode()
def evaluate_classification(
    model: nn.Module,
    examples: Sequence[Encoded],
    label_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 32,
    compute_dtype: str = "float32",
) -> dict[str, float]:
    """{"accuracy", "loss"} (loss: cross-entropy over the label words)."""
    correct, loss_sum = 0, 0.0
    for _, batch in length_sorted_batches(list(examples), batch_size, pad_id):
        with autocast(compute_dtype):
            h = last_position(hidden_states(model, batch), batch)
        logits = project(model, h.float(), label_ids)
        correct += int((logits.argmax(-1) == batch["target"]).sum())
        loss_sum += float(F.cross_entropy(logits, batch["target"], reduction="sum"))
    n = max(1, len(examples))
    return {"accuracy": correct / n, "loss": loss_sum / n}
