"""What happens to an image that cannot be decoded (corrupt, truncated, not an image).

``--on-bad-sample skip`` (default): the sample is left out of its batch, its path is named
once in the log and it is counted (``bad_samples`` in metrics.jsonl). One bad file in a
million-image folder should not cost a multi-day run. ``fail``: stop with the path.
"""

from __future__ import annotations

from distres.errors import RankError, UserError, console

POLICIES = ("skip", "fail")


class BadSamples:
    def __init__(self, policy: str = "skip"):
        if policy not in POLICIES:
            raise UserError(f"--on-bad-sample must be one of {', '.join(POLICIES)} (got {policy!r})")
        self.policy = policy
        self.count = 0  # samples skipped so far, on this process
        self._named: set[str] = set()

    def report(self, name: str, reason: str) -> None:
        if self.policy == "fail":
            raise RankError(
                f"cannot decode {name} ({reason}); remove or replace the file, "
                "or pass --on-bad-sample skip to leave such files out"
            )
        self.count += 1
        if name not in self._named:  # a bad file comes back every epoch: name it once
            self._named.add(name)
            console(f"distres: skipping unreadable image {name} ({reason}); counted as bad_samples in the metrics")

    def report_all(self, bad) -> None:
        for name, reason in bad:
            self.report(name, reason)
