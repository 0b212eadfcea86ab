"""Secure aggregation (privacy.secure_aggregation): the fixed-point sum is exact, each method's
aggregate follows from the sum alone, the protocol's masks cancel (also when a client drops),
a Flower run equals the plain run within the quantisation error while the server only ever
holds masked uploads, and undefined configs are refused in one line.

The Flower runs go through the ServerApp and ClientApp code over test_flower's LoopbackGrid."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_tree
from flwr.app import ConfigRecord, RecordDict
from safetensors.torch import load_file
from test_flower import LoopbackGrid

from fedlora.aggregation.secagg import (
    FRACTION_BITS,
    LIMIT,
    MAX_CLIENTS,
    SUMMABLE,
    SecureSum,
    decode,
    encode,
    modular_sum,
    secure_sum,
    secure_sum_refusal,
)
from fedlora.algorithms.aflora import AFLoRA, AFLoRAOptions
from fedlora.algorithms.base import FederationSetup, InvalidUpdate, Update
from fedlora.algorithms.fedit import FedIT, FedITOptions
from fedlora.algorithms.ffa import FFALoRA, FFALoRAOptions
from fedlora.config import build_config
from fedlora.flower import secagg
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import read_metrics

QUANTUM = 2.0 ** -(FRACTION_BITS + 1)
"""The largest rounding error of one encoded value."""
F32 = 2.0**-24


# ---------------------------------------------------------------- fixed point modulo 2^64

def test_fixed_point_sum_is_exact_and_wraps_back():
    """Σ of encoded values (negative ones too, so the words wrap modulo 2^64) decodes to the
    float64 sum within m rounding quanta; the encoding itself is round(v · 2^40)."""
    g = torch.Generator().manual_seed(0)
    values = [{"x": torch.randn(50, 7, generator=g, dtype=torch.float64) * 3} for _ in range(5)]
    enc = [encode(v) for v in values]
    assert enc[0]["x"].dtype == torch.int64
    assert torch.equal(enc[0]["x"], torch.round(values[0]["x"] * 2.0**FRACTION_BITS).to(torch.int64))
    summed = decode(modular_sum(enc)["x"])
    exact = sum(v["x"] for v in values)
    assert float((summed - exact).abs().max()) <= 5 * QUANTUM
    assert float((summed - exact).abs().max()) > 0  # (rounding happened: not a float sum in disguise)
    assert float(decode(modular_sum([encode({"x": torch.tensor([-1.5])})])["x"])) == -1.5


def test_encoding_refuses_what_the_sum_could_not_hold():
    with pytest.raises(ValueError, match="^secure aggregation: x is not finite; not uploaded$"):
        encode({"x": torch.tensor([0.0, float("nan")])})
    with pytest.raises(ValueError, match=r"^secure aggregation: \|x\| reaches 4097, beyond the fixed-point limit 4096; "
                                         r"not uploaded$"):
        encode({"x": torch.tensor([1.0, -(LIMIT + 1)])})
    assert torch.equal(encode({"x": torch.tensor([LIMIT])})["x"], torch.tensor([2**52]))


# ---------------------------------------------------------------- each method from the sum alone

SETUP = FederationSetup(module_shapes={"q": (30, 40), "v": (20, 40)}, client_max_ranks=[4, 4, 2, 2],
                        num_examples=[10, 20, 30, 40], scaling=1.0, seed=0)


def _method_and_updates(name: str, weighting: str = "normalized"):
    g = torch.Generator().manual_seed(1)
    if name == "aflora":  # pruning on: client 1's q module lost a column, so ranks differ per module
        method = AFLoRA(AFLoRAOptions(weighting=weighting, dlf=False), SETUP)
        ups = []
        for k, r in enumerate(SETUP.client_max_ranks):
            q_mask = torch.ones(r)
            if k == 1:
                q_mask[2] = 0
            ups.append(Update(k, {"q.B": torch.randn(30, int(q_mask.sum()), generator=g) * 0.1, "q.mask": q_mask,
                                  "v.B": torch.randn(20, r, generator=g) * 0.1, "v.mask": torch.ones(r)},
                              SETUP.num_examples[k], {}))
        return method, method.init_state(), ups
    method = FedIT(FedITOptions(rank=2), SETUP) if name == "fedit" else FFALoRA(FFALoRAOptions(rank=2), SETUP)
    state = method.init_state()
    ups = [Update(k, {key: t + torch.randn(t.shape, generator=g) * 0.1 for key, t in state.items()},
                  SETUP.num_examples[k], {}) for k in range(4)]
    return method, state, ups


def _secure_aggregate(method, state, ups):
    """SecureSum around `method`: every client's encoded summand, the server's aggregate of
    their sum (no masks here: the unmasking returns zeros)."""
    secure = SecureSum(method)
    secure.unmask = lambda ids, shapes: {k: np.zeros(s, dtype=np.uint64) for k, s in shapes.items()}
    scale = 1.0 / sum(SETUP.num_examples)
    summands = [replace_tensors(u, encode(SUMMABLE[method.name].summand(method, u, scale))) for u in ups]
    for s in summands:
        secure.validate(state, s)
    return secure.aggregate(state, summands, None), scale


def replace_tensors(update: Update, tensors) -> Update:
    return Update(update.client_id, tensors, update.num_examples, update.metrics)


@pytest.mark.parametrize("name, clients", [("fedit", [0, 1, 2, 3]), ("ffa", [0, 1, 2, 3]), ("aflora", [0, 1, 2, 3]),
                                           ("fedit", [0, 2, 3]), ("aflora", [1, 2, 3])])
def test_the_methods_aggregate_from_the_secure_sum_alone(name, clients):
    """The method's own aggregate of the (surviving) clients equals its aggregate of the one
    consensus update made from Σ [w v, w], within m quanta (divided by Σ w) plus float32
    rounding of the plain weighted sum. AFLoRA: per-module ranks (pruned columns) and eq. 12."""
    method, state, ups = _method_and_updates(name)
    ups = [ups[k] for k in clients]
    plain = method.aggregate(state, ups, None)
    secure, scale = _secure_aggregate(method, state, ups)
    total_weight = sum(u.num_examples for u in ups) * scale
    for key in plain.state:
        v = plain.state[key].abs().max()
        bound = len(ups) * QUANTUM * (1 + v) / total_weight + (2 * len(ups) + 1) * F32 * v
        assert float((secure.state[key] - plain.state[key]).abs().max()) <= bound, key
    assert not any(k in secure.metrics for k in ("client_weight", "delta_share"))


def test_aflora_data_weighting_and_a_wrong_weight_is_caught():
    """`weighting: data` sums |D_k| weights; the secure result differs from the plain one if the
    weights were taken as the normalized ones (the test can tell the two apart)."""
    method, state, ups = _method_and_updates("aflora", weighting="data")
    plain = method.aggregate(state, ups, None)
    secure, _ = _secure_aggregate(method, state, ups)
    assert torch.allclose(secure.state["q.B"], plain.state["q.B"], atol=1e-6)
    other, _, _ = _method_and_updates("aflora")
    assert not torch.allclose(other.aggregate(state, ups, None).state["q.B"], plain.state["q.B"], atol=1e-4)


def test_secure_sum_stage_client_side_and_checks():
    """The client's upload is its encoded summand (the scale comes in the payload and is not
    passed on to the method); the server checks a masked summand's keys, dtype and shapes."""
    method, state, ups = _method_and_updates("fedit")
    seen = {}

    class Trained(FedIT):
        def client_train(self, ctx, payload, client_state):
            seen["config"] = dict(payload.config)
            return ups[0], client_state

    inner = Trained(FedITOptions(rank=2), SETUP)
    secure = SecureSum(inner)
    payload = secure.payload(state, 0)
    assert payload.config["secagg_weight_scale"] == 1 / 100
    upload, _ = secure.client_train(None, payload, {})
    assert seen["config"] == {}
    w = 10 * (1 / 100)  # client 0's |D| times the scale
    assert torch.equal(upload.tensors["weight"], encode({"w": torch.tensor([w], dtype=torch.float64)})["w"])
    assert torch.equal(upload.tensors["q.A"], encode({"a": ups[0].tensors["q.A"].double() * w})["a"])
    secure.validate(state, upload)
    bad = dict(upload.tensors)
    bad["q.A"] = bad["q.A"].float()
    with pytest.raises(InvalidUpdate, match=r"^q.A: expected int64 \(2, 40\), got torch.float32 \(2, 40\)$"):
        secure.validate(state, replace_tensors(upload, bad))
    with pytest.raises(InvalidUpdate, match=r"^secure aggregation: summand keys differ from the method's \(weight\)$"):
        secure.validate(state, replace_tensors(upload, {k: t for k, t in upload.tensors.items() if k != "weight"}))
    with pytest.raises(RuntimeError, match="^secure aggregation: the runtime gave no way to unmask the sum$"):
        secure.aggregate(state, [upload], None)


