"""What happens to an image that cannot be decoded (corrupt, truncated, not an image).

``--on-bad-sample skip`` (default): the sample is left out of its batch, its path is named
once in the log and it is counted (``bad_samples`` in metrics.jsonl). One bad file in a
million-image folder should not cost a multi-day run. ``fail``: stop with the path.
Files excluded before decoding (--exclude-files, a file that crashed a decoder, one over
--max-image-pixels) are skipped and counted the same way; under ``fail`` the excluded ones are
still skipped (the user listed them), the others stop the run.

``listing`` (OUTPUT_DIR/bad_samples.txt in training) gets the path of each file that crashed a
decoder, one a line: a file that --exclude-files reads back.
"""

from __future__ import annotations

from distres.data.decode import EXCLUDED
from distres.errors import RankError, UserError, console

POLICIES = ("skip", "fail")


class BadSamples:
    def __init__(self, policy: str = "skip", listing=None):
        if policy not in POLICIES:
            raise UserError(f"--on-bad-sample must be one of {', '.join(POLICIES)} (got {policy!r})")
        self.policy = policy
        self.count = 0  # samples skipped so far, on this process
        self._named: set[str] = set()
        self.listing = listing

    def report(self, name: str, reason: str) -> None:
        if self.policy == "fail" and not reason.startswith(EXCLUDED):
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

    def crashed(self, name: str, why: str) -> None:
        """``name`` killed the process decoding it (``isolate``): listed, or the run stops."""
        if self.policy == "fail":
            raise RankError(f"{name} {why}; remove or replace the file, or pass --on-bad-sample skip")
        if self.listing is None:
            return
        try:
            with open(self.listing, "a") as f:
                f.write(name + "\n")
        except OSError as e:
            console(f"distres: warning: cannot add {name} to {self.listing} ({e.strerror})")
