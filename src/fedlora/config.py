"""Typed run configuration: YAML in, validated model out, one-line errors naming the field.

Every option is documented by the attribute docstring under its field, from which the site's
configuration reference is generated (tools/docgen.py, docs/reference/configuration.md).
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fedlora.aggregation import AggregationConfig, AttackConfig, check_pipeline
from fedlora.algorithms import AlgorithmOptions
from fedlora.data.alpaca import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
from fedlora.data.custom import data_file_builder
from fedlora.data.registry import registered_datasets
from fedlora.devices import AUTO_RANK_CAP, DeviceProfile, DevicesConfig, auto_ranks, resolve_profiles
from fedlora import schema
from fedlora.errors import ConfigError, DataError  # noqa: F401  (re-exported: callers import them from here)
from fedlora.hardware import (
    DEVICE_CHOICES,
    DEVICE_NAMES,
    DeviceUnavailable,
    accelerator_compute_dtype,
    preferred_compute_dtype,
    resolve_device,
)

PAPER_CLIENT_RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]


class Strict(schema.Strict):
    """Unknown keys and non-finite floats refused (fedlora.schema), assignments validated."""

    model_config = ConfigDict(validate_assignment=True)


class ModelConfig(Strict):
    """The base model, where LoRA goes, and where and in which dtype it computes."""

    name: str = "smollm2-135m"
    """`smollm2-135m` (the offline wheel), `tiny-llama` / `tiny-gpt2` (random, for tests),
    a hub name (`gpt2`, `TinyLlama/TinyLlama-1.1B-Chat-v1.0`, …), a local model folder, or a
    path to a `.gguf` file."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    """Modules that get LoRA, by name or name suffix as in PEFT: `nn.Linear` and GPT-2's `Conv1D`."""
    device: str = "auto"
    """Where training, the server's public-data steps and evaluation run: `auto` (cuda, else
    mps, else cpu), `cpu`, `cuda`, `cuda:N` or `mps`; aggregation and checkpoints stay on the
    CPU. Kept as written in config.yaml, so each host resolves `auto` itself."""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", validate_default=True)
    """Autocast dtype of forward/backward; weights, adapters and merges stay float32. `auto`
    becomes bfloat16 on CUDA GPUs that compute it (compute capability ≥ 8.0) and where the CPU
    computes it natively (`amx_bf16` or `avx512_bf16` in /proc/cpuinfo), else float32 (older
    GPUs, MPS; on other CPUs torch emulates bfloat16, many times slower); the run's config.yaml
    records the dtype it resolved to. `float32` for exact arithmetic."""

    @field_validator("compute_dtype")
    @classmethod
    def _resolve_auto(cls, value: str, info: ValidationInfo) -> str:
        if value != "auto":
            return value
        return accelerator_compute_dtype(str(info.data.get("device", "auto"))) or preferred_compute_dtype()

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_NAMES.fullmatch(value):
            raise ValueError(f"must be {DEVICE_CHOICES}, got {value!r}")
        return value

    def torch_device(self) -> str:
        """The device this process computes on (`auto` resolved here), or a one-line ConfigError."""
        return torch_device(self.device)


def torch_device(name: str, field: str = "model.device") -> str:
    """`name` (auto, cpu, cuda, cuda:N, mps) as a device available here, or a one-line
    ConfigError naming `field`."""
    if not DEVICE_NAMES.fullmatch(name):
        raise ConfigError(f"config error: {field}: must be {DEVICE_CHOICES}, got {name!r}")
    try:
        return resolve_device(name)
    except DeviceUnavailable as err:
        raise ConfigError(f"config error: {field}: {err}") from None


class LoRAConfig(Strict):
    """The one LoRA scaling s every method shares."""

    alpha: float = Field(16.0, gt=0)
    """Scaling numerator: s = alpha / r_max, one constant for every client and round."""
    scaling: float | None = Field(None, gt=0)
    """Set s directly instead (overrides alpha)."""


AG_NEWS_PROMPT = (
    "Classify the news article as World, Sports, Business or Technology.\n"
    "Article: {text}\nTopic:"
)


class ColumnsConfig(Strict):
    """Column names of a `custom` dataset (classification: text + label; instruction:
    instruction [+ input] + response [+ category])."""

    text: str = "text"
    """Classification: the text column."""
    label: str = "label"
    """Classification: the label column (strings or ints; class order = the hub's ClassLabel
    names, else the sorted distinct values)."""
    instruction: str = "instruction"
    """Instruction data: the instruction column."""
    input: str | None = None
    """Instruction data: the optional input (context) column."""
    response: str = "response"
    """Instruction data: the response column."""
    category: str | None = None
    """Instruction data: the optional category column, what label-based partitions split on."""