# ---------------------------------------------------------------- the protocol

class Clients:
    """Four protocol clients in this process (a RecordDict each, as a Flower Context keeps),
    reached through an exchange function like FlowerRun's."""

    def __init__(self, n: int, silent: dict[str, set[int]] | None = None):
        self.states = {k: RecordDict() for k in range(n)}
        self.silent = silent or {}
        self.log: list[tuple[str, int]] = []

    def exchange(self, action, contents):
        step = {"secagg_keys": secagg.client_keys, "secagg_shares": secagg.client_shares,
                "secagg_unmask": secagg.client_unmask}[action]
        out = {}
        for k, content in contents.items():
            self.log.append((action, k))
            if k in self.silent.get(action, ()):
                out[k] = "no reply within 1s"
                continue
            out[k] = RecordDict({secagg.RECORD: step(self.states[k], k, content.config_records[secagg.RECORD])})
        return out


def _summands(n: int):
    g = torch.Generator().manual_seed(3)
    return [encode({"a": torch.randn(6, 5, generator=g, dtype=torch.float64), "w": torch.rand(1, generator=g,
                                                                                              dtype=torch.float64)})
            for _ in range(n)]


def _protocol_round(n=4, drop_at_train=(), silent=None):
    clients = Clients(n, silent)
    server = secagg.ServerRound(7, list(range(n)), clients.exchange)
    server.setup()
    summands, uploads = _summands(n), {}
    for k in server.peers:
        if k in drop_at_train:
            continue
        secagg.receive_shares(clients.states[k], k, server.train_record(k))
        uploads[k] = secagg.masked_upload(clients.states[k], k, 7, summands[k])
    return clients, server, summands, uploads


def test_masks_cancel_and_the_server_recovers_the_exact_sum():
    """Four clients: the server's unmasked sum equals the sum of the summands bit for bit (mod
    2^64), while every masked upload differs from its summand in (nearly) every coordinate."""
    clients, server, summands, uploads = _protocol_round()
    assert server.peers == [0, 1, 2, 3] and server.threshold == 3 and not server.failures
    shapes = {k: tuple(t.shape) for k, t in summands[0].items()}
    masked_total = modular_sum(list(uploads.values()))
    masks = server.unmask(sorted(uploads), shapes)
    expected = modular_sum(summands)
    for key in shapes:
        assert np.array_equal(masked_total[key] - masks[key], expected[key]), key
    for k, up in uploads.items():
        for key in shapes:
            assert float((up[key] != summands[k][key]).double().mean()) > 0.95
            assert float((decode(up[key].numpy().view(np.uint64)) - decode(summands[k][key].numpy().view(np.uint64)))
                         .abs().min()) > 1.0  # what the server holds says nothing near the value


def test_a_client_that_drops_after_sharing_is_left_out_of_the_sum():
    """Client 2 shares its keys, then never uploads: the others' shares of its mask key remove
    its pairwise masks, and the sum is exactly the three others' summands; nobody revealed
    client 2's self-mask seed."""
    clients, server, summands, uploads = _protocol_round(drop_at_train={2})
    shapes = {k: tuple(t.shape) for k, t in summands[0].items()}
    masks = server.unmask(sorted(uploads), shapes)
    total = modular_sum(list(uploads.values()))
    expected = modular_sum([summands[k] for k in (0, 1, 3)])
    assert all(np.array_equal(total[k] - masks[k], expected[k]) for k in shapes)


def test_a_client_silent_at_the_keys_step_is_not_in_the_round():
    clients, server, summands, uploads = _protocol_round(silent={"secagg_keys": {1}})
    assert server.peers == [0, 2, 3] and "no reply" in server.failures[1]
    shapes = {k: tuple(t.shape) for k, t in summands[0].items()}
    total, masks = modular_sum(list(uploads.values())), server.unmask(sorted(uploads), shapes)
    expected = modular_sum([summands[k] for k in (0, 2, 3)])
    assert all(np.array_equal(total[k] - masks[k], expected[k]) for k in shapes)


def test_too_few_shares_stop_the_round_with_one_reason():
    """Two of four clients answer the unmasking: fewer than the threshold of 3 shares each."""
    clients, server, summands, uploads = _protocol_round(silent={"secagg_unmask": {0, 1}})
    with pytest.raises(RuntimeError, match="fewer than 3 shares came back"):
        server.unmask(sorted(uploads), {k: tuple(t.shape) for k, t in summands[0].items()})


