"""`fedlora export` reproduces the trained model in PEFT and transformers; `compare` and `report`
produce their tables and figures and resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_tree
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from fedlora.compare import method_configs, parse_methods
from fedlora.config import ConfigError, build_config
from fedlora.export import compress, export_run, load_run, write_peft
from fedlora.models import load_base_model
from fedlora.runtime.checkpoint import Checkpoint
from fedlora.runtime.inprocess import Simulation

IDS = torch.randint(0, 60, (3, 16), generator=torch.Generator().manual_seed(0))


def trained_logits(sim: Simulation) -> torch.Tensor:
    """The in-process global model as evaluated: merged base plus the method's eval factors."""
    fed = sim.fed
    state = Checkpoint.load(sim.run_dir).state
    fed.adapters.load(fed.algorithm.eval_factors(state))
    with torch.no_grad():
        out = fed.model(IDS).logits
    fed.adapters.clear()
    return out


EXPORT_OPTIONS = {"fedsa": {"global_b": "mean"}}  # with the default `none` FedSA-LoRA has no global adapter


@pytest.mark.parametrize("method", ["aflora", "fedit", "ffa", "flora", "flexlora", "hetlora",
                                    "fedex", "fedsa", "fedsvd", "rolora"])
def test_peft_and_merged_exports_reproduce_our_logits(data_dir, tmp_path, method):
    algorithm = {"name": method, **EXPORT_OPTIONS.get(method, {})}
    sim = Simulation(build_config(tiny_tree(algorithm=algorithm)), tmp_path / "run", progress=False)
    sim.run()
    ours = trained_logits(sim)
    base, _ = load_base_model("tiny-llama", seed=0)
    with torch.no_grad():
        untrained = base(IDS).logits
    assert (ours - untrained).abs().max() > 1e-4, "the run learned nothing: the test would prove nothing"

    info = export_run(tmp_path / "run", "peft", tmp_path / "peft")
    # a random tiny model has no hub name: its base is written beside the adapter, and the
    # adapter names it, so transformers + peft alone rebuild our model
    assert info["base_written"] and info["base"] == str((tmp_path / "peft" / "base").resolve())
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        theirs = peft_model(IDS).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)

    export_run(tmp_path / "run", "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ours, rtol=1e-4, atol=1e-5)


def test_fedsa_without_a_global_b_has_nothing_to_export(data_dir, tmp_path):
    tree = tiny_tree(algorithm={"name": "fedsa"}, federation={"rounds": 1, "local_steps": 1})
    Simulation(build_config(tree), tmp_path / "run", progress=False).run()
    with pytest.raises(ConfigError, match="learned no update"):
        export_run(tmp_path / "run", "peft", tmp_path / "peft")


def test_per_module_ranks_reach_peft(data_dir, tmp_path):
    """Modules of different ranks (rank_pattern / alpha_pattern) load and compute correctly."""
    Simulation(build_config(tiny_tree(algorithm={"name": "hetlora"}, federation={"rounds": 1})),
               tmp_path / "run", progress=False).run()
    run = load_run(tmp_path / "run")
    first = min(run.update)
    B, A, _ = compress(*run.update[first], 1)
    run.update[first] = (B, A)
    write_peft(tmp_path / "peft", run, run.update)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {first: 1} and config["alpha_pattern"] == {first: 1}
    base, _ = load_base_model("tiny-llama", seed=0)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, str(tmp_path / "peft"))(IDS).logits
        run.adapters.merge(run.update)
        torch.testing.assert_close(theirs, run.model(IDS).logits, rtol=1e-4, atol=1e-5)
    info = export_run(tmp_path / "run", "peft", tmp_path / "peft3", rank=3)
    assert info["ranks"] == [3] and 0 < info["relative_error"] < 1
    with pytest.raises(ConfigError, match="--base hub: no hub name is known for model tiny-llama"):
        export_run(tmp_path / "run", "peft", tmp_path / "peft4", base="hub")


