"""Differential privacy (fedlora.privacy): clipping per method, noise of the right size added
after clipping, ε from dp-accounting's own functions, target_epsilon across resume, DP-SGD's
per-example clipping, and one-line refusals of undefined configs."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_tree
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from safetensors.torch import load_file

from fedlora.algorithms.base import Update, weighted_sum
from fedlora.cli import main
from fedlora.config import ConfigError, build_config
from fedlora.privacy.accountant import calibrate, epsilon, step_event
from fedlora.privacy.budget import Budget, default_delta, participations, plan_budget
from fedlora.aggregation.privacy import ClientLevelDP, PrivacyStage, SampleLevelDP, privacy_wrapper
from fedlora.algorithms.aflora import AFLoRA, AFLoRAOptions
from fedlora.algorithms.base import FederationSetup, Message
from fedlora.algorithms.fedit import FedIT, FedITOptions
from fedlora.algorithms.ffa import FFALoRA, FFALoRAOptions
from fedlora.privacy.client_level import (
    clip_upload,
    delta_noise_multiplier,
    next_clip_norm,
    noise_generator,
    noisy_weighted_sum,
)
from fedlora.privacy.dpsgd import SampleDP, clipped_sum, dp_train_steps, noised_mean, private_batches
from fedlora.privacy.uploads import CLIENT_LEVEL, by_rank, clip_factor, deltas, joint_norm
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import read_metrics
from fedlora.train import train_steps


def _std_within(sample: torch.Tensor, expected: float, tolerance_se: float = 5.0) -> None:
    """The sample's mean is 0 and its standard deviation `expected`, each within 5 standard
    errors (the std's standard error is about std / √(2n))."""
    n = sample.numel()
    x = sample.double().flatten()
    assert abs(float(x.mean())) < tolerance_se * expected / math.sqrt(n)
    assert abs(float(x.std()) - expected) < tolerance_se * expected / math.sqrt(2 * n)


# ---------------------------------------------------------------- noise and clipping

def test_server_noise_has_sigma_c_times_the_largest_weight():
    zeros = [torch.zeros(300, 400) for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    out = noisy_weighted_sum(zeros, weights, 1.7 * 0.8, noise_generator(0, 1))
    _std_within(out, 1.7 * 0.8 * 0.5)


def test_server_noise_is_added_to_the_weighted_sum():
    tensors = [torch.full((200, 500), 1.0), torch.full((200, 500), 3.0)]
    out = noisy_weighted_sum(tensors, [0.75, 0.25], 0.1, noise_generator(0, 2))
    _std_within(out - 1.5, 0.1 * 0.75)


SETUP = FederationSetup(module_shapes={"q": (30, 40), "v": (20, 40)}, client_max_ranks=[4, 4, 2, 2],
                        num_examples=[10, 20, 30, 40], scaling=1.0, seed=0)


class Fixed(FFALoRA):
    """FFA-LoRA whose client 'trains' to a given upload (B = the global B + k + 1)."""

    def client_train(self, ctx, payload, client_state):
        k = ctx.client_id
        return Update(k, {key: t + (k + 1) for key, t in payload.tensors.items()}, 10, {}), client_state


class Ctx:
    def __init__(self, k):
        self.client_id = k


def _wrapped(method, sigma: float, clip: float, on_client: bool = False, round_: int = 1) -> ClientLevelDP:
    wrapper = ClientLevelDP(method, seed=0, on_client=on_client, planned_clients=4)
    wrapper.settings.noise_multiplier, wrapper.settings.clip_norm, wrapper.settings.round_ = sigma, clip, round_
    return wrapper


def test_client_noise_is_its_share_and_the_equal_mean_carries_the_full_noise():
    m, sigma, clip = 4, 1.3, 0.5
    wrapper = _wrapped(Fixed(FFALoRAOptions(rank=2), SETUP), sigma, clip, on_client=True)
    state = wrapper.init_state()
    ups = [wrapper.client_train(Ctx(k), wrapper.payload(state, k), {})[0] for k in range(m)]
    noise = [torch.cat([u.tensors[k].flatten() for k in sorted(state)]) for u in ups]
    _std_within(noise[0] - noise[0].mean(), sigma * clip / math.sqrt(m), 6.0)  # B's 100 coords: the delta is (k+1)·1
    assert all(u.metrics["dp_unclipped"] == 0.0 for u in ups)
    assert not torch.equal(noise[0], noise[1])  # each client its own draw
    agg = wrapper.aggregate(state, ups, None)
    expected = weighted_sum([u.tensors["q.B"] for u in ups], [0.25] * 4)
    assert torch.allclose(agg.state["q.B"], expected, atol=1e-6)  # equal weights, nothing added
    assert wrapper.unclipped == (0, 4)


def test_client_side_noise_is_the_clients_own_seeded_draw_and_its_state_passes_through():
    class Keeps(Fixed):
        def client_train(self, ctx, payload, client_state):
            update, _ = super().client_train(ctx, payload, client_state)
            return update, client_state

    wrapper = _wrapped(Keeps(FFALoRAOptions(rank=2), SETUP), 1.3, 0.5, on_client=True, round_=3)
    state = wrapper.init_state()
    mine = {"q.lam": torch.ones(2)}
    update, kept = wrapper.client_train(Ctx(2), wrapper.payload(state, 2), mine)
    assert kept is mine
    plain = Update(2, {key: t + 3 for key, t in state.items()}, 10, {})
    expected = clip_upload(CLIENT_LEVEL["ffa"], state, plain, 0.5, 1.3 * 0.5 / 2, noise_generator(0, 3, 2))
    assert all(torch.equal(update.tensors[k], expected.update.tensors[k]) for k in state)


def test_client_noise_draws_sum_to_sigma_c_over_m():
    g = noise_generator(0, 1, 0)
    shares = [clip_upload(CLIENT_LEVEL["ffa"], {"q.B": torch.zeros(200, 300)}, Update(k, {"q.B": torch.zeros(200, 300)},
                                                                                      1, {}), 1.0, 2.0 / 2, g)
              for k in range(4)]
    mean = weighted_sum([c.update.tensors["q.B"] for c in shares], [0.25] * 4)
    _std_within(mean, 2.0 / 4)


def test_server_side_stage_is_the_methods_sum_of_clipped_uploads_plus_noise():
    """FedIT, FFA-LoRA and AFLoRA: without noise the stage's aggregate is the method's own of the
    clipped uploads; with noise the difference has σ C max_k p_k per coordinate."""
    fedit = FedIT(FedITOptions(rank=2), SETUP)
    state = fedit.init_state()
    ups = [Update(k, {key: t + 0.01 * (k + 1) for key, t in state.items()}, SETUP.num_examples[k], {})
           for k in range(4)]
    big = _wrapped(fedit, 0.0, 1e6).aggregate(state, ups, None)
    assert all(torch.allclose(big.state[k], fedit.aggregate(state, ups, None).state[k], atol=1e-6) for k in state)
    assert "client_weight" not in big.metrics
    small = _wrapped(fedit, 0.0, 0.2)  # delta norms 0.161 (k + 1): only client 0's is within C
    clipped = [clip_upload(CLIENT_LEVEL["fedit"], state, u, 0.2).update for u in ups]
    out = small.aggregate(state, ups, None)
    assert all(torch.allclose(out.state[k], fedit.aggregate(state, clipped, None).state[k], atol=1e-6) for k in state)
    assert small.unclipped == (1, 4)
    noisy = _wrapped(fedit, 3.0, 0.2).aggregate(state, ups, None)
    diff = torch.cat([(noisy.state[k] - out.state[k]).flatten() for k in sorted(state)])
    _std_within(diff, 3.0 * 0.2 * 0.4, 6.0)  # p_max = 40 / 100

    aflora = AFLoRA(AFLoRAOptions(ddr=False, dlf=False), SETUP)
    a_state = aflora.init_state()
    a_ups = [Update(k, {"q.B": torch.full((30, r), 0.1), "q.mask": torch.ones(r),
                        "v.B": torch.full((20, r), 0.1), "v.mask": torch.ones(r)}, SETUP.num_examples[k], {})
             for k, r in enumerate(SETUP.client_max_ranks)]
    plain = aflora.aggregate(a_state, a_ups, None)
    quiet = _wrapped(aflora, 0.0, 1e6).aggregate(a_state, a_ups, None)
    assert torch.allclose(quiet.state["q.B"], plain.state["q.B"], atol=1e-6)
    p = by_rank(aflora, a_ups)
    raw = [math.log1p(r) * n for r, n in zip(SETUP.client_max_ranks, SETUP.num_examples)]
    assert p == pytest.approx([w / sum(raw) for w in raw])
    loud = _wrapped(aflora, 2.0, 1e6).aggregate(a_state, a_ups, None)
    diff = torch.cat([(loud.state[k] - plain.state[k]).flatten() for k in ("q.B", "v.B")])
    _std_within(diff, 2.0 * 1e6 * max(p), 6.0)
    assert torch.equal(loud.merge["q"][1], plain.merge["q"][1])  # A untouched (no public data here)


def test_noise_is_added_after_clipping():
    """A delta of norm 1000 clipped to C = 1, then noised: the mean over draws is the clipped
    delta (noise before clipping would leave a norm ≤ C; no clipping would average to 1000)."""
    spec = CLIENT_LEVEL["ffa"]
    ref = {"m.B": torch.ones(4, 2)}
    delta = torch.zeros(4, 2)
    delta[0, 0] = 1000.0
    upload = Update(0, {"m.B": ref["m.B"] + delta}, 5, {})
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([clip_upload(spec, ref, upload, 1.0, 2.0, g).update.tensors["m.B"] - ref["m.B"]
                         for _ in range(4000)])
    assert float(draws.norm(dim=(1, 2)).min()) > 1.0  # noise on top of the clipped delta
    expected = torch.zeros(4, 2)
    expected[0, 0] = 1.0
    assert torch.allclose(draws.mean(0), expected, atol=5 * 2.0 / math.sqrt(4000))
    _std_within(draws - expected, 2.0)


def test_fedit_clips_a_and_b_jointly_against_what_it_received():
    payload = {"q.A": torch.ones(2, 3), "q.B": torch.zeros(4, 2)}
    upload = Update(0, {"q.A": torch.ones(2, 3) + 3.0, "q.B": torch.full((4, 2), 4.0)}, 5, {})
    out = clip_upload(CLIENT_LEVEL["fedit"], payload, upload, 2.0)
    norm = math.sqrt(6 * 9 + 8 * 16)
    assert out.norm == pytest.approx(norm) and not out.unclipped
    assert torch.allclose(out.update.tensors["q.A"], torch.ones(2, 3) + 3.0 * 2.0 / norm)
    assert torch.allclose(out.update.tensors["q.B"], torch.full((4, 2), 4.0 * 2.0 / norm))


def test_a_delta_inside_the_ball_is_untouched():
    payload = {"q.B": torch.zeros(2, 2)}
    upload = Update(0, {"q.B": torch.full((2, 2), 0.5)}, 5, {})
    out = clip_upload(CLIENT_LEVEL["ffa"], payload, upload, 1.0)
    assert out.unclipped and out.norm == pytest.approx(1.0)
    assert torch.equal(out.update.tensors["q.B"], upload.tensors["q.B"])
    assert clip_factor(1.0, 1.0) == 1.0 and clip_factor(4.0, 1.0) == 0.25


def test_aflora_clips_b_lambda_from_zero_and_leaves_the_mask():
    mask = torch.tensor([1.0, 0.0, 1.0])
    upload = Update(0, {"q.B": torch.full((2, 2), 3.0), "q.mask": mask}, 5, {})
    payload = {"q.A": torch.ones(3, 5), "q.merge.B": torch.ones(2, 8)}
    out = clip_upload(CLIENT_LEVEL["aflora"], payload, upload, 3.0)
    assert out.norm == pytest.approx(6.0)
    assert torch.allclose(out.update.tensors["q.B"], torch.full((2, 2), 1.5))
    assert torch.equal(out.update.tensors["q.mask"], mask)


def test_the_2025_methods_clip_the_factor_they_upload_against_what_they_received():
    payload = {"q.A": torch.ones(2, 3), "q.B": torch.zeros(4, 2)}
    rolora_a_round = Update(0, {"q.A": torch.ones(2, 3) + 3.0}, 5, {})  # RoLoRA uploads only A this round
    out = clip_upload(CLIENT_LEVEL["rolora"], payload, rolora_a_round, 1.0)
    assert out.norm == pytest.approx(3.0 * math.sqrt(6)) and set(out.update.tensors) == {"q.A"}
    assert torch.allclose(out.update.tensors["q.A"], torch.ones(2, 3) + 1 / math.sqrt(6))
    rolora_b_round = {"q.B": torch.full((4, 2), 2.0)}
    assert joint_norm(deltas(CLIENT_LEVEL["rolora"], payload, rolora_b_round)) == pytest.approx(2.0 * math.sqrt(8))
    assert set(deltas(CLIENT_LEVEL["fedsa"], payload, {"q.A": torch.ones(2, 3) * 2})) == {"q.A"}
    assert joint_norm(deltas(CLIENT_LEVEL["fedsa"], payload, {"q.A": torch.ones(2, 3) * 2})) == pytest.approx(math.sqrt(6))
    assert set(deltas(CLIENT_LEVEL["fedsvd"], payload, {"q.B": torch.ones(4, 2), "q.A": torch.ones(2, 3)})) == {"q.B"}
    svd = deltas(CLIENT_LEVEL["fedsvd"], {"q.B": torch.ones(4, 2)}, {"q.B": torch.full((4, 2), 3.0)})
    assert joint_norm(svd) == pytest.approx(2.0 * math.sqrt(8))  # against the B it received, not zero


def test_every_method_either_defines_client_level_dp_or_says_why_not():
    from fedlora.algorithms import ALGORITHMS
    from fedlora.privacy.uploads import UNDEFINED

    assert set(CLIENT_LEVEL) | set(UNDEFINED) == set(ALGORITHMS) and not set(CLIENT_LEVEL) & set(UNDEFINED)


def test_fedsvd_under_dp_refactorises_the_noised_sum_of_clipped_b():
    """The stage hands FedSVD Σ p_k clip(B_k) + N; its SVD keeps the product, so
    B_new A_new = (B̄ + N) A_old, and N recovered through A_old has σ C max_k p_k per coordinate."""
    from fedlora.algorithms.fedsvd import FedSVD, FedSVDOptions

    fedsvd = FedSVD(FedSVDOptions(), SETUP)
    state = fedsvd.init_state()
    ups = [Update(k, {key: t + 0.01 * (k + 1) for key, t in state.items() if key.endswith(".B")},
                  SETUP.num_examples[k], {}) for k in range(4)]
    clipped = [clip_upload(CLIENT_LEVEL["fedsvd"], state, u, 0.05).update for u in ups]
    out = _wrapped(fedsvd, 0.0, 0.05).aggregate(state, ups, None)
    plain = fedsvd.aggregate(state, clipped, None)
    assert all(torch.allclose(out.state[k], plain.state[k], atol=1e-6) for k in state)
    noisy = _wrapped(fedsvd, 2.0, 0.05).aggregate(state, ups, None)
    noise = []
    for name in SETUP.module_shapes:
        A = state[f"{name}.A"].double()
        moved = (noisy.state[f"{name}.B"].double() @ noisy.state[f"{name}.A"].double()
                 - out.state[f"{name}.B"].double() @ out.state[f"{name}.A"].double())
        noise.append((moved @ A.t() @ torch.linalg.inv(A @ A.t())).flatten())
    _std_within(torch.cat(noise), 2.0 * 0.05 * 0.4, 6.0)  # p_max = 40 / 100


def test_ffa_clips_only_b():
    payload = {"q.B": torch.zeros(2, 2)}
    d = deltas(CLIENT_LEVEL["ffa"], payload, {"q.B": torch.ones(2, 2), "q.A": torch.ones(2, 2) * 9})
    assert set(d) == {"q.B"} and joint_norm(d) == pytest.approx(2.0)


def test_adaptive_clipping_follows_andrew_et_al():
    assert delta_noise_multiplier(1.0, None) == 1.0
    assert delta_noise_multiplier(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    with pytest.raises(ValueError, match="count_noise"):
        delta_noise_multiplier(2.0, 1.0)
    g = torch.Generator().manual_seed(0)
    nxt, share = next_clip_norm(2.0, 3, 4, 1e-9, 0.5, 0.2, g)
    assert share == pytest.approx(0.75) and nxt == pytest.approx(2.0 * math.exp(-0.2 * 0.25))
    draws = torch.tensor([next_clip_norm(1.0, 2, 4, 0.8, 0.5, 0.2, g)[1] for _ in range(20000)])
    _std_within(draws - 0.5, 0.8 / 4)


# ---------------------------------------------------------------- the accountant

@pytest.mark.parametrize("sigma, steps", [(0.8, 1), (1.1, 20), (3.0, 100)])
def test_epsilon_of_full_participation_is_the_librarys_gaussian_composition(sigma, steps):
    acc = RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), steps)
    assert epsilon(10, 10, sigma, steps, 1e-3) == acc.get_epsilon(1e-3)


def test_epsilon_by_pld_is_the_librarys():
    pld = PLDAccountant()
    pld.compose(dp_event.GaussianDpEvent(2.0), 3)
    assert epsilon(10, 10, 2.0, 3, 1e-3, "pld") == pld.get_epsilon(1e-3)


@pytest.mark.parametrize("population, sample, sigma, steps", [(100, 10, 1.0, 5), (50, 8, 2.0, 30)])
def test_epsilon_of_a_fixed_size_draw_is_the_librarys_replace_one_event(population, sample, sigma, steps):
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_event.SampledWithoutReplacementDpEvent(population, sample, dp_event.GaussianDpEvent(sigma / 2)), steps)
    assert epsilon(population, sample, sigma, steps, 1e-5) == acc.get_epsilon(1e-5)
    assert step_event(population, sample, sigma)[1] is NeighboringRelation.REPLACE_ONE


