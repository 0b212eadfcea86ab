"""`fedlora generate`: text from a finished run's model, to try what it learned.

The prompt is dressed as the run's training examples were: an instruction run's prompt goes
through the chat template where the tokenizer has one (else the config's instruction
template), a classification run's fills `data.prompt` (so the model names a label word);
`raw` sends it as typed. Greedy by default (the same text every time); `temperature` > 0
samples, seeded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedlora.config import ConfigError, torch_device
from fedlora.data.instruct import format_prompt
from fedlora.export import load_run
from fedlora.train import autocast


def dress_prompt(prompt: str, cfg, tokenizer, raw: bool = False) -> str:
    """The text the model sees: the prompt in the format the run trained on (see module doc)."""
    if raw:
        return prompt
    if cfg.data.task == "classification":  # as encode_classification fills it: other braces stay literal
        prefix, suffix = cfg.data.prompt.split("{text}", 1)
        return prefix + prompt + suffix
    return format_prompt(prompt, "", cfg.data, tokenizer)


def generate(
    run_dir: Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    raw: bool = False,
    device: str | None = None,
) -> str:
    """The completion (prompt excluded) of the run's final model; `device` overrides model.device."""
    if max_new_tokens < 1:
        raise ConfigError("config error: --max-new-tokens: must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError("config error: --temperature must be >= 0 and --top-p in (0, 1]")
    run = load_run(run_dir)
    where = torch_device(device, "--device") if device else run.cfg.model.torch_device()
    model = run.merged_model().to(where)
    tok = run.tokenizer
    enc = tok(dress_prompt(prompt, run.cfg, tok, raw), return_tensors="pt", add_special_tokens=False).to(where)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    torch.manual_seed(seed)
    with torch.inference_mode(), autocast(run.cfg.model.compute_dtype, where):
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
