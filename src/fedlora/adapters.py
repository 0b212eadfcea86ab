"""LoRA with a learnable diagonal and a rank mask: y = W x + s · B diag(λ ⊙ h) A x.

PEFT's LoRA has neither the diagonal Λ (AFLoRA) nor per-client ranks that change between
calls on one shared model, so the layer is ours. One `Adapters` object wraps the target
modules of ONE base model; simulated clients load their factors into it in turn, so the
base weights exist once in memory.

Factors live on the base weight's device (a GPU when the run computes there); what leaves
the layers (`Adapters.state()`: updates, client state, checkpoints) is on the CPU.

Factor shapes follow the papers: A is (r × n), B is (m × r), λ and h are (r,), for a
base weight W of shape (m × n) = (out × in). GPT-2's `Conv1D` stores W transposed; the
layer handles both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from fedlora.errors import ConfigError

FACTORS = ("A", "B", "lam", "mask")


def module_shape(base: nn.Module) -> tuple[int, int]:
    """(out_features m, in_features n) of a Linear or Conv1D target."""
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features
    if isinstance(base, Conv1D):
        n, m = base.weight.shape
        return m, n
    raise TypeError(f"LoRA target must be nn.Linear or Conv1D, got {type(base).__name__}")


def layer_index(module_name: str) -> int | None:
    """Decoder layer of a module name (`model.layers.12.self_attn.q_proj` → 12), None outside layers."""
    match = re.search(r"\.(\d+)(?:\.|$)", module_name)
    return int(match.group(1)) if match else None


def find_targets(
    model: nn.Module, target_modules: Iterable[str], field: str = "model.target_modules"
) -> dict[str, nn.Module]:
    """Linear/Conv1D modules whose name is, or ends with, one of `target_modules` (PEFT's rule);
    a name that matches none is a ConfigError naming `field` and the model's candidates."""
    targets = list(target_modules)
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
        and any(name == t or name.endswith("." + t) for t in targets)
    }
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in found)]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
        raise ConfigError(f"config error: {field}: {missing[0]!r} not found among the model's nn.Linear/Conv1D "
                          f"modules (it has: {', '.join(names)})")
    return found


class LoRALayer(nn.Module):
    """A frozen base projection plus low-rank factors that can be swapped per client."""

    def __init__(self, base: nn.Module, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.out_features, self.in_features = module_shape(base)
        self.transposed = isinstance(base, Conv1D)
        self.scaling = float(scaling)
        self.A: Tensor | None = None
        self.B: Tensor | None = None
        self.lam: Tensor | None = None
        self.mask: Tensor | None = None
        for p in base.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.base.weight.device

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]

    def set_factors(
        self,
        A: Tensor | None,
        B: Tensor | None,
        lam: Tensor | None = None,
        mask: Tensor | None = None,
        trainable: Iterable[str] = (),
    ) -> None:
        """Load factors (copied, float32, on the base's device) and mark which of A, B, lam
        receive gradients."""
        trainable = set(trainable)
        unknown = trainable - {"A", "B", "lam"}
        if unknown:
            raise ValueError(f"unknown trainable factor(s) {sorted(unknown)}")
        if (A is None) != (B is None):
            raise ValueError("A and B must both be given or both be None")
        if A is not None:
            r = A.shape[0]
            if A.shape != (r, self.in_features) or B.shape != (self.out_features, r):
                raise ValueError(
                    f"factor shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit "
                    f"W({self.out_features}×{self.in_features})"
                )
            for name, vec in (("lam", lam), ("mask", mask)):
                if vec is not None and vec.shape != (r,):
                    raise ValueError(f"{name} must have shape ({r},), got {tuple(vec.shape)}")

        device = self.device

        def own(t: Tensor | None, grad: bool) -> Tensor | None:
            if t is None:
                return None
            t = t.detach().to(device=device, dtype=torch.float32, copy=True)
            return nn.Parameter(t) if grad else t

        # Plain attributes, not registered parameters: the base model's parameters() and
        # state_dict() stay the base's own, and factors can be swapped freely.
        object.__setattr__(self, "A", own(A, "A" in trainable))
        object.__setattr__(self, "B", own(B, "B" in trainable))
        object.__setattr__(self, "lam", own(lam, "lam" in trainable))
        object.__setattr__(self, "mask", own(mask, False))

    def clear(self) -> None:
        for key in FACTORS:
            object.__setattr__(self, key, None)

    def trainable_parameters(self) -> list[Tensor]:
        return [t for t in (self.A, self.B, self.lam) if isinstance(t, nn.Parameter)]

    def diagonal(self) -> Tensor | None:
        """λ ⊙ h, or None when the layer is plain LoRA."""
        if self.lam is None and self.mask is None:
            return None
        if self.lam is None:
            return self.mask
        return self.lam if self.mask is None else self.lam * self.mask

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.A is None:
            return y
        z = x @ self.A.t()
        diag = self.diagonal()
        if diag is not None:
            z = z * diag
        return y + self.scaling * (z @ self.B.t())

    def delta_weight(self) -> Tensor:
        """s · B diag(λ ⊙ h) A of the loaded factors, as an (m × n) matrix."""
        if self.A is None:
            return torch.zeros(self.out_features, self.in_features, device=self.device)
        diag = self.diagonal()
        B = self.B if diag is None else self.B * diag
        return self.scaling * (B.detach() @ self.A.detach())

    @torch.no_grad()
    def _add_to_weight(self, delta: Tensor) -> None:
        self.base.weight.add_(delta.t() if self.transposed else delta)

    def merge(self) -> None:
        """Fold the loaded factors into the base weight (W ← W + ΔW), then unload them."""
        if self.A is not None:
            self._add_to_weight(self.delta_weight())
        self.clear()

    def merge_update(self, B: Tensor, A: Tensor) -> None:
        """W ← W + s · B A: a round's global update folded into the shared base."""
        B, A = (t.to(device=self.device, dtype=torch.float32) for t in (B, A))
        self._add_to_weight(self.scaling * (B @ A))


