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
    threads: int = _f(0, "torch CPU threads. 0: before each step, the cores this process may use (its CPU "
                         "affinity) that other processes left idle during the previous step (at least 1), so a "
                         "step beside a busy job does not wait on a shared core; a fixed N keeps N (bit-exact "
                         "reruns under any load).")

    # ---------------------------------------------------------------- model
    model: str = _f("smollm2-135m-instruct", "Packaged model name (see `pmd models list`), local folder, "
                                             "Hugging Face id, or `tiny-random` (tests).")
    dtype: Literal["auto", "bfloat16", "float32"] = _f(
        "auto", "Compute dtype. auto: bfloat16 where the device computes it natively (CUDA with bf16, CPUs with "
                "AVX512-BF16 or AMX), float32 elsewhere (pmd/hardware.py); the run header says which and why. "
                "bfloat16 runs matmuls in bf16 under autocast while trainable weights and optimizer state stay "
                "float32 (pure-bf16 AdamW would round small updates away).")
    attn_implementation: str = _f(
        "auto", "Attention kernel (transformers' attn_implementation): auto = eager on CPU, where it trains "
                "~10% faster than sdpa at short sequences (benchmarks/mfu.py), sdpa on GPU; or sdpa, eager, "
                "flash_attention_2, ...")
    finetune: Literal["lora", "full"] = _f("lora", "LoRA adapters (PEFT) or full fine-tuning.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scaling = alpha / r).")
    lora_target_modules: str = _f("all-linear", "PEFT target_modules: `all-linear` or comma-separated names.")

    # ---------------------------------------------------------------- task
    task: str = _f("chain_sum", "Task: a reasoning-gym dataset name, or humaneval | code | mcq | math | custom, or a path to a "
                           ".jsonl file (see docs/tasks.md).")
    task_params: dict = _f({}, "Task parameters (a YAML mapping, e.g. task_params='{max_digits: 2}'). Empty (the "
                               "default): the task's own defaults, for chain_sum pmd's (2 terms of 1-3 digits).")
    train_problems: int = _f(40, "Size of the training problem pool, cycled in epochs: the default 40 at 8 a step "
                                 "sees every problem 4 times in 20 steps, so the memory is read back (PMD's "
                                 "premise: problems recur across epochs).")
    eval_problems: int = _f(50, "Number of held-out problems for evaluation (disjoint from training).")

    # ---------------------------------------------------------------- method and rollouts
    method: Literal["grpo", "sdpo", "pmd"] = _f(
        "pmd", "Training method: grpo (RL baseline), sdpo (self-distillation from siblings and feedback), pmd "
               "(self-distillation from a teacher that reads procedural memory). The default is pmd because, "
               "paired by seed over 8 seeds on the 135M default model, it ends above grpo (README, Results).")
    steps: int = _f(20, "Number of training steps (one rollout batch each).")
    problems_per_step: int = _f(8, "Problems per step.")
    group_size: int = _f(4, "Rollouts per problem (TRL: num_generations).")
    max_new_tokens: int = _f(64, "Maximum completion length in tokens.")
    temperature: float = _f(0.7, "Rollout sampling temperature (also divides logits in the losses). 0.7: at 1.0 "
                                 "SmolLM2-135M writes mostly noise (training reward 0.07 against 0.21).")
    top_p: float = _f(1.0, "Rollout nucleus sampling.")
    success_threshold: float = _f(1.0, "A rollout passes when its reward >= this.")
    generation_batch_size: int = _f(64, "Sequences per `generate` call.")

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

    # ---------------------------------------------------------------- sdpo/pmd objective
    objective: Literal["auto", "distill", "route", "signed"] = _f(
        "auto", "How sdpo/pmd learn from the teacher (docs/method.md §5). auto: signed for pmd (the objective "
                "that did best in the README's Results), distill for sdpo (SDPO's). distill: match the teacher's "
                   "distribution, (1-grpo_weight)*distill + grpo_weight*GRPO. route: GRPO on passing rollouts "
                   "and on those without a teacher signal, distillation on failing ones (SRPO). signed: GRPO whose "
                   "per-token advantage is the group advantage times a bounded teacher/student probability "
                   "ratio: the reward sets the sign, the teacher the size (RLSD).")
    grpo_weight: float = _f(0.0, "objective=distill: weight lambda of the GRPO term, (1-l)*distill + l*grpo.")
    distill_warmup_steps: int = _f(0, "Steps of GRPO alone before the objective starts (an RL-only warm-up).")
    credit_clip: float = _f(2.0, "objective=signed: the teacher's per-token weight exp(sign(A)*(log p_T - "
                                 "log p_S)) is clipped to [1/credit_clip, credit_clip].")
    distill_unranked: float = _f(
        1.0, "objective=signed: weight of a distillation term on the rollouts the reward cannot rank (their group "
             "all passed or all failed, advantage 0, no GRPO gradient) whose teacher has a context: there memory "
             "is the only signal. The student's stop token is not distilled (docs/method.md §5). 0: off; 1.0 (full "
             "weight) did best in the README's Results (+0.8 points over 0.5, paired over 5 seeds).")
    distill_unranked_tokens: Literal["all", "answer"] = _f(
        "all", "distill_unranked: which tokens of those rollouts are distilled. all: every token but the stop "
               "token. answer: only the tokens of the final answer the verifier read (none where it found none).")

    # ---------------------------------------------------------------- sdpo self-teacher
    distillation_topk: int = _f(100, "Student top-k support of the divergence (0 = full vocabulary).")
    distillation_alpha: float = _f(0.5, "0 forward KL, 1 reverse KL, between: generalised JSD.")
    distillation_add_tail: bool = _f(True, "Add the leftover probability mass as one extra bucket.")
    distillation_is_clip: float = _f(2.0, "Clip of the (detached) importance ratio pi/pi_old.")
    teacher_model_kind: Literal["ema", "live", "base"] = _f(
        "ema", "Teacher weights: EMA of the student, the live student, or the initial weights.")
    teacher_update_rate: float = _f(0.05, "EMA rate tau: teacher <- (1-tau)*teacher + tau*student.")
    teacher_feedback: Literal["auto", "verbatim", "outcome", "off"] = _f(
        "auto", "The verifier feedback a failed rollout's teacher may read when no demonstration exists "
                "(docs/method.md §4). verbatim: as the verifier wrote it (SDPO). outcome: only that the attempt "
                "failed. auto: verbatim when it says more than the outcome (failing tests), none when it only "
                "restates the rollout's answer (\"The answer 7 is incorrect.\", which a small teacher copies). "
                "off: never.")
    demonstration_form: Literal["inline", "turn"] = _f(
        "turn", "How a demonstration reaches the teacher. inline: inside the user message under \"Correct "
                "solution:\", followed by the instruction (SDPO). turn: as an earlier assistant turn that ends "
                "the way a completion ends (its end-of-turn token), then the instruction as a new user turn "
                "(inline lowered p(EOS) where the student stopped; docs/method.md §16).")
    teacher_prefix_sharing: bool = _f(
        True, "Teacher forward encodes each distinct teacher prompt once and runs the completions that share it "
              "against its cached keys/values (same logits, fewer tokens computed; docs/method.md §13).")
    student_prefix_sharing: bool = _f(
        True, "Student forward (with gradients) encodes each problem's prompt once for its G rollouts in a "
              "micro-batch, instead of once per rollout (same loss and gradient, fewer tokens computed).")
    max_teacher_prompt_tokens: int = _f(2048, "Teacher prompt budget; an over-long demonstration is dropped, "
                                              "never cut.")

    # ---------------------------------------------------------------- pmd: procedural memory
    memory_levels: list = _f(["experience", "insight", "behavior"],
                             "Memory levels the teacher reads: experience, +insight, +behavior (a list, or "
                             "comma-separated). Experience is always on; behavior needs insight.")
    freeze: Literal["none", "memory", "policy", "reflector"] = _f(
        "none", "Co-evolution ablations. memory: memory stops changing after `freeze_memory_after` steps. "
                "policy: no weight updates; rollouts and evaluation put memory in the prompt (in-context "
                "baseline). reflector: reflections are written by the initial weights.")
    freeze_memory_after: int = _f(5, "freeze=memory: steps of normal PMD (the memory warm-up) before freezing.")
    reflector: str = _f("policy", "Who writes reflections: policy (the current student), local:<model> (another "
                                  "local model), openai:<base_url>#<model> (an OpenAI-compatible endpoint; key "
                                  "from $PMD_REFLECTOR_API_KEY or $OPENAI_API_KEY).")
    reflect_temperature: float = _f(0.7, "Reflector sampling temperature.")
    reflect_max_new_tokens: int = _f(64, "Maximum tokens per reflection (a STRATEGY and a LESSON line fit in 64).")
    reflect_per_step: int = _f(2, "Problems reflected per step at most, least recently reflected first "
                                  "(0 = every problem whose experience gained an entry). Reflection is on the "
                                  "training path: the default pmd run takes 27 min on 2 AVX2 cores with 2, 31 "
                                  "with 4; raise it with a stronger reflector.")
    reflect_attempt_max_chars: int = _f(600, "Each attempt shown to the reflector is cut to this many characters.")
    behavior_every: int = _f(5, "Steps between consolidations of insights into behaviors (0 = never).")
    l1_max_pass: int = _f(4, "Passing rollouts kept per problem (experience).")
    l1_max_fail: int = _f(2, "Latest failing rollouts kept per problem, with their feedback (experience).")
    l2_max_strategies: int = _f(4, "Strategies kept per problem (insight).")
    l2_max_lessons: int = _f(4, "Lessons kept per problem (insight).")
    l2_entry_max_tokens: int = _f(64, "Longest insight or behavior instruction, in tokens (longer ones are "
                                      "rejected, never cut).")
    l3_max_behaviors: int = _f(64, "Behaviors kept in all (lowest utility pruned first).")
    l3_min_problems: int = _f(3, "A cluster of insights becomes a behavior only if it spans this many problems.")
    l3_cluster_similarity: float = _f(0.75, "Cosine similarity at which insights cluster (average link).")
    l3_max_clusters_per_round: int = _f(16, "Behaviors abstracted per consolidation at most (largest clusters).")
    l3_max_cluster_inputs: int = _f(2000, "Insights clustered per consolidation at most (most supported).")
    l3_topk: int = _f(4, "Behaviors shown per teacher context at most.")
    l3_min_sim: float = _f(0.3, "A behavior is shown only if its cue is at least this similar to the problem.")
    dedup_threshold: float = _f(0.9, "Cosine similarity at which a new insight or behavior merges into an old one.")
    behavior_token_budget: int = _f(256, "Teacher-prompt tokens for behaviors at most.")
    insight_token_budget: int = _f(512, "Teacher-prompt tokens for strategies and lessons at most.")
    teacher_memory: Literal["all", "shared"] = _f(
        "all", "What the pmd teacher may read. all: every level. shared: only knowledge meant to carry over "
               "(insights and behaviors), no stored solutions, failures or feedback.")
    show_failure: bool = _f(False, "pmd: also show the problem's latest stored failed attempt, labelled as one "
                                   "to avoid (MOPD).")
    related_examples: int = _f(
        1, "pmd: where no demonstration of the problem itself fits, the teacher first reads this many solved "
           "problems most similar to it (the problem and one stored pass, chosen by demonstration_pick, as an "
           "earlier user/assistant exchange): experience reused across problems, a worked example of the "
           "procedure. 0: off. Not with teacher_memory=shared (no stored solutions there).")
    demonstration_pick: Literal["shortest", "longest", "median"] = _f(
        "shortest", "pmd: which stored pass the teacher reads as a demonstration or related example. shortest: "
                    "the fewest characters (one line of working, then the answer, on chain_sum at 135M). "
                    "longest: the most characters, i.e. the most working shown (where the shortest pass is a "
                    "bare answer the policy guessed). median: the pass nearest the median length, the working "
                    "most passes show without the one that runs longest (not yet measured in a grid).")
    store_cut_passes: bool = _f(
        False, "pmd: whether a passing rollout cut at max_new_tokens (no EOS) enters experience memory and may be "
               "a demonstration. false: it does not (shown to the teacher, it is a solution that never stops, "
               "and the teacher's stop there teaches the student to run on). true: as pmd 0.1.0 did until "
               "December 2026, for reproducing older runs.")
    teacher_reference: bool = _f(
        False, "pmd, a diagnostic upper bound (not PMD): where no demonstration fits, the teacher reads the task's "
               "reference answer (\"The correct answer is X.\") instead of stored feedback. It measures what a "
               "teacher context that knows the answer can teach through distillation at this model size; the "
               "student and the memory never see it.")
    feedback_source: Literal["memory", "own"] = _f(
        "memory", "Feedback shown when no demonstration fits: the latest stored failure's (shared by the group) "
                  "or the rollout's own (SDPO's choice).")
    embedder: str = _f("minilm", "Sentence embedder for dedup, clustering and retrieval: minilm (packaged "
                                 "all-MiniLM-L6-v2), hashing (no model; tests), st:<folder>.")
    eval_with_memory: bool = _f(False, "Also evaluate with memory in the prompt (behaviors, for held-out "
                                       "problems), reported as eval_memory_* next to the memory-free figures.")

    # ---------------------------------------------------------------- evaluation
    eval_every: int = _f(0, "Evaluate every N steps (and always before the first and after the last; 0: only "
                            "then; set it for a held-out curve).")
    eval_samples: int = _f(4, "Sampled completions per held-out problem for mean@k accuracy (0 = greedy only).")
    eval_temperature: float = _f(0.6, "Sampling temperature for mean@k.")
    eval_top_p: float = _f(0.95, "Nucleus for mean@k.")
    base_eval_cache: str = _f("", "Folder where the held-out evaluation of the initial model (step 0) is stored "
                                  "and reused by runs that would compute the same numbers: every key but the "
                                  "method, memory and optimisation ones must match (pmd/experiments/base_eval.py). `pmd "
                                  "compare` sets GRID/base_eval. Empty: always evaluate.")

    # ---------------------------------------------------------------- run folder and trackers
    report_to: str = _f("none", "Experiment trackers that also receive every metrics row: none, or any of "
                                "tensorboard, wandb, trackio, comma-separated (each an extra: pip install "
                                "'pmd[wandb]'; pmd/trackers.py).")
    save_every: int = _f(5, "Checkpoint every N steps (and at the end; 0: only at the end).")
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk (the newest).")

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> "Config":
        """Check ranges that types alone cannot express."""
        positive = ["steps", "problems_per_step", "group_size", "max_new_tokens", "micro_batch_size",
                    "optimizer_steps_per_batch", "generation_batch_size", "train_problems", "lora_r"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        for name in ["eval_problems", "eval_every", "eval_samples", "save_every", "warmup_steps", "distill_warmup_steps",
                     "distillation_topk", "threads", "max_grad_norm", "weight_decay", "distill_unranked"]:
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
        levels = ("experience", "insight", "behavior")
        bad = [x for x in self.memory_levels if x not in levels]
        if bad:
            raise ConfigError(f"memory_levels: {bad[0]!r} is not a level; valid levels are {', '.join(levels)}")
        if "experience" not in self.memory_levels:
            raise ConfigError("memory_levels: experience is always on (the other levels are built from it)")
        if "behavior" in self.memory_levels and "insight" not in self.memory_levels:
            raise ConfigError("memory_levels: behavior needs insight (behaviors are abstracted from insights)")
        for name, low in [("seed", 0), ("lora_alpha", 1), ("learning_rate", 0.0), ("grpo_clip_high", 0.0),
                          ("distillation_is_clip", 1.0), ("max_teacher_prompt_tokens", 1)]:
            if getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= {low}")
        for name in ["adam_beta1", "adam_beta2", "grpo_clip_low"]:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be in [0, 1)")
        from pmd.trackers import parse_report_to

        try:
            parse_report_to(self.report_to)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.credit_clip < 1:
            raise ConfigError(f"credit_clip={self.credit_clip!r}: must be >= 1 (the weight is clipped to [1/c, c])")
        if self.teacher_reference and (self.method != "pmd" or self.teacher_memory != "all"):
            raise ConfigError("teacher_reference needs method=pmd and teacher_memory=all (it takes the place of "
                              "the stored feedback)")
        if self.freeze != "none" and self.method != "pmd":
            raise ConfigError(f"freeze={self.freeze!r} is a pmd ablation; use it with method=pmd")
        for name in ["reflect_max_new_tokens", "reflect_attempt_max_chars", "l1_max_pass", "l2_entry_max_tokens",
                     "l3_min_problems", "l3_max_cluster_inputs"]:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 1")
        for name in ["freeze_memory_after", "reflect_per_step", "behavior_every", "l1_max_fail",
                     "l2_max_strategies", "l2_max_lessons", "l3_max_behaviors", "l3_max_clusters_per_round",
                     "l3_topk", "related_examples", "behavior_token_budget", "insight_token_budget"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be >= 0")
        for name in ["l3_cluster_similarity", "l3_min_sim", "dedup_threshold"]:
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: a cosine similarity, must be in [-1, 1]")
        if self.reflect_temperature <= 0:
            raise ConfigError("reflect_temperature must be > 0")
        if self.optimizer_steps_per_batch > self.problems_per_step * self.group_size:
            raise ConfigError("optimizer_steps_per_batch: cannot exceed problems_per_step * group_size")
        return self

    def resolved_objective(self) -> str:
        """The objective `auto` stands for with this method."""
        if self.objective != "auto":
            return self.objective
        return "signed" if self.method == "pmd" else "distill"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_name(self) -> str:
        return f"{self.method}-{Path(self.task).stem}-s{self.seed}"


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
        return _coerce_bool(name, value)
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
    if tp is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r}: expected a list such as 'a,b' or '[a, b]'")
        return [str(v).strip() for v in value if str(v).strip()]
    raise AssertionError(f"unhandled config type {tp} for {name}")  # a new field type needs a branch here


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
        return value.lower() in {"true", "1", "yes"}
    raise ConfigError(f"{name}={value!r}: expected true or false")


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, fields().keys(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `pmd train --help` lists all keys"
    return ConfigError(f"unknown config key {key!r}{hint}")


# Keys that were renamed: old key -> (new key, value mapping). Configs written before (run folders, YAML
# files) keep working.
RENAMED_KEYS = {"use_feedback": ("teacher_feedback", lambda on: "verbatim" if on else "off")}


def apply(cfg: Config, updates: dict[str, Any]) -> Config:
    """Return a copy of cfg with updates applied and validated."""
    known = fields()
    changes = {}
    for key, value in updates.items():
        if key in RENAMED_KEYS:
            new_key, convert = RENAMED_KEYS[key]
            key, value = new_key, convert(_coerce_bool(key, value))
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
        if isinstance(default, list):
            default = ",".join(map(str, default))
        lines.append(f"  {f.name}={default!s:<22} ({tname}) {f.metadata['help']}")
    return "\n".join(lines)

