"""The trusted program that runs *inside* the sandbox: isolate, limit, then run one candidate's tests.

pmd never imports this module. `pmd.tasks.sandbox` reads its source and starts it as
``python -I -S -c <source>``, writes one job (JSON) to its stdin and reads JSON-line records from a
pipe whose number is in the job. Standard library only.

Order of events (each step before any model-written code runs):
  1. read the whole job from stdin;
  2. isolation="unshare": new mount/pid/net/ipc/uts namespaces (plus a user namespace when not
     root), hide home and temp folders behind empty read-only tmpfs, make every other mount
     read-only except the work folder; then fork a pid-1 child that mounts a fresh /proc;
  3. fork the worker (so that the candidate is never pid 1 and a supervisor reports its exit);
  4. worker: resource limits, drop to the sandbox uid when started as root, stdin from /dev/null,
     the in-process guard (an audit hook), then the tests. The supervisor waits and writes an
     ``exit`` record with the worker's exit code or signal.

Records: {"ev": "isolation"|"load_error"|"begin"|"result"|"done"|"exit"|"fatal", ...}.
"""

import ast
import ctypes
import io
import json
import linecache
import math
import os
import resource
import signal
import sys
import time
import traceback

PROGRAM_FILE = "solution.py"
TESTS_FILE = "tests.py"
FIELD = 250  # characters kept per reported field (SDPO cuts feedback fields at 250)

_out_fd = -1


def emit(record):
    record["pid"] = os.getpid()
    data = (json.dumps(record) + "\n").encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(_out_fd, data):]
    except OSError:
        pass


def cut(text, limit=FIELD):
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value):
    try:
        return cut(repr(value))
    except BaseException as error:  # a hostile __repr__
        return f"<unprintable {type(value).__name__}: {type(error).__name__}>"


# --------------------------------------------------------------------------------------------- isolation
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24


class _Libc:
    def __init__(self):
        self.lib = ctypes.CDLL(None, use_errno=True)

    def _check(self, result, what):
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def unshare(self, flags):
        self._check(self.lib.unshare(flags), "unshare")

    def mount(self, source, target, fstype, flags, data=None):
        enc = (lambda s: None if s is None else s.encode())
        self._check(self.lib.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
                    f"mount {target}")


def _mount_flags(path):
    """MS_* flags a read-only remount of a bind of `path` must keep (locked flags in a user namespace)."""
    f = os.statvfs(path).f_flag
    flags = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            flags |= ms
    return flags


