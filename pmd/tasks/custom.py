"""Custom tasks: your rows (JSONL or a Hugging Face dataset) scored by your reward function.

Selecting::

    pmd train task=custom task_params='{path: data.jsonl, reward_fn: my_rewards:score}'
    pmd train task=data.jsonl task_params='{reward_fn: my_rewards.py:score}'

Rows need a ``prompt`` column (``prompt_column`` to rename): a string (sent as one user message) or a
list of chat messages (TRL's conversational format). Every other column is handed to the reward function.

The reward function has TRL's signature::

    def score(prompts, completions, **kwargs) -> list[float]

``prompts`` and ``completions`` are lists over the batch (completions are strings, or
``[{"role": "assistant", "content": ...}]`` lists when prompts are conversations); each dataset column
arrives as a keyword argument holding a list aligned with them (plus ``completion_ids=None`` and
``trainer_state=None``, which TRL also passes). A function without ``**kwargs`` receives only the
arguments it names. It returns one reward per completion, or feedback as well, in either form:

    return rewards, feedbacks                 # two lists
    return [{"reward": 1.0, "feedback": "..."}, ...]

``None`` counts as reward 0. Rewards are clipped to [0, 1] (``clip_rewards: false`` keeps them as they
are; pmd counts a rollout as passed when its reward reaches ``success_threshold``). A function that
raises, or returns the wrong shape, gives every rollout of that call reward 0, feedback
"verifier error: ..." and ``Verdict.error=True``; with ``strict: true`` it raises instead.
A path given as ``task=`` without ``reward_fn`` is read as a code, multiple-choice or math dataset when
its columns say so (``tests``/``test``/``test_list``, ``choices``/``options``, ``answer``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pmd.tasks.base import Problem, RowTask, Verdict
from pmd.tasks.data import DataError, check_params, json_safe, load_rows, row_id, source_params_help

PARAMS = {
    **source_params_help(),
    "reward_fn": "the reward function, module:function or path/to/file.py:function (required)",
    "prompt_column": "column with the prompt (default prompt, else question)",
    "eval_fraction": "share of rows held out for eval (default 0.2, by a hash of the prompt)",
    "problem_split": "holdout (disjoint train/eval) or shared (every row in both)",
    "clip_rewards": "clip rewards to [0, 1] (default true)",
    "strict": "raise when the reward function fails instead of giving reward 0 and 'verifier error: ...'",
}
_TRL_EXTRAS = {"completion_ids": None, "trainer_state": None}


def load_reward_fn(spec: str):
    """Import `module:function` (cwd importable) or `path/to/file.py:function`."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"reward_fn={spec!r}: expected module:function or path/to/file.py:function")
    module_name, _, fn_name = spec.rpartition(":")
    if module_name.endswith(".py") or os.sep in module_name:
        file = Path(module_name).expanduser()
        if not file.is_file():
            raise ValueError(f"reward_fn={spec!r}: no such file {module_name}")
        unit = importlib.util.spec_from_file_location(f"pmd_reward_{file.stem}", file)
        module = importlib.util.module_from_spec(unit)
        unit.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                raise ValueError(f"reward_fn={spec!r}: {error}") from error
            sys.path.insert(0, os.getcwd())  # `pmd` runs as a script: make the working folder importable
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as again:
                raise ValueError(f"reward_fn={spec!r}: {again}") from again
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward_fn={spec!r}: {module_name} has no function {fn_name!r}")
    return fn


class RewardShapeError(ValueError):
    pass