def test_epsilon_edges():
    assert epsilon(10, 10, 1.0, 0, 0.1) == 0.0
    assert epsilon(10, 10, 0.0, 3, 0.1) == math.inf
    assert epsilon(10, 10, 1.0, 4, 0.1) > epsilon(10, 10, 1.0, 3, 0.1) > epsilon(10, 10, 2.0, 3, 0.1)
    with pytest.raises(ValueError):
        step_event(5, 6, 1.0)
    with pytest.raises(ValueError):
        step_event(5, 0, 1.0)


@pytest.mark.parametrize("target", [8.0, 2.0])
def test_calibration_is_the_smallest_sigma_within_the_target(target):
    sigma = calibrate(10, 10, 5, target, 0.1)
    assert epsilon(10, 10, sigma, 5, 0.1) <= target
    assert epsilon(10, 10, sigma - 1e-3, 5, 0.1) > target


def _budget(**kw) -> Budget:
    args = dict(mode="client", noise_multiplier=1.0, delta=0.1, target_epsilon=None, accountant="rdp",
                populations=[10], sample=10, steps_per_round=1, planned_rounds=3)
    return Budget(**{**args, **kw})


def test_budget_refuses_rounds_beyond_the_target_naming_the_calibration():
    b = _budget(noise_multiplier=calibrate(10, 10, 3, 4.0, 0.1), target_epsilon=4.0)
    b.check(3)
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon: 4 rounds would spend ε = .*calibrated for 3"):
        b.check(4)
    _budget().check(1000)  # no target: nothing to refuse


