"""Secure aggregation on Flower: the SecAgg protocol (Bonawitz et al., CCS 2017) in fedlora's
Message-API rounds, so that the server learns the sum of the clients' summands
(`fedlora.aggregation.secagg`) and nothing about any one of them.

Why not Flower's `SecAggPlusWorkflow` and `secaggplus_mod` (flwr 1.41), and what is Flower's:
the workflow drives a legacy `Strategy` (`LegacyContext`, `configure_fit`/`aggregate_fit`,
FitIns/FitRes records) and the mod expects the legacy FitRes reply and a SecAgg stage in every
train message, while fedlora's ServerApp runs its own rounds over `grid` with its own records.
Two properties of that code also rule it out here: its mask generator (`pseudo_rand_gen`) folds
each 32-byte key into a 32-bit seed for NumPy's MT19937 (flwr issue #7522, open), so a server
that learns a client's self-mask seed, as it does in the last stage, could search that client's
pairwise seeds; and its stochastic quantisation draws from NumPy's global, unseeded generator, so
a run would not repeat. So the protocol is composed here from Flower's own primitives: elliptic-
curve key pairs (`flwr.supercore.primitives.asymmetric`), key agreement with HKDF and authenticated
encryption of the shares (`flwr.common.secure_aggregation.crypto.symmetric_encryption`), Shamir's
secret sharing (`...crypto.shamir`) and the share plaintext layout (`...secaggplus_utils`). Ours:
the four message exchanges, the mask generator (AES-256 in counter mode keyed with the whole
32-byte secret, from `cryptography`) and the fixed point (deterministic, in
`fedlora.aggregation.secagg`).

A round, clients named by their partition ids, U0 ⊇ U1 ⊇ A the clients still in at each step:

  1. keys (`query.secagg_keys`): each client makes two key pairs, one to encrypt shares (c), one
     for masks (s), and sends the public halves.
  2. shares (`query.secagg_shares`): the server sends everyone the keys of U0; each client draws a
     self-mask seed b, splits b and its mask secret s_sk into |U0| Shamir shares with threshold
     t = ⌊|U0|/2⌋ + 1, and sends each peer its shares encrypted with their common c key.
  3. train (`train` + a `secagg` record): the server forwards to each client of U1 the shares
     addressed to it; the client trains, and uploads y = x + PRG(b) + Σ_{v ∈ U1, v ≠ u} ±PRG(s_uv)
     modulo 2^64 (+ when u < v): the pairwise masks cancel in the sum over U1.
  4. unmask (`query.secagg_unmask`): A are the clients whose masked upload the server kept; each
     client of A sends, for every client of A, its share of b, and for every client of U1 \\ A (it
     dropped or was refused), its share of s_sk, never both for one client. With t shares each
     the server rebuilds those secrets and removes the self masks of A and the pairwise masks
     between A and the dropped clients.

Dropout tolerance: the sum is recovered as long as t of the clients that sent shares answer the
last step; a client that drops after step 2 is simply left out of the sum. Threat model
(docs/concepts/privacy.md): an honest-but-curious server and up to t − 1 clients colluding
with it learn nothing about an individual summand beyond the sum.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import ConfigRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

RECORD = "secagg"  # pragma: no mutate (a name both sides read from this constant)
"""The ConfigRecord of every secure-aggregation message and reply."""
STATE = "fedlora-secagg"  # pragma: no mutate (a name only this module reads)
"""The client's protocol state in its Flower Context (kept by the SuperNode between messages)."""
ACTIONS = ("secagg_keys", "secagg_shares", "secagg_unmask")
"""The ClientApp's query actions (message types `query.<action>`)."""
MAX_BYTES = 16_384
"""The longest key, share or ciphertext accepted from the other side."""


class SecAggError(ValueError):
    """A protocol message that breaks the protocol (one line: who, what)."""


# -- the mask generator -------------------------------------------------------------------------

