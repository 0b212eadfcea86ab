"""The contexts a runtime hands to an algorithm: a client's local steps, the server's public steps.

Both runtimes (in-process and Flower) build these same objects, so the training a method
asks for is identical wherever it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor, nn

from fedlora.adapters import Adapters
from fedlora.algorithms.base import ParamGroups
from fedlora.clock import train_flops
from fedlora.data.encode import Encoded, collate, sample_batches
from fedlora.privacy.dpsgd import SampleDP, dp_train_steps, private_batches
from fedlora.train import classification_loss, lm_loss, mean_loss, model_device, train_steps


def round_seed(seed: int, round_: int, stream: int) -> np.random.SeedSequence:
    """Independent, reproducible randomness for (run seed, round, client or server)."""
    return np.random.SeedSequence([seed, round_, stream])


SERVER_STREAM = 2**31 - 1


@dataclass
class LocalClient:
    """One client's round: its examples, local steps, batch size and learning rate."""

    adapters: Adapters
    model: nn.Module
    client_id: int
    examples: list[Encoded]
    label_ids: list[int]
    loss_mode: str
    local_steps: int
    batch_size: int
    lr: float
    pad_id: int
    seed: np.random.SeedSequence
    compute_dtype: str = "float32"
    task: str = "classification"
    """`instruction`: causal-LM loss on response tokens instead of the label-token loss."""
    flops: float = 0.0  # training FLOPs so far (fedlora.clock), for the simulated clock
    dp: SampleDP | None = None
    """Sample-level DP (config `privacy.mode: sample`): train with DP-SGD (fedlora.privacy.dpsgd)."""

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def _batches(self):
        return sample_batches(self.examples, self.batch_size, self.local_steps, self.seed, self.pad_id)

    def _loss_fn(self) -> Callable:
        if self.task == "instruction":
            return lambda b: lm_loss(self.model, b)
        return lambda b: classification_loss(self.model, b, self.label_ids, self.loss_mode)

    def train(
        self, param_groups: ParamGroups, regulariser: Callable[[], Tensor] | None = None
    ) -> list[float]:
        if self.dp is not None:
            return self._train_private(param_groups, regulariser, self.dp)
        batches = self._batches()
        # output-layer rows the loss projects on: the vocabulary at response positions, or the classes
        rows = len(self.label_ids) if self.task != "instruction" and self.loss_mode == "classes" else None
        self.flops += train_flops(self.model, self.adapters, batches, rows)
        return train_steps(
            param_groups,
            batches,
            self._loss_fn(),
            regulariser,
            self.compute_dtype,
        )

    def _train_private(self, param_groups: ParamGroups, regulariser: Callable[[], Tensor] | None,
                       dp: SampleDP) -> list[float]:
        batches = private_batches(self.examples, self.batch_size, self.local_steps, self.seed, self.pad_id)
        rows = len(self.label_ids) if self.task != "instruction" and self.loss_mode == "classes" else None
        self.flops += train_flops(self.model, self.adapters, batches, rows)
        return dp_train_steps(param_groups, batches, self._loss_fn(), dp, regulariser, self.compute_dtype)

    def loss(self) -> float:
        """Mean loss of the loaded adapters on this round's batches (the same seeded draw as train)."""
        return mean_loss(self._batches(), self._loss_fn(), self.compute_dtype, model_device(self.model))


@dataclass
class PublicServer:
    """The server's public data (AFLoRA's A fine-tuning), trained with causal-LM loss."""

    adapters: Adapters
    model: nn.Module
    examples: list[Encoded]
    pad_id: int
    seed: np.random.SeedSequence
    compute_dtype: str = "float32"
    heldout: list[Encoded] = field(default_factory=list)
    """Public examples never trained on: measure whether the server's steps help."""

    def heldout_loss(self) -> float | None:
        if not self.heldout:
            return None
        return mean_loss([collate(self.heldout, self.pad_id)], lambda b: lm_loss(self.model, b), self.compute_dtype,
                         model_device(self.model))

    def train_public(self, param_groups: ParamGroups, steps: int, batch_size: int) -> list[float]:
        if not self.examples:
            raise ValueError("the server has no public data")
        batches = sample_batches(self.examples, batch_size, steps, self.seed, self.pad_id)
        return train_steps(param_groups, batches, lambda b: lm_loss(self.model, b), None, self.compute_dtype)
