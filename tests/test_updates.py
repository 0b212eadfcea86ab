"""Client updates are not trusted: each rule of the server's screening (dtype, finiteness,
names and shapes, metrics, example counts, the per-round norm bound), the trimmed mean's use, and
one client ×1e6 among ten end to end (FedIT: the model ends where the clean run does;
AFLoRA: the poisoned update never reaches the base)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_tree
from safetensors.torch import load_file

from fedlora.algorithms.aflora import AFLoRA, AFLoRAOptions
from fedlora.algorithms.base import (
    FederationSetup,
    Message,
    Update,
)
from fedlora.algorithms.fedit import FedIT, FedITOptions
from fedlora.config import AggregationConfig, ConfigError, build_config
from fedlora.runtime.checkpoint import Checkpoint
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import read_metrics
from fedlora.aggregation import AttackConfig, build_pipeline
from fedlora.aggregation.robust import RobustCombine
from fedlora.aggregation.screening import update_norm
from fedlora.runtime.rounds import Accepted, accept_update, screen_norms

SHAPES = {"m0": (6, 5)}
METRICS = {"train_loss": 1.0, "trained_params": 10, "uploaded_params": 10, "rank": 2.0}


def fedit(sizes=(10, 20, 30)) -> FedIT:
    return FedIT(FedITOptions(), FederationSetup(SHAPES, [2] * len(sizes), list(sizes), scaling=1.0, seed=0))


def fake_fed(algo, norm_bound=10.0, norm_action="reject"):
    """What accept_update and screen_norms read of a Federation: the method in its pipeline."""
    cfg = SimpleNamespace(aggregation=AggregationConfig(norm_bound=norm_bound, norm_action=norm_action),
                          attack=AttackConfig())
    return SimpleNamespace(algorithm=build_pipeline(algo, cfg), total_params=1000, cfg=cfg)


def good_tensors(scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m0.A": torch.randn(2, 5, generator=g) * scale, "m0.B": torch.randn(6, 2, generator=g) * scale}


def check(update: Update, algo=None) -> str | None:
    """accept_update's verdict: None when accepted, else the logged reason."""
    algo = algo or fedit()
    rejected: list[dict] = []
    record = accept_update(fake_fed(algo), algo.init_state(), 1, update, Message({}), 0.0, rejected)
    assert (record is None) == bool(rejected)
    return rejected[0]["reason"] if rejected else None


# -- one update on its own ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_real_floating_point_dtypes_are_accepted(dtype):
    tensors = {k: v.to(dtype) for k, v in good_tensors().items()}
    assert check(Update(0, tensors, 10, dict(METRICS))) is None


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
def test_other_dtypes_are_rejected_naming_the_tensor(dtype):
    tensors = good_tensors()
    tensors["m0.B"] = torch.ones(6, 2, dtype=dtype)
    assert check(Update(0, tensors, 10, dict(METRICS))) == f"m0.B: dtype {dtype}, expected a real floating-point tensor"


def test_complex_nan_does_not_slip_through():
    tensors = good_tensors()
    tensors["m0.A"] = torch.full((2, 5), complex(float("nan"), 0.0))
    assert "dtype torch.complex64" in check(Update(0, tensors, 10, dict(METRICS)))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e300])
def test_non_finite_values_are_rejected(value):
    """1e300 is finite in float64 but infinite in the float32 the server aggregates in."""
    tensors = {k: v.double() for k, v in good_tensors().items()}
    tensors["m0.B"][3, 1] = value
    assert check(Update(0, tensors, 10, dict(METRICS))) == "m0.B: contains NaN or Inf"


def test_wrong_shape_missing_and_extra_tensors_are_rejected():
    t = good_tensors()
    assert check(Update(0, {**t, "m0.B": torch.zeros(6, 3)}, 10, dict(METRICS))) == "m0.B: shape (6, 3), expected (6, 2)"
    assert "missing ['m0.B']" in check(Update(0, {"m0.A": t["m0.A"]}, 10, dict(METRICS)))
    assert "unexpected ['m0.C']" in check(Update(0, {**t, "m0.C": torch.zeros(1)}, 10, dict(METRICS)))


@pytest.mark.parametrize("metrics, reason", [
    ({"train_loss": 1.0, "uploaded_params": 1}, "metrics: trained_params missing"),
    ({**METRICS, "train_loss": float("nan")}, "metrics: train_loss=nan is not a finite number"),
    ({**METRICS, "rank": "2"}, "metrics: rank='2' is not a finite number"),
    ({**METRICS, "uploaded_params": -5}, "metrics: uploaded_params=-5 is negative"),
])
def test_bad_metrics_are_rejected(metrics, reason):
    assert check(Update(0, good_tensors(), 10, metrics)) == reason