def test_a_client_reveals_nothing_the_protocol_forbids():
    """Unmasking is refused when it would reveal both secrets of one client, when fewer than
    the threshold are kept, when a client is not listed, and a second time in one round."""
    clients, server, _, _ = _protocol_round()
    state = clients.states[0]
    split = "^secure aggregation: server: the kept and dropped clients do not split the round's clients$"
    for request, reason in [
        ({"round": 7, "active": [0, 1, 2], "dropped": [2, 3]}, split),
        ({"round": 7, "active": [0, 1], "dropped": [2]}, split),
        ({"round": 7, "active": [1, 2, 3], "dropped": [0]}, split),
        ({"round": 7, "active": [0, 0, 1, 3], "dropped": [2]}, split),
        ({"round": 7, "active": [0, 1, 3], "dropped": [2, 2]}, split),
        ({"round": 7, "active": [0, 1], "dropped": [2, 3]},
         "^secure aggregation: 2 clients kept, fewer than the threshold 3: no share is revealed$"),
        ({"round": 8, "active": [0, 1, 2, 3], "dropped": []}, "^secure aggregation: client 0 has no keys for round 8$"),
    ]:
        with pytest.raises(secagg.SecAggError, match=reason):
            secagg.client_unmask(state, 0, request)
    reply = secagg.client_unmask(state, 0, {"round": 7, "active": [0, 1, 3], "dropped": [2]})
    assert list(reply["owners"]) == [0, 1, 3, 2] and len(reply["shares"]) == 4
    with pytest.raises(secagg.SecAggError, match="^secure aggregation: client 0 has no unmasking to do in round 7$"):
        secagg.client_unmask(state, 0, {"round": 7, "active": [0, 1, 3], "dropped": [2]})


def test_forged_or_misaddressed_shares_are_refused():
    clients = Clients(3)
    server = secagg.ServerRound(1, [0, 1, 2], clients.exchange)
    server.setup()
    record = dict(server.train_record(0))
    swapped = {**record, "ctxts": list(reversed(record["ctxts"]))}  # client 1's share presented as 2's
    with pytest.raises(secagg.SecAggError, match="^secure aggregation: the share from client 1 does not decrypt$"):
        secagg.receive_shares(clients.states[0], 0, swapped)
    with pytest.raises(secagg.SecAggError, match="^secure aggregation: server: the shares forwarded do not match the "
                                                 "clients of the round$"):
        secagg.receive_shares(clients.states[0], 0, {**record, "srcs": [1]})
    with pytest.raises(secagg.SecAggError, match=r"^secure aggregation: server: threshold 1 for 3 clients \(a majority "
                                                 r"is needed\)$"):
        secagg.client_shares(RecordDict(), 0, {"round": 1, "threshold": 1, "peers": [0, 1, 2],
                                               "share-pk": [b"a", b"b", b"c"], "mask-pk": [b"d", b"e", b"f"]})


def test_the_mask_generator_is_keyed_by_the_whole_key():
    """Keys that differ only in their last 4 bytes give unrelated masks (Flower 1.41's generator
    folds a key to 32 bits); one key always gives the same."""
    shapes = {"a": (1000,), "b": (3, 4)}
    key = bytes(range(32))
    other = key[:28] + bytes(4)
    a, b = secagg.prg(key, shapes), secagg.prg(other, shapes)
    assert np.array_equal(a["a"], secagg.prg(key, shapes)["a"]) and a["b"].shape == (3, 4)
    assert float(np.mean(a["a"] == b["a"])) < 0.01
    top = (a["a"] >> np.uint64(63)).astype(float)  # the high bit is a fair coin
    assert 0.4 < top.mean() < 0.6


# ---------------------------------------------------------------- a Flower run

NODES = 3


def _tree(synthetic_task, method, secure, rounds=1):
    tree = tiny_tree(algorithm={"name": method}, threads=1, data=dict(synthetic_task, train_examples=120),
                     federation={"num_clients": NODES, "client_max_ranks": [8, 4, 2], "rounds": rounds},
                     aggregation={"norm_bound": None})  # (the server cannot screen what it cannot see)
    if method == "aflora":
        tree["algorithm"]["server_steps"] = 2
    if secure:
        tree["privacy"] = {"secure_aggregation": True}
    return tree


def _flower(tree, out, monkeypatch, down=None):
    from fedlora.flower.server_app import FlowerRun

    grid = LoopbackGrid({100 + k: {"partition-id": k, "num-partitions": NODES, "state-dir": str(out / "clients")}
                         for k in range(NODES)}, monkeypatch)
    grid.down = down or {}
    received = []
    real_pull = grid.pull_messages

    def pull(ids):  # what reaches the server's code: every reply it pulls
        replies = real_pull(ids)
        received.extend(r for r in replies if not r.has_error() and "update" in r.content.array_records)
        return replies
    grid.pull_messages = pull
    FlowerRun(build_config(tree), out / "flower", grid, round_timeout=1.0, node_wait=0.0).run()
    return load_file(str(out / "flower/final_state.safetensors")), received


def _watch_masking(monkeypatch):
    """Each client's summand just before masking and its upload just after, by client."""
    seen: dict[int, tuple[dict, dict]] = {}
    real = secagg.masked_upload

    def watched(state, client, round_, tensors):
        out = real(state, client, round_, tensors)
        seen[client] = ({k: t.clone() for k, t in tensors.items()}, out)
        return out
    monkeypatch.setattr(secagg, "masked_upload", watched)
    return seen