class Adapters:
    """The LoRA layers injected into one base model, addressed by module name."""

    def __init__(self, model: nn.Module, layers: Mapping[str, LoRALayer]) -> None:
        self.model = model
        self.layers = dict(layers)

    @classmethod
    def inject(cls, model: nn.Module, target_modules: Iterable[str], scaling: float) -> Adapters:
        """Wrap every Linear/Conv1D whose name ends with one of `target_modules`."""
        for p in model.parameters():
            p.requires_grad_(False)
        found: dict[str, LoRALayer] = {}
        for name, module in find_targets(model, target_modules).items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = LoRALayer(module, scaling)
            setattr(parent, child, layer)
            found[name] = layer
        return cls(model, found)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Module name → (m, n) = (out, in) of its base weight."""
        return {k: (v.out_features, v.in_features) for k, v in self.layers.items()}

    def load(self, factors: Mapping[str, Tensor], trainable: Iterable[str] = ()) -> None:
        """Load `{module}.{A|B|lam|mask}` tensors; modules not named are cleared."""
        trainable = tuple(trainable)
        for name, layer in self.layers.items():
            A = factors.get(f"{name}.A")
            if A is None:
                layer.clear()
                continue
            layer.set_factors(
                A,
                factors[f"{name}.B"],
                factors.get(f"{name}.lam"),
                factors.get(f"{name}.mask"),
                trainable,
            )

    def state(self) -> dict[str, Tensor]:
        """Current factors as named tensors (detached copies, on the CPU)."""
        out: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            for key in FACTORS:
                t = getattr(layer, key)
                if t is not None:
                    out[f"{name}.{key}"] = t.detach().to("cpu", copy=True)
        return out

    def clear(self) -> None:
        for layer in self.layers.values():
            layer.clear()

    def trainable_parameters(self) -> list[Tensor]:
        return [p for layer in self.layers.values() for p in layer.trainable_parameters()]

    def merge(self, updates: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """Fold `{module: (B, A)}` into the base weights: W ← W + s B A."""
        for name, (B, A) in updates.items():
            self.layers[name].merge_update(B, A)

    def unwrap(self) -> None:
        """Put the base modules back in place of the LoRA layers (e.g. before save_pretrained)."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base)
        self.layers = {}

    def merge_loaded(self) -> None:
        """Fold every layer's loaded factors (with their diagonal) into the base, then clear."""
        for layer in self.layers.values():
            layer.merge()
