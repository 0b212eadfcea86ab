"""The in-process runtime: who trains what, determinism, resume after a kill, bad updates."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, tiny_tree
from safetensors.torch import load_file

from fedlora.algorithms.aflora import rank_weights, zero_pad
from fedlora.algorithms.base import weighted_sum
from fedlora.algorithms.fedit import FedIT
from fedlora.config import build_config
from fedlora.runtime.context import LocalClient
from fedlora.runtime.inprocess import Federation, Simulation, sample_clients
from fedlora.runtime.outputs import code_commit, read_metrics


def _base_weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_aflora_client_changes_only_b_and_lambda(data_dir, monkeypatch):
    fed = Federation.build(build_config(tiny_tree()))
    algo, state = fed.algorithm, fed.algorithm.init_state()
    before = _base_weights(fed.model)
    payload = algo.payload(state, 0)
    seen = {}
    original_train = LocalClient.train

    def spy(self, groups, regulariser=None):
        losses = original_train(self, groups, regulariser)
        seen.update(self.adapters.state())
        return losses

    monkeypatch.setattr(LocalClient, "train", spy)
    update, cstate = algo.client_train(fed.client(0, 1), payload, {})
    after = _base_weights(fed.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "client changed the base"
    for name in fed.adapters.layers:
        assert torch.equal(seen[f"{name}.A"], payload.tensors[f"{name}.A"]), "A changed on a client"
        assert seen[f"{name}.B"].abs().sum() > 0, "B did not train"
        assert not torch.equal(seen[f"{name}.lam"], torch.ones_like(seen[f"{name}.lam"]))
        assert torch.equal(cstate[f"{name}.lam"], seen[f"{name}.lam"])  # λ persists
    assert set(update.tensors) == {f"{n}.{k}" for n in fed.adapters.layers for k in ("B", "mask")}


@pytest.mark.parametrize("dlf", [True, False])
def test_aflora_server_changes_only_a(data_dir, dlf):
    fed = Federation.build(build_config(tiny_tree(algorithm={"name": "aflora", "server_steps": 3, "dlf": dlf})))
    algo, state = fed.algorithm, fed.algorithm.init_state()
    updates = [algo.client_train(fed.client(k, 1), algo.payload(state, k), {})[0] for k in range(4)]
    before = _base_weights(fed.model)
    agg = algo.aggregate(state, updates, fed.server(1))
    after = _base_weights(fed.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "server training changed the base"
    for name in fed.adapters.layers:
        masks = [u.tensors[f"{name}.mask"] for u in updates]
        p = rank_weights([int(h.sum()) for h in masks], [u.num_examples for u in updates])
        padded = [zero_pad(u.tensors[f"{name}.B"], h, algo.r_max) for u, h in zip(updates, masks)]
        assert torch.equal(agg.state[f"{name}.B"], weighted_sum(padded, p)), "B moved on the server"
        changed = not torch.equal(agg.state[f"{name}.A"], state[f"{name}.A"])
        assert changed == dlf
    assert agg.merge is not None


def _strip(records):
    # timings; sim_* adds the measured server time
    drop = {"wall_seconds", "server_seconds", "server_diagnostic_seconds", "seconds", "sim_seconds", "sim_time"}
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in drop}
        r["clients"] = [{k: v for k, v in c.items() if k not in drop} for c in r["clients"]]
        out.append(r)
    return out


@pytest.mark.parametrize("method", ["aflora", "fedit"])
def test_same_seed_same_numbers(data_dir, tmp_path, method):
    tree = tiny_tree(algorithm={"name": method})
    if method == "aflora":
        tree["algorithm"]["server_steps"] = 2
    runs = []
    for i in range(2):
        Simulation(build_config(tree), tmp_path / f"r{i}", progress=False).run()
        runs.append(tmp_path / f"r{i}")
    assert _strip(read_metrics(runs[0])) == _strip(read_metrics(runs[1]))
    a, b = (load_file(str(r / "final_state.safetensors")) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (runs[0] / "config.yaml").exists() and (runs[0] / "environment.json").exists()


def test_resume_after_kill_is_bit_identical(data_dir, tmp_path):
    tree = tiny_tree(federation={"rounds": 6, "local_steps": 25})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "fedlora.cli", "run", str(cfg_path), "--quiet"]
    subprocess.run([*cmd, "--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)

    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 600  # generous: a loaded machine is slow to reach round 2
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 6, f"the kill landed after round {done}: cannot test resume"

    subprocess.run([sys.executable, "-m", "fedlora.cli", "run", "--quiet", "--resume", str(tmp_path / "killed")],
                   check=True, env=env, capture_output=True)
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "killed")
    assert len(resumed) == 6
    assert _strip(full) == _strip(resumed)
    a = load_file(str(tmp_path / "full" / "final_state.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final_state.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fault", ["nan", "shape"])
def test_bad_update_is_rejected_and_round_continues(data_dir, tmp_path, monkeypatch, caplog, fault):
    original = FedIT.client_train

    def faulty(self, ctx, payload, client_state):
        update, state = original(self, ctx, payload, client_state)
        if ctx.client_id == 1:
            key = next(iter(update.tensors))
            if fault == "nan":
                update.tensors[key] = update.tensors[key] * float("nan")
            else:
                update.tensors[key] = update.tensors[key][:, :-1]
        return update, state

    monkeypatch.setattr(FedIT, "client_train", faulty)
    cfg = build_config(tiny_tree(algorithm={"name": "fedit"}))
    with caplog.at_level("WARNING", logger="fedlora"):
        Simulation(cfg, tmp_path / "run", progress=False).run()
    records = read_metrics(tmp_path / "run")
    for r in records:
        assert [x["client"] for x in r["rejected"]] == [1]
        assert ("NaN" in r["rejected"][0]["reason"]) == (fault == "nan")
        assert sorted(int(k) for k in r["ranks"]) == [0, 2, 3]
        assert "accuracy" in records[-1]
    assert "rejected the update of client 1" in caplog.text
    final = load_file(str(tmp_path / "run" / "final_state.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_client_sampling_is_seeded_and_sized():
    a = [sample_clients(np.random.default_rng(3), 10, 0.2) for _ in range(2)]
    assert a[0] == a[1] and len(a[0]) == 2
    assert sample_clients(np.random.default_rng(0), 10, 1.0) == list(range(10))


@pytest.mark.parametrize("method", ["aflora", "fedit"])
def test_gpt2_conv1d_targets_run(data_dir, tmp_path, method):
    algo = {"name": method, **({"server_steps": 1} if method == "aflora" else {})}
    tree = tiny_tree(model={"name": "tiny-gpt2", "target_modules": ["c_attn", "c_proj", "c_fc"]},
                     federation={"rounds": 1}, algorithm=algo)
    summary = Simulation(build_config(tree), tmp_path, progress=False).run()
    assert summary["rounds"] == 1 and summary["final_accuracy"] is not None
    state = load_file(str(tmp_path / "final_state.safetensors"))
    assert any(k.endswith("mlp.c_proj.B") for k in state) and any(k.endswith("attn.c_proj.B") for k in state)


def test_aflora_payload_carries_the_pending_base_update(data_dir):
    fed = Federation.build(build_config(tiny_tree()))
    algo, state = fed.algorithm, fed.algorithm.init_state()
    first = algo.payload(state, 1)
    assert all(k.endswith(".A") for k in first.tensors)  # round 1: only A_global[:r_k]
    updates = [algo.client_train(fed.client(k, 1), algo.payload(state, k), {})[0] for k in range(4)]
    agg = algo.aggregate(state, updates, fed.server(1))
    second = algo.payload(agg.state, 1)  # client 1 has r^1 = 4 of r_max = 8
    for name in fed.adapters.layers:
        A_full = torch.cat([second.tensors[f"{name}.A"], second.tensors[f"{name}.merge.A_tail"]])
        B_merge, A_merge = agg.merge[name]
        assert torch.equal(A_full, A_merge) and torch.equal(second.tensors[f"{name}.merge.B"], B_merge)
        assert second.tensors[f"{name}.A"].shape[0] == 4


def test_server_nan_stops_the_run_before_merging(data_dir, tmp_path, monkeypatch):
    from fedlora.algorithms.aflora import AFLoRA

    original = AFLoRA.aggregate

    def diverging(self, state, updates, server):
        agg = original(self, state, updates, server)
        if len(list((tmp_path / "merges").glob("*"))) >= 1:
            agg.state = {k: v * float("nan") for k, v in agg.state.items()}
        return agg

    monkeypatch.setattr(AFLoRA, "aggregate", diverging)
    with pytest.raises(RuntimeError, match="round 2: the server's aggregate contains NaN"):
        Simulation(build_config(tiny_tree()), tmp_path, progress=False).run()
    assert len(read_metrics(tmp_path)) == 1
    assert not (tmp_path / "merges" / "round_0002.safetensors").exists()


def test_a_resume_is_recorded_beside_the_first_environment(data_dir, tmp_path):
    """environment.json keeps the first start's environment; each resume adds its own with the
    round it continued after (a study carried across sessions says which code ran which rounds)."""
    run = tmp_path / "run"
    Simulation(build_config(tiny_tree(federation={"rounds": 1})), run, progress=False).run()
    first = json.loads((run / "environment.json").read_text())
    assert "resumes" not in first
    Simulation(build_config(tiny_tree(federation={"rounds": 2})), run, progress=False).run(resume=True)
    env = json.loads((run / "environment.json").read_text())
    assert {k: v for k, v in env.items() if k != "resumes"} == first
    assert [r["after_round"] for r in env["resumes"]] == [1]
    assert env["resumes"][0]["git_commit"] == first["git_commit"] and "argv" in env["resumes"][0]


def test_an_archived_copy_knows_its_commit(tmp_path):
    """`git archive` stamps src/fedlora/COMMIT (export-subst); outside a checkout code_commit reads
    it, and an unstamped file (a checkout's own) gives None rather than the placeholder."""
    stamped = subprocess.run(["git", "archive", "HEAD", "src/fedlora/COMMIT"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(stamped)) as tar:
        text = tar.extractfile("src/fedlora/COMMIT").read().decode().strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert text == head.strip()
    (tmp_path / "COMMIT").write_text(text + "\n")
    assert code_commit(tmp_path) == text
    (tmp_path / "COMMIT").write_text("$Format:%H$\n")
    assert code_commit(tmp_path) is None
