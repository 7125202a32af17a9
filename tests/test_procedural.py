# pytest tests/test_procedural.py -q
"""PMD's memory in the loop, without a model: the teacher-context builder and its budget, clustering,
observe / reflect / consolidate with a scripted reflector, utility credit, and caps over a long run."""

from __future__ import annotations

import numpy as np
import pytest

from pmd.config import Config, apply
from pmd.memory import MemoryConfig, MemoryStore, ProceduralMemory
from pmd.memory.embedder import hashing_embedder
from pmd.memory.procedural import cluster_insights, pick_order
from pmd.tasks import Problem
from pmd.teacher import Item, TeacherPrompts, fit, render


def words(text: str) -> int:
    return len(text.split())


# ------------------------------------------------------------------------------------------------ render
def test_without_memory_sections_the_context_is_sdpos_reprompt():
    """SDPO's reprompt, written out from lasgroup/SDPO's actor.yaml: prompt + solution or feedback + instruction."""
    demo, feedback = "2+3=5. Answer: 5", "The answer 6 is incorrect."
    assert render("What is 2+3?", [Item("demonstration", demo)]) == \
        "What is 2+3?\nCorrect solution:\n\n2+3=5. Answer: 5\n\nCorrectly solve the original question."
    assert render("What is 2+3?", [Item("feedback", feedback)]) == (
        "What is 2+3?\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
        "The answer 6 is incorrect.\n\nCorrectly solve the original question.")


def test_render_orders_sections_and_keeps_untrusted_braces_literal():
    items = [Item("demonstration", "x {problem} y"), Item("lesson", "Never {prompt} drop carries."),
             Item("behavior", "Check: verify {0} each step."), Item("strategy", "Add column by column.")]
    text = render("Q {solution}", items)
    assert text.startswith("Q {solution}\n\nBehaviors that have helped on similar problems:\n- Check: verify {0}")
    order = [text.index(s) for s in ("Behaviors that", "Strategies that", "Mistakes to avoid", "Correct solution:",
                                     "Correctly solve the original question.")]
    assert order == sorted(order)
    assert "x {problem} y" in text and "Never {prompt} drop carries." in text


# ------------------------------------------------------------------------------------------------ fit
def prompt_words(problem: str):
    """The whole teacher prompt's length in words, as `fit` is given it (the chat template's role)."""
    return lambda items: words(render(problem, items))


def test_fit_respects_the_budget_and_drops_items_whole():
    problem = "Add 12 and 30."
    items = [Item("demonstration", "word " * 50), Item("strategy", "short strategy here"),
             Item("lesson", "lesson " * 30), Item("behavior", "name: do the thing well")]
    base = words(render(problem, []))
    ctx = fit(items, prompt_words(problem), words, max_tokens=base + 40)
    assert ctx is not None and ctx.tokens <= base + 40
    assert ctx.tokens == words(render(problem, ctx.items))  # the length it reports is the prompt it admitted
    kinds = [i.kind for i in ctx.items]
    assert "demonstration" not in kinds and "lesson" not in kinds  # too long: dropped, never cut
    assert kinds == ["strategy", "behavior"]
    text = render(problem, ctx.items)
    assert text.startswith(problem) and text.endswith("Correctly solve the original question.")
    assert "word word" not in text


def test_fit_level_budgets_and_priority():
    items = [Item("strategy", "a b c d"), Item("lesson", "e f g h"), Item("behavior", "n: i j k"),
             Item("behavior", "m: l m n")]
    ctx = fit(items, prompt_words("P"), words, max_tokens=1000, level_budgets={"insight": 5, "behavior": 4})
    assert [i.text for i in ctx.items] == ["a b c d", "n: i j k"]


def test_fit_never_cuts_the_problem():
    long_problem = "word " * 100
    assert fit([Item("strategy", "a b c d")], prompt_words(long_problem), words, max_tokens=50) is None
    assert fit([], prompt_words("short"), words, max_tokens=50) is None  # no memory: no context


def test_fit_keeps_one_experience_item():
    ctx = fit([Item("demonstration", "d"), Item("feedback", "f")], prompt_words("P"), words, max_tokens=100)
    assert [i.kind for i in ctx.items] == ["demonstration"]
    ctx = fit([Item("failure", "x"), Item("failure", "y"), Item("strategy", "s")], prompt_words("P"), words,
              max_tokens=100)
    assert [i.text for i in ctx.items] == ["x", "s"]  # one attempt to avoid