def normalise_rewards(out, n: int) -> tuple[list[float | None], list[str | None]]:
    """(rewards, feedbacks) from whatever the reward function returned; RewardShapeError when unusable."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()
    feedbacks: list[str | None] = [None] * n
    if (isinstance(out, tuple) and len(out) == 2 and all(isinstance(x, (list, tuple)) or hasattr(x, "tolist")
                                                          for x in out)):
        rewards = out[0].tolist() if hasattr(out[0], "tolist") else list(out[0])
        feedbacks = list(out[1].tolist() if hasattr(out[1], "tolist") else out[1])
        if len(feedbacks) != n:
            raise RewardShapeError(f"returned {len(feedbacks)} feedback strings for {n} completions")
    elif isinstance(out, (list, tuple)):
        rewards = list(out)
    else:
        raise RewardShapeError(f"returned {type(out).__name__}; expected a list of {n} rewards")
    if len(rewards) != n:
        raise RewardShapeError(f"returned {len(rewards)} rewards for {n} completions")
    clean: list[float | None] = []
    for i, r in enumerate(rewards):
        if isinstance(r, dict):
            if "reward" not in r:
                raise RewardShapeError(f"item {i} is a dict without 'reward'")
            feedbacks[i] = r.get("feedback")
            r = r["reward"]
        if r is None:
            clean.append(None)
            continue
        if isinstance(r, bool) or not isinstance(r, (int, float)) and not hasattr(r, "__float__"):
            raise RewardShapeError(f"item {i} is {type(r).__name__}, not a number")
        value = float(r)
        if math.isnan(value):
            raise RewardShapeError(f"item {i} is NaN")
        clean.append(value)
    for i, fb in enumerate(feedbacks):
        if fb is not None and not isinstance(fb, str):
            raise RewardShapeError(f"feedback {i} is {type(fb).__name__}, not a string")
    return clean, feedbacks


def _name(fn, params: dict) -> str:
    return params.get("reward_fn") or f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


def _accepts(fn) -> tuple[set[str], bool]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


class CustomTask(RowTask):
    """Rows scored by reward functions with TRL's signature. `rewards`: [(function, weight)] given in-process
    (pmd.train(..., reward=...)); without it, the one function named by `reward_fn` in the params, weight 1."""

    def __init__(self, name: str, rows: list[dict], source: str, params: dict, seed: int = 0,
                 rewards: list[tuple[Callable, float]] | None = None):
        check_params(name, params, PARAMS)
        if rewards is None:
            if not params.get("reward_fn"):
                raise ValueError(f"task {name!r} needs task_params reward_fn=module:function")
            rewards = [(load_reward_fn(params["reward_fn"]), 1.0)]
        self.rewards = [(fn, float(weight), *_accepts(fn)) for fn, weight in rewards]
        self.strict = bool(params.get("strict", False))
        self.clip = bool(params.get("clip_rewards", True))
        super().__init__(name, params, seed)
        column = params.get("prompt_column")
        problems, self._prompts = [], {}
        for row in rows:
            where = f"{source}: row {row.get('_row', '?')}"
            key = column or ("prompt" if "prompt" in row else "question")
            if key not in row:
                wanted = repr(column) if column else "'prompt' (or 'question'; set prompt_column to rename)"
                raise DataError(f"{where}: missing the prompt column {wanted}")
            prompt = row[key]
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise DataError(f"{where}: empty prompt")
                text = prompt
            elif isinstance(prompt, list) and prompt and all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
                text = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])
            else:
                raise DataError(f"{where}: prompt must be a string or a list of {{role, content}} messages")
            columns = {k: json_safe(v) for k, v in row.items() if k not in (key, "_row")}
            pid = row_id(row, name)
            self._prompts[pid] = json_safe(prompt)
            problems.append(Problem(id=pid, question=str(text), answer=str(row.get("answer", "") or ""),
                                    metadata={"columns": columns, "row": row.get("_row"), "source": source}))
        self._set_problems(problems, source)

    @classmethod
    def load(cls, name: str, params: dict | None = None, seed: int = 0) -> "CustomTask":
        params = dict(params or {})
        check_params(name, params, PARAMS)
        rows, source = load_rows(params, name)
        return cls(name, rows, source, params, seed)

    def messages(self, problem: Problem) -> list[dict]:
        prompt = self._prompts[problem.id]
        if isinstance(prompt, list):
            return [{"role": m["role"], "content": m["content"]} for m in prompt]
        return [{"role": "user", "content": prompt}]

    def verify(self, problem: Problem, response: str) -> Verdict:
        return self.verify_batch([problem], [response])[0]

    def verify_batch(self, problems: list[Problem], responses: list[str]) -> list[Verdict]:
        """One call of each reward function for the whole batch, as TRL does; the reward is their weighted sum
        and the feedback their feedback lines joined."""
        n = len(problems)
        prompts = [self._prompts[p.id] for p in problems]
        completions = [[{"role": "assistant", "content": r}] if isinstance(pr, list) else r
                       for pr, r in zip(prompts, responses)]
        kwargs = {"prompts": prompts, "completions": completions, **_TRL_EXTRAS}
        for key in sorted({k for p in problems for k in p.metadata["columns"]}):
            kwargs.setdefault(key, [p.metadata["columns"].get(key) for p in problems])
        totals, lines = [0.0] * n, [[] for _ in range(n)]
        for fn, weight, names, var_kw in self.rewards:
            try:
                rewards, feedbacks = normalise_rewards(fn(**(kwargs if var_kw else {k: v for k, v in kwargs.items()
                                                                                      if k in names})), n)
            except Exception as error:  # noqa: BLE001 - a user function may raise anything
                if self.strict:
                    raise
                what = str(error) if isinstance(error, RewardShapeError) else f"{type(error).__name__}: {error}"
                message = f"verifier error: reward function {_name(fn, self.params)} {what}"[:500]
                return [Verdict(0.0, message, None, True) for _ in range(n)]
            for i, (r, fb) in enumerate(zip(rewards, feedbacks)):
                totals[i] += weight * (0.0 if r is None else r)
                if fb:
                    lines[i].append(fb)
        return [Verdict(min(max(r, 0.0), 1.0) if self.clip else r, "\n".join(fb), None)
                for r, fb in zip(totals, lines)]