def isolate_namespaces(job):
    """Build a bubblewrap-like sandbox with plain system calls; returns in the new pid namespace's pid 1
    (the original process stays outside, waits for it and exits like it).

    New mount, pid, network, ipc and uts namespaces (plus a user namespace when not root). The new root
    is an empty tmpfs holding read-only binds of the allowed paths (system libraries, the interpreter),
    four device nodes and the work folder (read-write); everything else of the host is absent.
    """
    libc = _Libc()
    root = os.getuid() == 0
    uid, gid = os.getuid(), os.getgid()
    work, new = job["workdir"], job["newroot"]
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    libc.unshare(flags if root else flags | CLONE_NEWUSER)
    if not root:  # map only ourselves; setgroups must be denied before an unprivileged gid_map
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    libc.mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    readonly = []

    def bind(path, writable=False):
        target = new + path
        if os.path.isdir(path):
            os.makedirs(target, 0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            open(target, "a").close()
        libc.mount(path, target, None, MS_BIND | MS_REC)
        if not writable:
            readonly.append((target, _mount_flags(path)))

    for path in job["ro_paths"]:
        if os.path.islink(path):
            os.makedirs(os.path.dirname(new + path), 0o755, exist_ok=True)
            os.symlink(os.readlink(path), new + path)
        elif os.path.exists(path):
            bind(path)
    for device in ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"):
        bind(device, writable=True)  # writing to a device node works on a read-only mount anyway
    bind(work, writable=True)
    for folder in ("/proc", "/tmp"):
        os.makedirs(new + folder, 0o755, exist_ok=True)
    for target, extra in readonly:
        libc.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | extra)
    libc.mount(None, new, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(new)
    if libc.lib.chroot(b".") != 0:
        raise OSError(ctypes.get_errno(), "chroot failed")
    os.chdir("/")
    pid = os.fork()
    if pid:  # the original process: wait for the namespace's pid 1 and exit like it
        _, status = os.waitpid(pid, 0)
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    try:  # pid 1 of the new pid namespace: a /proc that shows only this namespace
        libc.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        fresh_proc = True
    except OSError:
        fresh_proc = False
    return {"namespaces": True, "user_namespace": not root, "fresh_proc": fresh_proc}


def isolate_network():
    """rlimits mode: a private network namespace when the kernel allows it (best effort)."""
    libc = _Libc()
    try:
        if os.getuid() == 0:
            libc.unshare(CLONE_NEWNET)
            return {"network_namespace": True}
        uid, gid = os.getuid(), os.getgid()
        libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        return {"network_namespace": True, "user_namespace": True}
    except OSError as error:
        return {"network_namespace": False, "network_error": str(error)}


def drop_capabilities():
    """Clear every capability (they are kept inside a user namespace we created) and forbid regaining any."""
    libc = ctypes.CDLL(None, use_errno=True)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def set_limits(limits):
    def cap(which, value):
        value = int(value)
        try:
            soft, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass

    cpu = int(math.ceil(limits["cpu_seconds"]))
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
    except (ValueError, OSError):
        pass
    cap(resource.RLIMIT_AS, limits["memory_mb"] * 1024 * 1024)
    cap(resource.RLIMIT_FSIZE, limits["file_size_mb"] * 1024 * 1024)
    cap(resource.RLIMIT_NOFILE, limits["open_files"])
    cap(resource.RLIMIT_NPROC, limits["processes"])
    cap(resource.RLIMIT_CORE, 0)


def drop_privileges(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("could not drop privileges")


# --------------------------------------------------------------------------------------------- the guard
def install_guard(workdir, read_roots):
    """An audit hook that refuses, inside this interpreter, what the kernel layers may not stop.

    Not a security boundary on its own (C extensions or interpreter bugs can get around it); it
    turns common hostile or careless actions into a clear PermissionError.
    """
    realpath, abspath, fspath = os.path.realpath, os.path.abspath, os.fspath
    work = realpath(workdir)
    reads = tuple(realpath(r) for r in read_roots) + (work,)
    devices = frozenset({"/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"})
    own_pid = os.getpid()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked_modules = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess",
                                 "_xxsubinterpreters", "_testcapi", "_testinternalcapi"})
    process_events = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                                "os.fork", "os.forkpty", "os.startfile", "pty.spawn"})
    network_events = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                                "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
                                "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo"})
    write_events = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.truncate": (0,),
                    "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,),
                    "os.mkdir": (0,), "os.utime": (0,), "shutil.rmtree": (0,), "os.chflags": (0,),
                    "os.lchflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,)}
    inspect_events = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents"})
    busy = [False]

    def where(path):
        if isinstance(path, int) or path is None:
            return None
        try:
            path = fspath(path)
            if isinstance(path, bytes):
                path = path.decode("utf-8", "replace")
            return realpath(abspath(path))
        except Exception:
            return "?"

    def inside(path, roots):
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event, args):
        if busy[0]:
            return
        busy[0] = True
        try:
            if event == "open":
                path = where(args[0])
                if path is None or path in devices:
                    return
                mode, flags = args[1], args[2] if len(args) > 2 else 0
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(
                    isinstance(flags, int) and flags & write_flags)
                if writing and not inside(path, (work,)):
                    deny(f"writing outside the sandbox folder ({cut(path, 80)})")
                if not writing and not inside(path, reads):
                    deny(f"reading {cut(path, 80)}")
            elif event in ("os.listdir", "os.scandir"):
                path = where(args[0] if args else ".")
                if path is not None and not inside(path, reads):
                    deny(f"listing {cut(path, 80)}")
            elif event in write_events:
                for i in write_events[event]:
                    path = where(args[i]) if i < len(args) else None
                    if path is not None and not inside(path, (work,)):
                        deny(f"changing files outside the sandbox folder ({cut(path, 80)})")
            elif event in network_events:
                deny("network access")
            elif event in process_events:
                deny("starting processes")
            elif event == "os.kill":
                if args[0] != own_pid:
                    deny("sending signals to other processes")
            elif event == "os.killpg":
                deny("sending signals to other processes")
            elif event == "import":
                if args[0] in blocked_modules:
                    deny(f"importing {args[0]}")
            elif event in inspect_events:
                deny(event)
        finally:
            busy[0] = False

    sys.addaudithook(hook)


