"""What the procedural memory reads from a run's config, typed and built once (`MemoryConfig.from_config`).

Field names and meanings are those of `pmd.config.Config` (`pmd train --help`), and so are the defaults: they
are read from Config, never repeated here. The store's optional token budgets are not run config keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _default(name: str):
    from pmd.config import Config

    spec = Config.__dataclass_fields__[name]
    if spec.default_factory is not dataclasses.MISSING:
        return field(default_factory=lambda: tuple(spec.default_factory()))
    return spec.default


@dataclass(frozen=True)
class MemoryConfig:
    # levels and reflection
    memory_levels: tuple = _default("memory_levels")
    seed: int = _default("seed")
    reflect_per_step: int = _default("reflect_per_step")
    reflect_attempt_max_chars: int = _default("reflect_attempt_max_chars")
    behavior_every: int = _default("behavior_every")
    # experience (L1), insight (L2), behavior (L3) caps: the store enforces them
    l1_max_pass: int = _default("l1_max_pass")
    l1_max_fail: int = _default("l1_max_fail")
    l2_max_strategies: int = _default("l2_max_strategies")
    l2_max_lessons: int = _default("l2_max_lessons")
    l2_entry_max_tokens: int = _default("l2_entry_max_tokens")
    l3_max_behaviors: int = _default("l3_max_behaviors")
    dedup_threshold: float = _default("dedup_threshold")
    # consolidation and retrieval of behaviors
    l3_min_problems: int = _default("l3_min_problems")
    l3_cluster_similarity: float = _default("l3_cluster_similarity")
    l3_max_clusters_per_round: int = _default("l3_max_clusters_per_round")
    l3_max_cluster_inputs: int = _default("l3_max_cluster_inputs")
    l3_topk: int = _default("l3_topk")
    l3_min_sim: float = _default("l3_min_sim")
    # what the teacher context may take from memory
    feedback_source: str = _default("feedback_source")
    teacher_memory: str = _default("teacher_memory")
    show_failure: bool = _default("show_failure")
    teacher_reference: bool = _default("teacher_reference")
    related_examples: int = _default("related_examples")
    demonstration_pick: str = _default("demonstration_pick")
    store_cut_passes: bool = _default("store_cut_passes")
    # token budgets the store enforces per problem (experience, insight) or per level (behavior); None: none
    l1_token_budget: int | None = None
    l2_token_budget: int | None = None
    l3_token_budget: int | None = None

    @classmethod
    def from_config(cls, cfg) -> MemoryConfig:
        """The memory's part of a run config."""
        names = {f.name for f in dataclasses.fields(cls)} & set(cfg.__dataclass_fields__)
        values = {n: getattr(cfg, n) for n in names}
        values["memory_levels"] = tuple(values["memory_levels"])
        return cls(**values)
