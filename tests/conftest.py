"""Fixtures shared by several test files."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# A second process takes the run folder's lock as pmd's RunDir does (exclusive flock, its pid written in the
# file; 4242 so that the tests can recognise it) and keeps it until it is killed.
_HOLDER = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('4242\\n');"
           " f.flush(); print('held', flush=True); time.sleep(60)")


@pytest.fixture
def hold_lock() -> Callable[[Path], Callable[[], None]]:
    """`release = hold_lock(path)`: another process holds the lock file `path` (pid 4242) until `release()` or
    the end of the test."""
    holders: list[subprocess.Popen] = []

    def release(proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait()

    def hold(path: Path) -> Callable[[], None]:
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
        holders.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return lambda: release(proc)

    yield hold
    for proc in holders:
        if proc.poll() is None:
            release(proc)
