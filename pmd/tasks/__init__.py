"""Tasks: problems with verifiable answers, for post-training with rewards.

A task hands out train and held-out eval problems, turns a problem into chat messages for the student, and
scores a response with a verifier. Anything that implements the small ``Task`` protocol (``base``) can be
trained on. ``load_task`` dispatches on the name to one of the kinds (see docs/tasks.md):

  - any reasoning-gym dataset name: ``reasoning`` (``ReasoningGymTask``; also answer extraction and feedback);
  - ``humaneval`` and ``code``: ``code`` (unit tests run in ``sandbox``, whose inside is ``sandbox_runner``);
  - ``mcq``: ``mcq``; ``math``: ``free_math``; ``custom``: ``custom`` (your reward function);
  - a path to a .jsonl/.json file: ``load_file_task``.

``data`` reads rows (JSONL or Hugging Face datasets) and splits them; ``base.RowTask`` holds a fixed list of
problems with its train/eval split, for the kinds built from rows.

Adding a kind: write a module here that imports only ``base``, ``data``, ``reasoning`` or ``sandbox`` (never
another kind or this package), add its name to ``TASK_KINDS`` (``base``) and a branch to ``load_task`` below;
this file is the only one that imports the kind modules.
"""

from __future__ import annotations

import os
from pathlib import Path

from pmd.tasks.base import TASK_KINDS, Problem, RowTask, Split, Task, Verdict, verify_many
from pmd.tasks.code import CodeTask
from pmd.tasks.custom import CustomTask
from pmd.tasks.data import DataError, read_jsonl
from pmd.tasks.free_math import MathTask
from pmd.tasks.mcq import MCQTask
from pmd.tasks.reasoning import (ANSWER_INSTRUCTION, DEFAULT_TASK, DEFAULT_TASK_PARAMS, EVAL_SHARE,
                                 NO_ANSWER_FEEDBACK, PROMPT_TEMPLATE, ReasoningGymTask, default_params,
                                 extract_answer, feedback_for)

__all__ = [
    "ANSWER_INSTRUCTION", "DEFAULT_TASK", "DEFAULT_TASK_PARAMS", "EVAL_SHARE", "NO_ANSWER_FEEDBACK",
    "PROMPT_TEMPLATE", "TASK_KINDS", "CodeTask", "CustomTask", "DataError", "MCQTask", "MathTask", "Problem",
    "ReasoningGymTask", "RowTask", "Split", "Task", "Verdict", "default_params", "extract_answer",
    "feedback_for", "load_file_task", "load_task", "verify_many",
]


def load_task(name: str, params: dict | None = None, seed: int = 0) -> Task:
    """Build a task by name.

    humaneval | code | mcq | math | custom (see TASK_KINDS and docs/tasks.md); a path to a .jsonl/.json
    file (a custom task with `reward_fn`, else the kind its columns suggest); anything else is a
    reasoning-gym dataset name (with pmd's DEFAULT_TASK_PARAMS for DEFAULT_TASK when params is empty).
    """
    params = dict(params or {})
    kind = name.strip().lower()
    if kind == "humaneval":
        return CodeTask.humaneval(params, seed)
    if kind == "code":
        return CodeTask.from_rows("code", params, seed)
    if kind == "mcq":
        return MCQTask.load(params, seed)
    if kind == "math":
        return MathTask.load(params, seed)
    if kind == "custom":
        return CustomTask.load("custom", params, seed)
    if kind == "python":
        raise ValueError("task=python: this run's dataset and reward functions were given in Python; resume or "
                         "evaluate it with pmd.train(..., dataset=..., reward=...) / pmd.evaluate(...)")
    if _looks_like_file(name):
        return load_file_task(name, params, seed)
    return ReasoningGymTask(name, default_params(name, params), seed)


def load_file_task(path: str, params: dict | None = None, seed: int = 0):
    """`task=FILE.jsonl`: a custom task when reward_fn is given, else the kind the columns suggest."""
    params = dict(params or {})
    if "path" in params or "dataset" in params:
        raise ValueError(f"task={path!r} is already the data file; drop path/dataset from task_params")
    name = Path(path).stem
    if params.get("reward_fn"):
        return CustomTask.load(name, {**params, "path": path}, seed)
    rows = read_jsonl(path, limit=1)
    if not rows:
        raise DataError(f"{path}: no rows")
    loader = _loader_for_columns(rows[0])
    if loader is None:
        raise ValueError(f"task={path!r}: give task_params reward_fn=module:function, or use columns pmd knows "
                         "(tests for code, choices + answerKey for multiple choice, answer for math)")
    return loader(name, {**params, "path": path}, seed)


def task_from_rows(name: str, rows: list[dict], source: str, params: dict, seed: int = 0, rewards=None) -> Task:
    """A task over rows given in-process (`pmd.train(dataset=...)`): scored by `rewards` ([(function,
    weight)]) when given, else by the kind the columns suggest."""
    if rewards:
        return CustomTask(name, [{**row, "_row": i + 1} for i, row in enumerate(rows)], source, params, seed,
                          rewards=rewards)
    loader = _loader_for_columns(rows[0])
    if loader is None:
        raise ValueError("dataset: give reward=, or use columns pmd knows (tests for code, choices + answerKey for "
                         "multiple choice, answer for math)")
    return loader(name, {**params, "rows": rows}, seed)


def _loader_for_columns(row: dict):
    """How to load rows with these columns: code, multiple choice or math (None: not one of them)."""
    if {"tests", "test", "test_list", "public_test_cases"} & row.keys():
        return CodeTask.from_rows
    if {"choices", "options", "answerKey", "ideal"} & row.keys():
        return lambda name, params, seed: MCQTask.load(params, seed, name=name)
    if {"answer", "final_answer", "solution"} & row.keys():
        return lambda name, params, seed: MathTask.load(params, seed, name=name)
    return None


def _looks_like_file(name: str) -> bool:
    return name.endswith((".jsonl", ".json")) or (os.sep in name and os.path.isfile(name))
