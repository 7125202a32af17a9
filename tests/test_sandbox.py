# Run: python -m pytest tests/test_sandbox.py -q
"""Hostile candidates against the sandbox, in every sandbox mode that works on this machine.

Each hostile candidate defines the function under test, tries to do harm, and returns the right answer
only if the harm worked: a passing verdict would mean an escape. Every case must end as a failed
verdict with a clear feedback line, leave the host unchanged, and leave the verifier usable.

`guard=False` runs switch off the in-process audit hook, so the kernel layers (namespaces, uid, rlimits)
are tested on their own in the modes that have them.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pmd.tasks import sandbox as sandbox_mod
from pmd.tasks import verify_many
from pmd.tasks.code import CodeTask, code_problem
from pmd.tasks.sandbox import Limits, Sandbox, mode_available

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox targets Linux")

ROW = {"task_id": "add/0", "entry_point": "add",
       "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-4, 4) == 0\n"}
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
MARKER = "pmd never imports this module"  # text of the sandbox runner's docstring, in its command line


def available(mode):
    """Whether `mode` works here. PMD_REQUIRE_SANDBOX=bwrap (CI sets it) makes a missing bwrap a failure, not a
    skip, so the hostile candidates are known to have met the strongest mode."""
    if mode in os.environ.get("PMD_REQUIRE_SANDBOX", "").split(","):
        assert mode_available(mode)[0], f"PMD_REQUIRE_SANDBOX={mode}, but {mode_available(mode)[1]}"
        return True
    return mode_available(mode)[0]


MODES = [pytest.param(m, marks=pytest.mark.skipif(not available(m), reason=f"{m}: {mode_available(m)[1]}"))
         for m in ("bwrap", "unshare", "rlimits")]


def make_task(mode, guard=True, timeout=2.0, **params):
    task = CodeTask("hostile", [code_problem(dict(ROW, _row=1), "test", "hostile")],
                    {"sandbox": mode, "timeout": timeout, "problem_split": "shared", "train_tests": "all", **params})
    task._sandbox = Sandbox(mode=mode, limits=task.limits, workers=2, guard=guard)
    return task


def verify(task, body):
    """Verify a candidate whose add(a, b) runs `body` (indented into the function)."""
    code = "import os, sys, time, signal, socket, shutil\n\ndef add(a, b):\n" + textwrap.indent(
        textwrap.dedent(body), "    ")
    problem = task.get_problem("add/0", "eval")
    return task.verify(problem, f"```python\n{code}\n```")


def kernel_layers(mode):
    """Can this mode stop the action without the guard? (rlimits as root without a uid drop cannot)."""
    if mode in ("bwrap", "unshare"):
        return True
    return os.geteuid() == 0 and sandbox_mod._uid_can_run_python()


def runner_processes():
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if MARKER.encode() in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def victim(tmp_path):
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-token")
    secret.chmod(0o600)
    return folder, secret


def assert_failed(verdict, *phrases):
    assert verdict.reward == 0.0, verdict
    assert not verdict.error, verdict
    text = verdict.feedback.lower()
    assert any(p.lower() in text for p in phrases), verdict.feedback


# --------------------------------------------------------------------------------------------- baseline
@pytest.mark.parametrize("mode", MODES)
def test_good_candidate_passes(mode):
    task = make_task(mode)
    assert task.verify(task.get_problem("add/0", "eval"), GOOD).reward == 1.0


# --------------------------------------------------------------------------------------------- hostile
@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop(mode, guard):
    t = time.monotonic()
    verdict = verify(make_task(mode, guard, timeout=1.0), "while True:\n    pass\nreturn a + b\n")
    assert_failed(verdict, "time limit exceeded")
    assert time.monotonic() - t < 10


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb(mode, guard):
    if not guard and not kernel_layers(mode):
        pytest.skip("rlimits mode as root cannot cap processes without the guard")
    before = runner_processes()
    verdict = verify(make_task(mode, guard), """
        children = 0
        while True:
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            children += 1
        return a + b
    """)
    assert_failed(verdict, "starting processes is not allowed", "resource temporarily unavailable",
                  "time limit", "crashed")
    time.sleep(0.3)
    assert runner_processes() <= before  # nothing left behind


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_memory_bomb(mode, guard):
    verdict = verify(make_task(mode, guard, memory_mb=256), """
        hog = []
        while True:
            hog.append(bytearray(50 * 1024 * 1024))
        return a + b
    """)
    assert_failed(verdict, "memoryerror", "memory")


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_huge_output(mode, guard):
    verdict = verify(make_task(mode, guard), "while True:\n    print('x' * 100000)\nreturn a + b\n")
    assert_failed(verdict, "output limit exceeded")


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_write_and_delete_outside(mode, guard, victim):
    if not guard and not kernel_layers(mode):
        pytest.skip("rlimits mode as root relies on the guard for files")
    folder, _ = victim
    verdict = verify(make_task(mode, guard), f"""
        done = 0
        for action in (lambda: open({str(folder / 'new.txt')!r}, 'w').write('x'),
                       lambda: os.remove({str(folder / 'keep.txt')!r}),
                       lambda: shutil.rmtree({str(folder)!r}),
                       lambda: open('/root/pmd-sandbox-escape', 'w').write('x'),
                       lambda: open('/usr/pmd-sandbox-escape', 'w').write('x')):
            try:
                action()
                done += 1
            except OSError:
                pass
        if done:
            return a + b
        return open({str(folder / 'keep.txt')!r}).read()
    """)
    assert_failed(verdict, "not allowed", "no such file", "permission denied", "read-only")
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert (folder / "keep.txt").read_text() == "precious"
    assert not Path("/root/pmd-sandbox-escape").exists() and not Path("/usr/pmd-sandbox-escape").exists()


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_read_home_and_secrets(mode, guard, victim, monkeypatch):
    if not guard and not kernel_layers(mode):
        pytest.skip("rlimits mode as root relies on the guard for files")
    _, secret = victim
    monkeypatch.setenv("PMD_TEST_SECRET", "env-s3cr3t")
    home = os.path.expanduser("~")
    # the interpreter may live in the home folder (pyenv): its own folder may be visible, nothing else
    private = sorted(set(os.listdir(home)) - {Path(sandbox_mod.interpreter()).relative_to(home).parts[0]}
                     if sandbox_mod.interpreter().startswith(home + "/") else set(os.listdir(home)))
    verdict = verify(make_task(mode, guard), f"""
        leaks = []
        if any('s3cr3t' in v for v in os.environ.values()):
            leaks.append('environment')
        for path in ({str(secret)!r}, {home + '/.bashrc'!r}, '/etc/shadow', '/proc/1/environ'):
            try:
                if open(path, errors='replace').read():
                    leaks.append(path)
            except OSError:
                pass
        try:
            if set(os.listdir({home!r})) & set({private!r}):
                leaks.append('home listing')
        except OSError:
            pass
        if leaks:
            return a + b
        raise RuntimeError('nothing readable')
    """)
    assert_failed(verdict, "nothing readable", "not allowed")


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_network(mode, guard):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        verdict = verify(make_task(mode, guard), f"""
            s = socket.create_connection(('127.0.0.1', {port}), timeout=1)
            s.sendall(b'hello')
            return a + b
        """)
        assert_failed(verdict, "network access is not allowed", "connection refused", "unreachable",
                      "permission")
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_kill_parent_and_others(mode, guard):
    if not guard and not kernel_layers(mode):
        pytest.skip("rlimits mode as root relies on the guard for signals")
    decoy = subprocess.Popen(["sleep", "30"])
    try:
        verdict = verify(make_task(mode, guard), f"""
            hits = 0
            for pid in (os.getppid(), {os.getpid()}, {decoy.pid}):
                try:
                    os.kill(pid, signal.SIGKILL)
                    hits += 1
                except OSError:
                    pass
            if hits:
                return a + b
            raise RuntimeError('no signal delivered')
        """)
        assert decoy.poll() is None  # the decoy (and this test process) survived
        assert verdict.reward == 0.0 and verdict.feedback
    finally:
        decoy.kill()
        decoy.wait()


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_background_child_is_killed(mode, guard):
    if not guard and not kernel_layers(mode):
        pytest.skip("rlimits mode as root relies on the guard for processes")
    before = runner_processes()
    verdict = verify(make_task(mode, guard), """
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
        return a + b + 1
    """)
    assert_failed(verdict, "wrong answer", "starting processes is not allowed")
    time.sleep(0.3)
    assert runner_processes() <= before


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_crash_interpreter(mode, guard):
    verdict = verify(make_task(mode, guard), "import faulthandler\nfaulthandler._sigsegv()\nreturn a + b\n")
    assert_failed(verdict, "crashed", "segmentation fault")


@pytest.mark.parametrize("mode", MODES)
def test_exit_early_is_not_success(mode):
    verdict = verify(make_task(mode), "os._exit(0)\n")
    assert_failed(verdict, "exited")


@pytest.mark.parametrize("mode", MODES)
def test_fake_equality_object_is_rejected(mode):
    verdict = verify(make_task(mode), "class Any:\n    def __eq__(self, other):\n        return True\nreturn Any()\n")
    assert_failed(verdict, "not a plain value")


# --------------------------------------------------------------------------------------------- the host
@pytest.mark.parametrize("mode", MODES)
def test_verifier_goes_on_after_hostile_batch(mode, tmp_path):
    """A batch mixing hostile and good candidates: verdicts in order, good ones pass, temp folders gone."""
    task = make_task(mode, timeout=1.0)
    problem = task.get_problem("add/0", "eval")
    hostile = ["```python\ndef add(a, b):\n    while True: pass\n```",
               "```python\ndef add(a, b):\n    print('y' * 10**7)\n    return a + b\n```",
               "```python\nimport faulthandler\nfaulthandler._sigsegv()\n```"]
    responses = [GOOD, *hostile, GOOD]
    before = {p.name for p in Path(sandbox_mod.tempfile.gettempdir()).glob("pmd-sandbox-*")}
    verdicts = verify_many(task, [problem] * len(responses), responses)
    assert [v.reward for v in verdicts] == [1.0, 0.0, 0.0, 0.0, 1.0]
    after = {p.name for p in Path(sandbox_mod.tempfile.gettempdir()).glob("pmd-sandbox-*")}
    assert after <= before
    assert task.verify(problem, GOOD).reward == 1.0


def test_limits_record_isolation():
    """The isolation record says what protected the run (mode, namespaces, uid)."""
    mode = sandbox_mod.resolve_mode("auto")
    box = Sandbox(mode=mode, limits=Limits(timeout=5))
    result = box.run({"kind": "function", "program": "def f():\n    return 1\n", "entry_point": "f",
                      "tests": [{"index": 1, "code": "assert candidate() == 1", "line": 1}]})
    info = result.first("isolation")
    assert result.status == "done" and info["mode"] == mode
    if os.geteuid() == 0 and mode != "rlimits":
        assert info["uid"] >= sandbox_mod._UID_BASE


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="sandbox mode"):
        Sandbox(mode="docker")


def test_env_var_selects_mode(monkeypatch):
    monkeypatch.setenv("PMD_SANDBOX", "rlimits")
    assert sandbox_mod.resolve_mode("auto") == "rlimits"