def test_sample_level_record_is_per_client_and_the_worst_is_the_smallest_every_round():
    b = _budget(mode="sample", populations=[40, 20, 40], sample=4, steps_per_round=2)
    history = [{"clients": [{"id": 0}], "rejected": [{"client": 1, "reason": "x"}],
                "privacy_client_epsilon": {"0": 9.0, "1": 9.0}}]
    assert participations(history, 0) == 1 and participations(history, 1) == 1 and participations(history, 2) == 0
    rec = b.record(2, history, [1, 2])
    assert rec["client_epsilon"]["0"] == 9.0  # not in this round: last value kept
    assert rec["client_epsilon"]["1"] == epsilon(20, 4, 1.0, 4, 0.1)
    assert rec["client_epsilon"]["2"] == epsilon(40, 4, 1.0, 2, 0.1)
    assert rec["epsilon"] == max(rec["client_epsilon"].values())
    assert b.worst_epsilon(2) == epsilon(20, 4, 1.0, 4, 0.1)
    assert _budget().record(3, [], [0])["epsilon"] == epsilon(10, 10, 1.0, 3, 0.1)
    assert default_delta("client", 10, [5, 7]) == 0.1 and default_delta("sample", 10, [5, 7]) == 0.2


# ---------------------------------------------------------------- DP-SGD

