"""End to end on the real pretrained SmolLM2-135M (slow: `make test-slow`)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_tree
from safetensors.torch import load_file

from fedlora.config import build_config
from fedlora.data.encode import length_sorted_batches
from fedlora.runtime.inprocess import Federation, Simulation
from fedlora.runtime.outputs import read_metrics
from fedlora.train import hidden_states, last_position, project

pytestmark = pytest.mark.slow


def _cfg(method: str, **algo):
    return build_config(tiny_tree(
        model={"name": "smollm2-135m", "compute_dtype": "auto"},
        data={"train_examples": 200, "test_examples": 64, "max_length": 48},
        federation={"num_clients": 2, "client_max_ranks": [8, 4], "rounds": 2, "local_steps": 3,
                    "batch_size": 4, "lr": 0.002},
        algorithm={"name": method, **algo},
    ))


def test_label_row_scoring_equals_full_logit_log_likelihood(data_dir):
    fed = Federation.build(_cfg("fedit"))
    ids = fed.task.label_ids
    for _, batch in length_sorted_batches(fed.task.test[:16], 16, fed.pad_id):
        with torch.inference_mode():
            full = fed.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ll = F.log_softmax(full[torch.arange(16), batch["last"]], -1)[:, ids]
            ours = project(fed.model, last_position(hidden_states(fed.model, batch), batch), ids)
        assert torch.equal(ll.argmax(-1), ours.argmax(-1))
        torch.testing.assert_close(ours - ours.logsumexp(-1, keepdim=True),
                                   ll - ll.logsumexp(-1, keepdim=True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["aflora", "fedit"])
def test_real_model_trains_for_a_few_steps(data_dir, tmp_path, method):
    algo = {"server_steps": 1, "server_batch_size": 2} if method == "aflora" else {}
    cfg = _cfg(method, **algo)
    cfg.federation.local_steps = 8
    untuned = Federation.build(cfg).evaluate_untuned()["accuracy"]  # no adapter: the pretrained model, same items
    summary = Simulation(cfg, tmp_path, progress=False).run()
    records = read_metrics(tmp_path)
    assert len(records) == 2
    assert summary["final_accuracy"] > untuned, (summary["final_accuracy"], untuned)
    assert all(c["train_loss"] == c["train_loss"] for r in records for c in r["clients"])  # no NaN
    assert records[0]["client_cost_percent"] > 0 and records[0]["uplink_bytes"] > 0
    state = load_file(str(tmp_path / "final_state.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in state.items() if k.endswith(".B"))
    if method == "aflora":
        assert (tmp_path / "merges" / "round_0002.safetensors").exists()
        assert "server_loss" in records[0]


# Run in a fresh interpreter: only transformers and peft load the exports (offline, so the PEFT
# adapter's base must resolve to the folder the export wrote).
WITHOUT_FEDLORA = """
import json, sys
import torch
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

peft_dir, merged_dir, io = sys.argv[1:4]
inputs = load_file(io + "/inputs.safetensors")
peft = AutoPeftModelForCausalLM.from_pretrained(peft_dir).eval()
merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
with torch.inference_mode():
    out = {"peft": peft(**inputs).logits, "merged": merged(**inputs).logits}
    with peft.disable_adapter():
        out["base"] = peft(**inputs).logits
save_file(out, io + "/logits.safetensors")
tok = AutoTokenizer.from_pretrained(merged_dir)
print(json.dumps({"ids": tok(sys.argv[4], add_special_tokens=False)["input_ids"],
                  "chat_template": tok.chat_template, "dtype": str(merged.dtype),
                  "fedlora_imported": any(m.split(".")[0] == "fedlora" for m in sys.modules)}))
"""


@pytest.mark.parametrize("method", ["aflora", "hetlora"])
def test_exports_reproduce_the_real_model_without_fedlora(data_dir, tmp_path, method):
    """AFLoRA (updates merged into the base each round) and HETLoRA (a final adapter with
    per-module ranks after pruning), from the GGUF base: the PEFT adapter on the base folder the
    export writes, and the merged model, must compute our logits in transformers + peft alone."""
    import json
    import subprocess
    import sys

    from safetensors.torch import save_file

    from fedlora.export import export_run

    cfg = _cfg(method, **({"dlf": False} if method == "aflora" else {"gamma": 0.5}))
    cfg.model.compute_dtype = "float32"
    cfg.federation.rounds, cfg.federation.local_steps = 2, 2
    sim = Simulation(cfg, tmp_path / "run", progress=False)
    sim.run()
    fed = sim.fed
    fed.adapters.load(fed.algorithm.eval_factors(load_file(str(tmp_path / "run" / "final_state.safetensors"))))
    batch = next(iter(length_sorted_batches(fed.task.test[:4], 4, fed.pad_id)))[1]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.inference_mode():
        ours = fed.model(**inputs).logits
    fed.adapters.clear()
    peft = export_run(tmp_path / "run", "peft", tmp_path / "peft")
    assert peft["base"] == str((tmp_path / "peft" / "base").resolve()) and peft["base_exact"]
    export_run(tmp_path / "run", "merged", tmp_path / "merged")

    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    text = "Stocks rallied 3% in Zürich, led by tech."
    done = subprocess.run([sys.executable, "-c", WITHOUT_FEDLORA, str(tmp_path / "peft"), str(tmp_path / "merged"),
                           str(tmp_path), text], capture_output=True, text=True, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert not seen["fedlora_imported"] and seen["dtype"] == "torch.float32"
    assert seen["ids"] == fed.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert seen["chat_template"] == fed.tokenizer.chat_template
    theirs = load_file(str(tmp_path / "logits.safetensors"))
    assert (ours - theirs["base"]).abs().max() > 1e-3  # the run changed the model
    torch.testing.assert_close(theirs["peft"], ours, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(theirs["merged"], ours, rtol=1e-4, atol=2e-4)


def test_dequantised_cache_equals_the_gguf_load(data_dir, tmp_path, monkeypatch):
    """The cached float32 folder holds exactly what transformers de-quantises from the GGUF
    file: same weights bit for bit, same token ids, same chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.data.ag_news import load_ag_news
    from fedlora.models import load_base_model, smollm2_gguf

    gguf = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    direct_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    import gguf

    parses = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    cached, tok = load_base_model("smollm2-135m")  # a cold cache: tokenizer, then model + cache
    assert len(parses) == 1, f"the GGUF file was parsed {len(parses)} times for one load"
    assert "quantization_config" not in cached.config.to_dict()
    a, b = direct.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    texts = load_ag_news("test", data_dir)["text"][:300]
    assert tok(texts)["input_ids"] == direct_tok(texts)["input_ids"]
    assert tok.chat_template == direct_tok.chat_template and tok.eos_token == direct_tok.eos_token
