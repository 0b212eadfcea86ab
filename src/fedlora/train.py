"""Local training: losses that compute logits only where the loss needs them, and the step loop.

A classification example needs the next-token logits at ONE position (the end of the
prompt), and with `loss: classes` only for the label words' rows of the output layer; an
instruction example needs full-vocabulary logits only at response positions. Running the
decoder body and projecting just those hidden states is what makes our step cheaper than
a plain causal-LM step with full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = dict[str, Tensor]


def autocast(compute_dtype: str, device: torch.device | str = "cpu"):
    """bfloat16 autocast on the device computing (CPU or GPU); float32 needs none."""
    if compute_dtype == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def on_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on the model's device (batches are built on the CPU; a no-op there)."""
    return {key: t.to(device) for key, t in batch.items()}


MIN_SHARED_PREFIX = 4  # tokens: below this, a separate prefix pass costs more than it saves


def shared_prefix_length(batch: Batch) -> int:
    """Leading positions where every row holds the same real tokens, at most the shortest
    row's length minus one (each row keeps at least one position of its own)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    same = (ids == ids[:1]).all(0) & mask.bool().all(0)
    run = int(same.long().cumprod(0).sum())
    return min(run, int(mask.sum(1).min()) - 1)


def hidden_states(model: nn.Module, batch: Batch) -> Tensor:
    """Last hidden states (batch × time × hidden) from the decoder body, no output layer.

    Every prompt starts with the same instruction text, so the positions all rows share
    are run once (batch of one) and their keys and values reused by every row: with
    causal attention those positions see only each other, so each row's hidden states are
    those of the full pass (up to float rounding), at a fraction of the prefix's cost.
    Gradients flow through the shared pass as through the rows it stands for.

    `batch` must be on the model's device (`on_device`).
    """
    body = getattr(model, model.base_model_prefix)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    p = shared_prefix_length(batch) if len(ids) > 1 else 0
    if p < MIN_SHARED_PREFIX:
        return body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    head = body(input_ids=ids[:1, :p], use_cache=True)
    cache = head.past_key_values
    cache.batch_repeat_interleave(len(ids))
    tail = body(input_ids=ids[:, p:], attention_mask=mask, past_key_values=cache, use_cache=True)
    return torch.cat([head.last_hidden_state.expand(len(ids), -1, -1), tail.last_hidden_state], 1)


def project(model: nn.Module, h: Tensor, rows: Sequence[int] | None = None) -> Tensor:
    """Logits of hidden states `h` for the output-layer rows `rows` (all rows if None)."""
    head = model.get_output_embeddings()
    weight = head.weight if rows is None else head.weight[list(rows)]
    bias = getattr(head, "bias", None)
    if bias is not None and rows is not None:
        bias = bias[list(rows)]
    return F.linear(h, weight, bias).float()


def last_position(h: Tensor, batch: Batch) -> Tensor:
    return h[torch.arange(h.shape[0], device=h.device), batch["last"]]


def classification_loss(model: nn.Module, batch: Batch, label_ids: Sequence[int], mode: str) -> Tensor:
    """Cross-entropy of the label at the last prompt position.

    `classes`: softmax over the label words only (the paper's eq. 10, |L| classes);
    `vocab`: softmax over the whole vocabulary, target = the label word's token.
    """
    batch = on_device(batch, model_device(model))
    h = last_position(hidden_states(model, batch), batch)
    if mode == "classes":
        return F.cross_entropy(project(model, h, label_ids), batch["target"])
    targets = torch.tensor(label_ids, device=h.device)[batch["target"]]
    return F.cross_entropy(project(model, h), targets)


def lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Causal-LM cross-entropy on the labelled (response) tokens only."""
    batch = on_device(batch, model_device(model))
    h = hidden_states(model, batch)[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return F.cross_entropy(project(model, h[keep]), targets[keep])


def optimizers(param_groups: list[tuple]) -> list[torch.optim.Optimizer]:
    """Adam (no weight decay) over the groups `(params, lr)` and `(params, lr, "adam")`; plain SGD
    over the groups `(params, lr, "sgd")` (a step proportional to the gradient, e.g. for AFLoRA's
    λ, whose Adam steps are about lr whatever its gradient)."""
    by_kind: dict[str, list[dict]] = {"adam": [], "sgd": []}
    for ps, lr, *kind in param_groups:
        if ps:
            by_kind[kind[0] if kind else "adam"].append({"params": ps, "lr": lr})
    if not by_kind["adam"] and not by_kind["sgd"]:
        raise ValueError("nothing to train: no trainable parameters")
    opts: list[torch.optim.Optimizer] = []
    if by_kind["adam"]:
        opts.append(torch.optim.Adam(by_kind["adam"], weight_decay=0.0))
    if by_kind["sgd"]:
        opts.append(torch.optim.SGD(by_kind["sgd"]))
    return opts


def train_steps(
    param_groups: list[tuple],
    batches: Iterable[Batch],
    loss_fn: Callable[[Batch], Tensor],
    regulariser: Callable[[], Tensor] | None = None,
    compute_dtype: str = "float32",
) -> list[float]:
    """Adam (no weight decay; SGD for groups marked "sgd") on the given parameters; returns the
    task loss per step. The regulariser is added in float32 outside autocast; reported losses
    exclude it.
    """
    opts = optimizers(param_groups)
    device = opts[0].param_groups[0]["params"][0].device  # the trained factors sit on the model's device
    losses = []
    for batch in batches:
        with autocast(compute_dtype, device):
            loss = loss_fn(batch)
        total = loss if regulariser is None else loss + regulariser()
        total.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def mean_loss(batches: Iterable[Batch], loss_fn: Callable[[Batch], Tensor], compute_dtype: str = "float32",
              device: torch.device | str = "cpu") -> float:
    """Mean task loss over batches, no gradients (a measurement, not a step)."""
    losses = []
    for batch in batches:
        with autocast(compute_dtype, device):
            losses.append(float(loss_fn(batch)))
    return sum(losses) / len(losses)