DEFAULT_DATA_DIR = Path("../shared/data")
"""Beside the project's root (or the working directory): see `data_folder`."""


class DataConfig(Strict):
    """The clients' data: which dataset, how it is split, partitioned and encoded."""

    dataset: str = Field("ag_news", json_schema_extra=lambda schema: schema.update(enum=list(registered_datasets())))
    """A registered dataset (fedlora.data.registry), read from data_dir (or the hub): `ag_news`,
    `financial_phrasebank`, `dolly`, `alpaca`, `custom` (your own file or hub dataset), or one a
    module of yours registers (docs/howto/add-a-dataset.md). Its defaults fill the `data:` fields
    the config leaves out."""
    task: Literal["classification", "instruction"] = "classification"
    """`classification` (label words, label-token loss, accuracy) or `instruction` (prompt
    template, loss on response tokens only, held-out loss and perplexity). Filled from the
    dataset when left out (`custom`: classification unless set)."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Folder with `ag_news/`, `financial_phrasebank/`, `dolly/`, `alpaca/`, `mmlu/` (a relative
    path is also tried from the project root)."""
    hub_name: str | None = None
    """Online only: load this hub dataset instead of the local copy (columns: `ag_news` text,
    label; `financial_phrasebank` sentence, label; `dolly` instruction, context, response,
    category; `alpaca` instruction, input, output; `custom` its train and test splits)."""
    hub_config: str | None = None
    """Hub dataset configuration (financial_phrasebank's default: `sentences_<agreement>agree`)."""
    agreement: Literal["50", "66", "75", "all"] = "all"
    """Financial PhraseBank: the file read, by the share of annotators agreeing."""
    train_file: Path | None = None
    """`custom`: a CSV, JSON or JSONL file, optionally .gz (or a hub dataset via hub_name)."""
    test_file: Path | None = None
    """`custom`: held-out file; without one, a seeded split of the train file."""
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Share held out as test data when a dataset has no test split (FPB, Dolly, Alpaca,
    custom); identical texts stay on one side."""
    split_seed: schema.Seed = 0
    """Seed of that split: fixed apart from the run seed so every seed tests on the same rows."""
    partition: Literal["iid", "label_skew", "dirichlet", "category_skew", "size_skew"] = "label_skew"
    """How the training pool is split among the clients (flwr-datasets partitioners; see
    docs/concepts/data.md, "Partitions")."""
    labels_per_client: int = Field(2, ge=1)
    """`label_skew`: labels per client (paper: 2)."""
    dirichlet_alpha: float = Field(0.5, gt=0)
    """`dirichlet`: concentration over labels (categories); smaller is more skewed."""
    epsilon: float = Field(0.5, gt=0)
    """`category_skew` (FedIT): the Dirichlet concentration over categories (paper: 0.2-0.6)."""
    min_partition_size: int | None = Field(None, ge=1)
    """Dirichlet schemes redraw (up to 10 times) until every client has this many (None: 10
    for `dirichlet`, FedIT's 40 for `category_skew`)."""
    size_distribution: Literal["linear", "square", "exponential"] = "linear"
    """`size_skew`: client k's share grows as k+1, (k+1)^2 or e^(k+1); IID within."""
    train_examples: int | None = Field(None, ge=1)
    """Seeded cap on the training pool before partitioning (None: all of it)."""
    test_examples: int = Field(1000, ge=1)
    """Size of the fixed, seeded test subset."""
    validation_examples: int | None = Field(None, ge=1)
    """Tuning only (`fedlora tune` sets it): carve this many examples off the training pool
    (seeded, before train_examples caps it) and evaluate on them instead of the test set, which
    is then never evaluated. None: evaluate on the test set."""
    max_length: int = Field(64, ge=8)
    """Tokens per example. Classification: the text is truncated, the prompt's ending kept.
    Instruction: the response keeps at least half the budget, the prompt loses its start first."""
    prompt: str = AG_NEWS_PROMPT
    """Classification template with `{text}`; the model scores the next token (per dataset;
    `custom`: a prompt that names no AG News topics)."""
    label_words: list[str] | None = Field(
        default_factory=lambda: ["World", "Sports", "Business", "Technology"], min_length=2
    )
    """One word per class, no word twice (their first tokens must differ); None: the
    dataset's class names (the default of `custom`)."""
    loss: Literal["classes", "vocab"] = "classes"
    """`classes`: cross-entropy over the label words' logits (paper eq. 10, |L| classes);
    `vocab`: cross-entropy of the label token over the whole vocabulary."""
    instruction_prompt: str = ALPACA_PROMPT
    """Instruction template with `{instruction}` (Alpaca's), used when the chat template is not."""
    instruction_prompt_with_input: str = ALPACA_PROMPT_WITH_INPUT
    """The same with `{instruction}` and `{input}`, for examples that have an input."""
    chat_template: bool = True
    """Instruction data: wrap instruction (+ input) as one user turn in the tokenizer's chat
    template when it has one (SmolLM2 has); false: the templates above."""

    @model_validator(mode="before")
    @classmethod
    def _dataset_defaults(cls, data: Any) -> Any:
        spec = registered_datasets().get(data.get("dataset")) if isinstance(data, dict) else None
        if spec is not None:
            # the given keys first: on assignment `data` is the model's own fields, whose
            # order config.yaml keeps (a resumed comparison compares it with the saved one)
            defaults = spec.defaults
            data = {**data, **{k: v for k, v in defaults.items() if k not in data}}
        return data

    @field_validator("dataset")
    @classmethod
    def _registered(cls, v: str) -> str:
        names = list(registered_datasets())
        if v not in names:
            expected = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return v

    @field_validator("label_words")
    @classmethod
    def _distinct_words(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if any(not w.strip() for w in v):
            raise ValueError("a label word is empty")
        twice = sorted({w for w in v if v.count(w) > 1})
        if twice:
            raise ValueError(f"{twice[0]!r} appears more than once (one word per class)")
        return v

    @field_validator("train_file", "test_file")
    @classmethod
    def _readable_format(cls, v: Path | None) -> Path | None:
        if v is not None and data_file_builder(v) is None:
            raise ValueError(f"{v}: expected a .csv, .json or .jsonl file (optionally .gz)")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, v: str) -> str:
        if "{text}" not in v:
            raise ValueError("must contain the placeholder {text}")
        return v

    @field_validator("instruction_prompt", "instruction_prompt_with_input")
    @classmethod
    def _prompt_has_instruction(cls, v: str) -> str:
        if "{instruction}" not in v:
            raise ValueError("must contain the placeholder {instruction}")
        return v

    @model_validator(mode="after")
    def _dataset_rules(self) -> DataConfig:
        spec = registered_datasets()[self.dataset]
        problem = spec.check(self) if spec.check is not None else None
        if problem is not None:
            raise ValueError(problem)
        if spec.task is not None and self.task != spec.task:
            raise ValueError(f"dataset {self.dataset} is {spec.task} data (task: {spec.task})")
        for name in ("train_file", "test_file"):
            if not spec.takes_files and getattr(self, name) is not None:
                raise ValueError(f"data.{name}: only for dataset custom ({self.dataset} is read from data_dir)")
        return self


class EvaluationConfig(Strict):
    """What `Federation.evaluate` measures besides the task's own test set."""

    mmlu: bool = False
    """Also score MMLU (log-likelihood of A/B/C/D); for instruction tasks it is `accuracy`."""
    mmlu_shots: int = Field(0, ge=0, le=5)
    """Few-shot exemplars from MMLU's dev split (same subject)."""
    mmlu_per_subject: int | None = Field(None, ge=1)
    """Seeded subset: at most this many test questions per subject (None: all 14,042)."""
    mmlu_subjects: list[str] | None = None
    """Only these subjects (None: all 57)."""
    mmlu_hub_name: str | None = None
    """Online only: e.g. `cais/mmlu` instead of the local copy."""
    mmlu_max_length: int = Field(2048, ge=16)
    """Longer prompts keep their end (the question), dropping the first exemplars' text."""
    untuned: bool = False
    """Also evaluate the untuned model once before round 1 (RUN_DIR/untuned.json): the
    reference line of the accuracy figures."""
    # --- personalised evaluation (docs/concepts/personalized-evaluation.md) ---
    personalized: bool = False
    """Each client holds out a seeded part of its own training shard (never trained on); at
    every evaluation each client's accuracy on it with the model it would use (the global one,
    or its personal one: FedSA-LoRA's global A with its own B) is recorded, with the mean and
    worst client and per-item records (eval/personal_round_NNNN.npz). Classification tasks."""
    personal_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of each client's shard held out for personalised evaluation (at least one example
    held out and one left to train on per client)."""
    personal_rounds: Literal["every_evaluation", "last"] = "every_evaluation"
    """When the held-out parts are evaluated: at every evaluation, or after the last round only
    (a study evaluating every round on a small test subset: 20% of AG News shards is ~4,000
    items, ~4 minutes of one core per evaluation)."""


class PublicDataConfig(Strict):
    """The server's public set (AFLoRA's server-side A fine-tuning)."""

    dataset: Literal["alpaca"] = "alpaca"
    """The public set's dataset (the only one: Alpaca)."""
    fraction: float = Field(0.02, gt=0, le=1)
    """Seeded share of the Alpaca file drawn as the public set (paper: 2%; here 2% of the
    5,000-example copy = 100; 1.0: the whole copy). When clients also train on `alpaca`, these
    rows are removed from their pool first (disjoint)."""
    max_length: int = Field(128, ge=16)
    """Tokens per public example (the response keeps at least half)."""
    hub_name: str | None = None
    """Online only: draw from this hub dataset (e.g. `tatsu-lab/alpaca`, the paper's 52k:
    2% = 1,040)."""
    heldout_examples: int = Field(16, ge=0)
    """Seeded public examples outside the public set, never trained on: the server's loss on
    them before and after its A fine-tuning is logged every round (0: not measured). Excluded
    from the clients' pool when they train on `alpaca`."""