def test_peft_base_names_exactly_the_weights_trained_on(tmp_path):
    from fedlora.models import SMOLLM2_HUB_ID, hub_reference

    assert hub_reference("smollm2-135m") == (SMOLLM2_HUB_ID, False)  # the GGUF is its Q4_1 copy
    assert hub_reference("gpt2") == ("gpt2", True)
    assert hub_reference(str(tmp_path)) == (str(tmp_path.resolve()), True)
    assert hub_reference("tiny-llama") == (None, False)
    assert hub_reference(str(tmp_path / "model.Q8_0.gguf")) == (None, False)


def test_compress_error_is_the_discarded_singular_values():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(20, 9, generator=g), torch.randn(9, 15, generator=g)
    S = torch.linalg.svdvals(B.double() @ A.double())
    for r in (1, 4, 9):
        Bc, Ac, rel = compress(B, A, r)
        assert rel == pytest.approx(float(S[r:].norm() / S.norm()), rel=1e-9, abs=1e-12)
        actual = torch.linalg.norm(B.double() @ A.double() - (Bc @ Ac).double()) / S.norm()
        assert float(actual) == pytest.approx(rel, rel=1e-4, abs=1e-6)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedlora.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_compare_writes_table_and_figures_and_resumes(data_dir, tmp_path):
    tree = tiny_tree(federation={"rounds": 2}, algorithm={"name": "aflora", "server_steps": 1})
    tree["methods"] = {"hetlora": {"gamma": 0.5}}
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    out = tmp_path / "cmp"
    args = ["compare", str(cfg), "--methods", "aflora,hetlora,fedit", "--seeds", "0,1", "--out", str(out), "--quiet"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["method"] for r in rows] == ["aflora", "hetlora", "fedit"]
    assert all(r["seeds"] == "2" and 0 <= float(r["final_accuracy_mean"]) <= 1 for r in rows)
    assert float(rows[0]["client_cost_percent"]) < float(rows[1]["client_cost_percent"])  # B+λ < A+B
    for png in ("accuracy_vs_round", "accuracy_vs_uplink", "ranks_per_client", "accuracy_vs_sim_time"):
        assert (out / f"{png}.png").stat().st_size > 1000
    saved = yaml.safe_load((out / "seed_1" / "hetlora" / "config.yaml").read_text())
    assert saved["algorithm"]["gamma"] == 0.5 and saved["seed"] == 1
    assert yaml.safe_load((out / "seed_0" / "aflora" / "config.yaml").read_text())["algorithm"]["server_steps"] == 1
    # the same partition for every method
    parts = {m: (out / "seed_0" / m / "partition.json").read_text() for m in ("aflora", "hetlora", "fedit")}
    assert len(set(parts.values())) == 1

    # statistics: intervals over the two seeds, paired differences against fedit (the default)
    for r in rows:
        assert r["interval"] == "t over seeds"
        assert float(r["final_accuracy_ci_low"]) <= float(r["final_accuracy_mean"]) <= float(r["final_accuracy_ci_high"])
        assert 0 <= float(r["worst_class_accuracy"]) <= float(r["worst_client_accuracy"]) <= 1
    assert rows[2]["diff_vs_reference"] == "" and all(r["reference"] == "fedit" for r in rows[:2])
    assert all(r["paired_seeds"] == "2" and 0 < float(r["p_value"]) <= 1 for r in rows[:2])
    assert "Δ final vs fedit" in (out / "comparison.md").read_text()
    assert (out / "seed_1" / "aflora" / "eval" / "round_0002.npz").exists()

    stamp = (out / "seed_0" / "fedit" / "metrics.jsonl").stat().st_mtime_ns
    again = _cli(*args, "--reference", "hetlora")
    assert again.returncode == 0 and "finished earlier" in again.stderr
    assert (out / "seed_0" / "fedit" / "metrics.jsonl").stat().st_mtime_ns == stamp
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["reference"] for r in rows] == ["hetlora", "", "hetlora"] and rows[1]["diff_vs_reference"] == ""

    changed = _cli(*args, "--set", "federation.lr=0.5")
    assert changed.returncode == 2 and "different config" in changed.stderr