# --------------------------------------------------------------------------------------------- running
class TimeLimit(BaseException):
    """Raised by the timer inside a test; a BaseException so `except Exception` in candidates misses it."""


class OutputLimit(Exception):
    pass


class CappedBytes(io.RawIOBase):
    def __init__(self, limit):
        self.buffer, self.limit = bytearray(), limit

    def writable(self):
        return True

    def write(self, b):
        if len(self.buffer) + len(b) > self.limit:
            raise OutputLimit(f"output limit exceeded ({self.limit // 1024} KiB)")
        self.buffer += b
        return len(b)


def format_error(error):
    """A trimmed traceback: only frames of the candidate's own code, then the exception."""
    if isinstance(error, SyntaxError) and error.filename == PROGRAM_FILE:
        return cut("".join(traceback.format_exception_only(type(error), error)).strip(), 600)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == PROGRAM_FILE]
    lines = ["Traceback (most recent call last):\n"] + traceback.format_list(frames[-4:]) if frames else []
    lines += traceback.format_exception_only(type(error), error)
    text = "".join(lines).strip()
    if len(text) > 800:
        text = "..." + text[-797:]
    return text


def plain(value, depth=0):
    """True for values built only from builtin types (a candidate cannot fake equality with them)."""
    if depth > 50:
        return False
    t = type(value)
    if t in (int, float, bool, str, bytes, complex, type(None)):
        return True
    if t in (list, tuple, set, frozenset):
        return all(plain(v, depth + 1) for v in value)
    if t is dict:
        return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in value.items())
    return False


def recording(fn, name, last):
    """Wrap the candidate so that a failing test can show the concrete input of the last call."""

    def candidate(*args, **kwargs):
        shown = ", ".join([short_repr(a) for a in args] + [f"{k}={short_repr(v)}" for k, v in kwargs.items()])
        last.clear()
        last["input"] = cut(f"{name}({shown})")
        result = fn(*args, **kwargs)
        last["got"] = short_repr(result)
        return result

    return candidate


def failing_line(error):
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == TESTS_FILE]
    return lines[-1] if lines else None


def run_function_tests(job, ns, deadline, last):
    """HumanEval/MBPP-style tests: statements evaluated in the candidate's namespace."""
    tests = job["tests"]
    total = sum(1 for t in tests if not t.get("setup"))
    passed = 0
    for test in tests:
        k = test.get("index")
        if not test.get("setup"):
            emit({"ev": "begin", "test": k})
        last.clear()
        record = {"ev": "result", "test": k, "check": test.get("shown_check")}
        ok = True
        try:
            arm_timer(deadline)
            if test.get("eq"):
                actual = eval(compile(test["eq"]["actual"], TESTS_FILE, "eval"), ns)
                expected = eval(compile(test["eq"]["expected"], TESTS_FILE, "eval"), ns)
                ok = plain(actual) and expected == actual
                if not ok:
                    record.update(status="fail", expected=short_repr(expected), got=short_repr(actual))
                    if not plain(actual):
                        record["note"] = f"returned a {type(actual).__name__} object, not a plain value"
            else:
                tree = ast.parse(test["code"])
                ast.increment_lineno(tree, test.get("line", 1) - 1)
                exec(compile(tree, TESTS_FILE, "exec"), ns)
        except AssertionError as error:
            ok = False
            record["status"] = "fail"
            spot = (test.get("asserts") or {}).get(str(failing_line(error)))
            if spot:
                record["check"] = spot.get("check")
                if spot.get("expected"):
                    try:
                        arm_timer(deadline)
                        record["expected"] = short_repr(eval(compile(spot["expected"], TESTS_FILE, "eval"), ns))
                    except BaseException:  # noqa: BLE001 - only for display
                        pass
            if "got" in last:
                record["got"] = last["got"]
        except TimeLimit:
            emit({"ev": "result", "test": k, "status": "timeout", "input": last.get("input")})
            return passed, total, False
        except BaseException as error:  # noqa: BLE001 - any error of the candidate is a result
            ok = False
            record.update(status="error", error=format_error(error))
        finally:
            disarm_timer()
        record["input"] = last.get("input")
        if test.get("setup"):
            if not ok:  # a setup statement failed: report it against the next test
                record.update(test=None, setup=True)
                emit(record)
                return passed, total, False
            continue
        if ok:
            passed += 1
            emit({"ev": "result", "test": k, "status": "pass"})
        else:
            emit(record)
            if job["stop_on_failure"]:
                return passed, total, False
    return passed, total, True


