"""Lettered multiple-choice questions in the SciKnowEval format: the model reasons, then gives the letter
inside <answer></answer> (as in SDPO's SciKnowEval setup).

Selecting: ``task=mcq`` reads ``task_params={path: FILE.jsonl}`` or ``{dataset: NAME, config:, split:}``;
without either it uses the 30-question science sample shipped in ``pmd/data/science_mcq.jsonl`` (written
for pmd, for tests and demos; it is far too small to measure anything).

Accepted row shapes (one question per row):
  - SciKnowEval / ARC: ``question``, ``choices: {label: [...], text: [...]}``, ``answerKey``;
  - ``question`` with ``choices`` or ``options`` as a list of strings (labelled A, B, ...) or a mapping
    label -> text, and ``answer`` as a letter, a 0-based index or the text of the right option;
  - OpenAI-evals chat rows: ``input`` (a list of messages whose last user message holds the question
    with its options) and ``ideal`` (the letter).
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from pmd.tasks.base import Problem, RowTask, Verdict
from pmd.tasks.data import (DataError, check_params, first_key, in_eval_split, load_rows, read_jsonl, row_id,
                            source_params_help)
from pmd.tasks.reasoning import extract_answer

SAMPLE = Path(__file__).parent.parent / "data" / "science_mcq.jsonl"  # pmd/data (package data), not tasks/data.py
INSTRUCTION = ("Think it through step by step, then give only the letter of the correct option inside "
               "<answer></answer> tags, for example <answer>A</answer>.")
NO_ANSWER = "No answer found; end with <answer>LETTER</answer>."

PARAMS = {
    **source_params_help(),
    "eval_fraction": "share of questions held out for eval (default 0.2, by a hash of the question)",
    "problem_split": "holdout (disjoint train/eval) or shared (every question in both)",
    "strict_format": "only accept the letter inside <answer></answer> (default false: also 'Answer: B')",
    "feedback": "give 'The answer B is incorrect.' feedback (default true; SDPO gives none for MCQ)",
}

_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


def _choices(row: dict, where: str) -> tuple[list[str], list[str]] | None:
    """(labels, texts) of a row's options, or None when the options are inside the question text."""
    raw = first_key(row, ("choices", "options"))
    if raw is None:
        letters = [c for c in string.ascii_uppercase[:10] if c in row and row[c] not in (None, "")]
        if len(letters) >= 2:
            return letters, [str(row[c]) for c in letters]
        return None
    if isinstance(raw, dict) and "text" in raw:
        texts = [str(t) for t in raw["text"]]
        labels = [str(lab).strip() for lab in raw.get("label") or string.ascii_uppercase[: len(texts)]]
    elif isinstance(raw, dict):
        labels, texts = [str(k).strip() for k in raw], [str(v) for v in raw.values()]
    elif isinstance(raw, (list, tuple)):
        texts = [str(t) for t in raw]
        labels = list(string.ascii_uppercase[: len(texts)])
    else:
        raise DataError(f"{where}: choices must be a list or a mapping, got {type(raw).__name__}")
    if len(texts) < 2 or len(texts) != len(labels) or len(set(labels)) != len(labels):
        raise DataError(f"{where}: needs at least two options with distinct labels")
    return labels, texts


def _answer_label(row: dict, labels: list[str] | None, texts: list[str] | None, where: str) -> str:
    raw = first_key(row, ("answerKey", "answer", "ideal", "label", "correct", "target"))
    if raw is None:
        raise DataError(f"{where}: missing the answer (answerKey, answer or ideal)")
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if labels is None:
        letter = str(raw).strip().strip("().").upper()
        if len(letter) != 1 or letter not in string.ascii_uppercase:
            raise DataError(f"{where}: answer {raw!r} is not a letter")
        return letter
    if isinstance(raw, bool):
        raise DataError(f"{where}: answer {raw!r} is not a label, index or option")
    if isinstance(raw, int):
        if not 0 <= raw < len(labels):
            raise DataError(f"{where}: answer index {raw} is out of range for {len(labels)} options")
        return labels[raw]
    text = str(raw).strip()
    for label in labels:
        if text.upper() == label.upper() or text.upper().strip("().") == label.upper():
            return label
    for label, option in zip(labels, texts or []):
        if text.lower() == option.strip().lower():
            return label
    raise DataError(f"{where}: answer {raw!r} is not one of the labels {', '.join(labels)}")