@pytest.mark.parametrize("method", ["fedit", "aflora"])
def test_secure_flower_run_equals_the_plain_run_and_the_server_holds_only_masked_uploads(
        synthetic_task, tmp_path, monkeypatch, method):
    """One round with 3 nodes through the Flower apps with secure aggregation, against the
    plain in-process run (which a plain Flower run equals bit for bit, test_flower):
    (a) the global factors agree within the bound m · 2^-41 (1 + |v|) / Σw + (2m + 1) · 2^-24 |v|
        (fixed point, then float32 rounding of the plain weighted sum); AFLoRA's A, which the
        server fine-tunes from B on public data afterwards, within 1e-3;
    (b) every update the server's code pulled is a masked upload: int64 words that differ from
        the client's summand in (nearly) every coordinate and decode to nothing near it, and
        the method's own aggregate saw one update, the consensus, never a client's."""
    Simulation(build_config(_tree(synthetic_task, method, False)), tmp_path / "plain", progress=False).run()
    plain = load_file(str(tmp_path / "plain/final_state.safetensors"))
    seen = _watch_masking(monkeypatch)
    calls = []
    method_cls = {"fedit": FedIT, "aflora": AFLoRA}[method]
    real_aggregate = method_cls.aggregate

    def counted(self, state, updates, server):
        calls.append(len(updates))
        return real_aggregate(self, state, updates, server)
    monkeypatch.setattr(method_cls, "aggregate", counted)
    secure, received = _flower(_tree(synthetic_task, method, True), tmp_path, monkeypatch)
    assert calls == [1]

    keys = [k for k in plain if k.endswith(".B")] if method == "aflora" else list(plain)
    for key in keys:
        v = float(plain[key].abs().max())
        bound = NODES * QUANTUM * (1 + v) + (2 * NODES + 1) * F32 * v
        assert float((secure[key] - plain[key]).abs().max()) <= bound, key
    if method == "aflora":
        assert all(torch.allclose(secure[k], plain[k], atol=1e-3) for k in plain if k.endswith(".A"))

    assert sorted(seen) == [0, 1, 2] and len(received) == NODES
    for reply in received:
        k = reply.content.config_records["info"]["partition-id"]
        summand, masked = seen[k]
        arrays = dict(reply.content.array_records["update"].to_torch_state_dict())
        assert sorted(arrays) == sorted(summand)
        for key, t in arrays.items():
            assert torch.equal(t, masked[key])  # the server got exactly the masked upload
            assert float((t != summand[key]).double().mean()) > 0.95, key
            far = (decode(t.numpy().view(np.uint64)) - decode(summand[key].numpy().view(np.uint64))).abs()
            assert float(far.median()) > 1.0, key