def prg(key: bytes, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Uniform 64-bit words for every coordinate of `shapes` (keys in sorted order): the
    keystream of AES-256-CTR under the 32-byte `key` (a fresh key every round, so a zero nonce)."""
    sizes = {k: math.prod(shapes[k]) for k in sorted(shapes)}
    cipher = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    words = np.frombuffer(cipher.update(bytes(8 * sum(sizes.values()))), dtype="<u8")
    out, start = {}, 0
    for k, n in sizes.items():
        out[k] = words[start:start + n].reshape(shapes[k]).astype(np.uint64)
        start += n
    return out


def pair_key(secret_key: bytes, public_key: bytes) -> bytes:
    """The 32-byte key two clients share (ECDH + HKDF: the same from either side)."""
    return base64.urlsafe_b64decode(generate_shared_key(bytes_to_private_key(secret_key),
                                                        bytes_to_public_key(public_key)))


def public_key_of(secret_key: bytes) -> bytes:
    return public_key_to_bytes(bytes_to_private_key(bytes(secret_key)).public_key())


def add(total: dict[str, np.ndarray], masks: dict[str, np.ndarray], subtract: bool = False) -> None:
    """total + masks (− with `subtract`), modulo 2^64, in place."""
    for k, m in masks.items():
        if subtract:
            total[k] -= m
        else:
            total[k] += m


# -- reading the other side's records ----------------------------------------------------------

@dataclass(frozen=True)
class Fields:
    """A record from the other side, read strictly; every error names who sent it."""

    record: Mapping
    who: str

    def ints(self, key: str) -> list[int]:
        return _ints(self.record, key, self.who)

    def blobs(self, key: str) -> list[bytes]:
        return _blobs(self.record, key, self.who)

    def int(self, key: str) -> int:
        return _int(self.record, key, self.who)

    def blob(self, key: str) -> bytes:
        return _blob(self.record, key, self.who)


def from_server(request: Mapping) -> Fields:
    return Fields(request, "server")


def _ints(record: Mapping, key: str, who: str) -> list[int]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SecAggError(f"secure aggregation: {who}: {key} is not a list of client ids")
    return list(value)


def _blobs(record: Mapping, key: str, who: str) -> list[bytes]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, bytes) and 0 < len(v) <= MAX_BYTES for v in value):
        raise SecAggError(f"secure aggregation: {who}: {key} is not a list of byte strings")
    return list(value)


def _int(record: Mapping, key: str, who: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SecAggError(f"secure aggregation: {who}: {key} is not an integer")
    return value


def _blob(record: Mapping, key: str, who: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes) or not 0 < len(value) <= MAX_BYTES:
        raise SecAggError(f"secure aggregation: {who}: {key} is not a byte string")
    return value


# -- the client's side --------------------------------------------------------------------------

def _state(context_state: RecordDict, round_: int, client: int) -> ConfigRecord:
    """This round's protocol state of `client` (SecAggError when it has none)."""
    state = context_state.config_records.get(STATE)
    if state is None or state.get("round") != round_ or state.get("client") != client:
        raise SecAggError(f"secure aggregation: client {client} has no keys for round {round_}")
    return state


def client_keys(context_state: RecordDict, client: int, request: Mapping) -> ConfigRecord:
    """Step 1: two fresh key pairs (shares, masks) for this round; the public halves go back."""
    req = from_server(request)
    round_ = req.int("round")
    if req.int("client") != client:
        raise SecAggError(f"secure aggregation: the server addressed client {request.get('client')}; "
                          f"this node serves {client}")
    share_sk, share_pk = generate_key_pairs()
    mask_sk, mask_pk = generate_key_pairs()
    context_state.config_records[STATE] = ConfigRecord({
        "round": round_, "client": client,
        "share-sk": private_key_to_bytes(share_sk), "mask-sk": private_key_to_bytes(mask_sk),
    })
    return ConfigRecord({"share-pk": public_key_to_bytes(share_pk), "mask-pk": public_key_to_bytes(mask_pk)})


def client_shares(context_state: RecordDict, client: int, request: Mapping) -> ConfigRecord:
    """Step 2: a self-mask seed b; b and the mask secret key split into Shamir shares, one per
    client of U0, each encrypted for its owner."""
    req = from_server(request)
    round_, t, peers = req.int("round"), req.int("threshold"), req.ints("peers")
    share_pks, mask_pks = req.blobs("share-pk"), req.blobs("mask-pk")
    if len(set(peers)) != len(peers) or client not in peers or not len(peers) == len(share_pks) == len(mask_pks):
        raise SecAggError("secure aggregation: server: peers and keys do not match")
    if not 2 <= t <= len(peers) or t <= len(peers) // 2:
        raise SecAggError(f"secure aggregation: server: threshold {t} for {len(peers)} clients (a majority is needed)")
    if len(set(share_pks + mask_pks)) != 2 * len(peers):
        raise SecAggError("secure aggregation: server: two clients have the same public key")
    state = _state(context_state, round_, client)
    if "peers" in state:
        raise SecAggError(f"secure aggregation: client {client} already shared its keys in round {round_}")
    own = peers.index(client)
    if share_pks[own] != public_key_of(state["share-sk"]) or mask_pks[own] != public_key_of(state["mask-sk"]):
        raise SecAggError(f"secure aggregation: server: client {client}'s own public keys are not the ones it sent")
    seed = os.urandom(32)
    b_shares = create_shares(seed, t, len(peers))
    sk_shares = create_shares(bytes(state["mask-sk"]), t, len(peers))
    dsts, ctxts = [], []
    for i, v in enumerate(peers):
        if v == client:
            continue
        key = generate_shared_key(bytes_to_private_key(bytes(state["share-sk"])), bytes_to_public_key(share_pks[i]))
        dsts.append(v)
        ctxts.append(encrypt(key, share_keys_plaintext_concat(client, v, b_shares[i], sk_shares[i])))
    context_state.config_records[STATE] = ConfigRecord({
        **dict(state), "peers": peers, "threshold": t, "share-pks": share_pks, "mask-pks": mask_pks,
        "seed": seed, "owners": [client], "b-shares": [b_shares[own]], "sk-shares": [sk_shares[own]],
    })
    return ConfigRecord({"dsts": dsts, "ctxts": ctxts})


def receive_shares(context_state: RecordDict, client: int, request: Mapping) -> None:
    """Step 3, before training: decrypt the shares U1's clients sent this client and keep them."""
    req = from_server(request)
    round_ = req.int("round")
    state = _state(context_state, round_, client)
    if "masked-with" in state:
        raise SecAggError(f"secure aggregation: client {client} already uploaded in round {round_}")
    peers, everyone = req.ints("peers"), list(state["peers"])
    srcs, ctxts = req.ints("srcs"), req.blobs("ctxts")
    if (client not in peers or not set(peers) <= set(everyone) or sorted(srcs) != sorted(set(peers) - {client})
            or len(srcs) != len(ctxts)):
        raise SecAggError("secure aggregation: server: the shares forwarded do not match the clients of the round")
    if len(peers) < int(state["threshold"]):
        raise SecAggError(f"secure aggregation: {len(peers)} clients left, fewer than the threshold {state['threshold']}")
    owners, b_shares, sk_shares = list(state["owners"]), list(state["b-shares"]), list(state["sk-shares"])
    share_sk = bytes_to_private_key(bytes(state["share-sk"]))
    for src, ctxt in zip(srcs, ctxts):
        key = generate_shared_key(share_sk, bytes_to_public_key(bytes(state["share-pks"][everyone.index(src)])))
        try:
            sender, dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(key, ctxt))
        except Exception:  # noqa: BLE001 - a forged or damaged ciphertext, whatever the library raises
            raise SecAggError(f"secure aggregation: the share from client {src} does not decrypt") from None
        if sender != src or dst != client:
            raise SecAggError(f"secure aggregation: the share from client {src} names {sender} → {dst}")
        owners.append(src)
        b_shares.append(b_share)
        sk_shares.append(sk_share)
    context_state.config_records[STATE] = ConfigRecord({
        **dict(state), "masked-with": sorted(peers), "owners": owners, "b-shares": b_shares, "sk-shares": sk_shares,
    })