# ------------------------------------------------------------------------------------------------ clustering
def test_cluster_insights_groups_across_problems():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 16))
    vecs, entries = [], []
    for c in range(2):
        for k in range(4 if c == 0 else 2):  # cluster 0 spans 4 problems, cluster 1 only 2
            v = centres[c] + 0.05 * rng.normal(size=16)
            vecs.append(v / np.linalg.norm(v))
            entries.append({"id": len(entries), "problem": f"p{c}-{k}", "text": f"t{c}{k}", "support": 1})
    clusters = cluster_insights(entries, np.array(vecs, dtype=np.float32), 0.75, 3, 16)
    assert len(clusters) == 1 and {e["problem"] for e in clusters[0]} == {f"p0-{k}" for k in range(4)}


# ------------------------------------------------------------------------------------------------ the memory
INSIGHT = "STRATEGY: Add the numbers column by column carefully.\nLESSON: Do not drop the carry digit when adding."
BEHAVIOR = "BEHAVIOR: Check the sum: Add digits column by column and verify the carry.\nWHEN: adding numbers"


def scripted(prompts, seed, prefill="", fields=None):
    return [BEHAVIOR if p.startswith("Each note") else INSIGHT for p in prompts]


def make_memory(tmp_path, reflect=scripted, **kw) -> ProceduralMemory:
    cfg = apply(Config(), {"method": "pmd", "embedder": "hashing", "l3_min_sim": -1.0, **kw})
    embed = hashing_embedder()
    memory_cfg = MemoryConfig.from_config(cfg)
    store = MemoryStore(tmp_path / "memory.sqlite", memory_cfg, embed=embed, count_tokens=words)
    prompts = TeacherPrompts(lambda messages: messages[-1]["content"].split(), words,
                             max_tokens=cfg.max_teacher_prompt_tokens,
                             level_budgets={"behavior": cfg.behavior_token_budget, "insight": cfg.insight_token_budget})
    return ProceduralMemory(store, memory_cfg, reflect=reflect, embed=embed, prompts=prompts)


def problem(i: int) -> Problem:
    return Problem(id=f"p{i}", question=f"What is {i} + {i}?", answer=str(2 * i), metadata={})


def messages(p: Problem) -> list[dict]:
    return [{"role": "user", "content": p.question}]


def step_once(mem: ProceduralMemory, step: int, problems: list[Problem], passed: list[bool], G: int = 4):
    texts = [f"attempt {step}-{i} answer {i % 3}" for i in range(len(problems) * G)]
    feedback = ["" if ok else f"The answer {i % 3} is incorrect." for i, ok in enumerate(passed)]
    gained = mem.observe(step, problems, texts, [float(x) for x in passed], passed, feedback)
    mem.reflect(step, gained, {p.id: p.question for p in gained})
    if mem.cfg.behavior_every and step % mem.cfg.behavior_every == 0:
        mem.consolidate(step)
    groups = [mem.group_contexts(step, p, messages(p), texts[k * G:(k + 1) * G], passed[k * G:(k + 1) * G],
                                 feedback[k * G:(k + 1) * G]) for k, p in enumerate(problems)]
    used = {i for g in groups for c in g.per_rollout if c for i in c.entry_ids}
    mem.record(step, problems, passed, [g.shared for g in groups], used)
    return texts, groups


def test_all_three_levels_fill_and_every_rollout_gets_a_signal(tmp_path):
    mem = make_memory(tmp_path, behavior_every=2)
    probs = [problem(i) for i in range(4)]
    passed = [False] * 16
    _, groups = step_once(mem, 1, probs, passed)
    # all-fail groups: SDPO has no demonstration, PMD still has feedback and insights
    assert all(c is not None for g in groups for c in g.per_rollout)
    _, groups = step_once(mem, 2, probs, passed)
    stats = mem.store.stats()
    assert stats["experience"]["count"] > 0 and stats["insight"]["count"] > 0 and stats["behavior"]["count"] == 1
    assert all("behavior" in c.levels for g in groups for c in g.per_rollout)
    behavior = mem.store.behaviors()[0]
    assert behavior["support"] == 4 and behavior["uses"] == 1
    assert all(s.startswith("insight:") for s in behavior["source_rollouts"])


