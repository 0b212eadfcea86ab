"""`fedlora generate`: the run's trained model continues the prompt, greedy by default."""

import pytest
import torch
from conftest import tiny_tree

from fedlora.cli import main
from fedlora.config import build_config
from fedlora.export import load_run
from fedlora.generate import dress_prompt, generate
from fedlora.runtime.inprocess import Simulation

PROMPT = "Sports and World news"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from conftest import DATA_DIR

    if not DATA_DIR.exists():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    out = tmp_path_factory.mktemp("gen") / "run"
    tree = tiny_tree(algorithm={"name": "fedit"}, federation={"rounds": 1})
    Simulation(build_config(tree), out, progress=False).run()
    return out


def greedy_by_hand(run_dir, text: str, steps: int) -> str:
    """Argmax decoding with full forward passes on the run's merged model (no generate())."""
    run = load_run(run_dir)
    model, tok = run.merged_model(), run.tokenizer
    ids = tok(dress_prompt(text, run.cfg, tok), add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == tok.eos_token_id:
                break
    return tok.decode(ids[0, start:], skip_special_tokens=True)


def test_greedy_generation_is_the_trained_models_argmax(run_dir):
    text = generate(run_dir, PROMPT, max_new_tokens=6)
    assert text.strip() and text == generate(run_dir, PROMPT, max_new_tokens=6)
    assert text == greedy_by_hand(run_dir, PROMPT, 6)


def test_sampling_is_seeded(run_dir):
    a = generate(run_dir, PROMPT, max_new_tokens=8, temperature=1.5, seed=1)
    assert a == generate(run_dir, PROMPT, max_new_tokens=8, temperature=1.5, seed=1)
    others = {generate(run_dir, PROMPT, max_new_tokens=8, temperature=1.5, seed=s) for s in (2, 3, 4)}
    assert others - {a}, "the seed changes nothing: is it sampling at all?"


def test_a_classification_run_gets_its_prompt_template(run_dir):
    run = load_run(run_dir)
    dressed = dress_prompt(PROMPT, run.cfg, run.tokenizer)
    assert dressed == run.cfg.data.prompt.format(text=PROMPT) and dressed.endswith("Topic:")
    assert dress_prompt(PROMPT, run.cfg, run.tokenizer, raw=True) == PROMPT
    braces = run.cfg.model_copy(deep=True)
    braces.data.prompt = 'Reply as {"label": ...}. Article: {text}\nTopic:'  # braces are text, not fields
    assert dress_prompt("Oil up", braces, run.tokenizer) == 'Reply as {"label": ...}. Article: Oil up\nTopic:'


def test_cli_prints_the_completion_and_names_bad_options(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == generate(run_dir, PROMPT, max_new_tokens=6).strip()
    assert main(["generate", str(run_dir), "--prompt", PROMPT, "--device", "cuda:99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: --device: cuda:99 is not available")
    assert main(["generate", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err


def test_an_instruction_prompt_goes_through_the_chat_template():
    from fedlora.models import tiny_tokenizer

    cfg = build_config(tiny_tree(data={"dataset": "alpaca"}))
    tok = tiny_tokenizer()
    assert dress_prompt(PROMPT, cfg, tok) == cfg.data.instruction_prompt.format(instruction=PROMPT, input="")
    tok.chat_template = "{% for m in messages %}<user>{{ m['content'] }}{% endfor %}<assistant>"
    assert dress_prompt(PROMPT, cfg, tok) == f"<user>{PROMPT}<assistant>"