def add_masks(context_state: RecordDict, client: int, round_: int, words: dict[str, np.ndarray]) -> None:
    """Step 3, after training: the encoded summand (uint64 words) plus the self mask and the
    pairwise masks with every other client of U1, in place."""
    state = _state(context_state, round_, client)
    shapes = {k: w.shape for k, w in words.items()}
    add(words, prg(bytes(state["seed"]), shapes))
    everyone, mask_sk = list(state["peers"]), bytes(state["mask-sk"])
    for v in state["masked-with"]:
        if v != client:
            mask_pk = bytes(state["mask-pks"][everyone.index(v)])
            # + for the lower id, − for the higher (v ≠ client: > and >= agree)
            add(words, prg(pair_key(mask_sk, mask_pk), shapes), subtract=client > v)  # pragma: no mutate


def client_unmask(context_state: RecordDict, client: int, request: Mapping) -> ConfigRecord:
    """Step 4: for each client the server kept, its share of b; for each one dropped, its share of
    the mask secret key; once per round, never both for one client."""
    req = from_server(request)
    round_ = req.int("round")
    state = _state(context_state, round_, client)
    if "masked-with" not in state or state.get("unmasked"):
        raise SecAggError(f"secure aggregation: client {client} has no unmasking to do in round {round_}")
    active, dropped = req.ints("active"), req.ints("dropped")
    peers = set(state["masked-with"])
    if (client not in active or set(active) & set(dropped) or set(active) | set(dropped) != peers
            or len(set(active)) != len(active) or len(set(dropped)) != len(dropped)):
        raise SecAggError("secure aggregation: server: the kept and dropped clients do not split the round's clients")
    if len(active) < int(state["threshold"]):
        raise SecAggError(f"secure aggregation: {len(active)} clients kept, fewer than the threshold "
                          f"{state['threshold']}: no share is revealed")
    owners = list(state["owners"])
    shares = [bytes(state["b-shares"][owners.index(v)]) for v in active]
    shares += [bytes(state["sk-shares"][owners.index(d)]) for d in dropped]
    context_state.config_records[STATE] = ConfigRecord({**dict(state), "unmasked": True})
    return ConfigRecord({"owners": active + dropped, "shares": shares})


