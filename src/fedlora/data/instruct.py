"""Instruction prompts: the config's template, or the model's chat template when it has one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from fedlora.data.encode import Encoded, encode_instruction

if TYPE_CHECKING:
    from fedlora.config import DataConfig


def uses_chat_template(d: DataConfig, tokenizer: PreTrainedTokenizerBase) -> bool:
    return d.chat_template and bool(getattr(tokenizer, "chat_template", None))


def format_prompt(instruction: str, input_: str, d: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text before the response (the loss never sees these tokens)."""
    if uses_chat_template(d, tokenizer):
        content = f"{instruction}\n\n{input_}" if input_ else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    template = d.instruction_prompt_with_input if input_ else d.instruction_prompt
    return template.format(instruction=instruction, input=input_)


def encode_instruction_data(ds: Dataset, d: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[Encoded]:
    pairs = [
        (format_prompt(i, x, d, tokenizer), r)
        for i, x, r in zip(ds["instruction"], ds["input"], ds["response"])
    ]
    return encode_instruction(pairs, tokenizer, d.max_length)
