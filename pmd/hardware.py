"""What the machine computes well: the dtype `dtype=auto` resolves to, decided by capability, not by name.

bfloat16 halves memory traffic and, where the hardware has bf16 units, runs matmuls several times faster than
float32. Where it has none, bf16 is emulated: on a 2-core AVX2 CPU a 1024x1024 bf16 matmul ran at 0.9
GFLOP/s against 89 GFLOP/s in float32 (torch 2.13). So `auto` takes bf16 only on hardware that computes it:
a CUDA device that supports it, or a CPU with AVX512-BF16 or AMX (x86) or BF16 (Arm); float32 elsewhere.
"""

from __future__ import annotations

import os
import time

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


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its CPU affinity, which containers and `taskset` narrow), not the
    machine's."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """How many cores this process may run on."""
    return len(usable_cpus())


# ------------------------------------------------------------------------------------------------ threads
def threads_for(cores: int, others_busy: float) -> int:
    """Threads for the next step: the usable cores that other processes left idle (at least one)."""
    return max(1, min(cores, round(cores - others_busy)))


class CoreShare:
    """`threads=0` on a CPU: before each step, as many torch threads as the cores that other processes left idle
    during the previous one (measured from /proc/stat over this process's cores, minus this process's own time).

    Why not simply one thread per core: torch's threads meet at the end of every parallel region, so when a
    busy process takes one of the cores the thread sharing it holds all the others back. Measured on 2 cores:
    a 2-thread step beside one busy process took 4.2x its time alone, where a fair share is 2x; with this, 1.2x
    (docs/benchmarks.md, benchmarks/portability.py). Two pmd processes on the same cores settle at one each.
    Where /proc/stat cannot be read (not Linux), it keeps one thread per usable core.
    """

    def __init__(self) -> None:
        self.cpus = usable_cpus()
        self.last = self._snapshot()

    def _snapshot(self) -> tuple[float, float | None, float]:
        return time.monotonic(), busy_seconds(self.cpus), time.process_time()

    def threads(self) -> int:
        """Threads for the step about to run, from the load since the last call."""
        (wall0, busy0, own0), (wall1, busy1, own1) = self.last, self._snapshot()
        self.last = (wall1, busy1, own1)
        if busy0 is None or busy1 is None or wall1 - wall0 < 1.0:
            return len(self.cpus)
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
        return threads_for(len(self.cpus), others)


def busy_seconds(cpus: list[int], stat: str = "/proc/stat") -> float | None:
    """CPU seconds spent busy (not idle, not waiting for I/O) on `cpus` since boot, all processes together."""
    try:
        with open(stat) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{i}" for i in cpus}
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name in wanted:  # user nice system idle iowait irq softirq steal (guest time is inside user)
            values = [int(v) for v in fields[:8]]
            ticks += sum(values) - values[3] - values[4]
    return ticks / os.sysconf("SC_CLK_TCK")