class FederationConfig(Strict):
    """The clients, the rounds and the clients' local training budget."""

    num_clients: int = Field(10, ge=1)
    """K, the number of clients."""
    client_max_ranks: list[int] = Field(default_factory=lambda: list(PAPER_CLIENT_RANKS))
    """r_k^1, each client's largest LoRA rank, one per client (default: the paper's); each ≥ 1.
    `auto`: derived from each client's device throughput by `fedlora.devices.capability_rank`
    (docs: "Measured devices"), recorded as a list in the run's config.yaml."""
    rounds: int = Field(5, ge=1, le=schema.MAX_ROUNDS)
    """Global rounds."""
    fraction: float = 1.0
    """Share of clients sampled each round, in (0, 1] (paper: 1.0; 0.2 for the non-IID-degree
    study)."""
    local_steps: int = Field(10, ge=1)
    """Optimiser steps per client per round."""
    batch_size: int = Field(8, ge=1)
    """Examples per step."""
    lr: float = Field(1e-3, gt=0)
    """Adam learning rate of the clients (no weight decay)."""
    eval_every: int = Field(1, ge=1)
    """Evaluate every N rounds (and always after the last)."""
    eval_subset: int | None = Field(None, ge=1)
    """Rounds before the last evaluate only this many test items, a seeded subset that is the same
    every round, for every method and every seed of one test set (cheap curves, e.g. every round);
    the last round evaluates the whole test subset. Each evaluated round logs the subset's accuracy
    (`subset_accuracy`), the curve whose mean is the run's `accuracy_auc`. None: every evaluated
    round uses the whole test subset."""
    eval_batch_size: int = Field(32, ge=1)
    """Examples per evaluation batch."""

    @field_validator("client_max_ranks")
    @classmethod
    def _ranks_positive(cls, v: list[int]) -> list[int]:
        bad = [r for r in v if r < 1]
        if bad:
            raise ValueError(f"ranks must be >= 1, got {bad[0]}")
        return v

    @field_validator("fraction")
    @classmethod
    def _fraction_range(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _one_rank_per_client(self) -> FederationConfig:
        if len(self.client_max_ranks) != self.num_clients:
            raise ValueError(
                f"client_max_ranks has {len(self.client_max_ranks)} entries for "
                f"{self.num_clients} clients"
            )
        return self


class PrivacyConfig(Strict):
    """Differential privacy (docs/concepts/privacy.md): what a client's data is protected by."""

    mode: Literal["none", "client", "sample"] = "none"
    """`none`; `client`: client-level DP (each round, each client's whole contribution is
    clipped to `clip_norm` and the sum noised: protects a client's whole data set); `sample`:
    DP-SGD on every client (per-example gradients clipped, noised each local step: protects
    one training example)."""
    noise_multiplier: float | None = Field(None, gt=0)
    """σ: the noise's standard deviation in units of the clipped sum's sensitivity. Give this
    or `target_epsilon`."""
    target_epsilon: float | None = Field(None, gt=0)
    """The ε the run may spend at `delta` over federation.rounds: σ is calibrated to it (the
    accountant's own search), and a resume with more rounds that would exceed it is refused."""
    delta: float | None = Field(None, gt=0, lt=1)
    """δ of the reported ε. None: 1/N, N the clients (`client`) or the smallest client's
    example count (`sample`)."""
    clip_norm: float = Field(1.0, gt=0)
    """C: the ℓ2 bound of a client's round delta (`client`) or of one example's gradient of
    the trained factors (`sample`); with adaptive clipping, its start."""
    clipping: Literal["fixed", "adaptive"] = "fixed"
    """`adaptive` (`client` only): C follows a quantile of the update norms (Andrew et al. 2021)."""
    target_quantile: float = Field(0.5, gt=0, lt=1)
    """Adaptive clipping: the share of updates C aims to leave unclipped."""
    clip_lr: float = Field(0.2, gt=0)
    """Adaptive clipping: η of C ← C · exp(−η (b̄ − quantile))."""
    count_noise: float | None = Field(None, gt=0)
    """Adaptive clipping: σ_b, the noise on the count of unclipped updates (None: clients per
    round / 20, the paper's advice, or σ if larger: with few clients m/20 would leave nothing
    for the updates); it must exceed σ / 2."""
    noise: Literal["server", "client"] = "server"
    """`client` level: where clipping and noise happen. `server`: the trusted server clips every
    upload and noises the method's weighted sum; `client`: each client clips and adds its share
    of the noise before uploading, and the server averages with equal weights."""
    accountant: Literal["rdp", "pld"] = "rdp"
    """dp-accounting's RDP or PLD accountant; PLD only when nothing is sampled (every client
    every round, `client` mode)."""
    secure_aggregation: bool = False
    """Secure aggregation (SecAgg, Bonawitz et al. 2017) on the Flower runtime: each client
    uploads its weighted view masked so that the server learns only the round's sum (FedIT,
    FFA-LoRA, AFLoRA; at least 3 clients per round; `fedlora flower run` only; the server cannot
    screen what it cannot see, so it needs `aggregation.norm_bound: null` and `combine: mean`).
    Not DP (`mode` must not be `client`); docs/concepts/privacy.md says what it protects and
    what it does not."""


def privacy_refusal(cfg: RunConfig) -> str | None:
    """Why this privacy setting is undefined for this run (one line), or None."""
    p, method = cfg.privacy, cfg.algorithm.name
    # fields away from their defaults (a run's own config.yaml names every field)
    given = {k for k, f in PrivacyConfig.model_fields.items()
             if k not in ("mode", "secure_aggregation") and getattr(p, k) != f.default}
    if p.mode == "none":
        return f"privacy.{sorted(given)[0]}: set, but privacy.mode is none" if given else None
    if (p.noise_multiplier is None) == (p.target_epsilon is None):
        return "privacy: give exactly one of noise_multiplier and target_epsilon"
    sampled = p.mode == "sample" or cfg.federation.fraction < 1
    if p.accountant == "pld" and sampled:
        return "privacy.accountant: pld does not account for sampling without replacement; use rdp"
    if p.mode == "sample":
        client_only = sorted(given & {"clipping", "target_quantile", "clip_lr", "count_noise", "noise"})
        return f"privacy.{client_only[0]}: only for mode client" if client_only else None
    if method == "aflora" and getattr(cfg.algorithm, "ddr", False):
        return "privacy.mode: aflora's pruning masks depend on the data and are sent un-noised; set algorithm.ddr: false"
    if method == "fedsa" and getattr(cfg.algorithm, "global_b", "none") == "mean":
        return ("privacy.mode: fedsa's global_b: mean uploads each client's B_k, which starts from the client's "
                "own B (unknown to the server, so not clipped); set algorithm.global_b: none")
    if p.noise == "client" and method == "aflora":
        return "privacy.noise: client needs equal weights and ranks; aflora weights and pads by rank: use noise: server"
    if p.noise == "client" and cfg.aggregation.norm_bound is not None:
        return "privacy.noise: client: the norm bound could reject a noised update and leave the sum short of noise; set aggregation.norm_bound: null"
    if cfg.aggregation.combine != "mean":
        return f"privacy.mode: the noise is calibrated for the method's weighted sum, not aggregation.combine {cfg.aggregation.combine}"
    adaptive_only = sorted(given & {"target_quantile", "clip_lr", "count_noise"})
    if p.clipping == "fixed" and adaptive_only:
        return f"privacy.{adaptive_only[0]}: only for clipping adaptive"
    return None


class LoggingConfig(Strict):
    """Where a run's metrics go besides metrics.jsonl."""

    tensorboard: bool = False
    """Also write every numeric metrics.jsonl field as TensorBoard scalars in RUN_DIR/tb/
    (needs the `tensorboard` extra: pip install 'fedlora[tensorboard]')."""


class NodesConfig(Strict):
    """Flower deployments whose SuperNodes hold their own data (node config `data-file=PATH`)."""

    local_data: bool = False
    """True: each SuperNode trains on its own data file (CSV or JSONL, the columns of
    `data.columns`) and reports its example count and label histogram when asked; the server
    reads only the test (and public) data, never a client's. False: every node cuts its shard
    from the shared dataset with the global partitioner, as `fedlora run` does."""
    classes: list[str] | None = None
    """With local_data and `custom` data: the class (or category) names in index order, how a
    node maps its label column (`fedlora partition` writes them). None: the dataset's own."""
    max_examples: int = Field(1_000_000, ge=1)
    """The most examples a node may report; a larger count is refused (a node's count weights
    its update in the average)."""

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(v) < 1 or len(set(v)) != len(v) or any(not c.strip() for c in v)):
            raise ValueError("must be distinct, non-empty names")
        return v