@pytest.mark.parametrize("claimed", [-1, 0, 11, 10**9, True])
def test_example_counts_come_from_the_partition_table(claimed):
    """Client 0 holds 10 examples on the server's table: any other claim is refused, so a
    client cannot buy itself weight."""
    reason = check(Update(0, good_tensors(), claimed, dict(METRICS)))
    assert reason == f"num_examples {claimed!r} differs from the partition table's 10"


# -- the round's norm bound -----------------------------------------------------------------

def ten_updates(poisoned: int | None = 3, factor: float = 1e6) -> list[Accepted]:
    out = []
    for k in range(10):
        tensors = good_tensors(factor if k == poisoned else 1.0, seed=k)
        out.append(Accepted(Update(k, tensors, 10, dict(METRICS)), {"id": k}))
    return out


def test_norm_bound_rejects_the_outlier_with_its_numbers():
    rejected: list[dict] = []
    kept = screen_norms(fake_fed(fedit()), 4, ten_updates(), rejected)
    assert [a.update.client_id for a in kept] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    (entry,) = rejected
    assert entry["client"] == 3
    assert entry["reason"].startswith("update norm ") and "exceeds 10 × the round's median update norm" in entry["reason"]


def test_norm_bound_passes_honest_spread_and_can_be_switched_off():
    honest = ten_updates(poisoned=3, factor=5.0)  # 5× the others: inside a 10× bound
    assert len(screen_norms(fake_fed(fedit()), 1, honest, [])) == 10
    assert len(screen_norms(fake_fed(fedit(), norm_bound=None), 1, ten_updates(), [])) == 10


def test_norm_bound_uses_the_lower_median_so_two_clients_suffice():
    """With two updates the lower median is the smaller norm: the ×1e6 one is still caught."""
    rejected: list[dict] = []
    kept = screen_norms(fake_fed(fedit()), 1, ten_updates()[2:4], rejected)
    assert [a.update.client_id for a in kept] == [2] and rejected[0]["client"] == 3


def test_clip_scales_the_outlier_to_the_bound_and_notes_it():
    updates = ten_updates()
    norms = [update_norm(a.update.tensors) for a in updates]
    bound = 10 * float(torch.tensor(norms, dtype=torch.float64).median())
    rejected: list[dict] = []
    kept = screen_norms(fake_fed(fedit(), norm_action="clip"), 1, updates, rejected)
    assert rejected == [] and len(kept) == 10
    assert update_norm(kept[3].update.tensors) == pytest.approx(bound, rel=1e-5)
    assert "clipped" in kept[3].record and "scaled by" in kept[3].record["clipped"]
    assert all("clipped" not in a.record for i, a in enumerate(kept) if i != 3)
    assert torch.equal(kept[0].update.tensors["m0.A"], updates[0].update.tensors["m0.A"])


def test_aflora_masks_are_outside_the_norm_and_never_scaled():
    """AFLoRA's 0/1 masks carry no magnitude: they neither count in the norm nor get clipped."""
    assert AFLoRA.unbounded_keys == (".mask",)
    mask = torch.ones(2)
    assert update_norm({"m0.B": torch.tensor([3.0, 4.0]), "m0.mask": mask}, (".mask",)) == 5.0
    algo = AFLoRA(AFLoRAOptions(), FederationSetup({"m0": (2, 5)}, [2] * 3, [1] * 3, scaling=1.0, seed=0))
    updates = [Accepted(Update(k, {"m0.B": torch.full((2,), 1e6 if k == 2 else 1.0), "m0.mask": mask}, 1), {})
               for k in range(3)]
    kept = screen_norms(fake_fed(algo, norm_action="clip"), 1, updates, [])
    assert torch.equal(kept[2].update.tensors["m0.mask"], mask)
    assert torch.allclose(kept[2].update.tensors["m0.B"], torch.full((2,), 10.0))


def test_zero_median_passes_every_update():
    updates = [Accepted(Update(k, {"m0.B": torch.zeros(2) + (k == 2)}, 1), {}) for k in range(3)]
    assert len(screen_norms(fake_fed(fedit()), 1, updates, [])) == 3


# -- trimmed mean (its maths: test_robust.py) -------------------------------------------------

def test_fedit_aggregates_with_the_trimmed_mean_when_configured():
    setup = FederationSetup(SHAPES, [2] * 5, [10] * 5, scaling=1.0, seed=0)
    algo = RobustCombine(FedIT(FedITOptions(), setup), "trimmed_mean", trim=0.2)
    updates = [Update(k, good_tensors(1e6 if k == 4 else 1.0, seed=k), 10) for k in range(5)]
    new = algo.aggregate(algo.init_state(), updates, server=None).state
    assert float(new["m0.A"].abs().max()) < 10  # the 1e6 client is trimmed everywhere


