"""Facts about the machine this process runs on (no torch import: ``distres.prepare`` uses it)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (SLURM's cgroup binding, taskset),
    not the machine's core count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
