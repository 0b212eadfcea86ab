"""The attack harness (issue 30): each attack changes the upload as specified, only for the seeded
attackers, on both runtimes; bad `aggregation:` / `attack:` configs give one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_tree
from test_flower import fast_builds  # noqa: F401  (the fixture: Flower runs with the task built once)

from fedlora.aggregation import AggregationConfig, AttackConfig, build_pipeline
from fedlora.aggregation.attack import LabelFlip, UploadAttack, choose_attackers, reversal_for_norm
from fedlora.aggregation.screening import NormBound, update_norm
from fedlora.algorithms.base import Algorithm, FederationSetup, Message, MethodOptions, Update
from fedlora.config import ConfigError, build_config
from fedlora.data.encode import Encoded

SEED = np.random.SeedSequence([0, 1, 2])


@dataclass
class FakeClient:
    client_id: int
    seed: np.random.SeedSequence = SEED
    examples: list = field(default_factory=lambda: [Encoded([1, 2], 0), Encoded([3], 2), Encoded([4], 3)])
    label_ids: list = field(default_factory=lambda: [10, 11, 12, 13])


class Scripted(Algorithm):
    """A method whose client uploads fixed tensors; it records the labels it trained on."""

    def __init__(self, name: str, upload: dict, unbounded=()) -> None:
        super().__init__(MethodOptions(), FederationSetup({"w": (2, 2)}, [2] * 4, [10] * 4, 1.0, 0))
        self.name, self.upload, self.unbounded_keys, self.seen = name, upload, unbounded, []

    def init_state(self):
        return {}

    def payload(self, state, client_id):
        return Message({})

    def client_train(self, ctx, payload, client_state):
        self.seen.append([e.target for e in ctx.examples])
        return Update(ctx.client_id, {k: v.clone() for k, v in self.upload.items()}, 10, {"train_loss": 1.0}), {}

    def expected_shapes(self, state, update):
        return {}

    def aggregate(self, state, updates, server):
        raise NotImplementedError


RECEIVED = {"w.A": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "w.B": torch.tensor([[0.5, 0.0], [0.0, 0.5]])}
TRAINED = {"w.A": torch.tensor([[1.5, 2.0], [3.0, 3.0]]), "w.B": torch.tensor([[0.5, 1.0], [0.0, 0.5]])}


def attacked(kind: str, method: str = "fedit", client: int = 1, upload=TRAINED, received=RECEIVED, **options):
    algo = UploadAttack(Scripted(method, upload, (".mask",) if method == "aflora" else ()), frozenset({1}), kind,
                        **options)
    return algo.client_train(FakeClient(client), Message(received), {})[0]


def test_attackers_are_a_seeded_choice_of_k_distinct_clients():
    chosen = choose_attackers(10, 3, seed=0)
    assert len(chosen) == 3 and chosen <= set(range(10)) and chosen == choose_attackers(10, 3, seed=0)
    assert len({choose_attackers(10, 3, seed=s) for s in range(8)}) > 1


def test_an_honest_client_uploads_what_it_trained():
    update = attacked("sign_flip", client=0)
    assert all(torch.equal(update.tensors[k], TRAINED[k]) for k in TRAINED) and "attacker" not in update.metrics


def test_sign_flip_reverses_the_change_from_what_the_client_received():
    update = attacked("sign_flip")
    for k in TRAINED:  # received − (trained − received)
        assert torch.equal(update.tensors[k], 2 * RECEIVED[k] - TRAINED[k])
    assert update.metrics == {"train_loss": 1.0, "attacker": 1.0}


def test_scale_multiplies_the_change():
    update = attacked("scale", scale=10.0)
    for k in TRAINED:
        torch.testing.assert_close(update.tensors[k], RECEIVED[k] + 10 * (TRAINED[k] - RECEIVED[k]))


def test_a_pruned_upload_is_compared_with_the_received_factors_sliced_to_its_shape():
    """HETLoRA: rank 2 received, rank 1 uploaded."""
    upload = {"w.A": TRAINED["w.A"][:1], "w.B": TRAINED["w.B"][:, :1]}
    update = attacked("sign_flip", method="hetlora", upload=upload)
    assert torch.equal(update.tensors["w.A"], 2 * RECEIVED["w.A"][:1] - upload["w.A"])
    assert torch.equal(update.tensors["w.B"], 2 * RECEIVED["w.B"][:, :1] - upload["w.B"])


@pytest.mark.parametrize("method, kept", [("flora", "w.A"), ("aflora", "w.mask")])
def test_flora_and_aflora_attacks_act_on_b_so_the_clients_delta_w_flips_exactly(method, kept):
    upload = {"w.B": TRAINED["w.B"], kept: torch.tensor([[1.0, 0.5], [2.0, 1.0]]) if kept == "w.A"
              else torch.ones(2)}
    update = attacked("sign_flip", method=method, upload=upload)
    assert torch.equal(update.tensors["w.B"], -upload["w.B"]) and torch.equal(update.tensors[kept], upload[kept])
    scaled = attacked("scale", method=method, upload=upload, scale=-3.0)
    assert torch.equal(scaled.tensors["w.B"], -3.0 * upload["w.B"])


def test_gaussian_noise_has_the_honest_changes_rms_times_the_scale_and_is_seeded():
    received = {"w.A": torch.zeros(100, 100)}
    upload = {"w.A": torch.full((100, 100), 0.5)}  # a change of RMS 0.5
    a = attacked("gaussian", upload=upload, received=received, noise_scale=4.0)
    noise = a.tensors["w.A"]
    assert abs(float(noise.std()) - 2.0) < 0.05 and abs(float(noise.mean())) < 0.05
    assert torch.equal(noise, attacked("gaussian", upload=upload, received=received, noise_scale=4.0).tensors["w.A"])


def test_under_bound_sends_the_reversed_change_at_margin_times_the_bound():
    update = attacked("under_bound", margin=0.95, bound=10.0)
    honest = update_norm(TRAINED)
    assert update_norm(update.tensors) == pytest.approx(9.5 * honest, rel=1e-6)
    t = reversal_for_norm(TRAINED, RECEIVED, 9.5 * honest, ())
    assert t > 2  # reversed (t > 1), and larger than a plain sign flip (t = 2)
    for k in TRAINED:
        torch.testing.assert_close(update.tensors[k], RECEIVED[k] - (t - 1) * (TRAINED[k] - RECEIVED[k]))
    # it passes a norm bound of 10 × a median equal to its honest norm; ×10.5 would not
    others = [Update(k, dict(TRAINED), 10) for k in (0, 2, 3)]
    bound = NormBound(Scripted("fedit", TRAINED), bound=10.0, action="reject")
    assert all(v.update is not None for v in bound.screen([update, *others]))
    over = attacked("under_bound", margin=0.99, bound=10.6)
    assert bound.screen([over, *others])[0].update is None


def test_under_bound_leaves_unbounded_masks_out_of_the_norm():
    upload = {"w.B": torch.tensor([[3.0, 4.0]]), "w.mask": torch.ones(2) * 100}
    update = attacked("under_bound", method="aflora", upload=upload, margin=0.5, bound=4.0)
    assert update_norm(update.tensors, (".mask",)) == pytest.approx(2.0 * 5.0)
    assert torch.equal(update.tensors["w.mask"], upload["w.mask"])
    assert float(update.tensors["w.B"][0, 0]) < 0  # reversed


def test_label_flip_trains_on_the_next_class_and_restores_the_data():
    inner = Scripted("fedit", TRAINED)
    algo = LabelFlip(inner, frozenset({1}))
    ctx = FakeClient(1)
    original = list(ctx.examples)
    update, _ = algo.client_train(ctx, Message({}), {})
    assert inner.seen == [[1, 3, 0]] and ctx.examples == original  # (y + 1) mod 4
    assert update.metrics["attacker"] == 1.0 and torch.equal(update.tensors["w.A"], TRAINED["w.A"])
    algo.client_train(FakeClient(0), Message({}), {})
    assert inner.seen[-1] == [0, 2, 3]  # an honest client's labels are its own


# -- configs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sections, message", [
    ({"attack": {"kind": "sign_flip"}},
     "config error: attack.attackers: 0 clients attack with attack.kind sign_flip; set attack.attackers"),
    ({"attack": {"attackers": 2}}, "config error: attack.attackers: 2 with attack.kind none; set attack.kind"),
    ({"attack": {"kind": "scale", "attackers": 5}}, "config error: attack.attackers: 5 of federation.num_clients=4 clients"),
    ({"attack": {"kind": "flip", "attackers": 1}}, "config error: attack.kind: Input should be 'none', 'sign_flip', "
                                                    "'scale', 'gaussian', 'label_flip' or 'under_bound'"),
    ({"attack": {"kind": "gaussian", "attackers": 1, "noise_scale": 0}},
     "config error: attack.noise_scale: Input should be greater than 0"),
    ({"attack": {"kind": "scale", "attackers": 1, "scale": float("inf")}},
     "config error: attack.scale: Input should be a finite number"),
    ({"aggregation": {"combine": "mode"}}, "config error: aggregation.combine: Input should be 'mean', 'median', "
                                           "'trimmed_mean', 'krum' or 'multi_krum'"),
    ({"aggregation": {"combine": "krum", "select": 3}},
     "config error: aggregation.select: only for combine multi_krum, not krum"),
    ({"aggregation": {"trim": 0.5, "combine": "trimmed_mean"}},
     "config error: aggregation.trim: Input should be less than 0.5"),
    ({"aggregation": {"combine": "median"}, "algorithm": {"name": "hierfedlora"}},
     "config error: aggregation.combine: RobustCombine is undefined for hierfedlora: its aggregate is a mean per "
     "group, then per layer over the groups whose depth covers it (clients upload different modules); use the norm bound"),
    ({"aggregation": {"trimmed_mean": "x"}}, "config error: aggregation.trimmed_mean: 'x' is not in [0, 0.5) "
                                             "(the key is now aggregation.combine: trimmed_mean with aggregation.trim)"),
    ({"attack": {"kind": "label_flip", "attackers": 1}, "data": {"dataset": "dolly", "task": "instruction"}},
     "config error: attack.kind: label_flip needs class labels; data.task is instruction"),
])
def test_bad_aggregation_and_attack_configs_give_one_line(sections, message):
    with pytest.raises(ConfigError) as err:
        build_config(tiny_tree(**sections))
    assert str(err.value) == message


def test_cli_refuses_a_bad_attack_with_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(attack={"kind": "sign_flip", "attackers": 9})))
    out = subprocess.run([sys.executable, "-m", "fedlora.cli", "run", str(path), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "config error: attack.attackers: 9 of federation.num_clients=4 clients"
    assert not (tmp_path / "run").exists()


def test_the_pipeline_places_the_attack_outside_the_defences():
    cfg = SimpleNamespace(aggregation=AggregationConfig(), attack=AttackConfig(kind="under_bound", attackers=2),
                          seed=0, federation=SimpleNamespace(num_clients=4))
    algo = build_pipeline(Scripted("fedit", TRAINED), cfg)
    assert isinstance(algo, UploadAttack) and isinstance(algo.inner, NormBound)
    assert algo.attackers == choose_attackers(4, 2, 0) and algo.bound == 10.0
    cfg.aggregation = AggregationConfig(norm_bound=3.0)
    assert build_pipeline(Scripted("fedit", TRAINED), cfg).bound == 3.0  # aims under the server's bound
    cfg.aggregation = AggregationConfig(norm_bound=None)
    assert build_pipeline(Scripted("fedit", TRAINED), cfg).bound == 10.0


# -- end to end, both runtimes ---------------------------------------------------------------------

def test_a_run_without_defences_is_the_method_alone_bit_for_bit(data_dir, tmp_path, monkeypatch):
    """The default pipeline (norm bound, mean) ends where the bare method does when nobody is an
    outlier: the wrapping itself changes no number (main's code was compared the same way: all
    seven methods, with and without the norm bound, gave identical final states and merges)."""
    from safetensors.torch import load_file

    from fedlora.runtime import inprocess
    from fedlora.runtime.inprocess import Simulation

    tree = tiny_tree(algorithm={"name": "aflora", "server_steps": 1}, threads=1, federation={"rounds": 2})
    Simulation(build_config(tree), tmp_path / "pipeline", progress=False).run()
    monkeypatch.setattr(inprocess, "build_pipeline", lambda method, cfg: method)
    Simulation(build_config(tree), tmp_path / "bare", progress=False).run()
    a, b = (load_file(str(tmp_path / d / "final_state.safetensors")) for d in ("pipeline", "bare"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_flower_clientapp_applies_the_attack_as_the_inprocess_runtime_does(data_dir, tmp_path, monkeypatch,
                                                                                fast_builds):
    """The attack wraps client_train, so the ClientApp (which builds the same pipeline) sends the
    attacked upload: the Flower run ends where the in-process one does, and its records name the
    attacker the seeded choice picked."""
    from test_flower import _run_both_and_compare, _tree

    tree = {**_tree("fedit"), "attack": {"kind": "sign_flip", "attackers": 1},
            "aggregation": {"norm_bound": None, "combine": "median"}}
    flower, inprocess = _run_both_and_compare(tree, tmp_path, monkeypatch)
    (attacker,) = choose_attackers(3, 1, seed=0)
    for records in (flower, inprocess):
        for record in records:
            assert [c["id"] for c in record["clients"] if c.get("attacker")] == [attacker]
