"""What the machine computes well: the dtype `dtype=auto` resolves to, decided by capability, not by name.

bfloat16 halves memory traffic and, where the hardware has bf16 units, runs matmuls several times faster than
float32. Where it has none, bf16 is emulated: on a 2-core AVX2 CPU a 1024x1024 bf16 matmul ran at 0.9
GFLOP/s against 89 GFLOP/s in float32 (torch 2.13). So `auto` takes bf16 only on hardware that computes it:
a CUDA device that supports it, or a CPU with AVX512-BF16 or AMX (x86) or BF16 (Arm); float32 elsewhere.
"""

from __future__ import annotations

import torch

_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (/proc/cpuinfo "flags"), Arm ("Features")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bf16 natively, and what that was read from."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    found = sorted(_CPU_BF16_FLAGS & cpu_flags())
    if found:
        return True, f"CPU has {', '.join(found)}"
    return False, "CPU has no native bf16 (no avx512_bf16 / amx_bf16 / bf16 flag): bf16 would be emulated"


def resolve_dtype(spec: str, device: torch.device) -> tuple[str, str]:
    """(bfloat16 | float32, why) for a config's `dtype` on `device`."""
    native, why = native_bf16(torch.device(device))
    if spec == "auto":
        return ("bfloat16" if native else "float32"), f"dtype=auto: {why}"
    if spec == "bfloat16" and not native:
        return spec, f"dtype=bfloat16 as asked, but {why}; this runs many times slower than dtype=float32"
    return spec, f"dtype={spec} as asked"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and `taskset` narrow), not the
    machine's count."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
