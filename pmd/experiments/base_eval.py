"""The initial model's held-out evaluation, computed once and reused by the runs that share it.

Every arm of a grid starts from the same weights (LoRA adapters start at zero) and evaluates them on the same
held-out problems with the same seeds, so its step-0 evaluation is the same number for every arm of a seed:
on preset (b) that is 10 of each run's 35 minutes. With `base_eval_cache=FOLDER` (`pmd compare` sets
GRID/base_eval) the first run stores it under a key of everything that can change it, and later runs read it.

The key is the whole config minus the keys listed in TRAINING_ONLY, plus the library versions, the device
(`attn_implementation=auto` picks another kernel on a GPU) and the number of processes (which changes how
evaluation batches are formed). A key not listed there is part of the key, so
a new config field can only cause a miss, never a wrong hit. Delete the folder to recompute.

The fields are stored with today's metric names (`eval/accuracy`, ...); a file written before the namespaces
(`eval_accuracy`, ...) is read with them too (`pmd.metrics.upgrade`), so it stays a hit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pmd.metrics import upgrade

# Keys that cannot change what the initial model scores on the held-out problems: they act after step 0
# (method, optimisation, memory, reflection) or only decide when to evaluate and save.
TRAINING_ONLY = frozenset({
    "output_dir", "base_eval_cache", "method", "steps", "problems_per_step", "group_size", "temperature",
    "top_p", "success_threshold", "learning_rate", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
    "max_grad_norm", "micro_batch_size", "optimizer_steps_per_batch", "grpo_clip_low", "grpo_clip_high",
    "grpo_weight", "distillation_topk", "distillation_alpha", "distillation_add_tail", "distillation_is_clip",
    "teacher_model_kind", "teacher_update_rate", "teacher_feedback", "demonstration_form", "teacher_memory",
    "show_failure", "teacher_reference", "related_examples", "demonstration_pick", "store_cut_passes", "objective",
    "distill_warmup_steps", "credit_clip", "distill_unranked", "distill_unranked_tokens", "teacher_prefix_sharing",
    "student_prefix_sharing", "max_teacher_prompt_tokens", "memory_levels", "freeze", "freeze_memory_after",
    "reflector", "reflect_temperature", "reflect_max_new_tokens", "reflect_per_step",
    "reflect_attempt_max_chars", "behavior_every", "l1_max_pass", "l1_max_fail", "l2_max_strategies",
    "l2_max_lessons", "l2_entry_max_tokens", "l3_max_behaviors", "l3_min_problems", "l3_cluster_similarity",
    "l3_max_clusters_per_round", "l3_max_cluster_inputs", "l3_topk", "l3_min_sim", "dedup_threshold",
    "behavior_token_budget", "insight_token_budget", "feedback_source", "embedder", "eval_every", "save_every",
    "keep_checkpoints", "report_to",
})


def cache_key(config: dict, world: int) -> str:
    """A hex digest of everything that can change the initial evaluation."""
    import torch
    import transformers

    import pmd

    kept = {k: v for k, v in sorted(config.items()) if k not in TRAINING_ONLY}
    kept["_versions"] = [pmd.__version__, torch.__version__, transformers.__version__]
    kept["_processes"] = world
    kept["_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"  # kernels differ
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_path(config: dict, world: int) -> Path | None:
    folder = config.get("base_eval_cache") or ""
    return Path(folder) / f"{cache_key(config, world)}.json" if folder else None


def load(path: Path | None) -> dict | None:
    """The stored evaluation fields with today's metric names, or None (no cache, not written yet, or
    unreadable: evaluate again)."""
    if path is None or not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
        return upgrade(stored["eval"]) if isinstance(stored.get("eval"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def store(path: Path | None, config: dict, fields: dict) -> None:
    """Write atomically, with the config it was computed under (for a person wondering what it is)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"eval": upgrade(fields), "computed_by": config.get("output_dir", ""),
                               "config": {k: v for k, v in config.items() if k not in TRAINING_ONLY}},
                              indent=1, default=str))
    os.replace(tmp, path)
