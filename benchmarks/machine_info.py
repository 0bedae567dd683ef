"""What a committed benchmark result names: the CPU model and the code it ran."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def code_version() -> str:
    """'commit <sha>', or 'working tree on top of <sha>' when tracked files have changes.
    Without git or a .git folder (a copied checkout): $DISTRES_CODE_VERSION, else 'unknown'."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    head = git("rev-parse", "HEAD")
    if not head:
        return os.environ.get("DISTRES_CODE_VERSION", "unknown (no git)")
    # Results written by an earlier benchmark of the same run do not make the code differ.
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"))
    return f"working tree on top of {head}" if dirty else f"commit {head}"
