"""PMD's procedural memory in the training loop: observe, reflect, consolidate, and build teacher contexts.

Per step (docs/method.md §1), after the rollouts are verified:
  observe      each problem's rollouts enter experience memory (L1); the memory ids that were in the
               problem's teacher context at its previous visit are credited with its change in pass rate,
               minus the mean change over the problems revisited this step (the policy's general progress)
  reflect      problems whose experience gained an entry get one reflection each, all in one batched
               generation: STRATEGY / LESSON lines, merged into insight memory (L2)
  consolidate  every `behavior_every` steps, insights are clustered across problems (embeddings, average
               link) and the reflector abstracts each cluster spanning >= `l3_min_problems` problems into a
               behavior (L3)
  contexts     every rollout's teacher prompt: the problem, the behaviors most similar to it, its strategies
               and lessons, and one past correct solution (else feedback from a failed attempt), in budget
  record       the ids shown are counted as used, and the visit (pass rate, ids) is kept for the credit

The student never sees any of it: rollouts are sampled memory-free (except under freeze=policy, the
in-context baseline). Everything persists in the run's SQLite store, which every checkpoint snapshots.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from pmd.memory.config import MemoryConfig
from pmd.memory.reflection import (ParseReport, behavior_prompt, copied_from, insight_prompt, parse_behaviors,
                                   parse_insights)
from pmd.memory.store import MemoryStore, Rollout
from pmd.rollout import rollout_id
from pmd.tasks import Problem
from pmd.teacher import REFERENCE_FEEDBACK, Context, Item, TeacherPrompts, strip_thinking

Reflect = Callable[..., list["str | None"]]  # (prompts, seed, fields=None) -> one text (or None) per prompt

# The answer formats, field by field, for reflectors that write one line per field (see pmd.reflector).
INSIGHT_FIELDS = [("STRATEGY:", "\n"), ("\nLESSON:", "\n")]
BEHAVIOR_FIELDS = [("BEHAVIOR:", ":\n"), (":", "\n"), ("\nWHEN:", "\n")]


class GroupContexts(NamedTuple):
    """The teacher contexts of one problem's G rollouts (None: no signal), and the context that stands for the
    group in the utility credit."""

    per_rollout: list[Context | None]
    shared: Context | None


class ProceduralMemory:
    def __init__(self, store: MemoryStore, cfg: MemoryConfig, *, reflect: Reflect, embed,
                 prompts: TeacherPrompts, problem_texts: dict[str, str] | None = None):
        self.store = store
        self.cfg = cfg
        self.levels = set(cfg.memory_levels)
        self.reflect_fn = reflect
        self.embed = embed
        self.prompts = prompts  # fits teacher contexts within the prompt budget
        self.item_tokens = prompts.item_tokens
        self._problem_vectors: dict[str, np.ndarray] = {}
        self.problem_texts = problem_texts or {}  # problem id -> its prompt, for examples (related_examples)
        self.counters: dict[str, float] = defaultdict(float)
        self.log: list[dict] = []  # this step's reflections, for <run>/reflections.jsonl

    # ------------------------------------------------------------------------------------------ observe
    def observe(self, step: int, problems_P: list[Problem], texts_B: list[str], rewards_B: list[float],
                passed_B: list[bool], feedback_B: list[str], finished_B: list[bool] | None = None) -> list[Problem]:
        """L1 insert/evict and utility credit. Returns the problems whose experience gained an entry.
        A pass cut at the token budget (`finished_B` False: no EOS) is not stored (unless `store_cut_passes`): as
        a demonstration it would show the teacher a solution that never stops."""
        G = len(texts_B) // len(problems_P)
        kept_B = [finished_B is None or self.cfg.store_cut_passes or finished_B[i] or not passed_B[i]
                  for i in range(len(texts_B))]
        self.counters["memory/cut_passes_not_stored"] += sum(not k for k in kept_B)
        deltas: dict[str, tuple[float, list[int]]] = {}
        gained: list[Problem] = []
        for k, problem in enumerate(problems_P):
            rows = range(k * G, (k + 1) * G)
            rate = sum(passed_B[i] for i in rows) / G
            previous = self.store.last_visit(problem.id)
            if previous is not None and previous["entry_ids"]:
                deltas[problem.id] = (rate - previous["pass_rate"], previous["entry_ids"])
            before = {e["id"] for e in self.store.experience(problem.id)}
            ids = self.store.add_rollouts(step, problem.id, [
                Rollout(text=strip_thinking(texts_B[i]), reward=rewards_B[i], passed=passed_B[i],
                        feedback="" if passed_B[i] else feedback_B[i], rollout_id=rollout_id(step, i))
                for i in rows if kept_B[i]])
            if any(i is not None and i not in before for i in ids):
                gained.append(problem)
        if deltas:  # credit relative to the mean progress of all problems revisited now
            mean = sum(d for d, _ in deltas.values()) / len(deltas)
            for delta, ids in deltas.values():
                self.store.credit(ids, delta - mean, step)
        return gained

    # ------------------------------------------------------------------------------------------ reflect
    def reflect(self, step: int, problems: list[Problem], problem_texts: dict[str, str]) -> None:
        """One reflection per problem (least recently reflected first, at most `reflect_per_step`)."""
        if "insight" not in self.levels or not problems:
            return
        never = -1
        order = sorted(problems, key=lambda p: (self.store.last_visit(p.id) or {}).get("reflected_step") or never)
        chosen = order[:self.cfg.reflect_per_step] if self.cfg.reflect_per_step else order
        prompts, sources = [], []
        for problem in chosen:
            experience = self.store.experience(problem.id)
            passes = [e for e in experience if e["passed"]][:2]
            fails = [e for e in experience if not e["passed"]][:2]
            current = [(e["kind"], e["text"]) for e in self.store.insights(problem.id)]
            prompts.append(insight_prompt(problem_texts[problem.id], [e["text"] for e in passes],
                                          [(e["text"], e["feedback"]) for e in fails], current,
                                          max_attempt_chars=self.cfg.reflect_attempt_max_chars))
            sources.append([s for e in passes + fails for s in e["source_rollouts"]])
        outputs = self.reflect_fn(prompts, self.cfg.seed * 1_000_003 + step, fields=INSIGHT_FIELDS)
        report = ParseReport()
        for problem, output, source, prompt in zip(chosen, outputs, sources, prompts):
            self.counters["memory/reflect_calls"] += 1
            if output is None:
                self.counters["memory/reflect_errors"] += 1
                self.log.append({"step": step, "kind": "insight", "problem": problem.id, "output": None})
                continue
            strategies, lessons, _ = parse_insights(output, max_items=3, max_tokens=self.cfg.l2_entry_max_tokens,
                                                    count_tokens=self.item_tokens, report=report)
            # A line copied from the prompt (its format description, or an attempt) is not an insight.
            kept = [t for t in strategies + lessons if not copied_from(t, prompt)]
            self.counters["memory/reflect_copied"] += len(strategies) + len(lessons) - len(kept)
            strategies, lessons = [t for t in strategies if t in kept], [t for t in lessons if t in kept]
            ids = self.store.add_insights(step, problem.id, strategies, lessons, source_rollouts=source)
            self.store.mark_reflected(step, problem.id)
            self.log.append({"step": step, "kind": "insight", "problem": problem.id, "output": output,
                             "strategies": strategies, "lessons": lessons, "entry_ids": ids})
        self._count_report(report, "reflect")

    def _count_report(self, report: ParseReport, prefix: str) -> None:
        self.counters[f"memory/{prefix}_parse_fail"] += report.failed_outputs
        self.counters[f"memory/{prefix}_kept"] += report.kept
        self.counters[f"memory/{prefix}_rejected"] += report.rejected
        self.counters[f"memory/{prefix}_neutralised"] += report.neutralised + report.control_chars

    # ------------------------------------------------------------------------------------------ consolidate
    def consolidate(self, step: int) -> None:
        """Cluster insights across problems; abstract each broad cluster into one behavior."""
        if "behavior" not in self.levels:
            return
        entries, vectors = self.store.insight_vectors(limit=self.cfg.l3_max_cluster_inputs)
        clusters = cluster_insights(entries, vectors, self.cfg.l3_cluster_similarity, self.cfg.l3_min_problems,
                                    self.cfg.l3_max_clusters_per_round)
        self.counters["memory/behavior_clusters"] += len(clusters)
        if not clusters:
            return
        members = [one_per_problem(c, 8) for c in clusters]
        prompts = [behavior_prompt([e["text"] for e in m]) for m in members]
        outputs = self.reflect_fn(prompts, self.cfg.seed * 1_000_003 + step + 500_000, fields=BEHAVIOR_FIELDS)
        report = ParseReport()
        for cluster, output, prompt in zip(clusters, outputs, prompts):
            self.counters["memory/behavior_calls"] += 1
            row = {"step": step, "kind": "behavior", "problems": sorted({e["problem"] for e in cluster}),
                   "insight_ids": [e["id"] for e in cluster], "output": output}
            self.log.append(row)
            if output is None:
                self.counters["memory/behavior_errors"] += 1
                continue
            parsed, _ = parse_behaviors(output, max_items=1, max_tokens=self.cfg.l2_entry_max_tokens,
                                        count_tokens=self.item_tokens, report=report)
            # the prompt's own placeholders or a note copied whole
            kept = [b for b in parsed if not copied_from(f"{b[0]}: {b[1]}", prompt) and not copied_from(b[1], prompt)]
            self.counters["memory/behavior_copied"] += len(parsed) - len(kept)
            parsed = kept
            row["behaviors"] = [list(b) for b in parsed]
            for name, instruction, cue in parsed:
                row["entry_id"] = self.store.add_behavior(
                    step, name, instruction, cue, problems=[e["problem"] for e in cluster],
                    source_rollouts=[f"insight:{e['id']}" for e in cluster])
        self._count_report(report, "behavior")

    # ------------------------------------------------------------------------------------------ contexts
    def problem_vector(self, problem_id: str, text: str) -> np.ndarray | None:
        """The embedding of a problem's prompt, computed once per problem (the embedder is frozen)."""
        if self.embed is None:
            return None
        if problem_id not in self._problem_vectors:
            self._problem_vectors[problem_id] = self.embed([text])[0]
        return self._problem_vectors[problem_id]

    def related_examples(self, problem: Problem, text: str) -> list[Item]:
        """Up to `related_examples` other problems with a stored pass, most similar to this one first (cosine of
        the problem embeddings; ties and no embedder: problem id), each as its prompt and one stored pass
        (the one `demonstration_pick` prefers).
        A worked example of the procedure lifts a small teacher where its own problem has no solution yet:
        SmolLM2-135M, one solved example in context, held-out chain_sum mean@2 19.8% -> 35.5% (README)."""
        if not self.cfg.related_examples:
            return []
        passes = [own[pick_order([len(e["text"]) for e in own], self.cfg.demonstration_pick)[0]]
                  for solved, own in self.store.passes_of_others(problem.id).items() if solved in self.problem_texts]
        if not passes:
            return []
        scores = [0.0] * len(passes)
        here = self.problem_vector(problem.id, text)
        if here is not None:
            scores = [float(np.dot(here, self.problem_vector(e["problem"], self.problem_texts[e["problem"]])))
                      for e in passes]
        ranked = sorted(range(len(passes)), key=lambda j: (-round(scores[j], 6), passes[j]["problem"]))
        return [Item("example", passes[j]["text"], passes[j]["id"], question=self.problem_texts[passes[j]["problem"]])
                for j in ranked[:self.cfg.related_examples]]

    def memory_items(self, problem: Problem, text: str, *, with_problem_memory: bool = True) -> list[Item]:
        """Insights (best utility first) then behaviors (most similar first): the non-experience candidates."""
        items: list[Item] = []
        if with_problem_memory and "insight" in self.levels:
            items += [Item(e["kind"], e["text"], e["id"]) for e in self.store.insights(problem.id)]
        if "behavior" in self.levels and self.cfg.l3_topk:
            found = self.store.search_behaviors(self.problem_vector(problem.id, text), k=self.cfg.l3_topk,
                                                min_sim=self.cfg.l3_min_sim)
            items += [Item("behavior", f"{b['name']}: {b['instruction']}", b["id"]) for b in found]
        return items

    def group_contexts(self, step: int, problem: Problem, messages: list[dict], texts_G: list[str],
                       passed_G: list[bool], feedback_G: list[str],
                       finished_G: list[bool] | None = None) -> GroupContexts:
        """Each rollout's teacher context (docs/method.md §4): the experience item (a demonstration, else
        feedback), an attempt to avoid (`show_failure`), insights, behaviors, in that priority. With
        `teacher_memory=shared` only insights and behaviors. `feedback_G` is what the teacher may read; a
        sibling cut at the budget (`finished_G` False) is no demonstration (unless `store_cut_passes`)."""
        others = self.memory_items(problem, messages[-1]["content"])
        if self.cfg.teacher_memory == "shared":
            per_rollout = self.prompts.group(messages, [others] * len(texts_G))
            return GroupContexts(per_rollout, next((c for c in per_rollout if c is not None), None))
        experience = self.store.experience(problem.id)
        complete_G = [ok and (finished_G is None or self.cfg.store_cut_passes or finished_G[i])
                      for i, ok in enumerate(passed_G)]
        demos = self._demonstrations(step, experience, texts_G, complete_G, self.cfg.demonstration_pick)
        stored_failure = next((e for e in experience if not e["passed"] and e["feedback"]), None)
        feedback = (Item("feedback", stored_failure["feedback"], stored_failure["id"])
                    if stored_failure and self.cfg.feedback_source == "memory" else None)
        if self.cfg.teacher_reference and problem.answer:  # the upper-bound probe: the answer, not from memory
            feedback = Item("feedback", REFERENCE_FEEDBACK.replace("{answer}", problem.answer))
        examples = self.related_examples(problem, messages[-1]["content"]) if not demos else []
        last_failure = next((e for e in experience if not e["passed"]), None)
        avoid = [Item("failure", last_failure["text"], last_failure["id"])] if self.cfg.show_failure and last_failure \
            else []

        def offer(i: int) -> list[Item]:
            demo = next((item for item, source in demos if source != i), None)
            own = Item("feedback", feedback_G[i]) if self.cfg.feedback_source == "own" and not passed_G[i] and \
                feedback_G[i] else None
            fallback = feedback if self.cfg.teacher_reference else own or feedback
            # The experience item first (a demonstration; else solved related problems, then feedback), the rest after.
            return ([demo] if demo else examples) + ([fallback] if fallback else []) + avoid + others

        per_rollout = self.prompts.group(messages, [offer(i) for i in range(len(texts_G))])
        # The group's context for the utility credit: that of a rollout which is no demonstration's source.
        demo_sources = {source for _, source in demos}
        shared = next((c for i, c in enumerate(per_rollout) if c is not None and i not in demo_sources),
                      next((c for c in per_rollout if c is not None), None))
        return GroupContexts(per_rollout, shared)

    @staticmethod
    def _demonstrations(step: int, experience: list[dict], texts_G: list[str], passed_G: list[bool],
                        pick: str = "shortest") -> list[tuple[Item, int | None]]:
        """(demonstration, index of the sibling it is, or None): the stored pass from an earlier step that `pick`
        prefers (see `pick_order`), else this step's passes in that order (a rollout is never its own
        demonstration). Ties: the older entry, the earlier sibling."""
        stored = sorted((e for e in experience if e["passed"] and e["created_step"] < step), key=lambda e: e["id"])
        if stored:
            best = stored[pick_order([len(e["text"]) for e in stored], pick)[0]]
            return [(Item("demonstration", best["text"], best["id"]), None)]
        current = [i for i in range(len(texts_G)) if passed_G[i] and strip_thinking(texts_G[i])]
        order = pick_order([len(strip_thinking(texts_G[i])) for i in current], pick)
        return [(Item("demonstration", strip_thinking(texts_G[current[j]])), current[j]) for j in order[:2]]

    def eval_context(self, problem: Problem, messages: list[dict]) -> Context | None:
        """In-context memory for a held-out problem: behaviors only (it has no experience or insights)."""
        return self.prompts.fit(messages, self.memory_items(problem, messages[-1]["content"],
                                                            with_problem_memory=False))

    def prompt_context(self, step: int, problem: Problem, messages: list[dict]) -> Context | None:
        """freeze=policy: the memory placed in the student's own prompt before sampling (no siblings yet)."""
        experience = self.store.experience(problem.id)
        passes = sorted((e for e in experience if e["passed"]), key=lambda e: e["id"])
        passes = [passes[j] for j in pick_order([len(e["text"]) for e in passes], self.cfg.demonstration_pick)]
        failure = next((e for e in experience if not e["passed"] and e["feedback"]), None)
        candidates = ([Item("demonstration", passes[0]["text"], passes[0]["id"])] if passes else []) + \
                     ([Item("feedback", failure["feedback"], failure["id"])] if failure else []) + \
            self.memory_items(problem, messages[-1]["content"])
        return self.prompts.fit(messages, candidates)

    # ------------------------------------------------------------------------------------------ record
    def record(self, step: int, problems_P: list[Problem], passed_B: list[bool],
               shared: list[Context | None], used_ids: set[int]) -> None:
        """Count uses, and keep each problem's visit (pass rate, ids in its context) for the next credit."""
        self.store.record_usage(step, used_ids)
        G = len(passed_B) // len(problems_P)
        for k, problem in enumerate(problems_P):
            rate = sum(passed_B[k * G:(k + 1) * G]) / G
            self.store.record_visit(step, problem.id, rate, shared[k].entry_ids if shared[k] else [])

    # ------------------------------------------------------------------------------------------ metrics
    def take_counters(self) -> dict[str, float]:
        out = dict(self.counters)
        self.counters.clear()
        return out

    def take_log(self) -> list[dict]:
        out, self.log = self.log, []
        return out

    def size_metrics(self) -> dict[str, float]:
        stats = self.store.stats()
        out = {}
        for level, s in stats.items():
            out[f"memory/{level}_entries"] = s["count"]
            out[f"memory/{level}_tokens"] = s["tokens"]
        return out


