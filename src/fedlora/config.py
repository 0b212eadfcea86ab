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

from fedlora.aggregation import AggregationConfig, AttackConfig, check_pipeline
from fedlora.algorithms import AlgorithmOptions
from fedlora.data.alpaca import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
from fedlora.devices import DeviceProfile, DevicesConfig, resolve_profiles
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
CUSTOM_PROMPT = "Classify the text.\nText: {text}\nLabel:"

# Per-dataset defaults, filled in only for keys the config leaves out.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "ag_news": {"task": "classification"},
    "financial_phrasebank": {
        "task": "classification",
        "partition": "iid",
        "prompt": "Classify the sentiment of the financial news sentence as negative, neutral or "
        "positive.\nSentence: {text}\nSentiment:",
        "label_words": ["negative", "neutral", "positive"],
    },
    "dolly": {"task": "instruction", "max_length": 256, "partition": "category_skew"},
    "alpaca": {"task": "instruction", "max_length": 256, "partition": "iid"},
    # Your own data: its own class names, and a prompt that names no AG News topics.
    "custom": {"prompt": CUSTOM_PROMPT, "label_words": None},
}

DATA_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
"""Readers (`datasets` builders) of a custom data file, by suffix (before an optional .gz)."""


def data_file_builder(path: Path) -> str | None:
    """The builder that reads `path`, None for a format fedlora does not read."""
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    return DATA_FILE_BUILDERS.get(suffixes[-1] if suffixes else "")


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

    dataset: Literal["ag_news", "financial_phrasebank", "dolly", "alpaca", "custom"] = "ag_news"
    """The dataset, read from data_dir (or the hub); `custom` is your own file or hub dataset."""
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
        if isinstance(data, dict) and data.get("dataset") in DATASET_DEFAULTS:
            # the given keys first: on assignment `data` is the model's own fields, whose
            # order config.yaml keeps (a resumed comparison compares it with the saved one)
            defaults = DATASET_DEFAULTS[data["dataset"]]
            data = {**data, **{k: v for k, v in defaults.items() if k not in data}}
        return data

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
    def _custom_needs_source(self) -> DataConfig:
        if self.dataset == "custom" and self.train_file is None and self.hub_name is None:
            raise ValueError("dataset custom needs train_file or hub_name")
        if self.dataset in ("dolly", "alpaca") and self.task != "instruction":
            raise ValueError(f"dataset {self.dataset} is instruction data (task: instruction)")
        for name in ("train_file", "test_file"):
            if self.dataset != "custom" and getattr(self, name) is not None:
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
    """r_k^1, each client's largest LoRA rank, one per client (default: the paper's); each ≥ 1."""
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


class LoggingConfig(Strict):
    """Where a run's metrics go besides metrics.jsonl."""

    tensorboard: bool = False
    """Also write every numeric metrics.jsonl field as TensorBoard scalars in RUN_DIR/tb/
    (needs the `tensorboard` extra: pip install 'fedlora[tensorboard]')."""


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

    @model_validator(mode="before")
    @classmethod
    def _ranks_from_devices(cls, tree: Any) -> Any:
        """`devices.max_ranks: devices` fills federation.client_max_ranks from the profiles."""
        dev = tree.get("devices") if isinstance(tree, dict) else None
        if not isinstance(dev, dict) or dev.get("max_ranks") != "devices":
            return tree
        try:
            devices = DevicesConfig.model_validate(dev)
        except ValidationError:
            return tree  # the field validation below reports it
        fed = tree.get("federation") or {}
        n = fed.get("num_clients", 10) if isinstance(fed, dict) else None
        try:
            seed = int(tree.get("seed", 0))
        except (TypeError, ValueError, OverflowError):
            seed = None
        if not isinstance(n, int) or n < 1 or seed is None:
            return tree  # the field validation below reports it
        try:
            ranks = [p.max_rank for p in resolve_profiles(devices, n, seed)]
        except ValueError as err:
            raise ValueError(str(err)) from None
        # a run's own config.yaml names the ranks it was given: those are accepted back (resume)
        if fed.get("client_max_ranks", ranks) != ranks:
            raise ValueError(f"federation.client_max_ranks: {fed['client_max_ranks']} differs from the devices' "
                             f"ranks {ranks}; leave it unset when devices.max_ranks is devices")
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
    def _pipeline_fits_method(self) -> RunConfig:
        """Each aggregation stage and the attack must be defined for the method (fedlora.aggregation)."""
        check_pipeline(self)
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
        tree = load_yaml(raw.decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config error: {path}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "cannot parse"
        raise ConfigError(f"config error: {path}: invalid YAML{where}: {problem}") from None
    except BAD_YAML as err:
        raise ConfigError(f"config error: {path}: invalid YAML: {str(err).splitlines()[0][:120]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config error: {path}: top level must be a mapping")
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