class RunConfig(Strict):
    """One run: every section of a config file."""

    seed: schema.Seed = 0
    """The run's seed: partition, test subset, public subset, client sampling,
    initialisations, batches, a tiny model's weights; an integer in [0, 2³² − 1]."""
    threads: int | None = Field(None, ge=1, le=schema.MAX_THREADS)
    """torch intra-op threads (None: torch's default)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    public_data: PublicDataConfig = Field(default_factory=PublicDataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    algorithm: AlgorithmOptions
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    """Simulated device profiles (fedlora.devices) for the simulated clock and HierFedLoRA."""
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    """The server's screening and combination of client updates (norm bound, robust combines)."""
    attack: AttackConfig = Field(default_factory=AttackConfig)
    """Simulated adversarial clients, for measuring the defences (none by default)."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    """Differential privacy: client-level or sample-level (DP-SGD), with its accountant."""
    nodes: NodesConfig = Field(default_factory=NodesConfig)
    """Flower: whether SuperNodes serve their own data files (see docs/howto/real-nodes.md)."""

    @model_validator(mode="after")
    def _data_source(self) -> RunConfig:
        """Where the clients' data comes from: a training file (or hub dataset), or the nodes."""
        d, nodes = self.data, self.nodes
        if d.dataset == "custom" and d.train_file is None and d.hub_name is None and not nodes.local_data:
            raise ValueError("data: dataset custom needs train_file or hub_name")
        if nodes.local_data:
            if d.dataset == "custom" and d.test_file is None and d.hub_name is None:
                raise ValueError("data.test_file: nodes.local_data needs a test file (the server never reads "
                                 "the clients' training data)")
            if d.dataset == "custom" and nodes.classes is None and (d.task == "classification" or d.columns.category):
                raise ValueError("nodes.classes: nodes.local_data with custom data needs the class names in "
                                 "index order (fedlora partition writes them)")
            if d.validation_examples is not None:
                raise ValueError("data.validation_examples: tuning carves validation data off the training "
                                 "pool, which nodes.local_data keeps on the nodes")
        return self

    @model_validator(mode="before")
    @classmethod
    def _ranks_from_devices(cls, tree: Any) -> Any:
        """`devices.max_ranks: devices` fills federation.client_max_ranks from the profiles;
        `federation.client_max_ranks: auto` (recorded as `devices.max_ranks: auto`) from the
        devices' throughput and memory by the capability rule, profiles or measured alike. Until
        the nodes of a `devices: measured` run have reported, the ranks are provisionally the
        cap (the Flower server replaces them; the in-process runtime refuses such a config)."""
        if not isinstance(tree, dict):
            return tree
        dev, fed = tree.get("devices"), tree.get("federation")
        if dev == "measured":  # `devices: measured`, short for {source: measured}
            dev = {"source": "measured"}
            tree = {**tree, "devices": dev}
        auto = isinstance(fed, dict) and fed.get("client_max_ranks") == "auto"
        mode = dev.get("max_ranks") if isinstance(dev, dict) else None
        if auto and mode == "devices":
            raise ValueError("federation.client_max_ranks: auto and devices.max_ranks: devices both set the ranks; "
                             "give one")
        if auto:
            mode, dev = "auto", {**(dev if isinstance(dev, dict) else {}), "max_ranks": "auto"}
            tree = {**tree, "devices": dev}
        if mode not in ("devices", "auto"):
            return tree
        try:
            devices = DevicesConfig.model_validate(dev or {})
        except ValidationError as err:
            if not auto:
                return tree  # the field validation below reports it
            first = err.errors()[0]  # named here: `auto` is no list of ranks for the field validation
            where = ".".join(["devices", *(str(p) for p in first["loc"])])
            raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
        fed = tree.get("federation") or {}
        n = fed.get("num_clients", 10) if isinstance(fed, dict) else None
        try:
            seed = int(tree.get("seed", 0))
        except (TypeError, ValueError, OverflowError):
            seed = None
        if not isinstance(n, int) or n < 1 or seed is None:
            return tree  # the field validation below reports it
        if devices.source == "measured" and devices.measured is None:
            ranks = [AUTO_RANK_CAP] * n  # provisional: the nodes have not reported yet
        else:
            try:
                profiles = resolve_profiles(devices, n, seed)
                ranks = auto_ranks(devices, profiles) if mode == "auto" else [p.max_rank for p in profiles]
            except ValueError as err:
                raise ValueError(f"devices: {err}" if mode == "auto" and str(err).startswith("client ")
                                 else str(err)) from None
        # a run's own config.yaml names the ranks it was given: those are accepted back (resume)
        given = fed.get("client_max_ranks", ranks)
        if given not in ("auto", ranks) and not (devices.source == "measured" and devices.measured is None):
            raise ValueError(f"federation.client_max_ranks: {given} differs from the devices' ranks {ranks}; "
                             f"leave it unset when devices.max_ranks is {mode}")
        return {**tree, "federation": {**fed, "client_max_ranks": ranks}}

    @model_validator(mode="after")
    def _devices_fit(self) -> RunConfig:
        n, assign = self.federation.num_clients, self.devices.assign
        if assign is not None and len(assign) != n:
            raise ValueError(f"devices.assign: {len(assign)} entries for {n} clients")
        return self

    @model_validator(mode="after")
    def _ranks_fit_the_clients(self) -> RunConfig:
        """A method's rank options against the weakest client (before any model loads)."""
        weakest = min(self.federation.client_max_ranks)
        for key in ("rank", "min_rank"):
            value = getattr(self.algorithm, key, None)
            if value is not None and value > weakest:
                raise ValueError(f"algorithm.{key}: {value} exceeds the smallest client max rank {weakest}")
        return self

    @model_validator(mode="after")
    def _personalized_is_classification(self) -> RunConfig:
        if self.evaluation.personalized and self.data.task != "classification":
            raise ValueError("evaluation.personalized: classification tasks only (accuracy per client); "
                             f"data.task is {self.data.task}")
        return self

    @model_validator(mode="after")
    def _pipeline_fits_method(self) -> RunConfig:
        """Each aggregation stage and the attack must be defined for the method (fedlora.aggregation)."""
        check_pipeline(self)
        return self

    @model_validator(mode="after")
    def _privacy_defined(self) -> RunConfig:
        why = privacy_refusal(self)
        if why:
            raise ValueError(why)
        return self

    def device_profiles(self) -> list[DeviceProfile]:
        """Each client's DeviceProfile (seeded; the reference preset when no devices are given)."""
        return resolve_profiles(self.devices, self.federation.num_clients, self.seed)

    @property
    def scaling(self) -> float:
        """The one LoRA scaling s shared by every client (rank-independent: padding stays exact)."""
        if self.lora.scaling is not None:
            return self.lora.scaling
        return self.lora.alpha / max(self.federation.client_max_ranks)

    def check_files(self) -> None:
        """Fail before any work when a data file the run needs is missing."""
        from fedlora.data import required_files

        needed = required_files(self)
        if self.model.name.endswith(".gguf"):
            needed.append(("model.name", Path(self.model.name)))
        for field, path in needed:
            if not path.exists():
                raise ConfigError(f"config error: {field}: file not found: {path}")