# -- the server's side --------------------------------------------------------------------------

Exchange = Callable[[str, dict[int, RecordDict]], dict[int, "RecordDict | str"]]
"""(action, client → message content) → client → reply content, or why there is none."""


@dataclass
class ServerRound:
    """One round's protocol, from the server's side. `setup()` runs steps 1-2, `train_record(k)`
    is what client k's train message carries, and `unmask(kept, shapes)` runs step 4 and returns
    the masks in the kept clients' sum (`fedlora.aggregation.secagg.Unmask`)."""

    round_: int
    clients: list[int]
    exchange: Exchange
    failures: dict[int, str] = field(default_factory=dict)
    """Clients that left during steps 1-2, and why."""
    mask_pks: dict[int, bytes] = field(default_factory=dict)
    peers: list[int] = field(default_factory=list)
    """U1: the clients that sent their shares (the ones that mask with each other)."""
    threshold: int = 0
    forward: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)

    def _ask(self, action: str, contents: dict[int, dict]) -> dict[int, Mapping]:
        """Send, and keep the well-formed replies (others go to `failures`)."""
        out = {}
        replies = self.exchange(action, {k: RecordDict({RECORD: ConfigRecord({"round": self.round_, **c})})
                                         for k, c in contents.items()})
        for k in contents:
            reply = replies.get(k, "no reply")
            if isinstance(reply, str):
                self.failures[k] = f"secure aggregation ({action}): {reply}"
            elif RECORD not in reply.config_records:
                self.failures[k] = f"secure aggregation ({action}): reply without its {RECORD} record"
            else:
                out[k] = reply.config_records[RECORD]
        return out

    def setup(self) -> dict[int, str]:
        """Steps 1 and 2; the clients that left, with the reason."""
        share_pks: dict[int, bytes] = {}
        for k, r in self._ask("secagg_keys", {k: {"client": k} for k in self.clients}).items():
            try:
                reply = Fields(r, f"client {k}")
                share_pks[k], self.mask_pks[k] = reply.blob("share-pk"), reply.blob("mask-pk")
                _public_key(share_pks[k], k), _public_key(self.mask_pks[k], k)
            except SecAggError as err:
                self.failures[k] = str(err)
                share_pks.pop(k, None), self.mask_pks.pop(k, None)
        u0 = sorted(share_pks)
        self.threshold = len(u0) // 2 + 1
        if len(u0) < 3:
            return self._give_up(u0, f"only {len(u0)} clients sent keys; secure aggregation needs 3")
        keys = {"peers": u0, "threshold": self.threshold, "share-pk": [share_pks[k] for k in u0],
                "mask-pk": [self.mask_pks[k] for k in u0]}
        sent: dict[int, dict[int, bytes]] = {}
        for k, r in self._ask("secagg_shares", {k: keys for k in u0}).items():
            try:
                reply = Fields(r, f"client {k}")
                dsts, ctxts = reply.ints("dsts"), reply.blobs("ctxts")
                if sorted(dsts) != [v for v in u0 if v != k] or len(dsts) != len(ctxts):
                    raise SecAggError(f"secure aggregation: client {k} sent shares to {sorted(dsts)}")
                sent[k] = dict(zip(dsts, ctxts))
            except SecAggError as err:
                self.failures[k] = str(err)
        self.peers = sorted(sent)
        if len(self.peers) < self.threshold:
            return self._give_up(self.peers, f"only {len(self.peers)} clients shared their keys, fewer than the "
                                             f"threshold {self.threshold}")
        for v in self.peers:
            srcs = [u for u in self.peers if u != v]
            self.forward[v] = (srcs, [sent[u][v] for u in srcs])
        return self.failures

    def _give_up(self, left: list[int], reason: str) -> dict[int, str]:
        for k in left:
            self.failures[k] = f"secure aggregation: {reason}"
        self.peers = []
        return self.failures

    def train_record(self, client: int) -> ConfigRecord:
        """What client `client`'s train message carries: U1 and the shares addressed to it."""
        srcs, ctxts = self.forward[client]
        return ConfigRecord({"round": self.round_, "peers": self.peers, "srcs": srcs, "ctxts": ctxts})

    def unmask(self, kept: list[int], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """Step 4: the sum of the masks in the kept clients' uploads (RuntimeError if the shares
        that come back cannot rebuild every secret needed)."""
        active = sorted(kept)
        dropped = [k for k in self.peers if k not in active]
        if not set(active) <= set(self.peers):
            raise RuntimeError(f"round {self.round_}: secure aggregation: clients {sorted(set(active) - set(self.peers))} "
                               "were never part of the protocol")
        request = {"active": active, "dropped": dropped}
        collected: dict[int, list[bytes]] = {k: [] for k in self.peers}
        for k, r in self._ask("secagg_unmask", {k: request for k in active}).items():
            try:
                reply = Fields(r, f"client {k}")
                owners, shares = reply.ints("owners"), reply.blobs("shares")
            except SecAggError as err:
                self.failures[k] = str(err)
                continue
            if owners != active + dropped or len(shares) != len(owners):
                self.failures[k] = f"secure aggregation: client {k} returned shares of other clients"
                continue
            for owner, share in zip(owners, shares):
                collected[owner].append(share)
        short = [k for k, s in collected.items() if len(s) < self.threshold]
        if short:
            raise RuntimeError(
                f"round {self.round_}: secure aggregation: fewer than {self.threshold} shares came back for clients "
                f"{short} ({sorted(self.failures.items())[:3]}); the sum cannot be unmasked; the run stopped after "
                f"round {self.round_ - 1}: resume it with --resume")
        total = {k: np.zeros(s, dtype=np.uint64) for k, s in shapes.items()}
        for k in active:
            add(total, prg(_secret(collected[k], 32, k), shapes))
        for d in dropped:
            mask_sk = _secret(collected[d], None, d)
            for u in active:
                # what u added for d (u ≠ d: > and >= agree)
                add(total, prg(pair_key(mask_sk, self.mask_pks[u]), shapes), subtract=u > d)  # pragma: no mutate
        return total


def _public_key(pem: bytes, owner: int) -> None:
    """SecAggError unless `pem` is an elliptic-curve public key (what the key agreement needs)."""
    try:
        key = bytes_to_public_key(pem)
    except Exception:  # noqa: BLE001 - whatever the parser raises for a malformed key
        key = None  # pragma: no mutate (any non-key value is refused below)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SecAggError(f"secure aggregation: client {owner}: a public key is not an elliptic-curve key")


def _secret(shares: list[bytes], length: int | None, owner: int) -> bytes:
    """A secret rebuilt from its shares (RuntimeError when they do not combine)."""
    try:
        secret = combine_shares(shares)
    except (ValueError, IndexError) as err:
        raise RuntimeError(f"secure aggregation: the shares of client {owner} do not combine: {err}") from None
    if length is not None and len(secret) != length:
        raise RuntimeError(f"secure aggregation: the shares of client {owner} give a {len(secret)}-byte seed")
    return secret


def masked_upload(context_state: RecordDict, client: int, round_: int, tensors: Mapping) -> dict:
    """The client's encoded summand (int64 tensors) masked: what leaves the node."""
    import torch

    from fedlora.aggregation.secagg import as_words

    words = {k: as_words(t).copy() for k, t in tensors.items()}
    add_masks(context_state, client, round_, words)
    return {k: torch.from_numpy(w.view(np.int64)) for k, w in words.items()}
