"""The one typed config of a pmd run.

Every field has a default and a help string; `pmd train --help` prints them all. Values come from, in
increasing priority: the defaults below, an optional YAML file, and `key=value` arguments on the command
line. An unknown key or a bad value raises `ConfigError`, naming the key and what would have been valid.

Names follow TRL's SDPO/GRPO configs where TRL has one (`distillation_topk`, `distillation_alpha`, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the valid choices."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its help text (mutable defaults are copied per instance)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # ---------------------------------------------------------------- run
    output_dir: str = _f("", "Run folder. Empty: runs/<method>-<task>-s<seed>-<time>. An existing run "
                             "folder is resumed from its last checkpoint.")
    seed: int = _f(0, "Seed for data order, sampling, initialisation and evaluation.")
    threads: int = _f(0, "torch CPU threads (0 = torch's default).")

    # ---------------------------------------------------------------- model
    model: str = _f("smollm2-135m-instruct", "Packaged model name (see `pmd models list`), local folder, "
                                             "Hugging Face id, or `tiny-random` (tests).")
    dtype: Literal["bfloat16", "float32"] = _f(
        "bfloat16", "Compute dtype. bfloat16 runs matmuls in bf16 under autocast while trainable weights "
                    "and optimizer state stay float32 (pure-bf16 AdamW would round small updates away).")
    finetune: Literal["lora", "full"] = _f("lora", "LoRA adapters (PEFT) or full fine-tuning.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scaling = alpha / r).")
    lora_target_modules: str = _f("all-linear", "PEFT target_modules: `all-linear` or comma-separated names.")

    # ---------------------------------------------------------------- task
    task: str = _f("chain_sum", "Task name: any reasoning-gym dataset name.")
    task_params: dict = _f({"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 3},
                           "Task parameters (a YAML mapping, e.g. task_params='{max_digits: 2}').")
    train_problems: int = _f(1000, "Size of the training problem pool (cycled in epochs).")
    eval_problems: int = _f(50, "Number of held-out problems for evaluation (disjoint from training).")

    # ---------------------------------------------------------------- method and rollouts
    method: Literal["grpo", "sdpo"] = _f(
        "grpo", "Training method. The default is grpo because pure sdpo lowered the 135M default model's "
                "accuracy in our measurements (README, Results so far).")
    steps: int = _f(20, "Number of training steps (one rollout batch each).")
    problems_per_step: int = _f(4, "Problems per step.")
    group_size: int = _f(8, "Rollouts per problem (TRL: num_generations).")
    max_new_tokens: int = _f(64, "Maximum completion length in tokens.")
    temperature: float = _f(1.0, "Rollout sampling temperature (also divides logits in the losses).")
    top_p: float = _f(1.0, "Rollout nucleus sampling.")
    success_threshold: float = _f(1.0, "A rollout passes when its reward >= this.")
    generation_batch_size: int = _f(32, "Sequences per `generate` call.")

    # ---------------------------------------------------------------- optimisation
    learning_rate: float = _f(5e-5, "AdamW learning rate (constant after warmup).")
    warmup_steps: int = _f(0, "Linear warmup, in optimizer steps.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    max_grad_norm: float = _f(1.0, "Gradient clipping by global norm (0 = off).")
    micro_batch_size: int = _f(8, "Rollouts per forward/backward pass; gradients accumulate across them.")
    optimizer_steps_per_batch: int = _f(
        1, "Optimizer steps per rollout batch (mini-batches). Above 1, later steps are off-policy and the "
           "PPO clip (grpo) or importance-ratio clip (sdpo) applies.")

    # ---------------------------------------------------------------- grpo
    grpo_clip_low: float = _f(0.2, "PPO clip epsilon below 1.")
    grpo_clip_high: float = _f(0.28, "PPO clip epsilon above 1.")
    grpo_weight: float = _f(0.0, "Weight lambda of the GRPO term in sdpo: (1-l)*distill + l*grpo.")

    # ---------------------------------------------------------------- sdpo self-teacher
    distillation_topk: int = _f(100, "Student top-k support of the divergence (0 = full vocabulary).")
    distillation_alpha: float = _f(0.5, "0 forward KL, 1 reverse KL, between: generalised JSD.")
    distillation_add_tail: bool = _f(True, "Add the leftover probability mass as one extra bucket.")
    distillation_is_clip: float = _f(2.0, "Clip of the (detached) importance ratio pi/pi_old.")
    teacher_model_kind: Literal["ema", "live", "base"] = _f(
        "ema", "Teacher weights: EMA of the student, the live student, or the initial weights.")
    teacher_update_rate: float = _f(0.05, "EMA rate tau: teacher <- (1-tau)*teacher + tau*student.")
    use_feedback: bool = _f(True, "Show the verifier feedback of a failed rollout to its teacher when no "
                                  "successful sibling exists (SDPO: feedback only without a solution).")
    max_teacher_prompt_tokens: int = _f(2048, "Teacher prompt budget; an over-long demonstration is dropped, "
                                              "never cut.")

    # ---------------------------------------------------------------- evaluation
    eval_every: int = _f(10, "Evaluate every N steps (and always before the first and after the last).")
    eval_samples: int = _f(4, "Sampled completions per held-out problem for mean@k accuracy (0 = greedy only).")
    eval_temperature: float = _f(0.6, "Sampling temperature for mean@k.")
    eval_top_p: float = _f(0.95, "Nucleus for mean@k.")

    # ---------------------------------------------------------------- run folder
    save_every: int = _f(5, "Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk (the newest).")

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> "Config":
        """Check ranges that types alone cannot express."""
        positive = ["steps", "problems_per_step", "group_size", "max_new_tokens", "micro_batch_size",
                    "optimizer_steps_per_batch", "generation_batch_size", "train_problems", "lora_r"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        for name in ["eval_problems", "eval_every", "eval_samples", "save_every", "warmup_steps",
                     "distillation_topk", "threads", "max_grad_norm", "weight_decay"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        for name in ["distillation_alpha", "teacher_update_rate", "grpo_weight", "success_threshold",
                     "top_p", "eval_top_p"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be in [0, 1]")
        if self.temperature <= 0 or self.eval_temperature <= 0:
            raise ConfigError("temperature and eval_temperature must be > 0")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints={self.keep_checkpoints!r}: must be >= 1")
        if self.optimizer_steps_per_batch > self.problems_per_step * self.group_size:
            raise ConfigError("optimizer_steps_per_batch: cannot exceed problems_per_step * group_size")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_name(self) -> str:
        return f"{self.method}-{self.task}-s{self.seed}"


# ------------------------------------------------------------------------------------------------ parsing
def fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _type_of(name: str) -> Any:
    return typing.get_type_hints(Config)[name]


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's type, or raise ConfigError naming the key."""
    tp = _type_of(name)
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}={value!r}: valid choices are {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise ConfigError(f"{name}={value!r}: expected true or false")
    if tp is int:
        try:
            if isinstance(value, (bool, float)):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r}: expected an integer") from None
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r}: expected a number") from None
    if tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r}: expected a mapping such as '{{key: value}}'")
        return value
    if tp is str:
        return "" if value is None else str(value)
    raise AssertionError(f"unhandled config type {tp} for {name}")  # a new field type needs a branch here


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, fields().keys(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `pmd train --help` lists all keys"
    return ConfigError(f"unknown config key {key!r}{hint}")


def apply(cfg: Config, updates: dict[str, Any]) -> Config:
    """Return a copy of cfg with updates applied and validated."""
    known = fields()
    changes = {}
    for key, value in updates.items():
        if key not in known:
            raise _unknown_key(key)
        changes[key] = _coerce(key, value)
    return dataclasses.replace(cfg, **changes).validate()


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict. Values are parsed as YAML scalars/mappings later, per field type."""
    out: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got {arg!r}")
        key, value = arg.split("=", 1)
        out[key.strip()] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return data


def build(args: list[str], base: Config | None = None) -> Config:
    """CLI arguments -> Config: YAML files (args ending in .yaml/.yml) first, then key=value overrides."""
    cfg = base or Config()
    yaml_files = [a for a in args if "=" not in a and a.endswith((".yaml", ".yml"))]
    rest = [a for a in args if a not in yaml_files]
    for path in yaml_files:
        cfg = apply(cfg, load_yaml(path))
    return apply(cfg, parse_overrides(rest))


def help_text() -> str:
    """Every key with its type, default and help, grouped as in the class body."""
    lines = []
    for f in dataclasses.fields(Config):
        tp = _type_of(f.name)
        tname = "|".join(map(str, typing.get_args(tp))) if typing.get_origin(tp) is Literal else tp.__name__
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name}={default!s:<22} ({tname}) {f.metadata['help']}")
    return "\n".join(lines)

