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