def test_clipped_sum_clips_each_example_jointly():
    per_example = [[torch.tensor([3.0]), torch.tensor([4.0])], [torch.tensor([0.3]), torch.tensor([0.4])]]
    a, b = clipped_sum(per_example, 1.0)
    assert float(a) == pytest.approx(0.6 + 0.3) and float(b) == pytest.approx(0.8 + 0.4)


def test_dp_sgd_noise_has_sigma_c_over_the_batch():
    out = noised_mean([torch.zeros(400, 500)], 8, 0.5, 1.5, torch.Generator().manual_seed(1))[0]
    _std_within(out, 1.5 * 0.5 / 8)


def _toy_steps(private: bool, dtype: str = "float32", sigma: float = 1e-12, clip: float = 1e4, seed: int = 0,
               regularised: bool = False):
    """Two SGD steps of a linear model on batches of 6 (an unused parameter too), privately or not;
    (the weights after, the unused parameter after, the losses)."""
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randn(6, 3), "target": torch.randn(6)} for _ in range(2)]
    w, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    loss = lambda b: ((b["input_ids"] @ w - b["target"]) ** 2).mean()  # noqa: E731
    reg = (lambda: (w**2).sum() * 0.5) if regularised else None
    groups = [([w, unused], 0.1, "sgd")]
    if private:
        losses = dp_train_steps(groups, batches, loss, SampleDP(clip, sigma, torch.Generator().manual_seed(seed)),
                                reg, dtype)
    else:
        losses = train_steps(groups, batches, loss, reg, dtype)
    return w.detach(), unused.detach(), losses


@pytest.mark.parametrize("dtype, regularised", [("float32", False), ("float32", True), ("bfloat16", False)])
def test_dp_sgd_without_clipping_or_noise_is_the_batch_gradient_step(dtype, regularised):
    """C large and σ tiny: the mean of per-example gradients is the batch's mean gradient (plus
    the regulariser's, unclipped), so SGD steps and reported losses equal the non-private ones;
    a parameter the loss does not use gets no step."""
    w, unused, losses = _toy_steps(True, dtype, regularised=regularised)
    w0, unused0, losses0 = _toy_steps(False, dtype, regularised=regularised)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert torch.allclose(w, w0, atol=tol) and torch.allclose(unused, unused0, atol=1e-6)
    assert losses == pytest.approx(losses0, abs=tol)


def test_dp_sgd_clips_each_example_and_draws_its_noise_from_the_given_generator():
    clipped, _, _ = _toy_steps(True, clip=1e-3)
    free, _, _ = _toy_steps(True)
    step = torch.ones(3) - clipped
    assert float(step.norm()) <= 2 * 0.1 * 1e-3 + 1e-7 < float((torch.ones(3) - free).norm())  # 2 steps of ≤ lr·C
    a, b, c = (_toy_steps(True, sigma=5.0, seed=s)[0] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_private_batches_are_fresh_draws_of_distinct_examples():
    from fedlora.data.encode import Encoded

    examples = [Encoded(input_ids=[i + 5, 7], target=i % 2) for i in range(10)]
    import numpy as np
    batches = private_batches(examples, 4, 30, np.random.SeedSequence(0), 0)
    firsts = [b["input_ids"][:, 0].tolist() for b in batches]
    assert all(len(set(f)) == 4 for f in firsts)
    assert len({tuple(sorted(f)) for f in firsts}) > 5  # not one walk through a fixed order
    again = private_batches(examples, 4, 30, np.random.SeedSequence(0), 0)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again))


# ---------------------------------------------------------------- configs: one line each