def outputs_match(got, expected):
    """Judge comparison: line by line, trailing whitespace ignored, numbers within 1e-6."""
    g = [line.rstrip() for line in got.strip().splitlines()]
    e = [line.rstrip() for line in expected.strip().splitlines()]
    if g == e:
        return True
    if len(g) != len(e):
        return False
    for a, b in zip(g, e):
        ta, tb = a.split(), b.split()
        if len(ta) != len(tb):
            return False
        for x, y in zip(ta, tb):
            if x == y:
                continue
            try:
                if not math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-6):
                    return False
            except ValueError:
                return False
    return True


def run_stdio_tests(job, code, deadline):
    """Competitive-programming tests: run the whole program per test with the input on stdin."""
    tests = job["tests"]
    passed = 0
    limit = job["limits"]["output_kb"] * 1024
    for k, test in enumerate(tests, 1):
        emit({"ev": "begin", "test": k})
        path = os.path.join(job["workdir"], f".stdin-{k}")
        with open(path, "w") as f:
            f.write(test["input"])
        fd = os.open(path, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
        sink = CappedBytes(limit)
        real_stdin, real_stdout = sys.stdin, sys.stdout
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(sink), encoding="utf-8", write_through=True)
        shown = cut(test["input"])
        record = {"ev": "result", "test": k, "input": shown}
        try:
            arm_timer(deadline)
            try:
                exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
            except SystemExit as stop:
                if stop.code not in (None, 0):
                    raise RuntimeError(f"exit code {stop.code}") from None
            sys.stdout.flush()
            got = sink.buffer.decode("utf-8", "replace")
            ok = outputs_match(got, test["output"])
            if not ok:
                record.update(status="fail", expected=cut(test["output"]), got=cut(got))
        except TimeLimit:
            emit({"ev": "result", "test": k, "status": "timeout", "input": shown})
            return passed, len(tests), False
        except BaseException as error:  # noqa: BLE001
            ok = False
            record.update(status="error", error=format_error(error))
        finally:
            disarm_timer()
            sys.stdin, sys.stdout = real_stdin, real_stdout
        if ok:
            passed += 1
            emit({"ev": "result", "test": k, "status": "pass"})
        else:
            emit(record)
            if job["stop_on_failure"]:
                return passed, len(tests), False
    return passed, len(tests), True


def run_call_tests(job, ns, deadline):
    """LeetCode-style functional tests: JSON arguments (one per line) and a JSON expected value."""
    tests = job["tests"]
    name = job["entry_point"]
    passed = 0
    for k, test in enumerate(tests, 1):
        emit({"ev": "begin", "test": k})
        args = [json.loads(line) for line in test["input"].split("\n") if line.strip()]
        expected = json.loads(test["output"])
        shown = cut(f"{name}({', '.join(json.dumps(a) for a in args)})")
        record = {"ev": "result", "test": k, "input": shown}
        try:
            arm_timer(deadline)
            holder = ns.get("Solution")
            fn = getattr(holder(), name) if isinstance(holder, type) and hasattr(holder, name) else ns[name]
            actual = fn(*args)
            try:
                normal = json.loads(json.dumps(actual))
            except (TypeError, ValueError):
                normal = actual
            ok = plain(actual) and (normal == expected or actual == expected)
            if not ok:
                record.update(status="fail", expected=cut(json.dumps(expected)), got=short_repr(actual))
        except TimeLimit:
            emit({"ev": "result", "test": k, "status": "timeout", "input": shown})
            return passed, len(tests), False
        except BaseException as error:  # noqa: BLE001
            ok = False
            record.update(status="error", error=format_error(error))
        finally:
            disarm_timer()
        if ok:
            passed += 1
            emit({"ev": "result", "test": k, "status": "pass"})
        else:
            emit(record)
            if job["stop_on_failure"]:
                return passed, len(tests), False
    return passed, len(tests), True