def _format_error(err: ValidationError, algorithm_name: str | None) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"] if str(p) != algorithm_name]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    head, where = msg.split(":", 1)[0], ".".join(loc)
    names_itself = not where or head == where or head.startswith(where + ".")
    if names_itself and head.replace("_", "").replace(".", "").isalnum():
        return f"config error: {msg}"  # a check that names its field itself
    return f"config error: {where or '<root>'}: {msg}"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"config error: --set {dotted}: empty key (expected section.key=value)")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config error: {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings (value parsed as YAML) into a flat dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"config error: --set {pair}: expected key=value")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = load_yaml(raw)
        except BAD_YAML as err:
            problem = getattr(err, "problem", None) or "not a YAML value"
            raise ConfigError(f"config error: --set {pair}: {problem} (quote strings: key='value')") from None
    return out


def build_config(tree: dict[str, Any], overrides: dict[str, Any] | None = None) -> RunConfig:
    """The validated config of `tree` with dotted `overrides` applied (to a deep copy: the
    caller's tree, e.g. one compare builds every method's config from, stays as it was)."""
    try:
        tree = copy.deepcopy(tree or {})
    except RecursionError:  # a hostile file: thousands of nested brackets, or an alias to itself
        raise ConfigError("config error: nested too deeply (or refers to itself) to be a config") from None
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    algo = tree.get("algorithm")
    name = algo.get("name") if isinstance(algo, dict) else None
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, name)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """One run's config; a `methods:` mapping (per-method options for `fedlora compare`) is
    not part of a run, so a compare config runs its `algorithm:` section."""
    path = Path(path)
    tree = read_tree(path)
    tree.pop("methods", None)
    return resolve_data_dir(build_config(tree, overrides), path)


