"""MMLU (Hendrycks et al. 2021): 57 subjects of 4-way multiple choice, scored by the
log-likelihood of the answer letter after "Answer:" (zero- or few-shot from the dev split)."""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from fedlora.data.encode import Encoded, label_token_ids

LETTERS = ["A", "B", "C", "D"]


def mmlu_subjects(data_dir: Path) -> list[str]:
    """The subjects of the local copy (57), sorted."""
    folder = Path(data_dir) / "mmlu" / "test"
    return sorted(p.name.removesuffix("_test.csv.gz") for p in folder.glob("*_test.csv.gz"))


def load_mmlu(
    split: str, data_dir: Path, subjects: list[str] | None = None, hub_name: str | None = None
) -> Dataset:
    """Columns `question`, `choices` (4 strings), `answer` (0..3), `subject`; split test or dev."""
    if hub_name is not None:
        from datasets import load_dataset

        ds = load_dataset(hub_name, "all", split=split)
        if subjects is not None:
            wanted = set(subjects)
            ds = ds.filter(lambda r: r["subject"] in wanted)
        return ds.select_columns(["question", "choices", "answer", "subject"])
    cols: dict[str, list] = {"question": [], "choices": [], "answer": [], "subject": []}
    for subject in subjects or mmlu_subjects(data_dir):
        path = Path(data_dir) / "mmlu" / split / f"{subject}_{split}.csv.gz"
        if not path.exists():
            raise FileNotFoundError(f"evaluation.mmlu_subjects: no MMLU file {path}")
        with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
            for question, a, b, c, d, answer in csv.reader(fh):
                cols["question"].append(question)
                cols["choices"].append([a, b, c, d])
                cols["answer"].append(LETTERS.index(answer.strip()))
                cols["subject"].append(subject)
    return Dataset.from_dict(cols)


def per_subject_rows(subjects: list[str], per_subject: int | None, seed: int) -> list[int]:
    """A seeded draw of at most `per_subject` rows of each subject (sorted; all without a cap)."""
    if per_subject is None:
        return list(range(len(subjects)))
    rng = np.random.default_rng(seed)
    names = np.array(subjects)
    keep: list[int] = []
    for s in sorted(set(subjects)):
        idx = np.flatnonzero(names == s)
        keep += sorted(rng.choice(idx, size=min(per_subject, len(idx)), replace=False).tolist())
    return sorted(keep)


def format_question(question: str, choices: list[str], answer: int | None = None) -> str:
    lines = [question.strip(), *(f"{L}. {c}" for L, c in zip(LETTERS, choices))]
    ending = "Answer:" if answer is None else f"Answer: {LETTERS[answer]}\n\n"
    return "\n".join(lines) + "\n" + ending


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


@dataclass
class MMLUSet:
    """Encoded questions (target = answer index), their subjects, and the ids of " A".." D"."""

    examples: list[Encoded]
    subjects: list[str]
    label_ids: list[int]
    ids: list[int] = field(default_factory=list)
    """Per question, its row in the loaded test split (the key of per-item records)."""


def encode_mmlu(
    test: Dataset, dev: Dataset | None, shots: int, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> MMLUSet:
    """Hendrycks' prompt: a subject header, `shots` dev exemplars with answers, the question.

    A prompt longer than `max_length` drops exemplars from the front, then keeps its last
    `max_length` tokens (the question and "Answer:" always survive).
    """
    exemplars: dict[str, list[str]] = {}
    if shots and dev is not None:
        for q, ch, a, s in zip(dev["question"], dev["choices"], dev["answer"], dev["subject"]):
            exemplars.setdefault(s, []).append(format_question(q, ch, a))
    examples = []
    for q, ch, a, s in zip(test["question"], test["choices"], test["answer"], test["subject"]):
        shots_s = exemplars.get(s, [])[:shots]
        query = format_question(q, ch)
        while True:
            ids = tokenizer.encode(header(s) + "".join(shots_s) + query, add_special_tokens=False)
            if len(ids) <= max_length or not shots_s:
                break
            shots_s = shots_s[1:]
        examples.append(Encoded(ids[-max_length:], int(a)))
    return MMLUSet(examples, list(test["subject"]), label_token_ids(tokenizer, LETTERS))