@pytest.mark.parametrize("algorithm, privacy, extra, needle", [
    ({"name": "flexlora"}, {"mode": "client", "noise_multiplier": 1}, {}, "undefined for flexlora"),
    ({"name": "flora"}, {"mode": "client", "noise_multiplier": 1}, {}, "undefined for flora"),
    ({"name": "hetlora"}, {"mode": "client", "noise_multiplier": 1}, {}, "undefined for hetlora"),
    ({"name": "fedex"}, {"mode": "client", "noise_multiplier": 1}, {}, "undefined for fedex"),
    ({"name": "fedsa", "global_b": "mean"}, {"mode": "client", "noise_multiplier": 1}, {},
     "set algorithm.global_b: none"),
    ({"name": "aflora"}, {"mode": "client", "noise_multiplier": 1}, {}, "set algorithm.ddr: false"),
    ({"name": "aflora", "ddr": False}, {"mode": "client", "noise_multiplier": 1, "noise": "client"}, {},
     "use noise: server"),
    ({"name": "fedit"}, {"mode": "client", "noise_multiplier": 1, "noise": "client"}, {},
     "aggregation.norm_bound: null"),
    ({"name": "fedit"}, {"mode": "client", "noise_multiplier": 1}, {"aggregation": {"combine": "median"}},
     "not aggregation.combine median"),
    ({"name": "fedit"}, {"mode": "none", "target_epsilon": 2}, {}, "privacy.target_epsilon: set, but"),
    ({"name": "fedit"}, {"mode": "client"}, {}, "exactly one of noise_multiplier and target_epsilon"),
    ({"name": "fedit"}, {"mode": "client", "noise_multiplier": 1, "target_epsilon": 2}, {}, "exactly one"),
    ({"name": "fedit"}, {"mode": "sample", "noise_multiplier": 1, "clipping": "adaptive"}, {},
     "privacy.clipping: only for mode client"),
    ({"name": "fedit"}, {"mode": "client", "noise_multiplier": 1, "clip_lr": 0.1}, {},
     "privacy.clip_lr: only for clipping adaptive"),
    ({"name": "fedit"}, {"mode": "client", "noise_multiplier": 1, "accountant": "pld"},
     {"federation": {"fraction": 0.5}}, "pld does not account for sampling"),
    ({"name": "fedit"}, {"mode": "sample", "noise_multiplier": 1, "accountant": "pld"}, {}, "use rdp"),
    ({"name": "fedit"}, {"mode": "client", "noise_multiplier": 0}, {}, "privacy.noise_multiplier"),
    ({"name": "fedit"}, {"mode": "client", "target_epsilon": -1}, {}, "privacy.target_epsilon"),
    ({"name": "fedit"}, {"mode": "client", "noise_multiplier": 1, "delta": 1.5}, {}, "privacy.delta"),
    ({"name": "fedit"}, {"mode": "laplace"}, {}, "privacy.mode"),
    ({"name": "fedit"}, {"mode": "client", "noise_multiplier": 1, "epsilon": 3}, {}, "privacy.epsilon: unknown key"),
])
def test_bad_privacy_configs_are_one_line(algorithm, privacy, extra, needle):
    tree = tiny_tree(algorithm=algorithm, privacy=privacy, **extra)
    with pytest.raises(ConfigError) as err:
        build_config(tree)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and msg.startswith("config error: "), msg


@pytest.mark.parametrize("algorithm, privacy", [
    ({"name": "fedit"}, {"mode": "client", "target_epsilon": 2}),
    ({"name": "ffa"}, {"mode": "client", "noise_multiplier": 1, "clipping": "adaptive", "clip_lr": 0.1}),
    ({"name": "aflora", "ddr": False}, {"mode": "client", "noise_multiplier": 1, "accountant": "pld"}),
    ({"name": "hetlora"}, {"mode": "sample", "noise_multiplier": 1}),
    ({"name": "fedsvd"}, {"mode": "client", "target_epsilon": 2}),
    ({"name": "rolora"}, {"mode": "client", "noise_multiplier": 1}),
    ({"name": "fedsa"}, {"mode": "client", "noise_multiplier": 1}),
    ({"name": "fedsa", "global_b": "mean"}, {"mode": "sample", "noise_multiplier": 1}),
    ({"name": "fedit"}, {"mode": "none"}),
])
def test_defined_privacy_configs_pass(algorithm, privacy):
    assert build_config(tiny_tree(algorithm=algorithm, privacy=privacy)).privacy.mode == privacy["mode"]


def test_client_noise_without_norm_bound_is_defined():
    cfg = build_config(tiny_tree(algorithm={"name": "fedit"}, aggregation={"norm_bound": None},
                                 privacy={"mode": "client", "noise_multiplier": 1, "noise": "client"}))
    assert cfg.privacy.noise == "client"


def test_sample_level_needs_batches_no_larger_than_a_client():
    cfg = build_config(tiny_tree(algorithm={"name": "fedit"}, privacy={"mode": "sample", "noise_multiplier": 1}))
    with pytest.raises(ConfigError, match="smallest client has 3, batch_size is 4"):
        plan_budget(cfg, [10, 3, 20, 20], 4, [])


@pytest.mark.parametrize("sigma", ["nan", True, 0, -1.0, float("inf"), None])
def test_a_damaged_privacy_record_is_refused_before_training(sigma):
    cfg = build_config(tiny_tree(algorithm={"name": "fedit"}, privacy={"mode": "client", "noise_multiplier": 1}))
    history = [{"privacy_noise_multiplier": sigma, "privacy_planned_rounds": 2}, {"privacy_epsilon": 1.0}]
    if sigma is None:  # no σ recorded at all: the configured one
        assert plan_budget(cfg, [10] * 4, 4, history).noise_multiplier == 1
        return
    with pytest.raises(ConfigError, match="^config error: metrics of the run: its privacy record has no valid "
                                          "noise_multiplier and planned_rounds; cannot resume its accounting$"):
        plan_budget(cfg, [10] * 4, 4, history)


def test_the_recorded_sigma_and_plan_are_kept_when_a_run_goes_on():
    cfg = build_config(tiny_tree(algorithm={"name": "fedit"}, privacy={"mode": "client", "noise_multiplier": 1}))
    assert plan_budget(cfg, [10] * 4, 4, [{"privacy_noise_multiplier": 0.8}]).noise_multiplier == 0.8
    target = build_config(tiny_tree(algorithm={"name": "fedit"}, privacy={"mode": "client", "target_epsilon": 50}))
    history = [{"privacy_noise_multiplier": 0.9, "privacy_planned_rounds": 1}]
    b = plan_budget(target, [10] * 4, 4, history)
    assert (b.noise_multiplier, b.planned_rounds, b.target_epsilon) == (0.9, 1, 50)
    with pytest.raises(ConfigError, match="no valid"):
        plan_budget(target, [10] * 4, 4, [{"privacy_noise_multiplier": 0.9, "privacy_planned_rounds": 0}])
    with pytest.raises(ConfigError, match="no valid"):
        plan_budget(target, [10] * 4, 4, [{"privacy_noise_multiplier": 0.9, "privacy_planned_rounds": 1.5}])


# ---------------------------------------------------------------- end to end (tiny model)

DP_TREE = tiny_tree(algorithm={"name": "fedit"}, federation={"rounds": 2},
                    privacy={"mode": "client", "target_epsilon": 4.0})


@pytest.fixture(scope="module")
def private_run(tmp_path_factory) -> Path:
    if not Path(DP_TREE["data"]["data_dir"]).exists():
        pytest.skip("shared data not found")
    run_dir = tmp_path_factory.mktemp("dp") / "run"
    Simulation(build_config(DP_TREE), run_dir, progress=False).run()
    return run_dir


