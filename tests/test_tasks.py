# Run: python -m pytest tests/test_tasks.py -q
import json

import pytest

from pmd.tasks import (
    ANSWER_INSTRUCTION,
    DEFAULT_TASK,
    DEFAULT_TASK_PARAMS,
    NO_ANSWER_FEEDBACK,
    Problem,
    extract_answer,
    load_task,
)


@pytest.fixture(scope="module")
def task():
    return load_task(DEFAULT_TASK, DEFAULT_TASK_PARAMS, seed=0)


# A hand-made problem, so the reference answer is known not to appear in our wrong answers.
FIVE = Problem(id="chain_sum/test/0", question="What is 2 + 3?", answer="5", metadata={})


# --- extract_answer -------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Answer: 15", "15"),
        ("answer:15", "15"),
        ("Let me think.\n2 + 13 = 15\nAnswer: 15.", "15"),
        ("**Answer:** 15", "15"),
        ("**Answer**: **15**", "15"),
        ("Final answer: `15`!", "15"),
        ("Answer:\n\n15", "15"),
        ("The answer is 15.", "15"),
        ("So the final answer is: -7", "-7"),
        ("Answer: \u22123", "-3"),  # unicode minus
        ("Final Answer: 1,234", "1234"),
        ("Answer: 12.0", "12.0"),
        ("We get $\\boxed{42}$.", "42"),
        ("<answer> 12 </answer>", "12"),
        ("Answer: 7 + 8 = 15", "15"),
        ("The answer is 15 because 10 + 5 = 15", "15"),
        ("Answer: 15 apples", "15"),
        # The last marker wins, whatever its kind.
        ("Answer: 3\nWait, no.\nAnswer: 5", "5"),
        ("<answer>3</answer> hmm, \\boxed{4}. The answer is 5.", "5"),
        ("\\boxed{4} or rather <answer>6</answer>", "6"),
        # A marker beats a later stray number.
        ("Answer: 12\nCheck: 99 is too big.", "12"),
        # No marker: the last number in the text.
        ("5 - 9 = -4", "-4"),
        ("The final answer to the given arithmetic problem is 101.", "101"),
        ("It comes to 1,234,567 in total.", "1234567"),
        ("pi is about 3.14", "3.14"),
        ("Maybe 3, maybe 4, I'd go with 10.", "10"),
        # A marker with no number in it is skipped.
        ("Answer: I am not sure, 8 perhaps", "8"),
        ("\\boxed{12", "12"),  # cut off mid-box
    ],
)
def test_extract_numeric(response, expected):
    assert extract_answer(response, numeric=True) == expected


@pytest.mark.parametrize("response", ["", "   ", "I don't know.", "Answer:", "Answer: none"])
def test_extract_numeric_nothing(response):
    assert extract_answer(response, numeric=True) is None


@pytest.mark.parametrize(
    "response, expected",
    [
        ("Answer: Paris.", "Paris"),
        ("**Answer:** *olleh*", "olleh"),
        ("The answer is yes.", "yes"),
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("<answer>\nA B C\n</answer>", "A B C"),
        ("Answer: no\nActually, the answer is yes", "yes"),
    ],
)
def test_extract_text(response, expected):
    assert extract_answer(response, numeric=False) == expected


def test_extract_text_has_no_number_fallback():
    assert extract_answer("I think it is 42", numeric=False) is None


# --- verify ---------------------------------------------------------------


def test_verify_correct(task):
    verdict = task.verify(FIVE, "Let me compute: 2 + 3 = 5.\nAnswer: **5**.")
    assert (verdict.reward, verdict.feedback, verdict.extracted) == (1.0, "Correct.", "5")


def test_verify_correct_on_real_problems(task):
    for problem in task.problems("train", 20):
        verdict = task.verify(problem, f"Sure!\nAnswer: {problem.answer}")
        assert verdict.reward == 1.0, problem


