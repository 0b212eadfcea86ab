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
from fedlora.clock import device_setup, server_clock_seconds, simulated_round
from fedlora.config import ConfigError, RunConfig, dump_config
from fedlora.data.report import report_partition
from fedlora.data.task import FederatedTask, build_task
from fedlora.devices import DeviceProfile, server_profile
from fedlora.evaluate import evaluate_task, predict_classes, subset_positions
from fedlora.memory import ModelDims, check_memory
from fedlora.models import base_parameter_count, load_model, load_tokenizer
from fedlora.personalized import concat_records, personal_metrics, personal_records
from fedlora.records import summarize
from fedlora.runtime.checkpoint import CHECKPOINT, FINAL_STATE, Checkpoint, check_state, save_merge
from fedlora.runtime.context import SERVER_STREAM, LocalClient, PublicServer, round_seed
from fedlora.files import atomic_write, tensors_to_bytes
from fedlora.runtime.outputs import (UNTUNED_FILE, record_resume, write_eval_items, write_json, write_metrics,
                                     write_run_header)
from fedlora.runtime.progress import progress_bars, round_line
from fedlora.runtime.tensorboard import TensorBoardLog
from fedlora.runtime.rounds import Accepted, Job, Result, accept_update, reject, screen_norms
from fedlora.runtime.rebuild import read_run, replay_merges
from fedlora.runtime.replay import Participation
from fedlora.runtime.rundir import adopt_config, refuse_existing_run, run_lock

log = logging.getLogger("fedlora")


MEASURED_WITHOUT_NODES = (
    "config error: devices: measured takes each client's device from its Flower node's report, and this runtime "
    "has no nodes; describe the devices as profiles (devices.assign, mix or classes: the same capability rule), "
    "or run on Flower (fedlora flower run / testbed)")