def test_compare_rejects_unknown_methods(tmp_path):
    out = _cli("compare", "configs/quickstart.yaml", "--methods", "aflora,nope")
    assert out.returncode == 2 and "nope" in out.stderr


def test_compare_variants_of_one_method(tmp_path):
    """A `methods:` key that is no method's name is a variant: its `name` picks the method,
    its other keys the options on top of the config's `algorithm` options for that method."""
    tree = tiny_tree(algorithm={"name": "hierfedlora", "groups": 2})
    tree["methods"] = {"hier-speed": {"name": "hierfedlora", "speed_weight": 0.1}, "hetlora": {"gamma": 0.5}}
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    configs = method_configs(cfg, ["hierfedlora", "hier-speed", "hetlora"], [0], [])
    plain, speed = configs[("hierfedlora", 0)].algorithm, configs[("hier-speed", 0)].algorithm
    assert (plain.name, plain.groups, plain.speed_weight) == ("hierfedlora", 2, 0.0)
    assert (speed.name, speed.groups, speed.speed_weight) == ("hierfedlora", 2, 0.1)
    assert configs[("hetlora", 0)].algorithm.gamma == 0.5
    tree["methods"]["typo"] = {"name": "hetlorra"}
    cfg.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['typo'\]"):
        method_configs(cfg, ["hetlora"], [0], [])
    with pytest.raises(ConfigError, match="distinct"):
        parse_methods("aflora,aflora")


def test_report_has_every_figure(data_dir, tmp_path):
    Simulation(build_config(tiny_tree()), tmp_path, progress=False).run()
    assert _cli("report", str(tmp_path)).returncode == 0
    text = (tmp_path / "report.md").read_text()
    for name in ("accuracy", "train_loss", "test_loss", "ranks", "uplink", "downlink"):
        assert f"figures/{name}.png" in text and (tmp_path / "figures" / f"{name}.png").exists()


def test_assigning_a_field_keeps_config_yaml_in_field_order(tmp_path):
    """resolve_data_dir assigns data_dir; the dataset defaults' validator used to put its keys
    (task) first, so config.yaml changed order and a resumed comparison refused its own runs."""
    cfg = build_config(tiny_tree())
    cfg.data.data_dir = tmp_path
    assert list(cfg.data.model_dump()) == list(type(cfg.data).model_fields)


def test_check_not_mixed_compares_values_not_text(tmp_path):
    from fedlora.compare import check_not_mixed
    from fedlora.config import dump_config

    cfg = build_config(tiny_tree())
    saved = yaml.safe_load(dump_config(cfg))
    saved["data"] = dict(reversed(list(saved["data"].items())))  # same values, another order
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    check_not_mixed(cfg, tmp_path)  # accepted

    saved["federation"]["lr"] = 0.5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(ConfigError, match=r"different config \(federation\.lr; use another --out\)"):
        check_not_mixed(cfg, tmp_path)

    saved["seed"], saved["model"]["name"], saved["lora"]["alpha"], saved["data"]["max_length"] = 5, "x", 2.0, 9
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(ConfigError, match=r"\(data\.max_length, federation\.lr, lora\.alpha, model\.name, \.\.\.; use"):
        check_not_mixed(cfg, tmp_path)

    hostile = ["{not: [yaml", "- a list\n", "federation: {lr: soon}\n", "", "5", "null", "[" * 5000 + "]" * 5000,
               "{a: " * 3000, "seed: " + "9" * 4400, "a: &a [*a]\n", "!!python/object/apply:os.system [ls]",
               "seed: [1]\ndevices: {max_ranks: devices}\n", "seed: .inf\ndevices: {max_ranks: devices}\n",
               "federation: 5\ndevices: {max_ranks: devices}\n"]
    for damaged in hostile:
        (tmp_path / "config.yaml").write_text(damaged)
        with pytest.raises(ConfigError, match=r"config\.yaml: not a config this version reads"):
            check_not_mixed(cfg, tmp_path)
    (tmp_path / "config.yaml").write_bytes(b"\xff\xfe seed: 0")
    with pytest.raises(ConfigError, match=r"config\.yaml: not a config this version reads"):
        check_not_mixed(cfg, tmp_path)