def mcq_problem(row: dict, source: str, task: str) -> Problem:
    where = f"{source}: row {row.get('_row', '?')}"
    question = first_key(row, ("question", "prompt", "stem", "query"))
    if question is None and isinstance(row.get("input"), list):  # evals chat rows
        users = [m.get("content") for m in row["input"] if isinstance(m, dict) and m.get("role") == "user"]
        question = users[-1] if users else None
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing the question text")
    options = _choices(row, where)
    labels, texts = options if options else (None, None)
    answer = _answer_label(row, labels, texts, where)
    if labels is None:  # options inside the question: accept any single letter up to the answer's
        labels = list(string.ascii_uppercase[: max(4, string.ascii_uppercase.index(answer) + 1)])
    metadata = {"labels": labels, "texts": texts, "domain": row.get("domain")}
    return Problem(id=row_id(row, task), question=question.strip(), answer=answer, metadata=metadata)


def parse_letter(value: str, labels: list[str], texts: list[str] | None) -> str | None:
    """A label from an answer value: 'B', '(b)', 'B.', 'B: text', 'Option B' or the option's text."""
    value = value.strip().strip("*`$ ").rstrip(".")
    match = re.fullmatch(r"(?:option|choice)?\s*\(?([A-Za-z])\)?(?:[.:)]\s*.*)?", value, re.IGNORECASE | re.DOTALL)
    if match:
        letter = match.group(1).upper()
        if letter in labels:
            return letter
    for label, option in zip(labels, texts or []):
        if value.lower() == option.strip().lower():
            return label
    return None


class MCQTask(RowTask):
    """Multiple choice: reward 1 for the right letter, 0 otherwise; feedback never names the right letter."""

    EMPTY_SPLIT = "task {name!r} has no {split} questions (eval_fraction={eval_fraction})"

    def __init__(self, name: str, problems: list[Problem], params: dict | None = None, seed: int = 0):
        params = dict(params or {})
        check_params(name, params, PARAMS)
        super().__init__(name, params, seed, problems)
        self.strict_format = bool(params.get("strict_format", False))
        self.give_feedback = bool(params.get("feedback", True))

    @classmethod
    def load(cls, params: dict | None = None, seed: int = 0, name: str = "mcq") -> "MCQTask":
        params = dict(params or {})
        check_params(name, params, PARAMS)
        if params.get("path") or params.get("dataset"):
            rows, source = load_rows(params, name)
        else:
            rows, source = read_jsonl(SAMPLE), SAMPLE.name
        return cls(name, [mcq_problem(row, source, name) for row in rows], params, seed)

    def messages(self, problem: Problem) -> list[dict]:
        texts = problem.metadata.get("texts")
        options = ""
        if texts:
            options = "\n\n" + "\n".join(f"{lab}: {txt}" for lab, txt in zip(problem.metadata["labels"], texts))
        return [{"role": "user", "content": f"{problem.question}{options}\n\n{INSTRUCTION}"}]

    def verify(self, problem: Problem, response: str) -> Verdict:
        labels, texts = problem.metadata["labels"], problem.metadata.get("texts")
        letter = None
        tags = _TAG.findall(response)
        if tags:
            letter = parse_letter(tags[-1], labels, texts)
        if letter is None and not tags and not self.strict_format:
            value = extract_answer(response, numeric=False)
            letter = parse_letter(value, labels, texts) if value else None
        if letter is None:
            return Verdict(0.0, NO_ANSWER if self.give_feedback else "", None)
        if letter == problem.answer:
            return Verdict(1.0, "Correct.", letter)
        return Verdict(0.0, f"The answer {letter} is incorrect." if self.give_feedback else "", letter)

    def _is_eval(self, problem: Problem) -> bool:
        return in_eval_split(problem.question + "\n" + "\n".join(problem.metadata.get("texts") or []),
                             self.eval_fraction, salt=f"{self.name}/")