MAX_CONFIG_BYTES = 1_000_000
"""A config is a few kB; the bound keeps a hostile one from costing minutes to parse."""

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader when installed: about 6x faster than PyYAML's, whose parser also
recurses (a hostile "[[[[..." file would raise RecursionError); same YAML 1.1 types."""

BAD_YAML = (yaml.YAMLError, ValueError, TypeError, ArithmeticError, RecursionError)
"""What parsing and validating a hostile YAML text can raise (ValueError covers ConfigError and
Python's 4300-digit int limit; TypeError, ArithmeticError and RecursionError come from odd
values and self-referencing aliases meeting the validators)."""


MAX_YAML_DEPTH = 32
"""A config nests 4 deep; 32 leaves room and stops a "[[[[…" text before any recursion."""
MAX_YAML_NODES = 100_000
"""Values after aliases are expanded: a config has hundreds; a "billion laughs" text has 10⁹."""


class _StrictLoader(YAML_LOADER):  # type: ignore[misc,valid-type]
    """The safe loader, plus: a key twice in one mapping is an error (YAML says keys are
    unique; PyYAML silently keeps the last), and the document's depth and size with aliases
    expanded are bounded before anything is constructed."""

    def construct_document(self, node: yaml.Node) -> Any:
        _check_node_limits(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _check_node_limits(root: yaml.Node) -> None:
    """Depth and expanded size of a composed document, counted without expanding it (each
    node's size is computed once, children first)."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    on_path: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_YAML_DEPTH:
            raise ValueError(f"nested too deeply (more than {MAX_YAML_DEPTH} levels)")
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size.get(id(c), 1) for c in children)  # a cycle counts once
            if size[id(node)] > MAX_YAML_NODES:
                raise ValueError(f"more than {MAX_YAML_NODES} values once its aliases are expanded")
            continue
        if id(node) in size:
            continue
        if id(node) in on_path:
            continue  # a list that contains itself: no expansion; validation names its field
        on_path.add(id(node))
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in size)