def test_secure_flower_run_survives_a_client_that_drops_after_sharing(synthetic_task, tmp_path, monkeypatch):
    """Node 2 takes part in the key exchange, then gives no update in round 1: the run equals
    the plain Flower run in which node 2 is down the same way (within the bound, Σw < 1)."""
    plain, _ = _flower(_tree(synthetic_task, "fedit", False), tmp_path / "plain", monkeypatch, down={102: {1}})
    secure, _ = _flower(_tree(synthetic_task, "fedit", True), tmp_path / "secure", monkeypatch, down={102: {1}})
    history = read_metrics(tmp_path / "secure/flower")
    assert [c["id"] for c in history[0]["clients"]] == [0, 1]
    assert history[0]["rejected"] == [{"client": 2, "reason": "no reply within 1s"}]
    import json

    table = json.loads((tmp_path / "secure/flower/partition.json").read_text())["examples_per_client_per_label"]
    sizes = [sum(row) for row in table]
    total_weight = (sizes[0] + sizes[1]) / sum(sizes)
    for key in plain:
        v = float(plain[key].abs().max())
        bound = 2 * QUANTUM * (1 + v) / total_weight + 5 * F32 * v
        assert float((secure[key] - plain[key]).abs().max()) <= bound, key


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("change, command, message", [
    ({"algorithm": {"name": "flexlora"}}, "flower", "SecureSum is undefined for flexlora: its server re-factorises"),
    ({"algorithm": {"name": "flora"}}, "flower", "SecureSum is undefined for flora: its server stacks"),
    ({"algorithm": {"name": "hetlora"}}, "flower", "SecureSum is undefined for hetlora: its weights are the norms"),
    ({"algorithm": {"name": "fedsa"}}, "flower", "SecureSum is undefined for fedsa: not checked yet"),
    ({"aggregation": {"combine": "median"}}, "flower", "aggregation.combine median needs every individual update"),
    ({"aggregation": {"norm_bound": 3.0}}, "flower", "aggregation.norm_bound screens every individual update"),
    ({"privacy": {"secure_aggregation": True, "mode": "client", "noise_multiplier": 1.0}}, "flower",
     "with client-level DP the server clips each upload"),
    ({"federation": {"num_clients": 4, "fraction": 0.5, "client_max_ranks": [8, 4, 4, 2]}}, "flower",
     "needs at least 3 clients per round, the config has 2"),
    ({"algorithm": {"name": "aflora", "weighting": "paper-literal"}}, "flower", "weighting paper-literal"),
    ({}, "run", "needs the Flower runtime (fedlora flower run)"),
])
def test_bad_secure_aggregation_configs_exit_2_with_one_line(data_dir, tmp_path, capsys, change, command, message):
    from fedlora.cli import main

    tree = tiny_tree(algorithm={"name": "fedit"}, privacy={"secure_aggregation": True},
                     aggregation={"norm_bound": None})
    for key, value in change.items():
        tree[key] = value if key == "algorithm" else {**tree.get(key, {}), **value}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    args = ["run", str(path), "--out", str(tmp_path / "run")] if command == "run" else \
        ["flower", "run", str(path), "--out", str(tmp_path / "run"), "--local", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "privacy.secure_aggregation" in err and message in err, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- refusals, message by message

def _cfg(method="fedit", clients=3, fraction=1.0, combine="mean", norm_bound=None, mode="none", weighting=None):
    return NS(aggregation=NS(combine=combine, norm_bound=norm_bound), privacy=NS(mode=mode, secure_aggregation=True),
              federation=NS(num_clients=clients, fraction=fraction),
              algorithm=NS(name=method, **({} if weighting is None else {"weighting": weighting})))


@pytest.mark.parametrize("cfg, message", [
    (_cfg(), None),
    (_cfg(clients=5, fraction=0.5), None),  # 2.5 rounds half up to 3
    (_cfg(clients=MAX_CLIENTS), None),
    (_cfg(method="aflora", weighting="normalized"), None),
    (_cfg(method="aflora", weighting="data"), None),
    (_cfg(clients=2), "privacy.secure_aggregation: needs at least 3 clients per round, the config has 2 (with 2, each "
                      "client learns the other's update from the sum)"),
    (_cfg(clients=10, fraction=0.2), "privacy.secure_aggregation: needs at least 3 clients per round, the config has 2 "
                                     "(with 2, each client learns the other's update from the sum)"),
    (_cfg(clients=MAX_CLIENTS + 1), f"privacy.secure_aggregation: at most {MAX_CLIENTS} clients per round, the config "
                                    f"has {MAX_CLIENTS + 1}"),
    (_cfg(combine="krum"), "privacy.secure_aggregation: aggregation.combine krum needs every individual update, which "
                           "secure aggregation hides from the server"),
    (_cfg(norm_bound=2.0), "privacy.secure_aggregation: aggregation.norm_bound screens every individual update, which "
                           "secure aggregation hides from the server; set it to null"),
    (_cfg(mode="client"), "privacy.secure_aggregation: with client-level DP the server clips each upload (noise: "
                          "server) or averages with equal weights (noise: client); neither is wired to the secure sum "
                          "yet"),
    (_cfg(mode="sample"), None),
    (_cfg(method="aflora", weighting="paper-literal"), "privacy.secure_aggregation: aflora's weighting paper-literal "
                                                       "(a product of two shares) is not a ratio of sums the clients "
                                                       "can add; use normalized or data"),
])
def test_secure_sum_refusal_names_the_field_and_the_reason(cfg, message):
    assert secure_sum_refusal(cfg) == message


def test_the_pipeline_puts_secure_aggregation_outermost():
    """SecureSum wraps the whole pipeline (the attack included), and `secure_sum` finds it."""
    from fedlora.aggregation import build_pipeline
    from fedlora.aggregation.attack import UploadAttack

    tree = tiny_tree(algorithm={"name": "fedit"}, privacy={"secure_aggregation": True},
                     attack={"kind": "sign_flip", "attackers": 1}, aggregation={"norm_bound": None})
    cfg = build_config(tree)
    method = FedIT(FedITOptions(rank=2), SETUP)
    pipeline = build_pipeline(method, cfg)
    assert isinstance(pipeline, SecureSum) and isinstance(pipeline.inner, UploadAttack)
    assert secure_sum(pipeline) is pipeline and secure_sum(pipeline.inner) is None and secure_sum(method) is None
    assert pipeline.label() == "secure aggregation" and pipeline.method is method


def test_unmasked_weights_must_be_positive_and_the_clients_few_enough():
    method, state, ups = _method_and_updates("fedit")
    secure = SecureSum(method)
    secure.unmask = lambda ids, shapes: {k: np.zeros(s, dtype=np.uint64) for k, s in shapes.items()}
    scale = 1.0 / sum(SETUP.num_examples)
    summand = encode(SUMMABLE["fedit"].summand(method, ups[0], scale))
    summand["weight"] = encode({"w": torch.tensor([0.0], dtype=torch.float64)})["w"]
    with pytest.raises(RuntimeError, match="^secure aggregation: the unmasked sum of the weights is not positive"):
        secure.aggregate(state, [replace_tensors(ups[0], summand)], None)
    with pytest.raises(RuntimeError, match=f"^secure aggregation: {MAX_CLIENTS + 1} clients, more than the {MAX_CLIENTS}"):
        secure.aggregate(state, [ups[0]] * (MAX_CLIENTS + 1), None)


def test_the_protocols_records_are_read_strictly():
    """What comes from the other side: lists of ids (not booleans), non-empty byte strings up to
    MAX_BYTES, integers; anything else is one line naming who sent what."""
    assert secagg._ints({"k": [3, 1]}, "k", "client 2") == [3, 1]
    assert secagg._blob({"k": b"x" * secagg.MAX_BYTES}, "k", "client 2") == b"x" * secagg.MAX_BYTES
    assert secagg._blob({"k": b"x"}, "k", "client 2") == b"x"
    assert secagg._blobs({"k": [b"a", b"b"]}, "k", "client 2") == [b"a", b"b"]
    assert secagg._blobs({"k": [b"x" * secagg.MAX_BYTES]}, "k", "client 2") == [b"x" * secagg.MAX_BYTES]
    assert secagg._int({"k": 0}, "k", "client 2") == 0
    for reader, value, what in [
        (secagg._ints, [1, True], "is not a list of client ids"),
        (secagg._ints, (1, 2), "is not a list of client ids"),
        (secagg._blobs, [b"a", b""], "is not a list of byte strings"),
        (secagg._blobs, [b"x" * (secagg.MAX_BYTES + 1)], "is not a list of byte strings"),
        (secagg._blobs, b"ab", "is not a list of byte strings"),
        (secagg._int, True, "is not an integer"),
        (secagg._int, "3", "is not an integer"),
        (secagg._blob, b"", "is not a byte string"),
        (secagg._blob, b"x" * (secagg.MAX_BYTES + 1), "is not a byte string"),
        (secagg._blob, "text", "is not a byte string"),
    ]:
        with pytest.raises(secagg.SecAggError, match=f"^secure aggregation: client 2: k {what}$"):
            reader({"k": value}, "k", "client 2")


def test_the_client_app_serves_every_protocol_action():
    from fedlora.flower import client_app

    registered = set(client_app.app._registered_funcs)
    assert {f"query.{a}" for a in secagg.ACTIONS} <= registered
    assert secagg.ACTIONS == ("secagg_keys", "secagg_shares", "secagg_unmask")


def _replacing(clients, action, k, fields, keep=True):
    """The clients' exchange, with client k's reply to `action` given `fields` (over its own
    record's, or alone when keep is False)."""
    real = clients.exchange

    def lying(act, contents):
        out = real(act, contents)
        if act == action:
            own = dict(out[k].config_records[secagg.RECORD]) if keep else {}
            out[k] = RecordDict({secagg.RECORD: ConfigRecord({**own, **fields})})
        return out
    return lying


@pytest.mark.parametrize("key", ["mask-pk", "share-pk"])
def test_a_client_with_a_malformed_key_is_not_in_the_round(key):
    """Client 1 answers the keys step with a key that is no elliptic-curve key: it is left out
    (one reason), and the three others still complete a round."""
    server = secagg.ServerRound(2, [0, 1, 2, 3], _replacing(Clients(4), "secagg_keys", 1, {key: b"not a key"}))
    server.setup()
    assert server.peers == [0, 2, 3]
    assert server.failures == {1: "secure aggregation: client 1: a public key is not an elliptic-curve key"}


# ---------------------------------------------------------------- what mutation testing asked for

def test_views_and_summands_keep_their_dtypes_and_weights():
    """Summands are float64 (the weights too), the views float32; AFLoRA's weight is eq. 12's
    log(1 + r) |D| times the scale (`data`: |D| times it)."""
    for name in ("fedit", "aflora"):
        method, state, ups = _method_and_updates(name)
        summand = SUMMABLE[name].summand(method, ups[0], 0.5)
        assert all(t.dtype == torch.float64 for t in summand.values()), name
        view = SUMMABLE[name].view(method, summand)
        assert view and all(t.dtype == torch.float32 for t in view.values()), name
    aflora, _, _ = _method_and_updates("aflora")
    data, _, _ = _method_and_updates("aflora", weighting="data")
    from fedlora.aggregation.secagg import aflora_weight

    assert aflora_weight(data, 4, 10, 0.5) == 5.0
    assert aflora_weight(aflora, 4, 10, 0.5) == pytest.approx(np.log1p(4) * 5.0)


class Recorder(FedIT):
    """FedIT that records what reaches it through the stage and answers with a fixed upload."""

    def __init__(self, upload):
        super().__init__(FedITOptions(rank=2), SETUP)
        self.upload, self.seen = upload, {}

    def payload(self, state, client_id):
        self.seen["payload_client"] = client_id
        return super().payload(state, client_id)

    def client_train(self, ctx, payload, client_state):
        self.seen.update(ctx=ctx, tensors=payload.tensors, client_state=client_state)
        return self.upload, {"kept": torch.ones(1)}

    def aggregate(self, state, updates, server):
        self.seen.update(server=server, updates=updates)
        return super().aggregate(state, updates, server)


def test_the_stage_passes_everything_through_to_the_method():
    method, state, ups = _method_and_updates("fedit")
    inner = Recorder(ups[1])
    secure = SecureSum(inner)
    payload = secure.payload(state, 3)
    assert inner.seen["payload_client"] == 3 and all(torch.equal(payload.tensors[k], state[k]) for k in state)
    ctx, mine = object(), {"lam": torch.zeros(2)}
    upload, new_state = secure.client_train(ctx, payload, mine)
    assert inner.seen["ctx"] is ctx and inner.seen["client_state"] is mine and set(new_state) == {"kept"}
    assert all(torch.equal(inner.seen["tensors"][k], state[k]) for k in state)
    # the server: masks that are really there are removed, with the ids of the kept clients
    asked = []
    rng = np.random.default_rng(0)
    masks = {k: rng.integers(0, 2**63, size=s, dtype=np.uint64) for k, s in secure.summand_shapes(state).items()}

    def unmask(ids, shapes):
        asked.append(ids)
        return masks
    secure.unmask = unmask
    masked = {k: torch.from_numpy((upload.tensors[k].numpy().view(np.uint64) + masks[k]).view(np.int64))
              for k in upload.tensors}
    server = object()
    agg = secure.aggregate(state, [replace_tensors(upload, masked)], server)
    assert asked == [[1]] and inner.seen["server"] is server and len(inner.seen["updates"]) == 1
    assert all(torch.allclose(agg.state[k], ups[1].tensors[k], atol=1e-6) for k in state)


def test_aflora_stage_uses_the_clients_own_payload_and_rank():
    method, state, ups = _method_and_updates("aflora")
    secure = SecureSum(method)
    assert torch.equal(secure.payload(state, 2).tensors["q.A"], method.payload(state, 2).tensors["q.A"])
    summand = SUMMABLE["aflora"].summand(method, ups[1], 0.01)
    assert float(summand["q.weight"]) == pytest.approx(np.log1p(3) * 20 * 0.01)  # q lost a column: rank 3
    assert float(summand["v.weight"]) == pytest.approx(np.log1p(4) * 20 * 0.01)


def test_a_module_weight_that_is_not_positive_is_caught_for_aflora():
    method, state, ups = _method_and_updates("aflora")
    secure = SecureSum(method)
    secure.unmask = lambda ids, shapes: {k: np.zeros(s, dtype=np.uint64) for k, s in shapes.items()}
    summand = encode(SUMMABLE["aflora"].summand(method, ups[0], 0.01))
    summand["v.weight"] = encode({"w": torch.tensor([-0.5], dtype=torch.float64)})["w"]
    with pytest.raises(RuntimeError, match=r"^secure aggregation: the unmasked sum of the weights is not positive "
                                           r"\(a client's masks or shares were wrong\)$"):
        secure.aggregate(state, [replace_tensors(ups[0], summand)], None)


def test_exactly_max_clients_are_summed():
    method, state, ups = _method_and_updates("ffa")
    secure = SecureSum(method)
    secure.unmask = lambda ids, shapes: {k: np.zeros(s, dtype=np.uint64) for k, s in shapes.items()}
    summand = replace_tensors(ups[0], encode(SUMMABLE["ffa"].summand(method, ups[0], 1.0 / MAX_CLIENTS / 10)))
    agg = secure.aggregate(state, [summand] * MAX_CLIENTS, None)
    assert torch.allclose(agg.state["q.B"], ups[0].tensors["q.B"], atol=1e-6)
    with pytest.raises(RuntimeError, match=f"^secure aggregation: {MAX_CLIENTS + 1} clients, more than the "
                                           f"{MAX_CLIENTS} whose fixed-point sum cannot wrap$"):
        secure.aggregate(state, [summand] * (MAX_CLIENTS + 1), None)


def test_secure_sum_is_found_under_other_stages():
    from fedlora.aggregation.base import Wrapper

    class Outer(Wrapper):
        DEFAULT = "everything (a test stage)"

    method, _, _ = _method_and_updates("fedit")
    stage = SecureSum(method)
    assert secure_sum(Outer(stage)) is stage and secure_sum(Outer(Outer(method))) is None


@pytest.mark.parametrize("cfg, message", [
    (_cfg(clients=3, fraction=0.1), "privacy.secure_aggregation: needs at least 3 clients per round, the config has "
                                    "1 (with 2, each client learns the other's update from the sum)"),
    (_cfg(method="aflora"), None),
])
def test_secure_sum_refusal_edges(cfg, message):
    assert secure_sum_refusal(cfg) == message


def test_the_mask_generator_walks_one_keystream_across_the_keys():
    key = bytes(range(32))
    parts = secagg.prg(key, {"c": (1,), "a": (2,), "b": (3,)})
    whole = secagg.prg(key, {"x": (6,)})["x"]
    assert np.array_equal(np.concatenate([parts["a"], parts["b"], parts["c"]]), whole)
    total = {"x": np.zeros(6, dtype=np.uint64)}
    secagg.add(total, {"x": whole})
    secagg.add(total, {"x": whole}, subtract=True)
    assert not total["x"].any()


def test_uploads_are_int64_words():
    clients, server, summands, uploads = _protocol_round()
    assert all(t.dtype == torch.int64 for up in uploads.values() for t in up.values())


SERVER_SAYS = "^secure aggregation: server: "


def test_every_client_step_refuses_a_malformed_request():
    """One line naming the server and the field, for each step."""
    state = RecordDict()
    with pytest.raises(secagg.SecAggError, match="^secure aggregation: server: round is not an integer$"):
        secagg.client_keys(state, 0, {"client": 0})
    with pytest.raises(secagg.SecAggError, match="^secure aggregation: server: client is not an integer$"):
        secagg.client_keys(state, 0, {"round": 1})
    with pytest.raises(secagg.SecAggError, match="^secure aggregation: the server addressed client 1; this node "
                                                 "serves 0$"):
        secagg.client_keys(state, 0, {"round": 1, "client": 1})
    keys = {"round": 1, "threshold": 2, "peers": [0, 1, 2], "share-pk": [b"a", b"b", b"c"],
            "mask-pk": [b"d", b"e", b"f"]}
    for field in ("round", "threshold", "peers", "share-pk", "mask-pk"):
        kind = {"round": "an integer", "threshold": "an integer", "peers": "a list of client ids"}.get(
            field, "a list of byte strings")
        with pytest.raises(secagg.SecAggError, match=f"^secure aggregation: server: {field} is not {kind}$"):
            secagg.client_shares(state, 0, {k: v for k, v in keys.items() if k != field})
    for field in ("round", "peers", "srcs", "ctxts"):
        with pytest.raises(secagg.SecAggError, match=f"^secure aggregation: server: {field} is not "):
            clients, server, _, _ = _protocol_round(n=3, drop_at_train={0})
            record = dict(server.train_record(0))
            secagg.receive_shares(clients.states[0], 0, {k: v for k, v in record.items() if k != field})
    clients, server, _, _ = _protocol_round(n=3)
    for field in ("round", "active", "dropped"):
        request = {"round": 7, "active": [0, 1, 2], "dropped": []}
        with pytest.raises(secagg.SecAggError, match=f"^secure aggregation: server: {field} is not "):
            secagg.client_unmask(clients.states[0], 0, {k: v for k, v in request.items() if k != field})


@pytest.mark.parametrize("change, message", [
    ({"peers": [0, 0, 2]}, "peers and keys do not match"),
    ({"peers": [1, 2, 3]}, "peers and keys do not match"),
    ({"mask-pk": [b"d", b"e"]}, "peers and keys do not match"),
    ({"threshold": 4}, r"threshold 4 for 3 clients \(a majority is needed\)"),
    ({"mask-pk": [b"a", b"e", b"f"]}, "two clients have the same public key"),
])
def test_the_shares_step_checks_the_servers_list(change, message):
    state = RecordDict()
    secagg.client_keys(state, 0, {"round": 1, "client": 0})
    keys = {"round": 1, "threshold": 2, "peers": [0, 1, 2], "share-pk": [b"a", b"b", b"c"],
            "mask-pk": [b"d", b"e", b"f"]}
    with pytest.raises(secagg.SecAggError, match=f"{SERVER_SAYS}{message}$"):
        secagg.client_shares(state, 0, {**keys, **change})


def test_the_shares_step_checks_the_threshold_is_a_majority_and_the_clients_own_keys():
    state = RecordDict()
    own = secagg.client_keys(state, 0, {"round": 1, "client": 0})
    others = [secagg.client_keys(RecordDict(), k, {"round": 1, "client": k}) for k in (1, 2, 3)]
    keys = {"round": 1, "peers": [0, 1, 2, 3], "share-pk": [own["share-pk"]] + [o["share-pk"] for o in others],
            "mask-pk": [own["mask-pk"]] + [o["mask-pk"] for o in others]}
    with pytest.raises(secagg.SecAggError, match=rf"{SERVER_SAYS}threshold 2 for 4 clients \(a majority is needed\)$"):
        secagg.client_shares(state, 0, {**keys, "threshold": 2})
    swapped = {**keys, "share-pk": [others[0]["share-pk"], own["share-pk"]] + [o["share-pk"] for o in others[1:]]}
    with pytest.raises(secagg.SecAggError, match=f"{SERVER_SAYS}client 0's own public keys are not the ones it sent$"):
        secagg.client_shares(state, 0, {**swapped, "threshold": 3})
    masks = {**keys, "mask-pk": [others[0]["mask-pk"], own["mask-pk"]] + [o["mask-pk"] for o in others[1:]]}
    with pytest.raises(secagg.SecAggError, match=f"{SERVER_SAYS}client 0's own public keys are not the ones it sent$"):
        secagg.client_shares(state, 0, {**masks, "threshold": 3})
    reply = secagg.client_shares(state, 0, {**keys, "threshold": 4})  # all four: a majority too
    assert list(reply["dsts"]) == [1, 2, 3] and len(reply["ctxts"]) == 3
    with pytest.raises(secagg.SecAggError, match="^secure aggregation: client 0 already shared its keys in round 1$"):
        secagg.client_shares(state, 0, {**keys, "threshold": 4})


def test_the_train_step_checks_what_the_server_forwards():
    clients, server, _, _ = _protocol_round(n=4, drop_at_train={0, 1})
    record = dict(server.train_record(0))
    bad = "^secure aggregation: server: the shares forwarded do not match the clients of the round$"
    for change in ({"peers": [1, 2, 3]}, {"peers": [0, 1, 2, 3, 9]}, {"srcs": [1, 2, 2]},
                   {"ctxts": record["ctxts"][:2]}):
        with pytest.raises(secagg.SecAggError, match=bad):
            secagg.receive_shares(clients.states[0], 0, {**record, **change})
    few = {**record, "peers": [0, 1], "srcs": [1], "ctxts": record["ctxts"][:1]}
    with pytest.raises(secagg.SecAggError, match="^secure aggregation: 2 clients left, fewer than the threshold 3$"):
        secagg.receive_shares(clients.states[0], 0, few)
    # a share that decrypts but names another sender: encrypted by client 1 for client 0, saying it is 2's
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    s1 = clients.states[1].config_records[secagg.STATE]
    key = generate_shared_key(bytes_to_private_key(bytes(s1["share-sk"])), bytes_to_public_key(bytes(s1["share-pks"][0])))
    forged = encrypt(key, share_keys_plaintext_concat(2, 0, b"x" * 20, b"y" * 20))
    lying = {**record, "ctxts": [forged] + list(record["ctxts"][1:])}
    with pytest.raises(secagg.SecAggError, match="^secure aggregation: the share from client 1 names 2 → 0$"):
        secagg.receive_shares(clients.states[0], 0, lying)
    misaddressed = {**record, "ctxts": [encrypt(key, share_keys_plaintext_concat(1, 3, b"x" * 20, b"y" * 20))]
                    + list(record["ctxts"][1:])}
    with pytest.raises(secagg.SecAggError, match="^secure aggregation: the share from client 1 names 1 → 3$"):
        secagg.receive_shares(clients.states[0], 0, misaddressed)
    secagg.receive_shares(clients.states[0], 0, record)
    with pytest.raises(secagg.SecAggError, match="^secure aggregation: client 0 already uploaded in round 7$"):
        secagg.receive_shares(clients.states[0], 0, record)


def test_the_server_records_why_each_client_left():
    """Keys: a missing reply, a reply without the record, a missing key; shares: a wrong list of
    recipients. Each leaves one reason; too few clients end the round for all."""
    clients = Clients(5)
    real = clients.exchange

    def faulty(action, contents):
        out = real(action, contents)
        if action == "secagg_keys":
            out.pop(0)
            out[1] = RecordDict({"other": ConfigRecord({})})
            out[2] = RecordDict({secagg.RECORD: ConfigRecord({"mask-pk": b"x"})})
        return out
    server = secagg.ServerRound(4, [0, 1, 2, 3, 4], faulty)
    server.setup()
    assert server.failures == {
        0: "secure aggregation (secagg_keys): no reply",
        1: "secure aggregation (secagg_keys): reply without its secagg record",
        2: "secure aggregation: client 2: share-pk is not a byte string",
        3: "secure aggregation: only 2 clients sent keys; secure aggregation needs 3",
        4: "secure aggregation: only 2 clients sent keys; secure aggregation needs 3",
    }
    assert server.peers == []

    clients = Clients(4)
    real = clients.exchange

    def wrong_recipients(action, contents):
        out = real(action, contents)
        if action == "secagg_shares":
            for k in (0, 1):
                record = dict(out[k].config_records[secagg.RECORD])
                out[k] = RecordDict({secagg.RECORD: ConfigRecord({**record, "dsts": list(record["dsts"])[:-1] + [9]})})
        return out
    server = secagg.ServerRound(5, [0, 1, 2, 3], wrong_recipients)
    server.setup()
    assert server.failures[0] == "secure aggregation: client 0 sent shares to [1, 2, 9]"
    assert server.failures[2] == ("secure aggregation: only 2 clients shared their keys, fewer than the threshold 3")
    assert server.peers == [] and server.threshold == 3


def test_unmasking_skips_a_bad_reply_and_names_strangers():
    """Five clients (threshold 3): client 0's unmasking reply is malformed, client 1 sends shares
    in another order: both are skipped, the three others still unmask the exact sum."""
    clients, server, summands, uploads = _protocol_round(n=5)
    real = clients.exchange

    def faulty(action, contents):
        out = real(action, contents)
        if action == "secagg_unmask":
            out[0] = RecordDict({secagg.RECORD: ConfigRecord({"owners": [1]})})
            record = dict(out[1].config_records[secagg.RECORD])
            out[1] = RecordDict({secagg.RECORD: ConfigRecord({"owners": list(reversed(record["owners"])),
                                                             "shares": list(record["shares"])})})
        return out
    server.exchange = faulty
    shapes = {k: tuple(t.shape) for k, t in summands[0].items()}
    masks = server.unmask(sorted(uploads), shapes)
    total, expected = modular_sum(list(uploads.values())), modular_sum(summands)
    assert all(np.array_equal(total[k] - masks[k], expected[k]) for k in shapes)
    assert server.failures == {0: "secure aggregation: client 0: shares is not a list of byte strings",
                               1: "secure aggregation: client 1 returned shares of other clients"}
    with pytest.raises(RuntimeError, match=r"^round 7: secure aggregation: clients \[9\] were never part of the "
                                           r"protocol$"):
        server.unmask([0, 9], shapes)


def test_too_few_shares_message_names_the_round_to_continue_from():
    clients, server, summands, uploads = _protocol_round(silent={"secagg_unmask": {0, 1}})
    with pytest.raises(RuntimeError) as err:
        server.unmask(sorted(uploads), {k: tuple(t.shape) for k, t in summands[0].items()})
    assert str(err.value) == (
        "round 7: secure aggregation: fewer than 3 shares came back for clients [0, 1, 2, 3] "
        "([(0, 'secure aggregation (secagg_unmask): no reply within 1s'), (1, 'secure aggregation (secagg_unmask): "
        "no reply within 1s')]); the sum cannot be unmasked; the run stopped after round 6: resume it with --resume")


def test_secrets_are_rebuilt_or_refused_by_name():
    from flwr.common.secure_aggregation.crypto.shamir import create_shares

    shares = create_shares(b"s" * 32, 2, 3)
    assert secagg._secret(shares[:2], 32, 4) == b"s" * 32
    with pytest.raises(RuntimeError, match="^secure aggregation: the shares of client 4 give a 16-byte seed$"):
        secagg._secret(create_shares(b"s" * 16, 2, 3)[:2], 32, 4)
    with pytest.raises(RuntimeError, match="^secure aggregation: the shares of client 4 do not combine: "):
        secagg._secret([shares[0], shares[0][:4] + bytes(len(shares[0]) - 4)], 32, 4)


def test_a_round_goes_on_with_exactly_threshold_clients():
    """Four clients (threshold 3), client 3 silent at the shares step: three remain, exactly the
    threshold, and their sum is recovered exactly."""
    clients, server, summands, uploads = _protocol_round(silent={"secagg_shares": {3}})
    assert server.peers == [0, 1, 2] and server.threshold == 3 and sorted(uploads) == [0, 1, 2]
    shapes = {k: tuple(t.shape) for k, t in summands[0].items()}
    total, masks = modular_sum(list(uploads.values())), server.unmask(sorted(uploads), shapes)
    expected = modular_sum([summands[k] for k in (0, 1, 2)])
    assert all(np.array_equal(total[k] - masks[k], expected[k]) for k in shapes)


def test_a_malformed_share_reply_is_named():
    server = secagg.ServerRound(3, [0, 1, 2, 3, 4],
                                _replacing(Clients(5), "secagg_shares", 2, {"ctxts": [b"x"]}, keep=False))
    server.setup()
    assert server.failures == {2: "secure aggregation: client 2: dsts is not a list of client ids"}
    assert server.peers == [0, 1, 3, 4]


def test_shares_that_rebuild_a_wrong_seed_stop_the_unmasking():
    """The clients' shares of client 0's self-mask seed are replaced by shares of a 16-byte
    secret: the server refuses the seed, naming client 0."""
    from flwr.common.secure_aggregation.crypto.shamir import create_shares

    clients, server, summands, uploads = _protocol_round()
    fake = create_shares(b"z" * 16, 3, 4)
    real = clients.exchange

    def lying(action, contents):
        out = real(action, contents)
        if action == "secagg_unmask":
            for i, k in enumerate(sorted(out)):
                record = dict(out[k].config_records[secagg.RECORD])
                shares = list(record["shares"])
                shares[0] = fake[i]
                out[k] = RecordDict({secagg.RECORD: ConfigRecord({**record, "shares": shares})})
        return out
    server.exchange = lying
    with pytest.raises(RuntimeError, match="^secure aggregation: the shares of client 0 give a 16-byte seed$"):
        server.unmask(sorted(uploads), {k: tuple(t.shape) for k, t in summands[0].items()})


def test_aflora_summand_is_made_by_the_method_itself():
    method, state, ups = _method_and_updates("aflora")

    class Trained(AFLoRA):
        def client_train(self, ctx, payload, client_state):
            return ups[1], client_state

    inner = Trained(AFLoRAOptions(dlf=False), SETUP)
    upload, _ = SecureSum(inner).client_train(None, SecureSum(inner).payload(state, 1), {})
    assert torch.equal(upload.tensors["q.B"], encode(SUMMABLE["aflora"].summand(inner, ups[1], 0.01))["q.B"])