def test_demonstration_prefers_an_earlier_step_and_excludes_the_rollout_itself(tmp_path):
    mem = make_memory(tmp_path, memory_levels="experience")
    p = problem(1)
    # step 1: rollouts 1 and 3 pass; the shortest current pass is each other's demonstration
    texts = ["wrong", "ok 11", "wrong again", "ok 1111"]
    passed = [False, True, False, True]
    feedback = ["bad", "", "bad", ""]
    mem.observe(1, [p], texts, [float(x) for x in passed], passed, feedback)
    g = mem.group_contexts(1, p, messages(p), texts, passed, feedback)
    demo = [next((i.text for i in c.items if i.kind == "demonstration"), None) for c in g.per_rollout]
    assert demo == ["ok 11", "ok 1111", "ok 11", "ok 11"]
    # step 2: a stored pass from step 1 exists, so every rollout (even a new pass) gets it
    texts2 = ["ok 2", "wrong", "wrong", "wrong"]
    passed2 = [True, False, False, False]
    mem.observe(2, [p], texts2, [float(x) for x in passed2], passed2, ["", "bad", "bad", "bad"])
    g2 = mem.group_contexts(2, p, messages(p), texts2, passed2, ["", "bad", "bad", "bad"])
    assert all(next(i.text for i in c.items if i.kind == "demonstration") == "ok 11" for c in g2.per_rollout)
    assert len({id(c) for c in g2.per_rollout}) == 1  # one shared context: one prefix for the group


def test_demonstration_pick_longest_shows_the_pass_with_the_most_working(tmp_path):
    """demonstration_pick=longest: this step's passes longest first, then the longest stored pass, and the
    longest pass of a related problem as its example; the rollout is still never its own demonstration."""
    mem = make_memory(tmp_path, memory_levels="experience", demonstration_pick="longest")
    p, other = problem(1), problem(2)
    mem.problem_texts = {p.id: p.question, other.id: other.question}
    texts = ["wrong", "Answer: 2", "wrong again", "1 + 1 = 2.\nAnswer: 2"]
    passed = [False, True, False, True]
    feedback = ["bad", "", "bad", ""]
    mem.observe(1, [p], texts, [float(x) for x in passed], passed, feedback)
    g = mem.group_contexts(1, p, messages(p), texts, passed, feedback)
    demo = [next((i.text for i in c.items if i.kind == "demonstration"), None) for c in g.per_rollout]
    assert demo == [texts[3], texts[3], texts[3], texts[1]]
    g2 = mem.group_contexts(2, p, messages(p), ["x"] * 4, [False] * 4, ["bad"] * 4)
    assert all(next(i.text for i in c.items if i.kind == "demonstration") == texts[3] for c in g2.per_rollout)
    g3 = mem.group_contexts(2, other, messages(other), ["x"] * 4, [False] * 4, ["bad"] * 4)
    assert [(i.kind, i.text) for i in g3.per_rollout[0].items] == [("example", texts[3])]
    # the default picks the shortest of the same passes
    (tmp_path / "short").mkdir()
    short = make_memory(tmp_path / "short", memory_levels="experience")
    short.problem_texts = dict(mem.problem_texts)
    short.observe(1, [p], texts, [float(x) for x in passed], passed, feedback)
    g4 = short.group_contexts(2, other, messages(other), ["x"] * 4, [False] * 4, ["bad"] * 4)
    assert [(i.kind, i.text) for i in g4.per_rollout[0].items] == [("example", texts[1])]


def test_pick_order_by_length_with_ties_to_the_earlier():
    assert pick_order([5, 2, 9, 2], "shortest") == [1, 3, 0, 2]
    assert pick_order([5, 2, 9, 9], "longest") == [2, 3, 0, 1]
    # median: the lower middle of 2, 5, 8, 30 is 5; then by distance to it (2 and 8 tie: the earlier index)
    assert pick_order([30, 8, 5, 2], "median") == [2, 1, 3, 0]
    assert pick_order([7], "median") == [0] and pick_order([], "median") == []
    with pytest.raises(ValueError, match="demonstration_pick"):
        pick_order([1], "random")