def load_yaml(text: str | bytes) -> Any:
    """Safe YAML: plain data only, never Python objects; duplicate keys, deep nesting and
    alias bombs refused (a yaml.YAMLError or a ValueError, both in BAD_YAML)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a safe loader)


def read_tree(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of a config file, or a one-line ConfigError."""
    path = Path(path)
    from fedlora.files import read_user_file  # here: parsing the command line imports no torch

    raw = read_user_file(path, MAX_CONFIG_BYTES, "config error")  # bytes counted: /dev/zero, a FIFO
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config error: {path}: not UTF-8 text") from None
    return parse_tree(text, str(path))


def parse_tree(text: str, where: str) -> dict[str, Any]:
    """The YAML mapping of a config's text (a file's, or one sent over Flower), or a one-line
    ConfigError naming `where`; at most MAX_CONFIG_BYTES."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config error: {where}: more than {MAX_CONFIG_BYTES} bytes, more than a config may have")
    try:
        tree = load_yaml(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "cannot parse"
        raise ConfigError(f"config error: {where}: invalid YAML{at}: {problem}") from None
    except BAD_YAML as err:
        raise ConfigError(f"config error: {where}: invalid YAML: {str(err).splitlines()[0][:120]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config error: {where}: top level must be a mapping")
    return tree


def data_folder(data_dir: Path, config_path: Path) -> Path:
    """A relative data_dir means the working directory, else the project root above configs/;
    the answer is absolute, so a run's config.yaml names the real folder."""
    if data_dir.is_absolute():
        return data_dir
    alt = config_path.resolve().parent.parent / data_dir
    return (data_dir if data_dir.exists() or not alt.exists() else alt).resolve()


def resolve_data_dir(cfg: RunConfig, config_path: Path) -> RunConfig:
    cfg.data.data_dir = data_folder(cfg.data.data_dir, config_path)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