def _on_alarm(signum, frame):
    raise TimeLimit()


def arm_timer(deadline):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeLimit()
    signal.setitimer(signal.ITIMER_REAL, remaining)


def disarm_timer():
    signal.setitimer(signal.ITIMER_REAL, 0)


def run_job(job):
    deadline = time.monotonic() + job["limits"]["timeout"]
    signal.signal(signal.SIGALRM, _on_alarm)
    program = job["program"]
    linecache.cache[PROGRAM_FILE] = (len(program), None, program.splitlines(True), PROGRAM_FILE)
    source = job.get("tests_source") or ""
    linecache.cache[TESTS_FILE] = (len(source), None, source.splitlines(True), TESTS_FILE)
    try:
        code = compile(program, PROGRAM_FILE, "exec")
    except BaseException as error:  # noqa: BLE001 - SyntaxError, RecursionError, MemoryError
        emit({"ev": "load_error", "error": format_error(error)})
        return
    if job["kind"] == "stdio":
        passed, total, finished = run_stdio_tests(job, code, deadline)
        emit({"ev": "done", "passed": passed, "total": total, "finished": finished})
        return
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        arm_timer(deadline)
        exec(code, ns)
        if job.get("setup"):
            exec(compile(job["setup"], TESTS_FILE, "exec"), ns)
    except TimeLimit:
        emit({"ev": "load_error", "error": "timeout"})
        return
    except BaseException as error:  # noqa: BLE001
        emit({"ev": "load_error", "error": format_error(error)})
        return
    finally:
        disarm_timer()
    if job["kind"] == "function":
        entry = job.get("entry_point")
        if entry and entry not in ns:
            emit({"ev": "load_error", "error": f"NameError: the function {entry!r} is not defined"})
            return
        last = {}
        if entry:
            ns["candidate"] = recording(ns[entry], entry, last)
        passed, total, finished = run_function_tests(job, ns, deadline, last)
    else:
        passed, total, finished = run_call_tests(job, ns, deadline)
    emit({"ev": "done", "passed": passed, "total": total, "finished": finished})


def worker(job, info):
    set_limits(job["limits"])
    if job.get("uid") is not None and os.getuid() == 0:
        drop_privileges(job["uid"], job["gid"])
        info["uid"] = job["uid"]
    elif info.get("user_namespace"):
        drop_capabilities()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.chdir(job["workdir"])
    sys.path.extend(job.get("sys_path") or [])
    emit({"ev": "isolation", **info})
    if job["guard"]:
        install_guard(job["workdir"], job["read_roots"])
    run_job(job)


def children():
    pids = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return pids


def clean_up(job):
    """Kill and reap everything the worker left behind (this process is their subreaper)."""
    uid = job.get("uid")
    if uid is not None and os.getuid() == 0:  # every process of the sandbox uid, wherever it is
        killer = os.fork()
        if killer == 0:
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        for pid in children():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.01)


def main():
    global _out_fd
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    _out_fd = job["result_fd"]
    info = {"mode": job["isolation"], "pid": os.getpid()}
    try:
        if job["isolation"] == "unshare":
            info.update(isolate_namespaces(job))
        elif job["isolation"] == "rlimits":
            info.update(isolate_network())
    except Exception as error:  # refuse to run unisolated when isolation was asked for
        emit({"ev": "fatal", "error": f"sandbox setup failed: {type(error).__name__}: {error}"})
        os._exit(70)
    sys.stdout.flush()
    try:  # orphans of the worker become our children, so that clean_up can reap them
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            worker(job, info)
        except SystemExit as stop:  # the candidate called exit(); the tests did not finish
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException as error:  # noqa: BLE001
            emit({"ev": "fatal", "error": f"{type(error).__name__}: {cut(error)}"})
            code = 70
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(code & 0xFF)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        emit({"ev": "exit", "worker": pid, "signal": os.WTERMSIG(status)})
        code = 128 + os.WTERMSIG(status)
    else:
        code = os.WEXITSTATUS(status)
        emit({"ev": "exit", "worker": pid, "code": code})
    clean_up(job)
    os._exit(code)


if __name__ == "__main__":
    main()
