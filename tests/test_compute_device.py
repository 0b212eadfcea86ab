"""`model.device`: auto and cpu resolve to the CPU here, a device that is not there stops the run
with one line, and (marked `gpu`, skipped without CUDA) one tiny round on CUDA matches the CPU."""

import pytest
import torch
import yaml
from conftest import tiny_tree
from torch import nn

from fedlora.adapters import LoRALayer
from fedlora.cli import main
from fedlora.config import ConfigError, build_config, torch_device
from fedlora.runtime.checkpoint import Checkpoint
from fedlora.runtime.inprocess import Simulation

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def test_device_names_are_checked():
    with pytest.raises(ConfigError, match=r"model.device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"):
        build_config(tiny_tree(model={"name": "tiny-llama", "device": "gpu"}))
    assert build_config(tiny_tree(model={"name": "tiny-llama", "device": "cuda:1"})).model.device == "cuda:1"


@pytest.mark.skipif(CUDA or torch.backends.mps.is_available(), reason="auto picks the GPU here")
def test_auto_and_cpu_are_the_cpu_here():
    assert torch_device("auto") == "cpu" and torch_device("cpu") == "cpu"
    cfg = build_config(tiny_tree())
    assert cfg.model.device == "auto" and cfg.model.torch_device() == "cpu"  # config.yaml keeps auto


def test_an_unavailable_device_is_one_line_and_exit_2(data_dir, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(model={"name": "tiny-llama", "device": "cuda:99"})))
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: model.device: cuda:99 is not available")
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("major, dtype", [(8, "bfloat16"), (7, "float32")])
def test_auto_compute_dtype_on_cuda_follows_the_gpu(monkeypatch, major, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    for device in ("cuda", "auto"):  # auto is CUDA when torch sees a GPU
        cfg = build_config(tiny_tree(model={"name": "tiny-llama", "device": device, "compute_dtype": "auto"}))
        assert cfg.model.compute_dtype == dtype and cfg.model.device == device


def test_factors_and_merges_follow_the_base_weight():
    """The meta device stands in for a GPU: factors loaded from CPU tensors must land beside W."""
    layer = LoRALayer(nn.Linear(4, 3, device="meta"), scaling=1.0)
    layer.set_factors(torch.ones(2, 4), torch.ones(3, 2), lam=torch.ones(2), trainable={"B"})
    assert {t.device.type for t in (layer.A, layer.B, layer.lam)} == {"meta"}
    layer.merge_update(torch.ones(3, 2), torch.ones(2, 4))  # a CPU update into a meta weight
    assert layer.delta_weight().device.type == "meta"


def _tiny_run(tmp_path, method, device, dtype="float32"):
    algo = {"name": method, **({"server_steps": 2} if method == "aflora" else {})}
    tree = tiny_tree(model={"name": "tiny-llama", "compute_dtype": dtype, "device": device},
                     federation={"rounds": 1}, algorithm=algo)
    sim = Simulation(build_config(tree), tmp_path / f"{method}-{device}-{dtype}", progress=False)
    summary = sim.run()
    return sim, summary, Checkpoint.load(sim.run_dir)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["aflora", "hetlora", "flexlora", "hierfedlora"])
@pytest.mark.usefixtures("data_dir")
def test_one_tiny_round_on_cuda_matches_the_cpu(tmp_path, method):
    sim, summary, ckpt = _tiny_run(tmp_path, method, "cuda")
    assert next(sim.fed.model.parameters()).device.type == "cuda"
    tensors = [*ckpt.state.values(), *(t for s in ckpt.client_states.values() for t in s.values())]
    assert {t.device.type for t in tensors} == {"cpu"}, "checkpointed state left the CPU"
    _, cpu_summary, cpu_ckpt = _tiny_run(tmp_path, method, "cpu")
    for key, value in cpu_ckpt.state.items():
        torch.testing.assert_close(ckpt.state[key], value, rtol=1e-3, atol=1e-4)
    assert summary["final_accuracy"] == pytest.approx(cpu_summary["final_accuracy"], abs=0.05)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.usefixtures("data_dir")
def test_bfloat16_autocast_round_on_cuda_and_generation(tmp_path):
    from fedlora.generate import generate

    sim, summary, ckpt = _tiny_run(tmp_path, "fedit", "cuda", "bfloat16")
    losses = [c["train_loss"] for r in ckpt.history for c in r["clients"]]
    assert losses and all(loss == loss for loss in losses) and summary["final_accuracy"] is not None
    assert generate(sim.run_dir, "Sports news", max_new_tokens=4, device="cuda").strip()