"""Why in-process refuses `devices: measured` before the nodes reported (a config that records
their figures, a Flower run's config.yaml, runs in-process with them: `fedlora run --replay`)."""


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

    @property
    def server_profile(self) -> DeviceProfile:
        """The declared server device (devices.server): its throughput times the server's FLOPs."""
        return server_profile(self.cfg.devices)

    @classmethod
    def build(cls, cfg: RunConfig, reported: list[list[int]] | None = None) -> Federation:
        """Files, model name and data are checked before the (slow) model load; target
        modules right after it, before any training. `reported`: on node-local data (Flower),
        each client's label histogram as its node reported it, instead of the clients' shards."""
        if cfg.devices.source == "measured" and cfg.devices.measured is None:
            raise ConfigError(MEASURED_WITHOUT_NODES)
        cfg.check_files()
        cfg.model.torch_device()  # an unavailable device stops here, before data and model load
        tokenizer = load_tokenizer(cfg.model.name)
        check_memory(cfg, ModelDims.vocabulary_only(len(tokenizer)))  # the logits alone, before the data
        return cls.assemble(cfg, tokenizer, build_task(cfg, tokenizer, reported))

    @classmethod
    def assemble(cls, cfg: RunConfig, tokenizer: Any, task: FederatedTask) -> Federation:
        """The model, its adapters and the method for `task` (the server's, or one node's own
        view: `fedlora.data.task.node_task`). The one place a run's method object is built."""
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = cfg.model.torch_device()  # an unavailable device stops here, before the load
        model = load_model(cfg.model.name, cfg.seed, len(tokenizer))
        check_memory(cfg, ModelDims.of(model.config))  # all of it, before any batch is built
        model.to(device)  # the one base model every simulated client shares
        total = base_parameter_count(model)
        adapters = Adapters.inject(model, cfg.model.target_modules, cfg.scaling)
        profiles = cfg.device_profiles()
        setup = FederationSetup(
            module_shapes=adapters.shapes(),
            client_max_ranks=list(cfg.federation.client_max_ranks),
            num_examples=task.client_sizes(),
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

    @property
    def eval_positions(self) -> np.ndarray | None:
        """The seeded eval subset's positions in the test set (federation.eval_subset), or None."""
        return subset_positions(len(self.task.test), self.cfg.federation.eval_subset)

    def evaluate(self, state: Tensors, subset: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The global model's metrics and per-item records (fedlora.evaluate.evaluate_task), on
        the eval subset when `subset` and the run has one; `subset_accuracy` (the curve's point)
        and `eval_items` added."""
        positions = self.eval_positions
        self.adapters.load(self.algorithm.eval_factors(state))
        try:
            ev, items = evaluate_task(
                self.model, self.task, self.pad_id,
                self.cfg.federation.eval_batch_size, self.cfg.model.compute_dtype,
                positions if subset else None,
            )
        finally:
            self.adapters.clear()
        ev["eval_items"] = len(items["id"])
        if positions is not None and "correct" in items and self.task.kind == "classification":
            correct = items["correct"] if subset else items["correct"][positions]
            ev["subset_accuracy"] = float(np.mean(correct))
        return ev, items


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

    hides_updates = False
    """Whether the transport can keep each client's update from the server (secure aggregation)."""
    lock_wait = 0.0
    """Seconds to wait for another process to release the run directory (0: stop at once)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, progress: bool = True,
                 replay: Participation | None = None) -> None:
        if cfg.privacy.secure_aggregation and not self.hides_updates:
            raise ConfigError("config error: privacy.secure_aggregation: needs the Flower runtime (fedlora flower "
                              "run); in process the server holds every client's update anyway")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.replay = replay
        """`fedlora run --replay`: take part exactly as a recorded (Flower) run's clients did."""
        self.fed: Federation | None = None
        self.tensorboard: TensorBoardLog | None = None
        self.events: list[dict[str, Any]] = []
        """What happened between rounds (Flower: nodes joining, refused), for the next record."""
        self.record_once: dict[str, Any] = {}
        """Fields for the next round's record only (Flower: the nodes' measured devices, in round 1's)."""

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run (or resume) to cfg.federation.rounds, holding the run directory's lock throughout."""
        with run_lock(self.run_dir, wait=self.lock_wait):
            return self._run(resume)

    def _run(self, resume: bool) -> dict[str, Any]:
        cfg = self.cfg
        if resume:
            saved = read_run(self.run_dir, cfg)  # before the model loads: fail fast
        else:
            refuse_existing_run(self.run_dir)
        fed = self.fed = Federation.build(cfg, self._reported())
        per_round = clients_per_round(cfg.federation.num_clients, cfg.federation.fraction)
        # σ and the budget before any training (a resume with more rounds may be refused here)
        fed.privacy = PrivacyStage.build(cfg, fed.algorithm, per_round, saved.checkpoint.history if resume else [])
        if resume:
            ckpt = saved.checkpoint
            for state in (ckpt.state, *ckpt.client_states.values()):
                check_state(state, fed.adapters.shapes(), self.run_dir / CHECKPOINT)
            adopt_config(self.run_dir, ckpt, cfg)
            torch.set_num_threads(ckpt.threads)
            replay_merges(fed.adapters, saved.merges)
            sampler = np.random.default_rng()
            sampler.bit_generator.state = ckpt.sampler_state
            record_resume(self.run_dir, ckpt.round)
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

    def _reported(self) -> list[list[int]] | None:
        """The clients' label histograms when nodes report them (Flower, nodes.local_data)."""
        return None

    def _progress(self) -> Progress:
        return progress_bars(self.progress)

    def _round(self, fed: Federation, t: int, ckpt: Checkpoint, sampler, on_client) -> Checkpoint:
        cfg, algo = self.cfg, fed.algorithm
        start = time.perf_counter()
        selected = sample_clients(sampler, cfg.federation.num_clients, cfg.federation.fraction)
        if fed.privacy is not None:
            fed.privacy.start_round(t, ckpt.history)
        state, updates, clients, rejected, screened, client_states = self._train_clients(
            fed, t, ckpt, selected, on_client)

        s0 = time.perf_counter()
        server_metrics: dict[str, Any] = {}
        merges = ckpt.merges
        server = fed.server(t)
        if clients:
            agg = algo.aggregate(state, updates, server)
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
        sim = simulated_round(clients, fed.profiles, server_clock_seconds(
            cfg.devices.server_time, server_seconds, server.flops, fed.server_profile), ckpt.history)

        record: dict[str, Any] = {"round": t}
        if t % cfg.federation.eval_every == 0 or t == cfg.federation.rounds:
            ev, items = fed.evaluate(state, subset=t < cfg.federation.rounds)
            if cfg.evaluation.personalized and (cfg.evaluation.personal_rounds == "every_evaluation"
                                                or t == cfg.federation.rounds):
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
            server_flops=server.flops,
            server_diagnostic_seconds=diagnostic_seconds,
            wall_seconds=time.perf_counter() - start,
            **sim,
            clients=clients,
            rejected=rejected,
            screened=screened,
            **({"events": self.events} if self.events else {}),
            **self.record_once,
            **server_metrics,
        )
        self.events, self.record_once = [], {}
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
    ) -> tuple[Tensors, list[Update], list[dict[str, Any]], list[dict[str, Any]], list[list[int]],
               dict[int, Tensors]]:
        """The stage loop both runtimes drive: each stage's jobs go to the transport
        (`_train_stage`, the only part a runtime replaces), every result is validated here the
        same way, and a method with intra-round stages (HierFedLoRA) aggregates within its lanes
        between stages. Returns the state after the intermediate stages, the last stage's kept
        updates, every kept update's record, the rejections, the [stage, client] pairs that
        reached the norm screen (the participation `--replay` repeats) and the new client states."""
        algo = fed.algorithm
        client_states = dict(ckpt.client_states)
        clients: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        screened: list[list[int]] = []
        state, updates = ckpt.state, []
        for stage, lanes in enumerate(algo.stages(ckpt.state, selected)):
            if stage:
                state = algo.aggregate_stage(state, updates, stage - 1)
            jobs = [Job(lane, k, algo.payload(state, k)) for lane, ks in lanes.items() for k in ks]
            earlier = {c["id"] for c in clients}
            accepted: list[Accepted] = []
            for job, result in zip(jobs, self._train_stage(fed, t, stage, state, jobs, ckpt, client_states, earlier)):
                if result.failure is not None:
                    reject(t, job.client, result.failure, rejected)
                else:
                    record = accept_update(fed, state, t, result.update, job.payload, result.seconds, rejected)
                    if record is not None:
                        record.update(result.record, flops=result.flops, stage=stage, lane=job.lane)
                        accepted.append(Accepted(result.update, record, result.client_state))
                        screened.append([stage, job.client])
                on_client()
            kept = screen_norms(fed, t, accepted, rejected)
            if self.replay is not None:  # the recorded run's norm screen (a liar's update, honest here)
                recorded = self.replay.round(t).kept
                for a in kept:
                    if (stage, a.update.client_id) not in recorded:
                        reject(t, a.update.client_id, "replay: not kept in the recorded run", rejected)
                kept = [a for a in kept if (stage, a.update.client_id) in recorded]
            for a in kept:
                if a.client_state is not None:
                    client_states[a.update.client_id] = a.client_state
                clients.append(a.record)
            updates = [a.update for a in kept]
        self._check_participation(t, clients, rejected)
        return state, updates, clients, rejected, screened, client_states

    def _train_stage(self, fed: Federation, t: int, stage: int, state: Tensors, jobs: list[Job],
                     ckpt: Checkpoint, client_states: dict[int, Tensors], earlier: set[int]) -> Iterator[Result]:
        """The in-process transport: each job's client trains on the shared model, one after
        another, from its private state as the server keeps it (`client_states`, this round's
        earlier stages included). Yields one Result per job, in order. (`ckpt.history` and
        `earlier`, the clients accepted in an earlier stage, are for transports that keep
        client state on the clients.)"""
        algo = fed.algorithm
        recorded = self.replay.round(t) if self.replay is not None else None
        for job in jobs:
            if recorded is not None and (stage, job.client) not in recorded.screened:
                yield Result(failure="replay: no update reached the server in the recorded run")
                continue
            reset = recorded is not None and job.client in recorded.resets
            c0 = time.perf_counter()
            ctx = fed.client(job.client, t, stage)
            update, new_state = algo.client_train(ctx, job.payload, {} if reset else client_states.get(job.client, {}))
            fed.adapters.clear()
            yield Result(update, seconds=time.perf_counter() - c0, flops=ctx.flops, client_state=new_state,
                         record={"state_reset": "replay: lost in the recorded run"} if reset else {})

    def _check_participation(self, t: int, clients: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> None:
        """In-process, every client answers: nothing to check (Flower: enough clients?)."""

    def _summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        summary = summarize(self.cfg.algorithm.name, history)
        write_json(self.run_dir / "summary.json", summary)
        return summary
