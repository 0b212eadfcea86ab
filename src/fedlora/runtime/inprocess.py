"""The in-process runtime: every simulated client shares ONE base model, one after another.

The model and the clients' training, the server's public-data steps and evaluation run on
`model.device`; the global state, updates, aggregation and checkpoints stay on the CPU (small
tensors: cheap there, and a checkpoint is the same whatever device wrote it).

Per-client memory is only what the method keeps (AFLoRA: λ and the mask per module);
factors are loaded into the shared LoRA layers for a client's turn and cleared after.
All randomness comes from (seed, round, client) streams and one checkpointed sampler, so
the same config and seed give the same numbers, and a resumed run the same as an
uninterrupted one.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from fedlora.adapters import Adapters
from fedlora.aggregation import build_pipeline
from fedlora.aggregation.privacy import PrivacyStage
from fedlora.algorithms import build_algorithm
from fedlora.algorithms.base import (
    DIAGNOSTIC_SECONDS,
    Aggregate,
    Algorithm,
    FederationSetup,
    Tensors,
    Update,
    first_non_finite,
)
from fedlora.clock import device_setup, simulated_round
from fedlora.config import ConfigError, RunConfig, dump_config
from fedlora.data.report import report_partition
from fedlora.data.task import FederatedTask, build_task
from fedlora.devices import DeviceProfile
from fedlora.evaluate import evaluate_task, predict_classes
from fedlora.memory import ModelDims, check_memory
from fedlora.models import base_parameter_count, load_model, load_tokenizer
from fedlora.personalized import concat_records, personal_metrics, personal_records
from fedlora.records import summarize
from fedlora.runtime.checkpoint import CHECKPOINT, FINAL_STATE, Checkpoint, check_state, save_merge
from fedlora.runtime.context import SERVER_STREAM, LocalClient, PublicServer, round_seed
from fedlora.files import atomic_write, tensors_to_bytes
from fedlora.runtime.outputs import UNTUNED_FILE, write_eval_items, write_json, write_metrics, write_run_header
from fedlora.runtime.progress import progress_bars, round_line
from fedlora.runtime.tensorboard import TensorBoardLog
from fedlora.runtime.rounds import Accepted, accept_update, screen_norms
from fedlora.runtime.rundir import adopt_config, refuse_existing_run, run_lock, verify_run

log = logging.getLogger("fedlora")


@contextmanager
def option_errors() -> Iterator[None]:
    """A method's own check of an option against this federation (it raises a ValueError
    that names the option) becomes a one-line ConfigError; other errors are bugs."""
    try:
        yield
    except ValueError as err:
        if not re.match(r"(algorithm|model)[.:]", str(err)):
            raise
        raise ConfigError(f"config error: {err}") from None


def clients_per_round(num_clients: int, fraction: float) -> int:
    """fraction · K rounded half up, at least one."""
    return max(1, int(fraction * num_clients + 0.5))


def sample_clients(rng: np.random.Generator, num_clients: int, fraction: float) -> list[int]:
    """Seeded participation: clients_per_round(K, fraction) distinct clients, sorted."""
    m = clients_per_round(num_clients, fraction)
    if m >= num_clients:
        return list(range(num_clients))
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


@dataclass
class Federation:
    """Everything a run holds in memory: one model, its adapters, the task, the method."""

    cfg: RunConfig
    model: torch.nn.Module
    tokenizer: Any
    adapters: Adapters
    task: FederatedTask
    algorithm: Algorithm
    total_params: int
    profiles: list[DeviceProfile]
    privacy: PrivacyStage | None = None
    """Differential privacy (config `privacy`), set by the runtime once it knows the run's history."""

    @classmethod
    def build(cls, cfg: RunConfig) -> Federation:
        """Files, model name and data are checked before the (slow) model load; target
        modules right after it, before any training."""
        cfg.check_files()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = cfg.model.torch_device()  # an unavailable device stops here, before the load
        tokenizer = load_tokenizer(cfg.model.name)
        check_memory(cfg, ModelDims.vocabulary_only(len(tokenizer)))  # the logits alone, before the data
        task = build_task(cfg, tokenizer)
        model = load_model(cfg.model.name, cfg.seed, len(tokenizer))
        check_memory(cfg, ModelDims.of(model.config))  # all of it, before any batch is built
        model.to(device)  # the one base model every simulated client shares
        total = base_parameter_count(model)
        adapters = Adapters.inject(model, cfg.model.target_modules, cfg.scaling)
        profiles = cfg.device_profiles()
        setup = FederationSetup(
            module_shapes=adapters.shapes(),
            client_max_ranks=list(cfg.federation.client_max_ranks),
            num_examples=[len(c) for c in task.clients],
            scaling=cfg.scaling,
            seed=cfg.seed,
            **device_setup(cfg, model, adapters, task, profiles),
        )
        with option_errors():  # the method inside its aggregation pipeline (attack, defences)
            algorithm = build_pipeline(build_algorithm(cfg.algorithm, setup), cfg)
        return cls(cfg, model, tokenizer, adapters, task, algorithm, total, profiles)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def client(self, client_id: int, round_: int, stage: int = 0) -> LocalClient:
        """Client `client_id`'s context; a later stage of a round draws its own batches."""
        f = self.cfg.federation
        seed = round_seed(self.cfg.seed, round_, client_id)
        if stage:
            seed = np.random.SeedSequence([self.cfg.seed, round_, client_id, stage])
        return LocalClient(
            adapters=self.adapters, model=self.model, client_id=client_id,
            examples=self.task.clients[client_id], label_ids=self.task.label_ids,
            loss_mode=self.cfg.data.loss, local_steps=f.local_steps, batch_size=f.batch_size,
            lr=f.lr, pad_id=self.pad_id, seed=seed,
            compute_dtype=self.cfg.model.compute_dtype, task=self.task.kind,
        )

    def server(self, round_: int) -> PublicServer:
        return PublicServer(
            adapters=self.adapters, model=self.model, examples=self.task.public,
            heldout=self.task.public_heldout, pad_id=self.pad_id, seed=round_seed(self.cfg.seed, round_, SERVER_STREAM),
            compute_dtype=self.cfg.model.compute_dtype,
        )

    def evaluate_untuned(self) -> dict[str, Any]:
        """The base model as loaded: no adapter factors loaded, so the LoRA layers pass through."""
        self.adapters.clear()
        return evaluate_task(self.model, self.task, self.pad_id, self.cfg.federation.eval_batch_size,
                             self.cfg.model.compute_dtype)[0]

    def evaluate_personal(self, state: Tensors, client_states: dict[int, Tensors]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Each client's accuracy on its held-out part with the model it would use
        (`Algorithm.personal_factors`), and the per-item records (fedlora.personalized). A
        method without personal models is evaluated once, with the global adapter."""
        algo, cfg = self.algorithm, self.cfg
        method = getattr(algo, "method", algo)  # the method inside its aggregation pipeline
        shared = type(method).personal_factors is Algorithm.personal_factors
        parts = []
        for k, examples in enumerate(self.task.personal):
            if not shared or k == 0:
                self.adapters.clear()
                self.adapters.load(algo.personal_factors(state, client_states.get(k, {})))
            preds, _ = predict_classes(self.model, examples, self.task.label_ids, self.pad_id,
                                       cfg.federation.eval_batch_size, cfg.model.compute_dtype)
            parts.append(personal_records(k, self.task.personal_ids[k], [e.target for e in examples], preds))
        self.adapters.clear()
        items = concat_records(parts)
        return personal_metrics(items), items

    def evaluate(self, state: Tensors) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The global model's metrics and per-item records (fedlora.evaluate.evaluate_task)."""
        self.adapters.load(self.algorithm.eval_factors(state))
        try:
            return evaluate_task(
                self.model, self.task, self.pad_id,
                self.cfg.federation.eval_batch_size, self.cfg.model.compute_dtype,
            )
        finally:
            self.adapters.clear()


def _check_server_result(round_: int, agg: Aggregate) -> None:
    """The server's own output must be finite: a NaN merged into the base would be replayed on
    every resume. Stop instead; the previous round's checkpoint stays intact."""
    merged = {f"merge.{n}.{k}": t for n, pair in (agg.merge or {}).items() for k, t in zip("BA", pair)}
    bad = first_non_finite({**agg.state, **merged})
    if bad is not None:
        raise RuntimeError(
            f"round {round_}: the server's aggregate contains NaN/Inf in {bad} (server steps diverged?); "
            "the run stopped before merging it; lower algorithm.server_lr and --resume"
        )


class Simulation:
    """`fedlora run`: rounds of sampled clients, aggregation, evaluation and checkpoints."""

    def __init__(self, cfg: RunConfig, run_dir: Path, progress: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.fed: Federation | None = None
        self.tensorboard: TensorBoardLog | None = None

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run (or resume) to cfg.federation.rounds, holding the run directory's lock throughout."""
        with run_lock(self.run_dir):
            return self._run(resume)

    def _run(self, resume: bool) -> dict[str, Any]:
        cfg = self.cfg
        if resume:
            ckpt, merges = verify_run(self.run_dir, cfg)  # before the model loads: fail fast
        else:
            refuse_existing_run(self.run_dir)
        fed = self.fed = Federation.build(cfg)
        per_round = clients_per_round(cfg.federation.num_clients, cfg.federation.fraction)
        # σ and the budget before any training (a resume with more rounds may be refused here)
        fed.privacy = PrivacyStage.build(cfg, fed.algorithm, per_round, ckpt.history if resume else [])
        if resume:
            for state in (ckpt.state, *ckpt.client_states.values()):
                check_state(state, fed.adapters.shapes(), self.run_dir / CHECKPOINT)
            adopt_config(self.run_dir, ckpt, cfg)
            torch.set_num_threads(ckpt.threads)
            for merge in merges:
                fed.adapters.merge(merge)
            sampler = np.random.default_rng()
            sampler.bit_generator.state = ckpt.sampler_state
            log.info("resuming %s after round %d", self.run_dir, ckpt.round)
        else:
            with option_errors():  # before the run directory is written
                init = fed.algorithm.init_state()
            partition_sha256 = write_run_header(self.run_dir, cfg, fed.task.partition_table(), fed.task.names)
            report_partition(self.run_dir, fed.task.partition_table(), fed.task.names, show=self.progress)
            if cfg.evaluation.untuned:  # the reference line of the accuracy figures
                untuned = fed.evaluate_untuned()
                write_json(self.run_dir / UNTUNED_FILE, untuned)
                log.info("untuned model: %s", ", ".join(f"{k} {v:.4f}" for k, v in untuned.items()
                                                         if isinstance(v, float)))
            sampler = np.random.default_rng(cfg.seed)
            ckpt = Checkpoint(0, init, {}, sampler.bit_generator.state, threads=torch.get_num_threads(),
                              config=dump_config(cfg), partition_sha256=partition_sha256)
        write_metrics(self.run_dir, ckpt.history)
        if cfg.logging.tensorboard:
            self.tensorboard = TensorBoardLog(self.run_dir, ckpt.history)

        rounds = cfg.federation.rounds
        try:
            with self._progress() as bar:
                t_rounds = bar.add_task("rounds", total=rounds, completed=ckpt.round)
                t_clients = bar.add_task("clients", total=per_round)
                for t in range(ckpt.round + 1, rounds + 1):
                    bar.reset(t_clients, total=per_round)
                    ckpt = self._round(fed, t, ckpt, sampler, lambda: bar.advance(t_clients))
                    bar.advance(t_rounds)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
        atomic_write(self.run_dir / FINAL_STATE, tensors_to_bytes(ckpt.state))  # = the record's state_sha256
        return self._summary(ckpt.history)

    def _progress(self) -> Progress:
        return progress_bars(self.progress)

    def _round(self, fed: Federation, t: int, ckpt: Checkpoint, sampler, on_client) -> Checkpoint:
        cfg, algo = self.cfg, fed.algorithm
        start = time.perf_counter()
        selected = sample_clients(sampler, cfg.federation.num_clients, cfg.federation.fraction)
        if fed.privacy is not None:
            fed.privacy.start_round(t, ckpt.history)
        state, updates, clients, rejected, client_states = self._train_clients(fed, t, ckpt, selected, on_client)

        s0 = time.perf_counter()
        server_metrics: dict[str, Any] = {}
        merges = ckpt.merges
        if clients:
            agg = algo.aggregate(state, updates, fed.server(t))
            fed.adapters.clear()
            _check_server_result(t, agg)
            state, server_metrics = agg.state, agg.metrics
            if agg.merge:
                merges = {**merges, t: save_merge(self.run_dir, t, agg.merge)}
                fed.adapters.merge(agg.merge)
        else:
            state = ckpt.state
            log.warning("round %d: no valid update; the global state is unchanged", t)
        # measuring is not aggregating: the clock charges the server's work, not its diagnostics,
        # whose seconds are recorded apart so that a round's wall time can be accounted for
        diagnostic_seconds = server_metrics.pop(DIAGNOSTIC_SECONDS, 0.0)
        server_seconds = time.perf_counter() - s0 - diagnostic_seconds
        sim = simulated_round(clients, fed.profiles, server_seconds, cfg.devices.server_time, ckpt.history)

        record: dict[str, Any] = {"round": t}
        if t % cfg.federation.eval_every == 0 or t == cfg.federation.rounds:
            ev, items = fed.evaluate(state)
            if cfg.evaluation.personalized:
                personal, personal_items = fed.evaluate_personal(state, client_states)
                record.update(personal)
                items.update(personal_items)
            write_eval_items(self.run_dir, t, items)
            record.update(test_loss=ev.pop("loss"), **ev)  # "accuracy" unless loss is all there is
        n = len(clients)
        record.update(
            train_loss=sum(c["train_loss"] for c in clients) / n if n else None,
            ranks={str(c["id"]): c["rank"] for c in clients},
            next_ranks={str(c["id"]): c["next_rank"] for c in clients},
            client_cost_percent=sum(c["cost_percent"] for c in clients) / n if n else None,
            uplink_bytes=sum(c["uplink_bytes"] for c in clients),
            downlink_bytes=sum(c["downlink_bytes"] for c in clients),
            server_seconds=server_seconds,
            server_diagnostic_seconds=diagnostic_seconds,
            wall_seconds=time.perf_counter() - start,
            **sim,
            clients=clients,
            rejected=rejected,
            **server_metrics,
        )
        if fed.privacy is not None:
            record.update(fed.privacy.record(t, ckpt.history, selected))
        new = Checkpoint(
            round=t, state=state, client_states=client_states,
            sampler_state=sampler.bit_generator.state, history=[*ckpt.history, record],
            threads=ckpt.threads, config=ckpt.config, merges=merges, partition_sha256=ckpt.partition_sha256,
        )
        new.save(self.run_dir)
        write_metrics(self.run_dir, new.history)
        if self.tensorboard is not None:
            self.tensorboard.add(record)
        log.info("%s", round_line(record, cfg.federation.rounds))
        return new

    def _train_clients(
        self, fed: Federation, t: int, ckpt: Checkpoint, selected: list[int], on_client
    ) -> tuple[Tensors, list[Update], list[dict[str, Any]], list[dict[str, Any]], dict[int, Tensors]]:
        """The transport: each selected client's round (here: one after another on the shared
        model), stage by stage for methods with intra-round stages (HierFedLoRA). Returns the
        state after the intermediate stages, the last stage's accepted updates, every accepted
        update's record, the rejections and the new client states."""
        algo = fed.algorithm
        client_states = dict(ckpt.client_states)
        clients: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        stages = algo.stages(ckpt.state, selected)  # one stage, one lane unless the method has more
        plan = [(s, lane, k) for s, lanes in enumerate(stages) for lane, ks in lanes.items() for k in ks]
        state, current, pending = ckpt.state, 0, []

        def close_stage() -> list[Update]:
            """The stage's updates that also pass the norm bound; their records and states kept."""
            kept = screen_norms(fed, t, pending, rejected)
            for a in kept:
                client_states[a.update.client_id] = a.client_state
                clients.append(a.record)
            return [a.update for a in kept]

        for stage, lane, k in plan:
            if stage != current:  # aggregate the previous stage within its lanes (groups)
                state, current = algo.aggregate_stage(state, close_stage(), current), stage
                pending = []
            c0 = time.perf_counter()
            ctx = fed.client(k, t, stage)
            payload = algo.payload(state, k)
            update, new_client_state = algo.client_train(ctx, payload, client_states.get(k, {}))
            fed.adapters.clear()
            record = accept_update(fed, state, t, update, payload, time.perf_counter() - c0, rejected)
            if record is not None:
                record.update(flops=ctx.flops, stage=stage, lane=lane)
                pending.append(Accepted(update, record, new_client_state))
            on_client()
        return state, close_stage(), clients, rejected, client_states

    def _summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        summary = summarize(self.cfg.algorithm.name, history)
        write_json(self.run_dir / "summary.json", summary)
        return summary
