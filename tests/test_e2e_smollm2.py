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
    untuned = Federation.build(cfg).evaluate({})["accuracy"]  # no adapter: the pretrained model, same items
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


@pytest.mark.parametrize("method", ["aflora", "hetlora"])
def test_peft_export_reproduces_the_real_model(data_dir, tmp_path, method):
    """AFLoRA (updates merged into the base each round) and HETLoRA (a final adapter with
    per-module ranks after pruning): PEFT must compute what our model computes."""
    from peft import PeftModel

    from fedlora.export import export_run
    from fedlora.models import load_base_model

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
    export_run(tmp_path / "run", "peft", tmp_path / "peft")
    base, _ = load_base_model("smollm2-135m")
    with torch.inference_mode():
        untrained = base(**inputs).logits
        theirs = PeftModel.from_pretrained(base, str(tmp_path / "peft"))(**inputs).logits
    assert (ours - untrained).abs().max() > 1e-3  # the run changed the model
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=2e-4)
