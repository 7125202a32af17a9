"""Free-form math answers (integers, decimals, fractions, LaTeX) checked with math-verify.

Selecting: ``task=math`` draws GSM8K-style word problems from reasoning-gym's ``gsm_symbolic`` (100
GSM8K-derived templates; its parameters go in ``task_params={rg_params: {...}}``, the generator in
``source``), or reads rows from ``{path: FILE.jsonl}`` / ``{dataset: NAME}`` with a question column
(``question``, ``problem`` or ``prompt``) and an answer column (``answer``, ``final_answer`` or
``solution``; GSM8K's ``... #### 72`` and MATH's ``\\boxed{...}`` solutions are reduced to the final
answer).

Scoring: the student's last explicit answer (``Answer: X``, ``\\boxed{X}``, ``<answer>X</answer>``, "the
answer is X"; else math-verify's own search of the whole response) is compared with the reference by
``math_verify.verify`` (numeric tolerance, fractions, LaTeX, sets). Feedback is the one of the
reasoning-gym tasks: "Correct.", "The answer X is incorrect." or the missing-answer hint.
"""

from __future__ import annotations

import re
import threading

from pmd.tasks.base import Problem, RowTask, Verdict
from pmd.tasks.data import DataError, check_params, first_key, load_rows, row_id, source_params_help
from pmd.tasks.reasoning import PROMPT_TEMPLATE, ReasoningGymTask, extract_answer, feedback_for

PARAMS = {
    **source_params_help(),
    "source": "reasoning-gym generator used without path/dataset (default gsm_symbolic)",
    "rg_params": "parameters of that generator (a mapping)",
    "eval_fraction": "share of file/dataset problems held out for eval (default 0.2)",
}


def final_answer(text: str) -> str:
    """The final answer of a reference solution: after GSM8K's '####', else the last \\boxed{}, else all."""
    text = str(text).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    if "\\boxed" in text:
        found = extract_answer(text, numeric=False)
        if found:
            return found
    return text


class MathVerifier:
    """math-verify with per-thread timeouts (its signal-based timeout only works in the main thread)."""

    def __init__(self):
        from math_verify import parse, verify

        self._parse, self._verify = parse, verify
        self._gold: dict[str, list] = {}

    def _timeouts(self) -> dict:
        main = threading.current_thread() is threading.main_thread()
        return {"parse": 5 if main else None, "verify": 5 if main else None}

    def gold(self, answer: str) -> list:
        if answer not in self._gold:
            wrapped = answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"
            parsed = self._parse(wrapped, parsing_timeout=self._timeouts()["parse"])
            self._gold[answer] = parsed or self._parse(answer, parsing_timeout=self._timeouts()["parse"])
        return self._gold[answer]

    def equal(self, answer: str, candidate: str) -> bool:
        gold = self.gold(answer)
        if not gold:
            return candidate.strip() == answer.strip()
        timeouts = self._timeouts()
        for text in (f"\\boxed{{{candidate}}}", candidate):
            parsed = self._parse(text, parsing_timeout=timeouts["parse"])
            if parsed and self._verify(gold, parsed, timeout_seconds=timeouts["verify"]):
                return True
        return False

    def search(self, answer: str, response: str) -> tuple[bool, str | None]:
        """No explicit marker: let math-verify find the answer in the whole response."""
        parsed = self._parse(response, parsing_timeout=self._timeouts()["parse"])
        if not parsed:
            return False, None
        shown = str(parsed[-1])
        return bool(self._verify(self.gold(answer), parsed, timeout_seconds=self._timeouts()["verify"])), shown


class MathTask(RowTask):
    """Rows from a file or dataset (a RowTask, always holdout), or a reasoning-gym generator's problems."""

    EMPTY_SPLIT = "task {name!r} has no {split} problems"

    def __init__(self, name: str, params: dict, seed: int, problems: list[Problem] | None = None,
                 generator: ReasoningGymTask | None = None, source: str | None = None):
        super().__init__(name, params, seed, problems, source)
        self._generator = generator
        self._checker: MathVerifier | None = None

    @classmethod
    def load(cls, params: dict | None = None, seed: int = 0, name: str = "math") -> "MathTask":
        params = dict(params or {})
        check_params(name, params, PARAMS)
        if params.get("path") or params.get("dataset"):
            rows, source = load_rows(params, name)
            problems = [math_problem(row, source, name) for row in rows]
            return cls(name, params, seed, problems=problems, source=source)
        rg_params = params.get("rg_params") or {}
        if not isinstance(rg_params, dict):
            raise ValueError(f"task {name!r}: rg_params must be a mapping")
        generator = ReasoningGymTask(str(params.get("source", "gsm_symbolic")), rg_params, seed)
        return cls(name, params, seed, generator=generator)

    @property
    def checker(self) -> MathVerifier:
        if self._checker is None:
            self._checker = MathVerifier()
        return self._checker

    def problems(self, split: str, n: int) -> list[Problem]:
        if self._generator is not None:
            return self._generator.problems(split, n)
        return super().problems(split, n)

    def get_problem(self, problem_id: str, split: str | None = None) -> Problem:
        if self._generator is not None:
            return self._generator.get_problem(problem_id)
        return super().get_problem(problem_id, split)

    def messages(self, problem: Problem) -> list[dict]:
        return [{"role": "user", "content": PROMPT_TEMPLATE.format(question=problem.question)}]

    def verify(self, problem: Problem, response: str) -> Verdict:
        extracted = extract_answer(response, numeric=False)
        try:
            if extracted is not None:
                correct = self.checker.equal(problem.answer, extracted)
            else:
                correct, extracted = self.checker.search(problem.answer, response)
        except Exception:  # noqa: BLE001 - math-verify choking on odd output is a wrong answer
            correct = False
        reward = 1.0 if correct else 0.0
        return Verdict(reward, feedback_for(extracted, reward), extracted)


def math_problem(row: dict, source: str, task: str) -> Problem:
    where = f"{source}: row {row.get('_row', '?')}"
    question = first_key(row, ("question", "problem", "prompt"))
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: missing the question (question, problem or prompt)")
    answer = first_key(row, ("answer", "final_answer", "solution", "target"))
    if answer is None or not str(answer).strip():
        raise DataError(f"{where}: missing the answer (answer, final_answer or solution)")
    gold = final_answer(str(answer))
    if not re.search(r"\S", gold):
        raise DataError(f"{where}: empty final answer")
    return Problem(id=row_id(row, task), question=question.strip(), answer=gold, metadata={"source": source})
