"""Facts about the machine this process runs on (no torch import: ``distres.prepare`` uses it)."""

from __future__ import annotations

import os


def available_cpus(env: dict | None = None) -> int:
    """The CPUs this process may run on: its affinity mask (SLURM's cgroup binding, taskset),
    not the machine's core count, and no more than SLURM gave its task (--cpus-per-task): a
    cluster whose TaskPlugin does not bind leaves every task the whole node's mask, and tasks
    sharing a node would each start a thread per core."""
    env = os.environ if env is None else env
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    allotted = env.get("SLURM_CPUS_PER_TASK", "") if env.get("SLURM_JOB_ID") else ""
    if allotted.isdigit() and int(allotted) > 0:
        cpus = min(cpus, int(allotted))
    return cpus


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