def test_epsilon_is_recorded_every_round_and_stays_within_the_target(private_run):
    history = read_metrics(private_run)
    sigma = history[0]["privacy_noise_multiplier"]
    assert sigma == calibrate(4, 4, 2, 4.0, 0.25)
    for t, record in enumerate(history, 1):
        assert record["privacy_epsilon"] == epsilon(4, 4, sigma, t, 0.25)
        assert record["privacy_delta"] == 0.25 and "client_weight" not in record
    assert history[-1]["privacy_epsilon"] <= 4.0
    from fedlora.runtime.outputs import read_summary
    summary = read_summary(private_run)  # what `fedlora report` lists
    assert (summary["privacy_epsilon"], summary["privacy_delta"]) == (history[-1]["privacy_epsilon"], 0.25)


def test_a_resume_with_more_rounds_beyond_the_target_stops_before_training(private_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(private_run, run)
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["run", "--quiet", "--resume", str(run), "--set", "federation.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "privacy.target_epsilon: 3 rounds would spend" in err
    assert "calibrated for 2" in err
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_resumed_private_run_equals_an_uninterrupted_one(tmp_path):
    """σ fixed, adaptive clipping (state carried in the records), noise on the server: one round,
    then a resume to two, equals two rounds at once (state, ε, C)."""
    tree = tiny_tree(algorithm={"name": "aflora", "server_steps": 1, "ddr": False}, federation={"rounds": 1},
                     privacy={"mode": "client", "noise_multiplier": 0.7, "clipping": "adaptive"})
    if not Path(tree["data"]["data_dir"]).exists():
        pytest.skip("shared data not found")
    Simulation(build_config(tree), tmp_path / "a", progress=False).run()
    assert main(["run", "--quiet", "--resume", str(tmp_path / "a"), "--set", "federation.rounds=2"]) == 0
    tree["federation"]["rounds"] = 2
    Simulation(build_config(tree), tmp_path / "b", progress=False).run()
    a, b = (load_file(tmp_path / r / "final_state.safetensors") for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = ([{k: v for k, v in r.items() if k.startswith("privacy_")} for r in read_metrics(tmp_path / d)]
              for d in "ab")
    assert pa == pb and pa[1]["privacy_clip_norm"] == pa[0]["privacy_next_clip_norm"] != pa[0]["privacy_clip_norm"]


# ---------------------------------------------------------------- the run's stage (no model)

def _stage(privacy: dict, algorithm: dict | None = None, **sections):
    from fedlora.aggregation import build_pipeline
    from fedlora.algorithms import build_algorithm
    cfg = build_config(tiny_tree(algorithm=algorithm or {"name": "ffa"}, privacy=privacy, **sections))
    setup = FederationSetup(module_shapes={"q": (6, 8)}, client_max_ranks=list(cfg.federation.client_max_ranks),
                            num_examples=[30, 20, 40, 10], scaling=1.0, seed=0)
    pipeline = build_pipeline(build_algorithm(cfg.algorithm, setup), cfg)
    return PrivacyStage.build(cfg, pipeline, 4, []), pipeline


def test_stage_of_each_mode():
    none, pipe = _stage({"mode": "none"})
    assert none is None and privacy_wrapper(pipe) is None
    fixed, pipe = _stage({"mode": "client", "noise_multiplier": 1.5})
    pipe = privacy_wrapper(pipe)  # inside the norm bound
    assert isinstance(pipe, ClientLevelDP) and fixed.wrapper is pipe and not pipe.on_client
    assert pipe.settings.noise_multiplier == 1.5 and fixed.count_noise is None and not fixed.sample_level
    adaptive, pipe = _stage({"mode": "client", "noise_multiplier": 1.5, "clipping": "adaptive"})
    assert adaptive.count_noise == 1.5  # max(4 / 20, σ)
    assert adaptive.wrapper.settings.noise_multiplier == pytest.approx(delta_noise_multiplier(1.5, 1.5))
    assert _stage({"mode": "client", "noise_multiplier": 0.1, "clipping": "adaptive"})[0].count_noise == pytest.approx(0.2)
    assert _stage({"mode": "client", "noise_multiplier": 1, "clipping": "adaptive", "count_noise": 3})[0].count_noise == 3
    client, pipe = _stage({"mode": "client", "noise_multiplier": 1, "noise": "client"}, aggregation={"norm_bound": None})
    assert isinstance(pipe, ClientLevelDP) and pipe.on_client and pipe.planned_clients == 4
    from fedlora.aggregation import stage_names
    assert stage_names(pipe) == ["client-level DP (client noise)"]
    assert stage_names(_stage({"mode": "client", "noise_multiplier": 1})[1])[-1] == "client-level DP (server noise)"
    assert stage_names(_stage({"mode": "sample", "noise_multiplier": 1})[1])[-1] == "sample-level DP (DP-SGD)"
    sample, pipe = _stage({"mode": "sample", "noise_multiplier": 0.9, "clip_norm": 0.3})
    assert isinstance(pipe.inner, SampleLevelDP) and sample.sample_level and privacy_wrapper(pipe) is pipe.inner
    assert sample.budget.populations == [30, 20, 40, 10] and sample.budget.sample == 4
    assert sample.budget.steps_per_round == 2 and sample.budget.delta == 0.1
    sample.start_round(2, [])
    ctx = Ctx(1)

    class Inner(FFALoRA):
        def client_train(self, ctx, payload, client_state):
            return (ctx.dp, payload), client_state

    wrapped = SampleLevelDP(Inner(FFALoRAOptions(), SETUP), seed=0)
    wrapped.settings = sample.wrapper.settings
    mine, sent = {"x": torch.ones(1)}, Message({})
    (dp, got), kept = wrapped.client_train(ctx, sent, mine)
    assert got is sent and kept is mine
    assert (dp.clip_norm, dp.noise_multiplier) == (0.3, 0.9)
    assert torch.equal(torch.randn(3, generator=dp.generator), torch.randn(3, generator=noise_generator(0, 2, 1)))


def test_an_unset_stage_refuses_to_run():
    wrapper = SampleLevelDP(FFALoRA(FFALoRAOptions(), SETUP), seed=0)
    with pytest.raises(RuntimeError, match="no noise multiplier"):
        wrapper.client_train(Ctx(0), None, {})


def test_stage_clip_norm_and_records():
    stage, _ = _stage({"mode": "client", "noise_multiplier": 1.0, "clipping": "adaptive", "clip_norm": 0.5})
    assert stage.clip_norm([]) == 0.5
    history = [{"privacy_next_clip_norm": 0.7}, {"round": 2}]
    assert stage.clip_norm(history) == 0.7
    stage.start_round(3, history)
    rec = stage.record(3, history, [0, 1])  # no update this round: C unchanged
    assert rec["privacy_clip_norm"] == 0.7 and rec["privacy_next_clip_norm"] == 0.7
    assert rec["privacy_epsilon"] == epsilon(4, 4, 1.0, 3, 0.25) and rec["privacy_delta"] == 0.25
    assert "privacy_planned_rounds" not in rec
    stage.wrapper.unclipped = (1, 2)
    rec = stage.record(3, history, [0, 1])
    nxt, share = next_clip_norm(0.7, 1, 2, stage.count_noise, 0.5, 0.2, noise_generator(0, 3, 2**32 - 1))
    assert (rec["privacy_next_clip_norm"], rec["privacy_noisy_unclipped_share"]) == (nxt, share)
    stage.start_round(4, history)
    assert stage.wrapper.unclipped is None and stage.wrapper.settings.round_ == 4
    fixed, _ = _stage({"mode": "client", "noise_multiplier": 1.0})
    fixed.start_round(1, [])
    assert "privacy_next_clip_norm" not in fixed.record(1, [], [0])
    sample, _ = _stage({"mode": "sample", "noise_multiplier": 1.0, "clip_norm": 0.3})
    sample.start_round(1, [])
    assert sample.record(1, [], [0])["privacy_clip_norm"] == 0.3
    target, _ = _stage({"mode": "client", "target_epsilon": 5.0})
    assert target.record(1, [], [0])["privacy_planned_rounds"] == 2


def test_count_noise_too_small_is_refused():
    with pytest.raises(ConfigError, match="privacy.count_noise: 1 must exceed"):
        _stage({"mode": "client", "noise_multiplier": 4, "clipping": "adaptive", "count_noise": 1})


# (secure aggregation: tests/test_secagg.py)


def test_a_bad_privacy_config_exits_2_with_one_line(tmp_path, capsys):
    import yaml
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tiny_tree(algorithm={"name": "flora"}, privacy={"mode": "client", "target_epsilon": 2})))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("config error: privacy.mode:") and "flora" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- what mutation testing asked for

def test_client_noise_counts_the_updates_that_were_not_clipped():
    fedit = FedIT(FedITOptions(rank=2), SETUP)
    wrapper = ClientLevelDP(fedit, seed=0, on_client=True, planned_clients=3)
    assert wrapper.unclipped is None
    state = fedit.init_state()
    ups = [Update(k, dict(state), 10, {"dp_unclipped": flag}) for k, flag in enumerate((1.0, 0.0, 1.0))]
    wrapper.aggregate(state, ups, None)
    assert wrapper.unclipped == (2, 3)


def test_a_stage_without_its_budget_says_so():
    wrapper = ClientLevelDP(FedIT(FedITOptions(rank=2), SETUP), seed=0, on_client=False, planned_clients=4)
    with pytest.raises(RuntimeError, match="^the privacy stage has no noise multiplier: the runtime did not set up its "
                                           "budget$"):
        wrapper._sigma()


def test_noise_draws_are_exactly_the_seeded_ones_added():
    """Server noise, client noise, the count's noise and DP-SGD's: + the seeded draw (not −,
    not another generator's)."""
    import numpy as np

    from fedlora.privacy.client_level import PRIVACY_STREAM

    seed = int(np.random.SeedSequence([5, 2, PRIVACY_STREAM, 1]).generate_state(1, np.uint64)[0])
    assert torch.equal(torch.randn(4, generator=noise_generator(5, 2, 1)),
                       torch.randn(4, generator=torch.Generator().manual_seed(seed)))
    t = [torch.ones(3, 2), torch.full((3, 2), 3.0)]
    out = noisy_weighted_sum(t, [0.25, 0.75], 2.0, noise_generator(0, 1))
    draw = torch.randn(3, 2, generator=noise_generator(0, 1), dtype=torch.float32) * (2.0 * 0.75)
    assert torch.equal(out, weighted_sum(t, [0.25, 0.75]) + draw)
    ref = {"m.B": torch.zeros(2, 2)}
    up = Update(0, {"m.B": torch.full((2, 2), 0.1)}, 5, {})
    noised = clip_upload(CLIENT_LEVEL["ffa"], ref, up, 10.0, 0.5, noise_generator(0, 1, 0)).update.tensors["m.B"]
    assert torch.equal(noised, torch.full((2, 2), 0.1) + torch.randn(2, 2, generator=noise_generator(0, 1, 0)) * 0.5)
    g = noise_generator(0, 3, 9)
    c, share = next_clip_norm(1.0, 2, 4, 0.5, 0.5, 0.2, noise_generator(0, 3, 9))
    expected = (2 + float(torch.randn((), generator=g, dtype=torch.float64)) * 0.5) / 4
    assert share == expected and c == pytest.approx(math.exp(-0.2 * (expected - 0.5)))
    s = [torch.ones(2, 3, dtype=torch.float64)]
    mean = noised_mean(s, 2, 0.5, 3.0, torch.Generator().manual_seed(1))
    assert mean[0].dtype == torch.float64
    assert torch.equal(mean[0], (s[0] + torch.randn(2, 3, generator=torch.Generator().manual_seed(1),
                                                     dtype=torch.float64) * 1.5) / 2)


def test_delta_noise_multiplier_values_and_message():
    assert delta_noise_multiplier(2.0, 3.0) == pytest.approx((2.0**-2 - 6.0**-2) ** -0.5)
    assert delta_noise_multiplier(2.0, None) == 2.0
    with pytest.raises(ValueError, match=r"^privacy.count_noise: 1 must exceed noise_multiplier / 2 = 1.5$"):
        delta_noise_multiplier(3.0, 1.0)


def test_per_example_clipping_edges():
    """One example (no second to index), a zero gradient (no division by its norm)."""
    one = clipped_sum([[torch.tensor([3.0, 4.0])]], 1.0)
    assert torch.allclose(one[0], torch.tensor([0.6, 0.8]))
    zero = clipped_sum([[torch.zeros(2)], [torch.tensor([0.3, 0.4])]], 1.0)
    assert torch.allclose(zero[0], torch.tensor([0.3, 0.4]))


def test_norms_deltas_and_weights_in_their_own_precision():
    """The joint norm in float64 (float32 squares overflow at 4e19), a bfloat16 upload's delta in
    float32, AFLoRA's data weighting honoured by its DP weights."""
    assert joint_norm({"a": torch.tensor([3e19, 4e19])}) == pytest.approx(5e19)
    d = deltas(CLIENT_LEVEL["ffa"], {"q.B": torch.zeros(2, dtype=torch.bfloat16)},
               {"q.B": torch.ones(2, dtype=torch.bfloat16)})
    assert d["q.B"].dtype == torch.float32
    data = AFLoRA(AFLoRAOptions(ddr=False, dlf=False, weighting="data"), SETUP)
    ups = [Update(k, {"q.mask": torch.ones(r)}, SETUP.num_examples[k], {})
           for k, r in enumerate(SETUP.client_max_ranks)]
    assert by_rank(data, ups) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_budget_edges():
    """ε exactly at the target is allowed; the message names the planned rounds only when they
    differ; the accountant's kind reaches ε; σ is recorded; a record without clients counts none;
    an explicit δ is kept; a batch as large as the smallest client is allowed."""
    b = Budget("client", 1.0, 0.1, None, "pld", [10], 10, 1, 2)
    assert b.epsilon(10, 3) == epsilon(10, 10, 1.0, 3, 0.1, "pld") != epsilon(10, 10, 1.0, 3, 0.1, "rdp")
    at = Budget("client", 1.0, 0.1, epsilon(10, 10, 1.0, 2, 0.1), "rdp", [10], 10, 1, 2)
    at.check(2)
    below = replace(at, target_epsilon=0.5)
    with pytest.raises(ConfigError) as err:
        below.check(2)
    assert str(err.value).endswith("more than 0.5; stopped before training")
    assert b.record(1, [], [])["noise_multiplier"] == 1.0
    sample = Budget("sample", 1.0, 0.1, None, "rdp", [10, 20], 2, 1, 2)
    assert sample.record(1, [], [])["epsilon"] == 0.0
    assert participations([{"rejected": [{"client": 1}]}, {"clients": [{"id": 1}]}], 1) == 2
    cfg = build_config(tiny_tree(algorithm={"name": "fedit"},
                                 privacy={"mode": "sample", "noise_multiplier": 1, "delta": 0.01}))
    budget = plan_budget(cfg, [4, 10, 20, 20], 4, [])
    assert budget.delta == 0.01 and budget.populations == [4, 10, 20, 20]


def test_server_noise_is_the_seeded_draw_on_the_weighted_sum_and_the_server_reaches_the_method():
    """σ C max p times noise_generator(seed, round)'s draws, one per key in sorted order, added to
    the method's weighted sum; the server context reaches the method's aggregate."""
    seen = {}

    class Records(FedIT):
        def aggregate(self, state, updates, server):
            seen["server"] = server
            return super().aggregate(state, updates, server)

    fedit = Records(FedITOptions(rank=2), SETUP)
    state = fedit.init_state()
    ups = [Update(k, {key: t + 0.01 * (k + 1) for key, t in state.items()}, SETUP.num_examples[k], {})
           for k in range(4)]
    wrapper = _wrapped(fedit, 2.0, 1e6, round_=5)
    server = object()
    out = wrapper.aggregate(state, ups, server)
    assert seen["server"] is server
    plain = FedIT(FedITOptions(rank=2), SETUP).aggregate(state, ups, None)
    g = noise_generator(0, 5)
    for key in sorted(state):
        draw = torch.randn(state[key].shape, generator=g, dtype=torch.float32) * (2.0 * 1e6 * 0.4)
        assert torch.allclose(out.state[key], plain.state[key] + draw, atol=1e-2), key


def test_epsilon_and_step_event_edges():
    assert epsilon(10, 10, 0.0, 3, 0.1) == math.inf
    event, _ = step_event(10, 1, 1.0)  # one of ten: allowed
    assert isinstance(event, dp_event.SampledWithoutReplacementDpEvent)
    with pytest.raises(ValueError, match="^a draw of 4 out of 3$"):
        step_event(3, 4, 1.0)


def test_dp_sgd_steps_a_single_parameter_and_autocasts_bfloat16():
    """One trained tensor (no second to look at); with compute_dtype bfloat16 the loss is the
    autocast one, not float32's."""
    w = torch.nn.Parameter(torch.tensor([[1.0], [1.0]]))
    batch = {"input_ids": torch.zeros(2, 1), "x": torch.tensor([[1.0039, 1.0039], [0.5, 0.25]])}

    def loss(b):
        return (b["x"] @ w).sum()
    dp = SampleDP(1e6, 0.0, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = (float((batch["x"][:1] @ w).sum()) + float((batch["x"][1:] @ w).sum())) / 2
    got = dp_train_steps([([w], 0.0)], [batch], loss, dp, compute_dtype="bfloat16")
    assert got == [expected] and expected != (2.0078 + 0.75) / 2


@pytest.mark.parametrize("on_client", [True, False])
def test_a_single_update_is_aggregated(on_client):
    """One client in the round (nothing at a second position to read the keys from)."""
    fedit = FedIT(FedITOptions(rank=2), SETUP)
    state = fedit.init_state()
    update = Update(0, {k: t + 0.01 for k, t in state.items()}, 10, {"dp_unclipped": 1.0})
    wrapper = _wrapped(fedit, 0.0, 1e6, on_client=on_client)
    out = wrapper.aggregate(state, [update], None)
    assert all(torch.allclose(out.state[k], update.tensors[k]) for k in state)


def test_no_noise_is_no_privacy():
    assert epsilon(10, 4, 0.0, 3, 0.1) == math.inf


def test_pld_is_calibrated_near_rdp_and_refused_where_its_grid_would_not_fit():
    """target_epsilon under pld: the search starts at half the RDP σ (from 0.01 one probe needed
    > 20 GB and the OS killed the test run), lands at or below RDP's σ, and meets the target; a
    σ too small for PLD's grid is refused with one line naming privacy.accountant."""
    tree = dict(algorithm={"name": "fedit"}, privacy={"mode": "client", "target_epsilon": 4, "accountant": "pld"})
    cfg = build_config(tiny_tree(**tree))
    n, rounds = cfg.federation.num_clients, cfg.federation.rounds
    b = plan_budget(cfg, [10] * n, n, [])
    rdp = calibrate(n, n, rounds, 4.0, b.delta, "rdp")
    assert rdp / 2 <= b.noise_multiplier < rdp
    assert epsilon(n, n, b.noise_multiplier, rounds, b.delta, "pld") <= 4.0
    assert epsilon(n, n, b.noise_multiplier - 1e-3, rounds, b.delta, "pld") > 4.0
    small = build_config(tiny_tree(**{**tree, "privacy": {"mode": "client", "noise_multiplier": 0.02,
                                                          "accountant": "pld"}}))
    with pytest.raises(ConfigError, match=r"^config error: privacy.accountant: pld at noise_multiplier 0.02 over "):
        plan_budget(small, [10] * n, n, [])
    with pytest.raises(ValueError, match="use rdp$"):
        calibrate(n, n, 10_000, 1000.0, 0.1, "pld")
