"""The shared-prompt-prefix pass gives the full pass's hidden states and gradients."""

import pytest
import torch

import fedlora.train as train
from fedlora.adapters import Adapters
from fedlora.data.encode import Encoded, collate
from fedlora.models import load_base_model

TARGETS = {"tiny-llama": ["q_proj", "v_proj"], "tiny-gpt2": ["c_attn", "c_proj"]}


def _batch(prefix_len=10, lengths=(3, 7, 5, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(5, 40, (prefix_len,), generator=g).tolist()
    rows = [prefix + torch.randint(5, 40, (n,), generator=g).tolist() for n in lengths]
    return collate([Encoded(r, i % 2) for i, r in enumerate(rows)], pad_id=0)


def _hidden_and_grads(model, adapters, batch, shared: bool, monkeypatch):
    monkeypatch.setattr(train, "MIN_SHARED_PREFIX", 4 if shared else 10**9)
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    h = train.hidden_states(model, batch)
    hook.remove()
    n, width = batch["input_ids"].shape
    assert shapes == ([(1, 10), (n, width - 10)] if shared else [(n, width)])  # which path ran
    loss = train.last_position(h, batch).square().sum()
    params = adapters.trainable_parameters()
    return h.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_shared_prefix_pass_equals_full_pass(name, monkeypatch):
    """In float64, so that what is compared is the maths, not float32 rounding (which the
    random tiny models amplify; the real model's float32 check is the slow label-row test)."""
    model, _ = load_base_model(name)
    model.double()
    adapters = Adapters.inject(model, TARGETS[name], scaling=0.5)
    adapters.load(_random_factors(adapters, torch.Generator().manual_seed(1)), trainable={"A", "B"})
    for layer in adapters.layers.values():
        layer.A.data, layer.B.data = layer.A.data.double(), layer.B.data.double()
    batch = _batch()
    assert train.shared_prefix_length(batch) == 10
    ref_h, ref_g = _hidden_and_grads(model, adapters, batch, False, monkeypatch)
    got_h, got_g = _hidden_and_grads(model, adapters, batch, True, monkeypatch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got_h[real], ref_h[real], rtol=1e-7, atol=1e-7)
    scale = max(float(g.abs().max()) for g in ref_g)
    assert scale > 0
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * scale)


def _random_factors(adapters, g):
    out = {}
    for mod, (m, n) in adapters.shapes().items():
        out[f"{mod}.A"], out[f"{mod}.B"] = torch.randn(2, n, generator=g), torch.randn(m, 2, generator=g) * 0.3
    return out


def test_shared_prefix_length_stops_at_the_first_difference_and_the_shortest_row():
    batch = _batch(prefix_len=6, lengths=(4, 4))
    ids = batch["input_ids"]
    assert train.shared_prefix_length(batch) == 6 + int((ids[0, 6:] == ids[1, 6:]).long().cumprod(0).sum())
    short = _batch(prefix_len=6, lengths=(0, 5))  # a row that is only the prefix keeps its last token
    assert train.shared_prefix_length(short) == 5
    assert train.shared_prefix_length(_batch(prefix_len=0, lengths=(4, 4), seed=3)) < 4
