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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from fedlora.adapters import Adapters
from fedlora.algorithms import build_algorithm
from fedlora.algorithms.base import (
    Aggregate,
    Algorithm,
    FederationSetup,
    Tensors,
    Update,
    first_non_finite,
)
from fedlora.clock import device_setup, simulated_round
from fedlora.config import RunConfig, dump_config
from fedlora.data.report import report_partition
from fedlora.data.task import FederatedTask, build_task
from fedlora.devices import DeviceProfile
from fedlora.evaluate import evaluate_task
from fedlora.models import base_parameter_count, load_base_model
from fedlora.runtime.checkpoint import Checkpoint, save_merge
from fedlora.runtime.context import SERVER_STREAM, LocalClient, PublicServer, round_seed
from fedlora.runtime.files import atomic_write, tensors_to_bytes
from fedlora.runtime.outputs import write_json, write_metrics, write_run_header
from fedlora.runtime.rounds import accept_update
from fedlora.runtime.rundir import adopt_config, refuse_existing_run, run_lock, verify_run

log = logging.getLogger("fedlora")


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

    @classmethod
    def build(cls, cfg: RunConfig) -> Federation:
        cfg.check_files()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = cfg.model.torch_device()  # an unavailable device stops here, before the load
        model, tokenizer = load_base_model(cfg.model.name, seed=cfg.seed)
        model.to(device)  # the one base model every simulated client shares
        total = base_parameter_count(model)
        adapters = Adapters.inject(model, cfg.model.target_modules, cfg.scaling)
        task = build_task(cfg, tokenizer)
        profiles = cfg.device_profiles()
        setup = FederationSetup(
            module_shapes=adapters.shapes(),
            client_max_ranks=list(cfg.federation.client_max_ranks),
            num_examples=[len(c) for c in task.clients],
            scaling=cfg.scaling,
            seed=cfg.seed,
            **device_setup(cfg, model, adapters, task, profiles),
        )
        algorithm = build_algorithm(cfg.algorithm, setup)
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

    def evaluate(self, state: Tensors) -> dict[str, float]:
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
        if resume:
            adopt_config(self.run_dir, ckpt, cfg)
            torch.set_num_threads(ckpt.threads)
            for merge in merges:
                fed.adapters.merge(merge)
            sampler = np.random.default_rng()
            sampler.bit_generator.state = ckpt.sampler_state
            log.info("resuming %s after round %d", self.run_dir, ckpt.round)
        else:
            write_run_header(self.run_dir, cfg, fed.task.partition_table(), fed.task.names)
            report_partition(self.run_dir, fed.task.partition_table(), fed.task.names, show=self.progress)
            sampler = np.random.default_rng(cfg.seed)
            ckpt = Checkpoint(0, fed.algorithm.init_state(), {}, sampler.bit_generator.state,
                              threads=torch.get_num_threads(), config=dump_config(cfg))
        write_metrics(self.run_dir, ckpt.history)

        rounds = cfg.federation.rounds
        per_round = clients_per_round(cfg.federation.num_clients, cfg.federation.fraction)
        with self._progress() as bar:
            t_rounds = bar.add_task("rounds", total=rounds, completed=ckpt.round)
            t_clients = bar.add_task("clients", total=per_round)
            for t in range(ckpt.round + 1, rounds + 1):
                bar.reset(t_clients, total=per_round)
                ckpt = self._round(fed, t, ckpt, sampler, lambda: bar.advance(t_clients))
                bar.advance(t_rounds)
        atomic_write(self.run_dir / "final_state.safetensors", tensors_to_bytes(ckpt.state))
        return self._summary(ckpt.history)

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            disable=not self.progress, transient=False,
        )

    def _round(self, fed: Federation, t: int, ckpt: Checkpoint, sampler, on_client) -> Checkpoint:
        cfg, algo = self.cfg, fed.algorithm
        start = time.perf_counter()
        selected = sample_clients(sampler, cfg.federation.num_clients, cfg.federation.fraction)
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
        server_seconds = time.perf_counter() - s0
        sim = simulated_round(clients, fed.profiles, server_seconds, cfg.devices.server_time, ckpt.history)

        record: dict[str, Any] = {"round": t}
        if t % cfg.federation.eval_every == 0 or t == cfg.federation.rounds:
            ev = fed.evaluate(state)
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
            wall_seconds=time.perf_counter() - start,
            **sim,
            clients=clients,
            rejected=rejected,
            **server_metrics,
        )
        new = Checkpoint(
            round=t, state=state, client_states=client_states,
            sampler_state=sampler.bit_generator.state, history=[*ckpt.history, record],
            threads=ckpt.threads, config=ckpt.config, merges=merges,
        )
        new.save(self.run_dir)
        write_metrics(self.run_dir, new.history)
        if "accuracy" in record:
            log.info("round %d: accuracy %.4f", t, record["accuracy"])
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
        updates: list[Update] = []
        clients: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        stages = algo.stages(ckpt.state, selected)  # one stage, one lane unless the method has more
        plan = [(s, lane, k) for s, lanes in enumerate(stages) for lane, ks in lanes.items() for k in ks]
        state, current = ckpt.state, 0
        for stage, lane, k in plan:
            if stage != current:  # aggregate the previous stage within its lanes (groups)
                state, updates, current = algo.aggregate_stage(state, updates, current), [], stage
            c0 = time.perf_counter()
            ctx = fed.client(k, t, stage)
            payload = algo.payload(state, k)
            update, new_client_state = algo.client_train(ctx, payload, client_states.get(k, {}))
            fed.adapters.clear()
            record = accept_update(fed, state, t, update, payload, time.perf_counter() - c0, rejected)
            if record is not None:
                client_states[k] = new_client_state
                updates.append(update)
                clients.append({**record, "flops": ctx.flops, "stage": stage, "lane": lane})
            on_client()
        return state, updates, clients, rejected, client_states

    def _summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        accs = [(r["round"], r["accuracy"]) for r in history if "accuracy" in r]
        costs = [r["client_cost_percent"] for r in history if r["client_cost_percent"] is not None]
        summary = {
            "method": self.cfg.algorithm.name,
            "rounds": len(history),
            "final_accuracy": accs[-1][1] if accs else None,
            "best_accuracy": max(a for _, a in accs) if accs else None,
            "best_round": max(accs, key=lambda x: x[1])[0] if accs else None,
            "mean_client_cost_percent": float(np.mean(costs)) if costs else None,
            "total_uplink_bytes": int(sum(r["uplink_bytes"] for r in history)),
            "total_downlink_bytes": int(sum(r["downlink_bytes"] for r in history)),
            "wall_seconds": float(sum(r["wall_seconds"] for r in history)),
            "rejected_updates": int(sum(len(r["rejected"]) for r in history)),
        }
        write_json(self.run_dir / "summary.json", summary)
        return summary
