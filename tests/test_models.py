import torch

from fedlora.models import load_base_model


def test_load_from_local_folder_matches_saved_model(tmp_path):
    model, tok = load_base_model("tiny-gpt2", seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_base_model(str(tmp_path))
    ids = torch.tensor([tok.encode("World Sports and the news", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits)
    assert tok2.padding_side == "right" and tok2.pad_token is not None
    assert not any(p.requires_grad for p in again.parameters())


def test_tiny_models_are_seeded():
    a, _ = load_base_model("tiny-llama", seed=1)
    b, _ = load_base_model("tiny-llama", seed=1)
    c, _ = load_base_model("tiny-llama", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
