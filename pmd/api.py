"""pmd from Python: train on your own dataset and reward function, evaluate, read a run and its memory.

    import pmd

    def reward(prompts, completions, answer, **kwargs):          # TRL's signature
        return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

    run = pmd.train({"method": "pmd", "steps": 20}, dataset=rows, reward=reward)
    run.metrics[-1]["eval/accuracy"], run.final, run.memory(level="insight")

`pmd train` on the command line is this `train` with the keys of its arguments. A run started from Python with
an in-memory dataset records the dataset's fingerprint and the reward functions' names in its config
(task=python); calling `pmd.train` again with the same folder, dataset and rewards resumes it, and a different
dataset is refused with the field named. Such a run cannot be resumed from the command line (it has no data).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pmd import config as config_mod
from pmd.config import Config, ConfigError

Reward = Callable[..., object]


@dataclass
class TrainedRun:
    """A run folder, read from Python."""

    path: Path

    @property
    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl (step 0: the evaluation before training), with today's metric names."""
        from pmd.runlog import RunDir

        return RunDir(self.path).metrics()

    @property
    def final(self) -> Path:
        """The trained model: a plain transformers folder (AutoModelForCausalLM.from_pretrained)."""
        return self.path / "final"

    @property
    def summary(self) -> dict:
        return json.loads((self.path / "summary.json").read_text())

    @property
    def config(self) -> Config:
        from pmd.runlog import RunDir

        return RunDir(self.path).read_config()

    def memory(self, level: str | None = None, problem: str | None = None) -> list[dict]:
        """The run's procedural memory entries (pmd runs; empty for others)."""
        return read_memory(self.path, level=level, problem=problem)


def train(keys: dict | Config | None = None, *, dataset=None, reward: Reward | list | None = None,
          base: Config | None = None, **more_keys) -> TrainedRun:
    """Train (or resume, when `output_dir` is an existing run) and return the run.

    `keys`: config keys (`pmd train --help` lists them) as a dict, or a `pmd.Config`; `more_keys` add to them;
    `base` is the config they apply to (default: the defaults; `pmd train` passes its YAML file's). On resume,
    the keys given here must match the run's, except those that may change (steps, eval_every, ...).
    `dataset`: a `datasets.Dataset` or a list of dicts with a `prompt` column (a string or chat messages), as
    the rows of a custom JSONL task; every other column reaches the reward function. `reward`: a function with
    TRL's signature `(prompts, completions, **columns) -> rewards` or `-> (rewards, feedback)`, or a list of
    them, or of `(function, weight)` pairs, summed with their weights. Without `reward`, a dataset's columns
    must say its kind (tests: code, choices: multiple choice, answer: math).
    """
    from pmd.distributed import Processes
    from pmd.loop import train as run_training

    cfg, explicit = _config(keys, more_keys, base or Config())
    task = None
    if dataset is not None or reward is not None:
        task, params = python_task(dataset, reward, cfg)
        cfg = config_mod.apply(cfg, {"task": "python", "task_params": params})
        explicit |= {"task", "task_params"}  # a resumed run must have been trained on the same data
    path = run_training(cfg, explicit_keys=explicit, task=task)
    Processes().finish()  # launched with several processes: leave the process group together
    return TrainedRun(Path(path))


def evaluate(model: str | Path, keys: dict | None = None, *, dataset=None, reward: Reward | list | None = None
             ) -> dict:
    """Memory-free held-out accuracy of a model (packaged name, folder, Hugging Face id) or a run's final model:
    {accuracy (mean@k), accuracy_greedy, pass_at_k, n, k}. A run folder brings its task, params and seed, hence
    its held-out set; `keys` may set the evaluation keys (`pmd eval` lists them)."""
    import torch

    from pmd.evaluate import evaluate as evaluate_model
    from pmd.hardware import resolve_dtype, usable_cores
    from pmd.models import load_model_and_tokenizer
    from pmd.runlog import RunDir
    from pmd.tasks import load_task

    base = Config()
    if (Path(model) / "config.yaml").exists():  # a run folder: its task and held-out set
        base, model = RunDir(model).read_config(), str(Path(model) / "final")
    cfg = config_mod.apply(base, dict(keys or {}))
    torch.set_num_threads(cfg.threads or usable_cores())
    task = python_task(dataset, reward, cfg)[0] if dataset is not None or reward is not None else \
        load_task(cfg.task, cfg.task_params, seed=cfg.seed)
    dtype, _ = resolve_dtype(cfg.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    lm, tokenizer = load_model_and_tokenizer(str(model), dtype=getattr(torch, dtype))
    return evaluate_model(lm, tokenizer, task, task.problems("eval", cfg.eval_problems),
                          samples=cfg.eval_samples, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size, seed=cfg.seed + 1)


def read_memory(run: str | Path, level: str | None = None, problem: str | None = None) -> list[dict]:
    """A run's (or a checkpoint's) memory entries as dicts: level, kind, text, problem, uses, helpful, support,
    provenance. Empty when the run has no memory (grpo, sdpo)."""
    from pmd.memory import MEMORY_FILENAME, MemoryStore

    path = Path(run) / MEMORY_FILENAME
    if not path.exists():
        return []
    with MemoryStore(path, readonly=True) as store:
        return list(store.entries(level=level, problem=problem))


# ---------------------------------------------------------------------------------------------- helpers
def _config(keys: dict | Config | None, more_keys: dict, base: Config) -> tuple[Config, set[str]]:
    """The config and the keys given explicitly (checked against a resumed run's)."""
    if isinstance(keys, Config):
        explicit = {f for f in config_mod.fields() if getattr(keys, f) != getattr(Config(), f)}
        return config_mod.apply(keys, more_keys), explicit | set(more_keys)
    updates = {**(keys or {}), **more_keys}
    return config_mod.apply(base, updates), set(updates)


def python_task(dataset, reward, cfg: Config):
    """(task, its task_params) for an in-memory dataset and reward functions. The params record the rows'
    fingerprint and the functions' names, so a resume can check that it gets the same ones."""
    from pmd.tasks import task_from_rows

    if dataset is None:
        raise ConfigError("reward= needs dataset=: the rows it scores (a list of dicts with a prompt column)")
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ConfigError("dataset: expected a datasets.Dataset or a non-empty list of dicts (rows)")
    rewards = _weighted(reward)
    fingerprint = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]
    params = {k: v for k, v in cfg.task_params.items() if k not in ("fingerprint", "rows", "reward")}
    params.update({"fingerprint": fingerprint, "rows": len(rows),
                   "reward": [f"{_qualname(fn)} x {w:g}" for fn, w in rewards] if rewards else None})
    task_params = {k: v for k, v in params.items() if k not in ("fingerprint", "rows", "reward")}
    return task_from_rows("python", rows, "dataset", task_params, seed=cfg.seed, rewards=rewards), params


def _weighted(reward) -> list[tuple[Callable, float]] | None:
    if reward is None:
        return None
    items = reward if isinstance(reward, (list, tuple)) else [reward]
    out = []
    for item in items:
        fn, weight = item if isinstance(item, tuple) else (item, 1.0)
        if not callable(fn):
            raise ConfigError(f"reward: {fn!r} is not callable; give a function, a list of them, or "
                              "(function, weight) pairs")
        out.append((fn, float(weight)))
    return out


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
