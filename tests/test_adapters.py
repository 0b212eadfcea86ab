import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedlora.adapters import Adapters, LoRALayer
from fedlora.models import load_base_model


def _factors(m, n, r, g):
    mask = torch.tensor([1.0, 0.0] * r)[:r]  # active and pruned dims (a random mask was all zeros)
    return (torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), torch.rand(r, generator=g) + 0.5, mask)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_is_w_plus_scaled_b_diag_a(kind):
    g = torch.Generator().manual_seed(0)
    m, n, r, s = 6, 5, 4, 0.5
    base = nn.Linear(n, m) if kind == "linear" else Conv1D(m, n)
    nn.init.normal_(base.weight, generator=g)
    layer = LoRALayer(base, s)
    A, B, lam, h = _factors(m, n, r, g)
    layer.set_factors(A, B, lam, h)
    x = torch.randn(3, n, generator=g)
    expected = base(x) + s * x @ (B @ torch.diag(lam * h) @ A).T
    torch.testing.assert_close(layer(x), expected)
    # merging the loaded factors into W gives the same outputs without the adapter
    ad = Adapters(nn.Sequential(), {"x": layer})
    ad.merge_loaded()
    assert layer.A is None
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_masked_columns_get_no_gradient_and_frozen_factors_none():
    g = torch.Generator().manual_seed(1)
    layer = LoRALayer(nn.Linear(5, 6), 1.0)
    A, B, lam, _ = _factors(6, 5, 4, g)
    h = torch.tensor([1.0, 0.0, 1.0, 0.0])
    layer.set_factors(A, B, lam, h, trainable={"B", "lam"})
    layer(torch.randn(7, 5, generator=g)).pow(2).sum().backward()
    assert layer.A.grad is None and not layer.A.requires_grad
    assert torch.all(layer.B.grad[:, h == 0] == 0) and torch.all(layer.lam.grad[h == 0] == 0)
    assert torch.any(layer.B.grad[:, h == 1] != 0) and torch.any(layer.lam.grad[h == 1] != 0)


def test_shape_and_factor_name_errors():
    layer = LoRALayer(nn.Linear(5, 6), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_factors(torch.zeros(2, 4), torch.zeros(6, 2))
    with pytest.raises(ValueError, match="unknown trainable"):
        layer.set_factors(torch.zeros(2, 5), torch.zeros(6, 2), trainable={"C"})


@pytest.mark.parametrize("name,targets", [("tiny-gpt2", ["c_attn", "c_proj", "c_fc"]),
                                          ("tiny-llama", ["q_proj", "v_proj"])])
def test_inject_state_roundtrip_and_base_untouched(name, targets):
    model, _ = load_base_model(name)
    n_params = sum(p.numel() for p in model.parameters())
    ad = Adapters.inject(model, targets, scaling=0.25)
    assert len(ad.layers) == 2 * len(targets) + (2 if name == "tiny-gpt2" else 0)
    # adapters are not registered as parameters of the base
    assert sum(p.numel() for p in model.parameters()) == n_params
    g = torch.Generator().manual_seed(0)
    state = {}
    for mod, (m, n) in ad.shapes().items():
        state[f"{mod}.A"], state[f"{mod}.B"] = torch.randn(3, n, generator=g), torch.randn(m, 3, generator=g)
    ad.load(state, trainable={"B"})
    out = ad.state()
    assert set(out) == set(state)
    assert all(torch.equal(out[k], state[k]) for k in state)
    assert len(ad.trainable_parameters()) == len(ad.layers)


def test_inject_missing_target():
    model, _ = load_base_model("tiny-llama")
    with pytest.raises(ValueError, match="not found"):
        Adapters.inject(model, ["nope_proj"], 1.0)


def test_delta_weight_is_the_dense_update():
    g = torch.Generator().manual_seed(2)
    layer = LoRALayer(nn.Linear(5, 6), 0.7)
    A, B, lam, h = _factors(6, 5, 3, g)
    layer.set_factors(A, B, lam, h)
    torch.testing.assert_close(layer.delta_weight(), 0.7 * B @ torch.diag(lam * h) @ A)


def test_plain_and_empty_layers():
    """No diagonal: ΔW = s B A; no factors: ΔW = 0 of the weight's shape, merge is a no-op."""
    g = torch.Generator().manual_seed(3)
    layer = LoRALayer(nn.Linear(5, 6), 0.7)
    assert layer.rank == 0 and layer.diagonal() is None
    assert torch.equal(layer.delta_weight(), torch.zeros(6, 5))
    before = layer.base.weight.clone()
    layer.merge()
    assert torch.equal(layer.base.weight, before)
    A, B = torch.randn(3, 5, generator=g), torch.randn(6, 3, generator=g)
    layer.set_factors(A, B)
    assert layer.rank == 3
    torch.testing.assert_close(layer.delta_weight(), 0.7 * B @ A)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, before + 0.7 * B @ A)
    assert layer.A is None and layer.B is None


def test_unwrap_puts_the_base_modules_back():
    model, _ = load_base_model("tiny-llama")
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    originals = {n: model.get_submodule(n) for n in names}
    ad = Adapters.inject(model, ["q_proj", "v_proj"], scaling=0.5)
    assert all(isinstance(model.get_submodule(n), LoRALayer) for n in names)
    ad.unwrap()
    assert all(model.get_submodule(n) is originals[n] for n in names)
    assert ad.layers == {}
    assert not any(isinstance(m, LoRALayer) for m in model.modules())


def test_merge_update_computes_in_float32_whatever_the_updates_dtype():
    """W ← W + s B A with B, A cast to float32 first: a float16 update is not multiplied in half
    precision (its product would be off by ~1e-3)."""
    g = torch.Generator().manual_seed(4)
    layer = LoRALayer(nn.Linear(40, 30), 0.5)
    before = layer.base.weight.detach().clone()
    B, A = torch.randn(30, 8, generator=g).half(), torch.randn(8, 40, generator=g).half()
    layer.merge_update(B, A)
    torch.testing.assert_close(layer.base.weight, before + 0.5 * (B.float() @ A.float()))
