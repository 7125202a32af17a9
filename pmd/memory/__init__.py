"""PMD's procedural memory: what the run's own rollouts teach, kept across episodes and epochs.

    store.py       the three levels in one SQLite file (experience, insight, behavior), caps, dedup, events
    procedural.py  the memory's part of each step: observe, reflect, consolidate, offer items to the teacher,
                   record usage
    reflection.py  the reflection and consolidation prompts, and the parsers of what the reflector writes
    reflector.py   who writes reflections: the policy, another local model, or an OpenAI-compatible endpoint
    embedder.py    sentence embeddings for dedup, clustering and behavior retrieval
    config.py      MemoryConfig: the memory's part of the run config, built once

`build_memory` assembles them for a run. The teacher prompt the memory feeds is built by pmd/teacher.py, the
same path SDPO's siblings take.
"""

from __future__ import annotations

from pathlib import Path

from pmd.memory.config import MemoryConfig
from pmd.memory.procedural import ProceduralMemory
from pmd.memory.store import LEVELS, MEMORY_FILENAME, MemoryStore, Rollout

__all__ = ["LEVELS", "MEMORY_FILENAME", "MemoryConfig", "MemoryStore", "ProceduralMemory", "Rollout",
           "build_memory"]


def build_memory(cfg: MemoryConfig, run_path: str | Path, *, embedder: str, reflect, prompts,
                 problem_texts: dict[str, str] | None = None) -> ProceduralMemory:
    """A run's procedural memory: its store in `run_path`, the embedder named by `embedder`, the reflector
    `reflect` (pmd.memory.reflector), the teacher's prompt fitter `prompts` (pmd.teacher.TeacherPrompts) and
    the training problems' prompts by id (`problem_texts`, for `related_examples`)."""
    from pmd.memory.embedder import make_embedder

    embed = make_embedder(embedder)
    store = MemoryStore.for_run(run_path, cfg, embed=embed, count_tokens=prompts.item_tokens)
    return ProceduralMemory(store, cfg, reflect=reflect, embed=embed, prompts=prompts, problem_texts=problem_texts)