def test_demonstration_pick_median_skips_the_bare_answer_and_the_longest(tmp_path):
    """demonstration_pick=median: of three stored passes the middle one, as demonstration, as related example,
    and (freeze=policy) in the student's prompt."""
    mem = make_memory(tmp_path, memory_levels="experience", demonstration_pick="median")
    p, other = problem(1), problem(2)
    mem.problem_texts = {p.id: p.question, other.id: other.question}
    texts = ["Answer: 2", "1 + 1 = 2.\nAnswer: 2", "wrong",
             "Let me add 1 and 1 slowly, one unit at a time, which gives 2.\nAnswer: 2"]
    passed = [True, True, False, True]
    feedback = ["", "", "bad", ""]
    mem.observe(1, [p], texts, [float(x) for x in passed], passed, feedback)
    g = mem.group_contexts(1, p, messages(p), texts, passed, feedback)  # this step's passes: median first
    demo = [next((i.text for i in c.items if i.kind == "demonstration"), None) for c in g.per_rollout]
    assert demo == [texts[1], texts[0], texts[1], texts[1]]
    g2 = mem.group_contexts(2, p, messages(p), ["x"] * 4, [False] * 4, ["bad"] * 4)
    assert all(next(i.text for i in c.items if i.kind == "demonstration") == texts[1] for c in g2.per_rollout)
    g3 = mem.group_contexts(2, other, messages(other), ["x"] * 4, [False] * 4, ["bad"] * 4)
    assert [(i.kind, i.text) for i in g3.per_rollout[0].items] == [("example", texts[1])]
    ctx = mem.prompt_context(2, p, messages(p))
    assert next(i.text for i in ctx.items if i.kind == "demonstration") == texts[1]


def test_a_pass_cut_at_the_budget_is_never_a_demonstration(tmp_path):
    """A pass without EOS (cut at max_new_tokens) shows a solution that never stops: it is neither stored
    nor offered as a sibling demonstration, whichever pick; a finished pass still is, and a cut failure
    is still stored (its feedback is what the teacher reads)."""
    mem = make_memory(tmp_path, memory_levels="experience", demonstration_pick="longest")
    p = problem(1)
    texts = ["1 + 1 = 2. Answer: 2 and so on and on", "Answer: 2", "wrong", "1 + 1 = 2, so 2 and more and more"]
    passed, finished = [True, True, False, True], [False, True, False, False]
    feedback = ["", "", "bad", ""]
    mem.observe(1, [p], texts, [float(x) for x in passed], passed, feedback, finished)
    assert sorted((e["kind"], e["text"]) for e in mem.store.experience(p.id)) == [("fail", "wrong"),
                                                                                   ("pass", "Answer: 2")]
    assert mem.take_counters()["memory/cut_passes_not_stored"] == 2
    g = mem.group_contexts(1, p, messages(p), texts, passed, feedback, finished)
    demo = [next((i.text for i in c.items if i.kind == "demonstration"), None) for c in g.per_rollout]
    assert demo == ["Answer: 2", None, "Answer: 2", "Answer: 2"]  # the longest, cut passes, are skipped
    g_unknown = mem.group_contexts(1, p, messages(p), texts, passed, feedback)  # no finished flags: all count
    assert next(i.text for i in g_unknown.per_rollout[1].items if i.kind == "demonstration") == texts[0]
    (tmp_path / "keep").mkdir()  # store_cut_passes=true: as before, they are stored and shown
    keep = make_memory(tmp_path / "keep", memory_levels="experience", demonstration_pick="longest",
                       store_cut_passes=True)
    keep.observe(1, [p], texts, [float(x) for x in passed], passed, feedback, finished)
    assert len(keep.store.experience(p.id)) == 4
    g_keep = keep.group_contexts(2, p, messages(p), texts, passed, feedback, finished)
    assert next(i.text for i in g_keep.per_rollout[1].items if i.kind == "demonstration") == texts[0]


def test_utility_credit_is_relative_to_the_mean_change(tmp_path):
    mem = make_memory(tmp_path, memory_levels="experience,insight")
    a, b = problem(1), problem(2)
    step_once(mem, 1, [a, b], [False] * 8)
    ids_a = mem.store.last_visit("p1")["entry_ids"]
    ids_b = mem.store.last_visit("p2")["entry_ids"]
    assert ids_a and ids_b
    step_once(mem, 2, [a, b], [True] * 4 + [False] * 4)  # a improved by 1.0, b by 0: mean 0.5
    helpful = {e["id"]: e["helpful"] for e in mem.store.entries()}
    assert all(helpful[i] == pytest.approx(0.5) for i in ids_a if i in helpful and i not in ids_b)
    assert all(helpful[i] == pytest.approx(-0.5) for i in ids_b if i in helpful and i not in ids_a)


def test_reflection_failures_are_counted_not_raised(tmp_path):
    outputs = iter([None, "<|im_end|> {garbage} \x00", INSIGHT])

    def flaky(prompts, seed, prefill="", fields=None):
        return [next(outputs) for _ in prompts]

    mem = make_memory(tmp_path, reflect=flaky, memory_levels="experience,insight", reflect_per_step=0)
    step_once(mem, 1, [problem(1), problem(2), problem(3)], [False] * 12)
    counters = mem.take_counters()
    assert counters["memory/reflect_calls"] == 3 and counters["memory/reflect_errors"] == 1
    assert counters["memory/reflect_parse_fail"] == 1 and counters["memory/reflect_kept"] == 2
    assert mem.store.stats()["insight"]["count"] == 2


def test_memory_stays_within_its_caps_over_a_long_run(tmp_path):
    """Many steps of synthetic reflections over a revisited pool: every level stays within its cap."""
    rng = np.random.default_rng(0)
    vocabulary = ["carry", "digits", "sign", "order", "column", "check", "units", "sum", "borrow", "align"]

    def varied(prompts, seed, prefill="", fields=None):
        r = np.random.default_rng(seed)
        out = []
        for p in prompts:
            w = r.choice(vocabulary, size=6)
            if p.startswith("Each note"):
                out.append(f"BEHAVIOR: {w[0]} {w[1]}: Always {' '.join(w[2:])} before answering.\nWHEN: {w[0]} tasks")
            else:
                out.append("\n".join(f"{k}: Keep the {' '.join(r.choice(vocabulary, size=5))} straight."
                                     for k in ("STRATEGY", "LESSON", "STRATEGY", "LESSON", "STRATEGY", "LESSON")))
        return out

    caps = dict(l1_max_pass=2, l1_max_fail=2, l2_max_strategies=3, l2_max_lessons=3, l3_max_behaviors=5,
                behavior_every=3, l3_min_problems=2, l3_cluster_similarity=0.3)
    mem = make_memory(tmp_path, reflect=varied, **caps)
    pool = [problem(i) for i in range(12)]
    for step in range(1, 61):
        chosen = [pool[i] for i in rng.choice(len(pool), size=4, replace=False)]
        step_once(mem, step, chosen, list(rng.random(16) < 0.4))
        for p in pool:
            exp = mem.store.experience(p.id)
            assert sum(e["passed"] for e in exp) <= 2 and sum(not e["passed"] for e in exp) <= 2
            assert len(mem.store.insights(p.id, "strategy")) <= 3 and len(mem.store.insights(p.id, "lesson")) <= 3
        assert mem.store.stats()["behavior"]["count"] <= 5
    assert mem.store.stats()["behavior"]["count"] > 0
    assert any(e["action"] == "prune" for e in mem.store.events())


def test_teacher_reference_replaces_feedback_only_where_no_demonstration_fits(tmp_path):
    """The upper-bound probe: an all-fail group's teacher reads the reference answer (never stored in memory);
    a group with a pass keeps its demonstration."""
    mem = make_memory(tmp_path, memory_levels="experience", teacher_reference=True)
    p = problem(3)  # answer "6"
    texts, passed, feedback = ["5", "7", "8", "9"], [False] * 4, ["The answer 5 is incorrect."] * 4
    mem.observe(1, [p], texts, [0.0] * 4, passed, feedback)
    g = mem.group_contexts(1, p, messages(p), texts, passed, feedback)
    shown = [[(i.kind, i.text) for i in c.items] for c in g.per_rollout]
    assert shown == [[("feedback", "The correct answer is 6.")]] * 4
    assert all("The correct answer" not in e["feedback"] for e in mem.store.experience(p.id))
    texts2, passed2 = ["6", "5", "7", "8"], [True, False, False, False]
    mem.observe(2, [p], texts2, [float(x) for x in passed2], passed2, ["", "bad", "bad", "bad"])
    g2 = mem.group_contexts(2, p, messages(p), texts2, passed2, ["", "bad", "bad", "bad"])
    kinds = [[i.kind for i in c.items] for c in g2.per_rollout]
    assert kinds[1:] == [["demonstration"]] * 3  # the pass is their demonstration
    assert kinds[0] == ["feedback"]  # the pass itself has no other demonstration: it reads the answer
    (tmp_path / "off").mkdir()
    off = make_memory(tmp_path / "off", memory_levels="experience")
    off.observe(1, [p], texts, [0.0] * 4, passed, feedback)
    g_off = off.group_contexts(1, p, messages(p), texts, passed, feedback)
    assert all(i.text == "The answer 5 is incorrect." for c in g_off.per_rollout for i in c.items)


