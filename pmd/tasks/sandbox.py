"""Run model-written code safely: one sandboxed process per candidate, in parallel up to a limit.

What a candidate gets (details, guarantees and non-guarantees: docs/sandbox.md):
  - its own process (in its own session and process group), started from an empty temporary work
    folder, with a scrubbed environment (HOME and TMPDIR point at the work folder) and stdin empty;
  - kernel resource limits: CPU seconds, address space, file size, open files, processes, no core
    dumps; a wall-clock timeout after which the whole process group is killed; stdout + stderr capped
    (exceeding the cap kills the run: "output limit exceeded");
  - isolation, the strongest available of three modes (`mode="auto"`; override with the `sandbox`
    task parameter or the PMD_SANDBOX environment variable):
      bwrap    bubblewrap (Debian package `bubblewrap`): new mount/pid/net/ipc/uts namespaces, a root
               holding only read-only system folders and the interpreter, the work folder writable;
      unshare  the same layout built by pmd itself with unshare(2), mount(2) and chroot(2)
               (root, or any user where unprivileged user namespaces are enabled);
      rlimits  no filesystem or pid isolation: limits, the scrubbed process, a private network
               namespace when the kernel allows one, and the in-process guard;
    when pmd runs as root, the candidate runs as an unprivileged per-slot uid (so the process limit
    applies, root-only files stay closed and the parent cannot be signalled);
  - an in-process guard (a Python audit hook) that refuses network, subprocesses, signals to other
    processes, ctypes, and file access outside the work folder with a clear PermissionError.

The program that runs inside is `pmd/tasks/sandbox_runner.py`; it reports one JSON record per event on a
private pipe, and `RunResult` holds them.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODES = ("bwrap", "unshare", "rlimits")
_RUNNER_SOURCE = (Path(__file__).with_name("sandbox_runner.py")).read_text()
# Unprivileged uids for candidates when pmd runs as root: far above any real account, one per slot
# and per pmd process, so that limits and clean-up of one candidate never touch another.
_UID_BASE = 2_000_000_000
_SLOTS = 64
_STARTUP_GRACE = 3.0  # wall seconds allowed for interpreter start-up on a loaded machine


@dataclass(frozen=True)
class Limits:
    """Per-candidate limits. `timeout` covers loading the program and running all its tests."""

    timeout: float = 5.0  # seconds of wall clock inside the sandbox
    cpu_seconds: float = 0.0  # 0: timeout + 1
    memory_mb: int = 1024  # address space
    file_size_mb: int = 16  # largest file the candidate may write
    processes: int = 16  # processes + threads of the sandbox uid (enforced when not root)
    open_files: int = 64
    output_kb: int = 1024  # stdout + stderr of the process, and captured program output per test

    def resolved(self) -> dict:
        d = asdict(self)
        d["cpu_seconds"] = self.cpu_seconds or self.timeout + 1
        return d


@dataclass
class RunResult:
    """What happened to one candidate. `status`: done | timeout | output_limit | crashed | exited | error."""

    status: str
    records: list[dict] = field(default_factory=list)
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    mode: str = ""
    detail: str = ""

    def first(self, ev: str) -> dict | None:
        return next((r for r in self.records if r.get("ev") == ev), None)

    @property
    def results(self) -> list[dict]:
        return [r for r in self.records if r.get("ev") == "result"]

    @property
    def running_test(self) -> int | None:
        """The test that had begun but not finished when the run ended."""
        begun = [r["test"] for r in self.records if r.get("ev") == "begin"]
        ended = {r.get("test") for r in self.results}
        open_tests = [t for t in begun if t not in ended]
        return open_tests[-1] if open_tests else None


# --------------------------------------------------------------------------------------------- detection
_detect_lock = threading.Lock()
_mode_ok: dict[str, tuple[bool, str]] = {}


def interpreter() -> str:
    return os.path.realpath(sys.executable)


def python_paths(site_packages: bool = False) -> list[str]:
    """Folders the sandboxed interpreter needs (read-only)."""
    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
             os.path.dirname(interpreter())}
    if site_packages:
        import site

        paths.add(os.path.realpath(sys.prefix))
        paths.update(os.path.realpath(p) for p in site.getsitepackages() if os.path.isdir(p))
    out = sorted(paths)
    return [p for p in out if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in out)]


SYSTEM_PATHS = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache",
                "/etc/localtime"]


def mode_available(mode: str) -> tuple[bool, str]:
    """(works, reason) for a sandbox mode on this machine, probed once per process with a real job."""
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}; valid: auto, {', '.join(MODES)}")
    with _detect_lock:
        if mode not in _mode_ok:
            _mode_ok[mode] = _probe(mode)
        return _mode_ok[mode]


def _probe(mode: str) -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return (mode == "rlimits" and os.name == "posix"), "namespaces need Linux"
    if mode == "bwrap" and not shutil.which("bwrap"):
        return False, "bwrap not found (Debian/Ubuntu: apt-get install bubblewrap)"
    box = Sandbox(mode=mode, limits=Limits(timeout=10), workers=1, _probing=True)
    job = {"kind": "function", "program": "def f():\n    return 41 + 1\n", "entry_point": "f",
           "tests": [{"index": 1, "code": "assert candidate() == 42", "line": 1,
                      "eq": {"actual": "candidate()", "expected": "42"}}]}
    try:
        result = box.run(job)
    except Exception as error:  # noqa: BLE001
        return False, f"{type(error).__name__}: {error}"
    done = result.first("done")
    if result.status == "done" and done and done["passed"] == 1:
        info = result.first("isolation") or {}
        if mode in ("bwrap", "unshare") and os.geteuid() == 0 and "uid" not in info:
            return False, "could not drop to an unprivileged uid"
        return True, "ok"
    fatal = result.first("fatal")
    reason = fatal["error"] if fatal else (result.detail or result.stderr.strip()[-300:] or result.status)
    return False, reason


def resolve_mode(requested: str = "auto") -> str:
    """The mode to use: `requested`, or for "auto" (or PMD_SANDBOX) the first that works of bwrap,
    unshare, rlimits."""
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        requested = os.environ.get("PMD_SANDBOX", "auto").strip().lower() or "auto"
    if requested == "auto":
        for mode in MODES:
            if mode_available(mode)[0]:
                return mode
        raise RuntimeError("no sandbox mode works here: " + "; ".join(
            f"{m}: {mode_available(m)[1]}" for m in MODES))
    ok, reason = mode_available(requested)
    if not ok:
        raise ValueError(f"sandbox mode {requested!r} does not work here: {reason}")
    return requested


def describe() -> dict:
    """Which modes work here and which one "auto" picks (printed by benchmarks/sandbox.py)."""
    modes = {m: mode_available(m) for m in MODES}
    chosen = next((m for m in MODES if modes[m][0]), None)
    return {"auto": chosen, "root": os.geteuid() == 0,
            "modes": {m: ("ok" if ok else f"unavailable: {why}") for m, (ok, why) in modes.items()}}


_uid_python_ok: bool | None = None


def _uid_can_run_python() -> bool:
    """rlimits mode as root: can an unprivileged uid start this interpreter (e.g. not under /root)?"""
    global _uid_python_ok
    if _uid_python_ok is None:
        try:
            done = subprocess.run([interpreter(), "-I", "-S", "-c", "pass"], user=_UID_BASE - 1,
                                  group=_UID_BASE - 1, extra_groups=[], cwd="/", env={},
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            _uid_python_ok = done.returncode == 0
        except (OSError, subprocess.SubprocessError):
            _uid_python_ok = False
    return _uid_python_ok


# --------------------------------------------------------------------------------------------- slots
_slot_lock = threading.Lock()
_free_slots: list[int] = list(range(_SLOTS))
_slot_cond = threading.Condition(_slot_lock)


def _take_slot() -> int:
    with _slot_cond:
        while not _free_slots:
            _slot_cond.wait()
        return _free_slots.pop()


def _give_slot(slot: int) -> None:
    with _slot_cond:
        _free_slots.append(slot)
        _slot_cond.notify()


def slot_uid(slot: int) -> int:
    return _UID_BASE + (os.getpid() % 1_000_000) * _SLOTS + slot


# --------------------------------------------------------------------------------------------- the sandbox
class Sandbox:
    """Runs jobs (see `pmd/tasks/sandbox_runner.py` for the job format) one process each."""

    def __init__(self, mode: str = "auto", limits: Limits | None = None, workers: int = 2, guard: bool = True,
                 site_packages: bool = False, _probing: bool = False):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.mode = mode if _probing else resolve_mode(mode)
        self.limits = limits or Limits()
        self.workers = min(workers, _SLOTS)
        self.guard = guard
        self.site_packages = site_packages
        self._pool: ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------------------------------- public
    def run_many(self, jobs: list[dict]) -> list[RunResult]:
        """Run jobs in parallel, at most `workers` at a time; results in job order."""
        if len(jobs) <= 1 or self.workers == 1:
            return [self.run(j) for j in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="pmd-sandbox")
        return list(self._pool.map(self.run, jobs))

    def run(self, job: dict, limits: Limits | None = None) -> RunResult:
        limits = limits or self.limits
        slot = _take_slot()
        base = tempfile.mkdtemp(prefix="pmd-sandbox-")
        try:
            return self._run(job, limits, slot, base)
        finally:
            _remove_tree(base)
            _give_slot(slot)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---------------------------------------------------------------------------------------- internals
    def _drop_uid(self) -> bool:
        if os.geteuid() != 0:
            return False
        return self.mode in ("bwrap", "unshare") or _uid_can_run_python()

    def _run(self, job: dict, limits: Limits, slot: int, base: str) -> RunResult:
        work = os.path.join(base, "work")
        newroot = os.path.join(base, "root")
        os.mkdir(work, 0o700)
        os.mkdir(newroot, 0o700)
        os.chmod(base, 0o711)  # the sandbox uid must reach work/ (nothing else in here)
        uid = slot_uid(slot) if self._drop_uid() else None
        if uid is not None:
            os.chown(work, uid, uid)
        keep = python_paths(self.site_packages)
        full = {
            "stop_on_failure": True, **job,
            "limits": limits.resolved(), "isolation": self.mode, "guard": job.get("guard", self.guard),
            "workdir": work, "newroot": newroot, "ro_paths": SYSTEM_PATHS + keep,
            "read_roots": ["/usr", "/lib", "/lib64", "/bin", "/etc/localtime"] + keep,
            "uid": uid, "gid": uid,
        }
        if self.site_packages:  # importable without running their .pth files (the interpreter has -S)
            import site

            full["sys_path"] = [p for p in site.getsitepackages() if os.path.isdir(p)]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        argv = [interpreter(), "-I", "-S", "-c", _RUNNER_SOURCE]
        if self.mode == "bwrap":
            argv = self._bwrap_argv(work, keep, env) + argv
        read_fd, write_fd = os.pipe()
        full["result_fd"] = write_fd  # pass_fds keeps the number in the child
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work, env=env,
                start_new_session=True, close_fds=True, pass_fds=(write_fd,))
        except OSError as error:
            os.close(read_fd)
            os.close(write_fd)
            return RunResult(status="error", mode=self.mode, detail=f"could not start the sandbox: {error}")
        os.close(write_fd)
        result = self._communicate(proc, json.dumps(full).encode(), read_fd, limits, start)
        if uid is not None and self.mode == "rlimits":
            _kill_uid(uid)  # background processes that left the process group
        return result

    def _bwrap_argv(self, work: str, keep: list[str], env: dict) -> list[str]:
        argv = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv"]
        if os.geteuid() == 0:  # privileged bwrap: the runner drops to the slot uid itself
            argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        made: set[str] = {"/tmp", "/dev", "/proc"}

        def parents(path: str) -> list[str]:
            out = []
            parent = os.path.dirname(path)
            while parent not in ("/", "") and parent not in made:
                out.append(parent)
                made.add(parent)
                parent = os.path.dirname(parent)
            return [a for p in reversed(out) for a in ("--perms", "0755", "--dir", p)]

        for path in SYSTEM_PATHS + keep:
            if os.path.islink(path):
                argv += parents(path) + ["--symlink", os.readlink(path), path]
            elif os.path.exists(path):
                argv += parents(path) + ["--ro-bind", path, path]
            made.add(path)
        argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        argv += parents(work) + ["--bind", work, work, "--chdir", work]
        for k, v in env.items():
            argv += ["--setenv", k, v]
        return argv

    def _communicate(self, proc: subprocess.Popen, job_bytes: bytes, read_fd: int, limits: Limits,
                     start: float) -> RunResult:
        deadline = start + limits.timeout + _STARTUP_GRACE + 0.2 * limits.timeout
        cap = limits.output_kb * 1024
        keep_bytes = 4096
        out = {"stdout": bytearray(), "stderr": bytearray()}
        seen = {"stdout": 0, "stderr": 0}
        records_buf = bytearray()
        status = ""
        try:
            proc.stdin.write(job_bytes)
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        sel = selectors.DefaultSelector()
        os.set_blocking(read_fd, False)
        sel.register(read_fd, selectors.EVENT_READ, "records")
        for name in ("stdout", "stderr"):
            stream = getattr(proc, name)
            os.set_blocking(stream.fileno(), False)
            sel.register(stream.fileno(), selectors.EVENT_READ, name)
        exited_at = None
        try:
            while sel.get_map():
                now = time.monotonic()
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > 0.5:
                    break  # the process is gone; what is still open belongs to leftovers
                if exited_at is None and now > deadline:
                    status = "timeout"
                    break
                for key, _ in sel.select(timeout=0.05):
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    if key.data == "records":
                        if len(records_buf) < 4 * 1024 * 1024:
                            records_buf += chunk
                        continue
                    seen[key.data] += len(chunk)
                    buf = out[key.data]
                    if len(buf) < keep_bytes:
                        buf += chunk[:keep_bytes - len(buf)]
                if not status and seen["stdout"] + seen["stderr"] > cap:
                    status = "output_limit"
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = time.monotonic()
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.wait()
            sel.close()
            os.close(read_fd)
            proc.stdout.close()
            proc.stderr.close()
        records = _parse_records(bytes(records_buf))
        rc = proc.returncode
        result = RunResult(status=status, records=records, seconds=time.monotonic() - start, mode=self.mode,
                           stdout=out["stdout"].decode("utf-8", "replace"),
                           stderr=out["stderr"].decode("utf-8", "replace"))
        exit_rec = next((r for r in records if r.get("ev") == "exit"), None)
        if exit_rec is not None:  # the supervisor saw the worker end: exact code or signal
            result.exit_code, result.signal = exit_rec.get("code"), exit_rec.get("signal")
            worker = exit_rec.get("worker")
            result.records = [r for r in records if r.get("pid") in (worker, exit_rec.get("pid"))
                              or r.get("ev") in ("fatal",)]
        elif rc is not None and rc < 0:
            result.signal = -rc
        elif rc is not None and rc > 128 and self.mode != "rlimits":
            result.signal = rc - 128
        else:
            result.exit_code = rc
        if not result.status:
            if any(r.get("ev") == "done" for r in result.records):
                result.status = "done"
            elif result.signal is not None:
                result.status = "crashed"
            elif any(r.get("ev") == "fatal" for r in result.records):
                result.status = "error"
                result.detail = next(r["error"] for r in result.records if r.get("ev") == "fatal")
            else:
                result.status = "exited"
        return result


def _parse_records(data: bytes) -> list[dict]:
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _kill_uid(uid: int) -> None:
    """Kill every process of a sandbox uid (kill(-1) as that uid reaches exactly its own processes)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        except BaseException:  # noqa: BLE001
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def _remove_tree(path: str) -> None:
    def fix(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


def signal_name(number: int | None) -> str:
    try:
        return signal.Signals(number).name
    except (ValueError, TypeError):
        return f"signal {number}"