def test_verify_wrong_does_not_reveal_answer(task):
    verdict = task.verify(FIVE, "2 + 3 = 7\nAnswer: 7")
    assert verdict.reward == 0.0
    assert verdict.extracted == "7"
    assert verdict.feedback == "The answer 7 is incorrect."
    assert "5" not in verdict.feedback


def test_verify_number_fallback(task):
    verdict = task.verify(FIVE, "2 + 3 = 5")
    assert verdict.reward == 1.0 and verdict.extracted == "5"


@pytest.mark.parametrize("response", ["", "I have no idea.", "???", "Answer:"])
def test_verify_no_answer(task, response):
    verdict = task.verify(FIVE, response)
    assert verdict.reward == 0.0
    assert verdict.extracted is None
    assert verdict.feedback == NO_ANSWER_FEEDBACK


def test_verify_text_task():
    task = load_task("spell_backward", seed=0)
    problem = task.problems("train", 1)[0]
    assert task.verify(problem, f"Answer: **{problem.answer}**.").reward == 1.0
    wrong = task.verify(problem, "Answer: zzzzqqqq")
    assert wrong.reward < 1.0 and problem.answer not in wrong.feedback


# --- splits ---------------------------------------------------------------


def test_same_seed_same_problems(task):
    again = load_task(DEFAULT_TASK, DEFAULT_TASK_PARAMS, seed=0)
    for split in ("train", "eval"):
        assert task.problems(split, 30) == again.problems(split, 30)


def test_train_and_eval_disjoint_by_question(task):
    train = task.problems("train", 2000)
    held_out = task.problems("eval", 200)
    assert not {p.question for p in train} & {p.question for p in held_out}


def test_ids_distinct(task):
    problems = task.problems("train", 300) + task.problems("eval", 100)
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.id.startswith(f"{DEFAULT_TASK}/") for p in problems)


def test_prefix_stable(task):
    for split in ("train", "eval"):
        assert task.problems(split, 50)[:10] == task.problems(split, 10)


def test_default_task_without_params_uses_pmds_defaults(task):
    bare = load_task(DEFAULT_TASK, {}, seed=0)
    assert bare.params == DEFAULT_TASK_PARAMS and bare.problems("train", 20) == task.problems("train", 20)
    # Given parameters are used as they are, never merged with pmd's defaults.
    assert load_task(DEFAULT_TASK, {"max_digits": 2}, seed=0).params == {"max_digits": 2}


def test_different_seeds_differ():
    a = load_task(DEFAULT_TASK, DEFAULT_TASK_PARAMS, seed=0).problems("train", 50)
    b = load_task(DEFAULT_TASK, DEFAULT_TASK_PARAMS, seed=1).problems("train", 50)
    assert [p.question for p in a] != [p.question for p in b]


def test_metadata_is_json_serialisable(task):
    for problem in task.problems("train", 5):
        json.dumps(problem.metadata)


def test_bad_split(task):
    with pytest.raises(ValueError, match="split"):
        task.problems("test", 5)


# --- errors ---------------------------------------------------------------


def test_unknown_task_name():
    with pytest.raises(ValueError, match="chain_summ") as error:
        load_task("chain_summ")
    assert "'chain_sum'" in str(error.value)  # the suggestion


def test_unknown_parameter():
    with pytest.raises(ValueError, match="max_digit'") as error:
        load_task("chain_sum", {"max_digit": 2})
    assert "max_digits" in str(error.value)  # suggestion / valid list


def test_reserved_parameter():
    with pytest.raises(ValueError, match="seed"):
        load_task("chain_sum", {"seed": 3})


def test_invalid_parameter_value():
    with pytest.raises(ValueError, match="chain_sum"):
        load_task("chain_sum", {"min_digits": 3, "max_digits": 2})


# --- prompt ---------------------------------------------------------------


def test_messages_single_user_turn(task):
    problem = task.problems("eval", 1)[0]
    messages = task.messages(problem)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    assert problem.question in messages[0]["content"]
    assert ANSWER_INSTRUCTION in messages[0]["content"]
