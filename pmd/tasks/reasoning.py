"""Reasoning-gym tasks: any reasoning-gym dataset as a task, plus the answer extraction and verifier
feedback that the math and multiple-choice kinds reuse.

``ReasoningGymTask`` wraps any reasoning-gym dataset and scores answers with the
dataset's own ``score_answer``. ``DEFAULT_TASK_PARAMS`` are pmd's parameters for
the default task (chain_sum) when ``task_params`` is empty (see
``default_params``).

Prompt format
-------------
The student gets a single user message: the dataset's question, a newline, and
``ANSWER_INSTRUCTION``, i.e.::

    {question}
    Work it out, then give the final answer as "Answer: <answer>".

(see ``PROMPT_TEMPLATE``). Of 19 wordings measured with SmolLM2-135M-Instruct
on the default task this one scored best. That model rarely writes the
"Answer:" line itself (wordings that made it start with "Answer:" cut its
accuracy to about 10%), so extraction usually falls back to the last number.
No system message is added; the chat template may add its own.

Train / eval split
------------------
Each question text is assigned to train or eval by a hash of the text (one in
``EVAL_SHARE`` goes to eval), so the two splits are disjoint by question text
for every seed and every ``n``. Within a split, problems are drawn from a
reasoning-gym stream whose seed is derived from (dataset, split, seed), so the
same seed always gives the same problems. Neither split is de-duplicated, so
both follow the dataset's own distribution (a small question space, such as
one-digit sums, repeats within a split, never across splits).
``problems(split, n)`` is prefix-stable: asking for more problems appends to
the list (true for every reasoning-gym dataset whose items depend only on the
seed and the index, which is all of them except ``acre``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
from typing import Any

import reasoning_gym
from reasoning_gym.factory import DATASETS

from pmd.tasks.base import TASK_KINDS, Problem, Split, Verdict

# Sums/differences of two numbers with 1-3 digits. SmolLM2-135M-Instruct gets
# 107 of 300 eval problems right (36%, greedy, this prompt): about 75% of the
# one-digit, 25% of the two-digit and 1% of the three-digit ones, so there is
# both signal now and room to improve. These parameters apply when the task is
# DEFAULT_TASK and task_params is empty (never merged into given parameters).
DEFAULT_TASK = "chain_sum"
DEFAULT_TASK_PARAMS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 3}

ANSWER_INSTRUCTION = 'Work it out, then give the final answer as "Answer: <answer>".'
PROMPT_TEMPLATE = "{question}\n" + ANSWER_INSTRUCTION

NO_ANSWER_FEEDBACK = "No final answer found; end with 'Answer: <answer>'."

# One question text in EVAL_SHARE is reserved for the eval split.
EVAL_SHARE = 5
# How many stream items we are willing to look at per requested problem.
_SCAN_FACTOR = 20
# Parameters pmd sets itself, so users may not pass them.
_RESERVED_PARAMS = ("seed", "size")


def default_params(name: str, params: dict) -> dict:
    """The parameters a reasoning-gym task `name` runs with: pmd's DEFAULT_TASK_PARAMS for DEFAULT_TASK
    when `params` is empty, else `params` as given (the dataset's own defaults fill the rest)."""
    if name == DEFAULT_TASK and not params:
        return dict(DEFAULT_TASK_PARAMS)
    return params


# ---------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------

# A number: optional minus, digits with optional thousands commas, optional
# decimals. The lookbehind stops us starting in the middle of another number.
_NUMBER_RE = re.compile(r"(?<![\d.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_BOXED_RE = re.compile(r"\\boxed\s*\{")
# "Answer: X", "**Answer:** X", "Final answer = X", "the answer is X", ...
# The value is the rest of the line (or the next line if this one is empty).
_PHRASE_RE = re.compile(
    r"\banswer\b[*_\s]*(?:[:=]|\bis\b:?)[*_\s]*([^\n]*)", re.IGNORECASE
)
_DECORATION = " \t\n*_`$\"'"
_TRAILING_PUNCTUATION = ".,;:!"


def extract_answer(response: str, numeric: bool) -> str | None:
    """Find the student's final answer in a (possibly chatty) response.

    Order of preference:
      1. The last explicit marker in the text, whichever kind it is:
         ``<answer>X</answer>``, ``\\boxed{X}``, ``Answer: X`` (also
         ``Final answer: X``, bold ``**Answer:** X``, ``Answer = X``) and
         ``the answer is X``. Markers are tried from last to first and the
         first one with a usable value wins.
      2. For numeric answers only: the last number anywhere in the text.
      3. Otherwise None.

    Values are stripped of markdown (``**``, backticks, ``$``) and trailing
    punctuation. For numeric answers the value is reduced to one number: the
    first number after the last ``=`` in it (so ``Answer: 7 + 8 = 15`` gives
    15), with thousands commas removed; a marker without a number is skipped.
    """
    text = response.replace("\u2212", "-")  # unicode minus sign
    for value in reversed(_marker_values(text)):
        answer = _first_number(value) if numeric else _clean(value)
        if answer:
            return answer
    if numeric:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return numbers[-1].replace(",", "")
    return None


def _marker_values(text: str) -> list[str]:
    """Values of all answer markers, ordered by where the marker starts."""
    found = [(m.start(), m.group(1)) for m in _TAG_RE.finditer(text)]
    found += [(m.start(), m.group(1)) for m in _PHRASE_RE.finditer(text)]
    for m in _BOXED_RE.finditer(text):
        inner = _braced(text, m.end())
        if inner is not None:
            found.append((m.start(), inner))
    return [value for _, value in sorted(found, key=lambda item: item[0])]


def _braced(text: str, start: int) -> str | None:
    """Text up to the brace matching an opening brace just before `start`."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None  # unclosed, e.g. the response was cut off


def _clean(value: str) -> str:
    """Strip markdown decoration and trailing punctuation until nothing changes."""
    previous = None
    while value != previous:
        previous = value
        value = value.strip(_DECORATION).rstrip(_TRAILING_PUNCTUATION)
    return value


def _first_number(value: str) -> str | None:
    """The number a marker's value states, e.g. '15' from '7 + 8 = 15.'"""
    match = _NUMBER_RE.search(value.rsplit("=", 1)[-1])
    return match.group(0).replace(",", "") if match else None


def _is_number(text: str) -> bool:
    return _NUMBER_RE.fullmatch(text.strip()) is not None


def feedback_for(extracted: str | None, reward: float) -> str:
    """Short verifier feedback. It may echo the student's answer, never the reference."""
    if extracted is None:
        return NO_ANSWER_FEEDBACK
    shown = extracted if len(extracted) <= 60 else extracted[:57] + "..."
    if reward >= 1.0:
        return "Correct."
    if reward > 0.0:
        return f"The answer {shown} is only partially correct."
    return f"The answer {shown} is incorrect."


# ---------------------------------------------------------------------------
# reasoning-gym tasks
# ---------------------------------------------------------------------------


class ReasoningGymTask:
    """Any reasoning-gym dataset, scored by the dataset's own ``score_answer``."""

    def __init__(self, name: str, params: dict | None = None, seed: int = 0):
        self.name = name
        self.params = dict(params or {})
        self.seed = seed
        _check_names(name, self.params)
        try:
            # A one-item dataset just to own the scorer (it may read the config).
            self._scorer = self._dataset("train", size=1)
        except (AssertionError, ValueError, TypeError) as error:
            # reasoning-gym validates configs with bare asserts; say which task failed.
            message = f"Invalid parameters {self.params} for task {name!r}: {error}"
            raise ValueError(message) from error

    def problems(self, split: Split, n: int) -> list[Problem]:
        """The first `n` problems of a split (see the module docstring)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if n <= 0:
            return []
        dataset = self._dataset(split, size=_SCAN_FACTOR * n + 100)
        picked: list[Problem] = []
        for index in range(len(dataset)):
            entry = dataset[index]
            if _is_eval_question(entry["question"]) != (split == "eval"):
                continue
            picked.append(_to_problem(entry, f"{self.name}/{split}/{index}"))
            if len(picked) == n:
                return picked
        raise ValueError(
            f"Only found {len(picked)} of {n} {split} problems for '{self.name}' "
            f"with params {self.params}; its questions may rarely fall in this split."
        )

    def messages(self, problem: Problem) -> list[dict]:
        return [{"role": "user", "content": PROMPT_TEMPLATE.format(question=problem.question)}]

    def verify(self, problem: Problem, response: str) -> Verdict:
        """Extract the answer and score it with the dataset's own scorer.

        Some scorers give partial credit: chain_sum gives len(reference) /
        len(answer) when the reference appears inside the answer (0.5 for "13"
        when the reference is "3").
        """
        extracted = extract_answer(response, numeric=_is_number(problem.answer))
        reward = 0.0 if extracted is None else self._score(problem, extracted)
        return Verdict(reward=reward, feedback=feedback_for(extracted, reward), extracted=extracted)

    def get_problem(self, problem_id: str, split: Split | None = None) -> Problem:
        """Rebuild a problem from its id ("{name}/{split}/{index}"), e.g. for `pmd verify`."""
        parts = problem_id.rsplit("/", 2)
        if len(parts) != 3 or parts[0] != self.name or parts[1] not in ("train", "eval") or not parts[2].isdigit():
            raise ValueError(f"problem id {problem_id!r} is not of the form {self.name}/train|eval/INDEX")
        index = int(parts[2])
        entry = self._dataset(parts[1], size=index + 1)[index]  # type: ignore[arg-type]
        if _is_eval_question(entry["question"]) != (parts[1] == "eval"):
            raise ValueError(f"problem id {problem_id!r}: item {index} is not in the {parts[1]} split")
        return _to_problem(entry, problem_id)

    def _score(self, problem: Problem, extracted: str) -> float:
        # Puzzles with many valid solutions have no reference answer; we store
        # "" for those and give the scorer back the None it expects.
        entry = {
            "question": problem.question,
            "answer": problem.answer or None,
            "metadata": problem.metadata,
        }
        try:
            score = self._scorer.score_answer(extracted, entry)
        except Exception:  # a scorer crashing on odd student output is a wrong answer
            return 0.0
        return min(max(float(score or 0.0), 0.0), 1.0)

    def _dataset(self, split: Split, size: int):
        seed = _stream_seed(self.name, split, self.seed)
        return reasoning_gym.create_dataset(self.name, size=size, seed=seed, **self.params)


def _check_names(name: str, params: dict) -> None:
    """Raise a ValueError naming an unknown dataset or parameter, with suggestions."""
    if name not in DATASETS:
        close = difflib.get_close_matches(name, [*TASK_KINDS, *DATASETS], n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown task {name!r}: not one of {', '.join(TASK_KINDS)}, a .jsonl file or a "
                         f"reasoning-gym dataset.{hint}")
    _, config_cls = DATASETS[name]
    valid = [f.name for f in dataclasses.fields(config_cls) if f.name not in _RESERVED_PARAMS]
    for key in params:
        if key in _RESERVED_PARAMS:
            raise ValueError(
                f"Parameter {key!r} of {name!r} is set by pmd: "
                "seed comes from load_task, size from problems()."
            )
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown parameter {key!r} for task {name!r}.{hint} "
                f"Valid parameters: {', '.join(valid)}."
            )


def _stream_seed(name: str, split: Split, seed: int) -> int:
    """A seed far from other (name, split, seed) streams.

    reasoning-gym seeds item i with `seed + i`, so nearby seeds would give
    shifted copies of the same stream; hashing spreads them out.
    """
    digest = hashlib.sha256(f"{name}/{split}/{seed}".encode()).hexdigest()
    return int(digest[:8], 16)


def _is_eval_question(question: str) -> bool:
    digest = hashlib.sha256(question.encode()).hexdigest()
    return int(digest, 16) % EVAL_SHARE == 0


def _to_problem(entry: dict[str, Any], problem_id: str) -> Problem:
    answer = entry["answer"]
    return Problem(
        id=problem_id,
        question=entry["question"],
        answer="" if answer is None else str(answer),
        metadata=entry["metadata"],
    )
