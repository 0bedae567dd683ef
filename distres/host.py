"""Facts about the machine this process runs on (no torch import: ``distres.prepare`` uses it)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (SLURM's cgroup binding, taskset),
    not the machine's core count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def native_bf16() -> bool | None:
    """Whether this CPU computes in bf16 itself (AVX512-BF16 or AMX); None where it cannot be
    told (no /proc/cpuinfo). Without it, bf16 autocast on the CPU is emulated: oneDNN falls back
    to reference kernels, several times slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags
