# Run: python -m pytest tests/test_task_kinds.py -q
"""Multiple choice, math (math-verify) and custom (TRL-style reward function) tasks: loading, scoring,
bad input, `verify_many`, and one short `pmd train` on each with the tiny random model."""

import json
import sys
import threading
from pathlib import Path

import pytest

from pmd.tasks import Problem, load_task, verify_many
from pmd.tasks.data import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def write_rows(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------- mcq
def test_mcq_sample_splits_and_prompt():
    task = load_task("mcq")
    train, held_out = task.problems("train", 100), task.problems("eval", 100)
    assert len(train) + len(held_out) == 30 and held_out
    assert not {p.id for p in train} & {p.id for p in held_out}
    content = task.messages(train[0])[0]["content"]
    assert train[0].question in content and "\nA: " in content and "<answer>" in content


@pytest.mark.parametrize("response, reward, extracted", [
    ("The speed is 9.8 * 2 = 19.6 m/s.\n<answer>C</answer>", 1.0, "C"),
    ("<answer> (c) </answer>", 1.0, "C"),
    ("<answer>C: About 19.6 m/s</answer>", 1.0, "C"),
    ("<answer>About 19.6 m/s</answer>", 1.0, "C"),
    ("<answer>A</answer> wait, no: <answer>C</answer>", 1.0, "C"),
    ("Answer: C", 1.0, "C"),
    ("**Answer:** (C)", 1.0, "C"),
    ("<answer>B</answer>", 0.0, "B"),
    ("<answer>E</answer>", 0.0, None),  # not an option
    ("I am not sure.", 0.0, None),
])
def test_mcq_scoring(response, reward, extracted):
    task = load_task("mcq")
    problem = task.get_problem("sci-001")
    verdict = task.verify(problem, response)
    assert (verdict.reward, verdict.extracted) == (reward, extracted)
    if reward == 0.0:
        assert "C" not in verdict.feedback.replace("LETTER", "")  # never reveals the right letter


def test_mcq_strict_format_and_no_feedback():
    task = load_task("mcq", {"strict_format": True, "feedback": False})
    problem = task.get_problem("sci-001")
    assert task.verify(problem, "Answer: C").reward == 0.0
    assert task.verify(problem, "<answer>C</answer>").reward == 1.0
    assert task.verify(problem, "<answer>B</answer>").feedback == ""


def test_mcq_row_shapes(tmp_path):
    rows = [
        {"id": "list", "question": "2 + 2?", "choices": ["3", "4", "5"], "answer": 1},
        {"id": "map", "question": "Capital of Italy?", "options": {"A": "Rome", "B": "Milan"}, "answer": "Rome"},
        {"id": "cols", "question": "Largest planet?", "A": "Mars", "B": "Jupiter", "C": "Venus", "answer": "B"},
        {"id": "chat", "input": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Water boils at sea level at?\nA) 90 C\nB) 100 C"}],
         "ideal": "B"},
    ]
    task = load_task("mcq", {"path": str(write_rows(tmp_path, rows)), "eval_fraction": 0.0})
    by_id = {p.id: p for p in task.problems("train", 10)}
    assert {k: p.answer for k, p in by_id.items()} == {"list": "B", "map": "A", "cols": "B", "chat": "B"}
    assert task.verify(by_id["chat"], "<answer>B</answer>").reward == 1.0
    assert "B: Milan" in task.messages(by_id["map"])[0]["content"]


@pytest.mark.parametrize("row, message", [
    ({"id": 1, "choices": ["a", "b"], "answer": "A"}, "row 2: missing the question"),
    ({"id": 1, "question": "q", "choices": ["a", "b"]}, "row 2: missing the answer"),
    ({"id": 1, "question": "q", "choices": ["a", "b"], "answer": "C"}, "row 2: answer 'C' is not one of"),
    ({"id": 1, "question": "q", "choices": ["a", "b"], "answer": 5}, "row 2: answer index 5 is out of range"),
    ({"id": 1, "question": "q", "choices": ["only"], "answer": "A"}, "row 2: needs at least two options"),
])
def test_mcq_malformed_rows(tmp_path, row, message):
    good = {"id": 0, "question": "q", "choices": ["a", "b"], "answer": "A"}
    path = write_rows(tmp_path, [good, row], "quiz.jsonl")
    with pytest.raises(DataError, match=f"quiz.jsonl: {message}"):
        load_task("mcq", {"path": str(path)})


def test_mcq_from_a_hugging_face_dataset_folder(tmp_path):
    import datasets

    rows = [{"question": f"Pick {c}", "choices": {"label": ["A", "B", "C"], "text": ["x", "y", "z"]},
             "answerKey": c} for c in "ABCABCABCA"]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    task = load_task("mcq", {"dataset": str(tmp_path / "hf"), "problem_split": "shared"})
    problems = task.problems("eval", 100)
    assert len(problems) == 10 and problems[0].id == "mcq/1"
    assert task.verify(problems[1], "<answer>B</answer>").reward == 1.0


# --------------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("answer, response, reward", [
    ("72", "Natalia sold 48 + 24 = 72 clips.\nAnswer: 72", 1.0),
    ("72", "Answer: 72.0", 1.0),
    ("72", "So the answer is $\\boxed{72}$.", 1.0),
    ("0.5", "Answer: \\frac{1}{2}", 1.0),
    ("\\frac{3}{4}", "Answer: 0.75", 1.0),
    ("\\frac{3}{4}", "Answer: 3/4", 1.0),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", 1.0),
    ("72", "Answer: 71", 0.0),
    ("72", "They sold 48 in April and 24 in May, so 72 in total.", 1.0),  # math-verify finds it
    ("72", "No idea.", 0.0),
])
def test_math_verify_scoring(answer, response, reward):
    task = load_task("math")
    problem = Problem(id="m/0", question="?", answer=answer, metadata={})
    verdict = task.verify(problem, response)
    assert verdict.reward == reward, verdict
    if reward == 0.0:
        assert answer not in verdict.feedback


def test_math_defaults_to_gsm_symbolic():
    task = load_task("math")
    problem = task.problems("train", 1)[0]
    assert problem.id.startswith("gsm_symbolic/train/")
    assert task.verify(problem, f"Answer: {problem.answer}").reward == 1.0
    assert task.get_problem(problem.id) == problem


def test_math_rows_and_gsm8k_answers(tmp_path):
    rows = [{"id": "g1", "question": "What is 6 * 7?", "answer": "6 * 7 = 42\n#### 42"},
            {"id": "m1", "problem": "Simplify 2/4.", "solution": "We get $\\boxed{\\frac{1}{2}}$."}]
    task = load_task("math", {"path": str(write_rows(tmp_path, rows)), "eval_fraction": 0.0})
    by_id = {p.id: p for p in task.problems("train", 5)}
    assert by_id["g1"].answer == "42" and by_id["m1"].answer == "\\frac{1}{2}"
    assert task.verify(by_id["m1"], "Answer: 0.5").reward == 1.0


def test_math_verify_works_off_the_main_thread():
    task = load_task("math")
    problem = Problem(id="m/0", question="?", answer="\\frac{1}{3}", metadata={})
    out = {}
    thread = threading.Thread(target=lambda: out.update(v=task.verify(problem, "Answer: 1/3")))
    thread.start()
    thread.join()
    assert out["v"].reward == 1.0


def test_math_malformed_row(tmp_path):
    path = write_rows(tmp_path, [{"id": 1, "question": "q"}], "m.jsonl")
    with pytest.raises(DataError, match="m.jsonl: row 1: missing the answer"):
        load_task("math", {"path": str(path)})


# --------------------------------------------------------------------------------------------- custom
REWARDS = '''
def plain(prompts, completions, answer, **kwargs):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

def with_feedback(prompts, completions, answer, **kwargs):
    return ([1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)],
            ["ok" if c.strip() == a else "try again" for c, a in zip(completions, answer)])

def dicts(prompts, completions, answer, **kwargs):
    return [{"reward": 2.0 if c.strip() == a else -1.0, "feedback": "dict"} for c, a in zip(completions, answer)]

def named_only(completions, answer):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]

def chat(prompts, completions, **kwargs):
    return [1.0 if isinstance(c, list) and c[0]["role"] == "assistant" else 0.0 for c in completions]

def boom(prompts, completions, **kwargs):
    raise ValueError("bad things")

def short(prompts, completions, **kwargs):
    return [1.0]

def not_numbers(prompts, completions, **kwargs):
    return ["yes"] * len(completions)

def seen(prompts, completions, **kwargs):
    return [1.0 if kwargs.get("completion_ids", 0) is None and "answer" in kwargs else 0.0 for _ in completions]
'''


@pytest.fixture
def custom(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    rows = [{"id": f"q{i}", "prompt": f"Say {i}.", "answer": str(i)} for i in range(10)]
    path = write_rows(tmp_path, rows, "say.jsonl")

    def make(fn, **params):
        return load_task("custom", {"path": str(path), "reward_fn": f"my_rewards:{fn}", "problem_split": "shared",
                                    **params})
    return make


def batch(task, responses):
    problems = task.problems("train", len(responses))
    return verify_many(task, problems, responses)


def test_custom_plain_rewards(custom):
    verdicts = batch(custom("plain"), ["0", "nope", "2"])
    assert [v.reward for v in verdicts] == [1.0, 0.0, 1.0] and not any(v.error for v in verdicts)


def test_custom_feedback_forms(custom):
    assert [v.feedback for v in batch(custom("with_feedback"), ["0", "x"])] == ["ok", "try again"]
    verdicts = batch(custom("dicts"), ["0", "x"])
    assert [v.reward for v in verdicts] == [1.0, 0.0] and verdicts[0].feedback == "dict"  # clipped to [0, 1]
    assert [v.reward for v in batch(custom("dicts", clip_rewards=False), ["0", "x"])] == [2.0, -1.0]


def test_custom_signature_and_trl_arguments(custom):
    assert [v.reward for v in batch(custom("named_only"), ["0", "x"])] == [1.0, 0.0]
    assert [v.reward for v in batch(custom("seen"), ["a"])] == [1.0]


@pytest.mark.parametrize("fn, message", [
    ("boom", "ValueError: bad things"),
    ("short", "returned 1 rewards for 3 completions"),
    ("not_numbers", "item 0 is str, not a number"),
])
def test_custom_verifier_errors(custom, fn, message):
    verdicts = batch(custom(fn), ["0", "1", "2"])
    for v in verdicts:
        assert v.error and v.reward == 0.0 and v.feedback.startswith("verifier error: ") and message in v.feedback
    with pytest.raises(ValueError):  # RewardShapeError is a ValueError
        batch(custom(fn, strict=True), ["0", "1", "2"])


def test_custom_conversational_prompts(tmp_path, custom):
    rows = [{"id": "c", "prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]}]
    path = write_rows(tmp_path, rows, "chat.jsonl")
    task = load_task("custom", {"path": str(path), "reward_fn": "my_rewards:chat", "problem_split": "shared"})
    problem = task.problems("train", 1)[0]
    assert task.messages(problem) == rows[0]["prompt"] and problem.question == "Hi"
    assert task.verify(problem, "Hello").reward == 1.0


def test_custom_file_path_as_task_and_worked_example():
    task = load_task(str(EXAMPLES / "capitals.jsonl"),
                     {"reward_fn": f"{EXAMPLES / 'capital_reward.py'}:score", "problem_split": "shared"})
    problems = {p.id: p for p in task.problems("train", 20)}
    verdicts = verify_many(task, [problems["fr"], problems["jp"], problems["ca"]],
                           ["Paris.", "Kyoto", "The capital of Canada is Ottawa, because it was chosen in 1857."])
    assert [v.reward for v in verdicts] == [1.0, 0.0, 0.0]
    assert verdicts[1].feedback == "Kyoto is not the capital." and "only" in verdicts[2].feedback


@pytest.mark.parametrize("params, message", [
    ({"reward_fn": "my_rewards:missing"}, "has no function 'missing'"),
    ({"reward_fn": "no_such_module:f"}, "No module named 'no_such_module'"),
    ({"reward_fn": "nocolon"}, "expected module:function"),
    ({}, "needs task_params reward_fn"),
])
def test_custom_bad_reward_fn(custom, tmp_path, params, message):
    with pytest.raises(ValueError, match=message):
        load_task("custom", {"path": str(tmp_path / "say.jsonl"), **params})


def test_custom_malformed_rows(tmp_path, custom):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2, "text": "no prompt"}\n')
    with pytest.raises(DataError, match="bad.jsonl: row 2: missing the prompt column 'prompt'"):
        load_task("custom", {"path": str(path), "reward_fn": "my_rewards:plain"})


def test_file_without_reward_fn_uses_known_columns(tmp_path):
    mcq = write_rows(tmp_path, [{"question": "q", "choices": ["a", "b"], "answerKey": "A"}], "quiz.jsonl")
    assert type(load_task(str(mcq), {"problem_split": "shared"})).__name__ == "MCQTask"
    other = write_rows(tmp_path, [{"prompt": "q"}], "free.jsonl")
    with pytest.raises(ValueError, match="reward_fn"):
        load_task(str(other))


# --------------------------------------------------------------------------------------------- training
TINY = dict(model="tiny-random", steps=2, problems_per_step=2, group_size=2, max_new_tokens=8, eval_problems=2,
            eval_samples=1, micro_batch_size=4, threads=1, save_every=2)


def short_run(tmp_path, **kw):
    from pmd.config import Config, apply
    from pmd.loop import train

    run = train(apply(Config(), {**TINY, "output_dir": str(tmp_path / "run"), **kw}))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/accuracy" in rows[-1]
    rollouts = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 2 * 2
    return rows, rollouts


def test_train_mcq(tmp_path):
    rows, rollouts = short_run(tmp_path, task="mcq", task_params={}, method="sdpo")
    assert all(r["feedback"] for r in rollouts)  # tiny-random never answers: the missing-answer hint


def test_train_math(tmp_path):
    short_run(tmp_path, task="math", task_params={}, method="grpo")


def test_train_custom(tmp_path):
    _, rollouts = short_run(tmp_path, task=str(EXAMPLES / "capitals.jsonl"), method="sdpo",
                            task_params={"reward_fn": f"{EXAMPLES / 'capital_reward.py'}:score"})
    assert {r["feedback"] for r in rollouts} <= {"Correct.", "Empty answer: reply with the name of the city.",
                                                 "Reply with the city name only, no explanation."} | {
        r["feedback"] for r in rollouts if r["feedback"].endswith("is not the capital.")}