def pick_order(lengths: list[int], pick: str) -> list[int]:
    """Indices of candidate passes (by their lengths), the one `demonstration_pick` prefers first; ties: the
    earlier index. shortest / longest: by length. median: nearest the median length (the lower middle, so a
    real pass) first: a solution with the working most passes show, neither the luckiest bare answer (the
    shortest, findings point 10) nor the one that runs to the budget (the longest, point 11)."""
    if pick == "shortest":
        distance = list(lengths)
    elif pick == "longest":
        distance = [-n for n in lengths]
    elif pick == "median":
        middle = sorted(lengths)[(len(lengths) - 1) // 2] if lengths else 0
        distance = [abs(n - middle) for n in lengths]
    else:
        raise ValueError(f"demonstration_pick must be shortest, longest or median, got {pick!r}")
    return sorted(range(len(lengths)), key=lambda i: (distance[i], i))


def cluster_insights(entries: list[dict], vectors: np.ndarray | None, similarity: float, min_problems: int,
                     max_clusters: int) -> list[list[dict]]:
    """Average-link agglomerative clusters of insights at cosine >= `similarity`, spanning at least
    `min_problems` distinct problems; largest (by problems) first, at most `max_clusters`."""
    if vectors is None or len(entries) < max(2, min_problems):
        return []
    from scipy.cluster.hierarchy import fcluster, linkage

    distances = np.clip(1.0 - vectors @ vectors.T, 0.0, 2.0).astype(np.float64)
    condensed = distances[np.triu_indices(len(entries), k=1)]
    labels = fcluster(linkage(condensed, method="average"), t=1.0 - similarity, criterion="distance")
    groups: dict[int, list[dict]] = defaultdict(list)
    for entry, label in zip(entries, labels):
        groups[int(label)].append(entry)
    broad = [g for g in groups.values() if len({e["problem"] for e in g}) >= min_problems]
    broad.sort(key=lambda g: (-len({e["problem"] for e in g}), -len(g), min(e["id"] for e in g)))
    return broad[:max_clusters]


def one_per_problem(cluster: list[dict], limit: int) -> list[dict]:
    """Up to `limit` members from distinct problems, most supported first."""
    seen, out = set(), []
    for e in sorted(cluster, key=lambda e: (-e.get("support", 1), e["id"])):
        if e["problem"] not in seen:
            seen.add(e["problem"])
            out.append(e)
    return out[:limit]

