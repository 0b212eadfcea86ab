import pytest
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


def test_cached_folder_builds_once_and_rebuilds_when_altered(tmp_path, monkeypatch):
    from fedlora.models import cached_folder

    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "weights.gguf"
    source.write_bytes(b"v1")
    builds = []

    def build(out):
        builds.append(out)
        (out / "w.bin").write_bytes(source.read_bytes() * 3)

    assert cached_folder(source, build, "kind", build_missing=False) is None and not builds
    first = cached_folder(source, build, "kind")
    assert (first / "w.bin").read_bytes() == b"v1v1v1" and len(builds) == 1
    assert cached_folder(source, build, "kind") == first and len(builds) == 1  # hit
    (first / "w.bin").write_bytes(b"tampered")
    assert (cached_folder(source, build, "kind") / "w.bin").read_bytes() == b"v1v1v1"
    assert len(builds) == 2  # an altered cache file is rebuilt, not trusted
    source.write_bytes(b"v2")
    second = cached_folder(source, build, "kind")
    assert second != first and (second / "w.bin").read_bytes() == b"v2v2v2"
    assert not list((tmp_path / "cache" / "kind").glob(".*.tmp"))  # no temporary left


def test_cached_folder_can_be_turned_off_and_failed_builds_leave_nothing(tmp_path, monkeypatch):
    from fedlora.models import cached_folder

    source = tmp_path / "m.gguf"
    source.write_bytes(b"x")
    monkeypatch.setenv("FEDLORA_CACHE", "off")
    assert cached_folder(source, lambda out: None, "kind") is None
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))

    def broken(out):
        (out / "half").write_bytes(b"...")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        cached_folder(source, broken, "kind")
    assert list((tmp_path / "cache" / "kind").iterdir()) == []


def test_one_gguf_parse_shares_one_reader_per_file_and_restores_the_class(tmp_path):
    """transformers opens a GGUF file three times for one model (tokenizer's config, model's
    config, weights); inside `one_gguf_parse` blocks each file is parsed once until
    `forget_gguf_readers`, nested blocks keep the patch until the outermost closes, and outside
    them nothing is patched."""
    import gguf
    import numpy as np

    from fedlora.models import forget_gguf_readers, one_gguf_parse

    paths = []
    for i in range(2):
        path = tmp_path / f"m{i}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_uint32("test.value", 7 + i)
        writer.add_tensor("w", np.arange(4, dtype=np.float32) + i)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths.append(path)
    original = gguf.GGUFReader
    try:
        with one_gguf_parse():  # the tokenizer's load
            first = gguf.GGUFReader(paths[0])
            with one_gguf_parse():  # a nested block (the cache writer inside the model's load)
                assert gguf.GGUFReader(str(paths[0])) is first
            assert gguf.GGUFReader is not original  # still patched: the outer block is open
            other = gguf.GGUFReader(paths[1])
            assert other is not first and int(other.fields["test.value"].parts[-1][0]) == 8
            assert np.array_equal(first.tensors[0].data, np.arange(4, dtype=np.float32))
        assert gguf.GGUFReader is original
        assert gguf.GGUFReader(paths[0]) is not first  # outside the blocks: a plain parse
        with one_gguf_parse():  # the model's load reuses the tokenizer's parse
            assert gguf.GGUFReader(paths[0]) is first
        forget_gguf_readers()
        with one_gguf_parse():
            assert gguf.GGUFReader(paths[0]) is not first
    finally:
        forget_gguf_readers()
    assert gguf.GGUFReader is original