def test_teacher_reference_is_a_pmd_option():
    from pmd.config import ConfigError

    with pytest.raises(ConfigError, match="teacher_reference"):
        apply(Config(), {"method": "sdpo", "teacher_reference": True}).validate()
    with pytest.raises(ConfigError, match="teacher_reference"):
        apply(Config(), {"method": "pmd", "teacher_memory": "shared", "teacher_reference": True}).validate()


def test_related_examples_fill_in_where_the_problem_has_no_demonstration(tmp_path):
    """related_examples: an all-fail group of a never-solved problem reads the most similar *other* problems'
    shortest stored passes, each as an earlier user/assistant exchange (most similar nearest the problem); a
    group with a pass keeps its own demonstration and no example; the problem's own pass is never an example."""
    questions = {"near": "Add 25 and 38.", "far": "Name the capital city of France.", "also": "Add 25 and 31.",
                 "target": "Add 25 and 39."}
    ps = {k: Problem(id=k, question=q, answer="", metadata={}) for k, q in questions.items()}
    mem = make_memory(tmp_path, memory_levels="experience", related_examples=2)
    mem.problem_texts = dict(questions)
    for k, (texts, passed) in {"near": (["63 long", "63"], [True, True]), "far": (["Paris"], [True]),
                               "also": (["56"], [True])}.items():
        mem.observe(1, [ps[k]], texts, [1.0] * len(texts), passed, [""] * len(texts))
    fails = ["60", "61"]
    g = mem.group_contexts(2, ps["target"], messages(ps["target"]), fails, [False, False], ["", ""])
    shown = [(i.kind, i.question, i.text) for i in g.per_rollout[0].items]
    vec = {k: mem.embed([q])[0] for k, q in questions.items()}
    expected = sorted(["near", "far", "also"], key=lambda k: -float(np.dot(vec["target"], vec[k])))[:2]
    assert "far" not in expected  # the hashing embedder ranks the arithmetic problems first
    assert shown == [("example", questions[k], {"near": "63", "also": "56"}[k]) for k in expected]
    assert g.per_rollout[0].signal == "example" and g.per_rollout[0].kinds == "example"
    chat = mem.prompts.chat(messages(ps["target"]), g.per_rollout[0].items)
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in chat[:4]] == [questions[expected[1]], "56" if expected[1] == "also" else "63",
                                                questions[expected[0]], "63" if expected[0] == "near" else "56"]
    assert chat[-1]["content"].startswith(questions["target"])
    # a solved problem keeps its own demonstration; examples never replace it
    g2 = mem.group_contexts(2, ps["near"], messages(ps["near"]), ["1", "2"], [False, False], ["", ""])
    assert [[i.kind for i in c.items] for c in g2.per_rollout] == [["demonstration"]] * 2
    # off: the never-solved problem gets no signal (no feedback to show, no insight)
    (tmp_path / "off").mkdir()
    off = make_memory(tmp_path / "off", memory_levels="experience", related_examples=0)
    off.problem_texts = dict(questions)
    off.observe(1, [ps["near"]], ["63"], [1.0], [True], [""])
    assert off.group_contexts(2, ps["target"], messages(ps["target"]), fails, [False, False],
                              ["", ""]).per_rollout == [None, None]


def test_related_examples_must_not_be_negative():
    from pmd.config import ConfigError

    with pytest.raises(ConfigError, match="related_examples"):
        apply(Config(), {"method": "pmd", "related_examples": -1}).validate()