def test_the_old_trimmed_mean_key_still_means_the_trimmed_mean_combine():
    agg = build_config(tiny_tree(algorithm={"name": "fedit"}, aggregation={"trimmed_mean": 0.1})).aggregation
    assert (agg.combine, agg.trim) == ("trimmed_mean", 0.1)
    assert build_config(tiny_tree(aggregation={"trimmed_mean": 0.0})).aggregation.combine == "mean"
    with pytest.raises(ConfigError, match=r"^config error: aggregation.trimmed_mean: conflicts with "
                                          r"aggregation.combine/trim \(the key is now aggregation.combine: "):
        build_config(tiny_tree(aggregation={"trimmed_mean": 0.1, "combine": "median"}))
    with pytest.raises(ConfigError, match=r"^config error: aggregation.combine: RobustCombine is undefined for "
                                          r"hierfedlora: "):
        build_config(tiny_tree(algorithm={"name": "hierfedlora"}, aggregation={"trimmed_mean": 0.1}))
    with pytest.raises(ConfigError, match=r"^config error: aggregation.norm_bound: "):
        build_config(tiny_tree(aggregation={"norm_bound": 0.5}))


# -- one client ×1e6 among ten, end to end ---------------------------------------------------

def poison(monkeypatch, cls, client: int, factor: float) -> None:
    """Client `client` multiplies every tensor it uploads (AFLoRA's masks aside) by `factor`."""
    real = getattr(cls.client_train, "honest", cls.client_train)

    def client_train(self, ctx, payload, client_state):
        update, new_state = real(self, ctx, payload, client_state)
        if update.client_id == client:
            update.tensors = {k: t if k.endswith(".mask") else t * factor for k, t in update.tensors.items()}
        return update, new_state

    client_train.honest = real
    monkeypatch.setattr(cls, "client_train", client_train)


def ten_clients(method: str, ranks: list[int], **sections) -> dict:
    algorithm = {"name": method, "server_steps": 1} if method == "aflora" else {"name": method}
    return tiny_tree(algorithm=algorithm, threads=1, **sections,
                     federation={"num_clients": 10, "client_max_ranks": ranks, "rounds": 2, "local_steps": 2})


def run(tree, out) -> tuple[list[dict], dict[str, torch.Tensor]]:
    Simulation(build_config(tree), out, progress=False).run()
    return read_metrics(out), load_file(str(out / "final_state.safetensors"))


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a)
    return (num / sum(float(b[k].norm() ** 2) for k in b)) ** 0.5


def test_fedit_one_client_times_1e6_among_ten_ends_with_the_clean_model(data_dir, tmp_path, monkeypatch):
    """The norm bound rejects client 3's ×1e6 update every round (and says so); the final
    adapter and accuracy are those of the clean run within the noise of one client fewer.
    Without the bound the same attack takes the model far away (the test can fail)."""
    tree = ten_clients("fedit", [4] * 10)
    clean, clean_state = run(tree, tmp_path / "clean")
    poison(monkeypatch, FedIT, client=3, factor=1e6)
    screened, state = run(tree, tmp_path / "poisoned")
    for record in screened:
        assert [r["client"] for r in record["rejected"]] == [3]
        assert "exceeds 10 × the round's median update norm" in record["rejected"][0]["reason"]
        assert sorted(c["id"] for c in record["clients"]) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert relative_difference(state, clean_state) < 0.1  # one honest client fewer: about 0.05
    assert abs(screened[-1]["accuracy"] - clean[-1]["accuracy"]) <= 0.1  # 5 of 48 test examples
    _, unscreened = run({**tree, "aggregation": {"norm_bound": None}}, tmp_path / "unscreened")
    assert relative_difference(unscreened, clean_state) > 1e3


def test_aflora_poisoned_update_is_never_merged_into_the_base(data_dir, tmp_path, monkeypatch):
    """Client 3's ×1e6 update is rejected each round: every merge file equals, bit for bit,
    that of a run in which client 3's update is dropped (NaN, rejected by the finiteness check)."""
    tree = ten_clients("aflora", [8, 8, 4, 4, 4, 4, 2, 2, 2, 2])
    poison(monkeypatch, AFLoRA, client=3, factor=1e6)
    screened, _ = run(tree, tmp_path / "poisoned")
    assert [[r["client"] for r in rec["rejected"]] for rec in screened] == [[3], [3]]
    # a rejected client keeps its previous private state (λ, mask), as on Flower
    assert sorted(Checkpoint.load(tmp_path / "poisoned").client_states) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    poison(monkeypatch, AFLoRA, client=3, factor=float("nan"))
    dropped, _ = run(tree, tmp_path / "dropped")
    assert all("NaN" in rec["rejected"][0]["reason"] for rec in dropped)
    for r in (1, 2):
        a = load_file(str(tmp_path / f"poisoned/merges/round_{r:04d}.safetensors"))
        b = load_file(str(tmp_path / f"dropped/merges/round_{r:04d}.safetensors"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert max(float(t.abs().max()) for t in a.values()) < 100
