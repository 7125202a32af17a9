# pytest tests/test_hardware.py -q
"""dtype=auto decides by capability: bf16 only where the hardware computes it natively."""

from __future__ import annotations

import os

import torch

from pmd import hardware


def test_auto_takes_bf16_only_with_a_native_bf16_flag(monkeypatch):
    cpu = torch.device("cpu")
    for flags, expected in [({"avx2", "fma"}, "float32"), ({"avx512f", "avx512_bf16"}, "bfloat16"),
                            ({"amx_bf16", "amx_tile"}, "bfloat16"), ({"asimd", "bf16"}, "bfloat16"), (set(), "float32")]:
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        dtype, why = hardware.resolve_dtype("auto", cpu)
        assert dtype == expected, flags
        assert why.startswith("dtype=auto")


def test_asking_for_bf16_on_a_cpu_that_emulates_it_keeps_it_and_says_so(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    dtype, why = hardware.resolve_dtype("bfloat16", torch.device("cpu"))
    assert dtype == "bfloat16" and "emulated" in why and "slower" in why
    assert hardware.resolve_dtype("float32", torch.device("cpu")) == ("float32", "dtype=float32 as asked")


def test_usable_cores_follow_the_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # e.g. `taskset -c 0 pmd train`
    assert hardware.usable_cores() == 1


# ------------------------------------------------------------------------------------------------ threads
def test_threads_take_the_cores_others_leave_idle():
    assert hardware.threads_for(2, 0.0) == 2
    assert hardware.threads_for(2, 0.2) == 2  # background noise keeps every core
    assert hardware.threads_for(2, 1.0) == 1  # one busy process: one thread, no waiting on a shared core
    assert hardware.threads_for(2, 3.0) == 1  # never none
    assert hardware.threads_for(8, 2.6) == 5


def test_busy_seconds_reads_only_this_process_cpus(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  900 0 90 5000 10 0 0 0 0 0\n"
                    "cpu0 100 0 10 500 7 0 0 0 0 0\n"
                    "cpu1 200 5 20 400 3 1 1 1 0 0\n"
                    "cpu2 600 0 60 4100 0 0 0 0 0 0\n")
    hz = os.sysconf("SC_CLK_TCK")
    assert hardware.busy_seconds([0, 1], str(stat)) == (110 + 228) / hz  # idle and iowait excluded; cpu2 not ours
    assert hardware.busy_seconds([0], str(tmp_path / "missing")) is None


def test_core_share_gives_up_a_core_to_a_busy_process():
    """A real busy process on one of our cores: within a second of load, CoreShare leaves that core to it."""
    import subprocess
    import sys
    import time

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or hardware.busy_seconds(cpus) is None:
        import pytest
        pytest.skip("needs 2+ usable cores and /proc/stat")
    share = hardware.CoreShare()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(2.0)
        others_busy_threads = share.threads()
    finally:
        hog.kill()
    assert others_busy_threads <= len(cpus) - 1
