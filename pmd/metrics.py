"""Metric names: one namespace per part of the loop, and the reading of run folders written before it.

    train/    the update and the rollouts it learned from (loss, reward, success, completion lengths, grad norm)
    teacher/  what the self-teacher saw and how its distribution relates to the student's
    memory/   the procedural memory: sizes per level, reflection and consolidation counters
    eval/     held-out evaluation (memory-free unless the name says memory)
    time/     wall seconds per phase of the step

`step` and `rollouts` stay bare: they index the rows. README "Metrics" defines every name.
"""

from __future__ import annotations

# Flat names of run folders written before the namespaces (pmd <= 67e95c6) -> today's names.
LEGACY_NAMES = {
    "loss": "train/loss",
    "grpo_loss": "train/grpo_loss",
    "distill_loss": "train/distill_loss",
    "reward_mean": "train/reward_mean",
    "reward_std": "train/reward_std",
    "success_sample_fraction": "train/success_sample_fraction",
    "success_group_fraction": "train/success_group_fraction",
    "completion_length_mean": "train/completion_length_mean",
    "completion_clipped_fraction": "train/completion_clipped_fraction",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "verifier_error_fraction": "train/verifier_error_fraction",
    "teacher_signal_fraction": "teacher/signal_fraction",
    "demonstration_fraction": "teacher/demonstration_fraction",
    "feedback_used_fraction": "teacher/feedback_fraction",
    "teacher_student_divergence": "teacher/divergence",
    "teacher_prefers_pass": "teacher/prefers_pass",
    "teacher_lift_prefers_pass": "teacher/lift_prefers_pass",
    "teacher_preference_pairs": "teacher/preference_pairs",
    "teacher_prompt_tokens_mean": "teacher/prompt_tokens_mean",
    "context_experience_fraction": "teacher/context_experience_fraction",
    "context_insight_fraction": "teacher/context_insight_fraction",
    "context_behavior_fraction": "teacher/context_behavior_fraction",
    "memory_frozen": "memory/frozen",
    "eval_accuracy": "eval/accuracy",
    "eval_accuracy_greedy": "eval/accuracy_greedy",
    "eval_pass_at_k": "eval/pass_at_k",
    "eval_n": "eval/n",
    "eval_k": "eval/k",
    "eval_cached": "eval/cached",
}
_LEGACY_PREFIXES = {"reflect/": "memory/reflect_", "behavior/": "memory/behavior_", "eval_memory_": "eval/memory_"}


def upgrade(row: dict) -> dict:
    """A metrics row with today's names (rows already written with them pass through unchanged)."""
    out = {}
    for key, value in row.items():
        new = LEGACY_NAMES.get(key)
        if new is None:
            prefix = next((p for p in _LEGACY_PREFIXES if key.startswith(p)), None)
            new = _LEGACY_PREFIXES[prefix] + key[len(prefix):] if prefix else key
        out[new] = value
    return out
