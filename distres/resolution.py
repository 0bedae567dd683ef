"""Progressive resizing (``--progressive-resize START:END --progressive-epochs A:B``): the
training crop size as a pure function of the epoch, FFCV's schedule.

Low resolution early is cheap (the cost of a step goes with the pixel count) and costs little
accuracy, as long as the last epochs train at the final size (FFCV's ResNet-50 configs: 160 ->
192 px, then evaluation at 256 -> 224). The size is START up to epoch A, then linear to END at
epoch B, rounded to a multiple of 32 (kernels and tensor cores like it, and it keeps the number
of distinct sizes, hence of torch.compile recompilations, small), then END. Epochs count from 0,
as the loaders' ``epoch``, so a resumed run computes the size of the epoch it continues in and
trains at the size the uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

from distres.errors import UserError

ROUND_TO = 32


@dataclass(frozen=True)
class Schedule:
    start: int  # size up to epoch ``ramp_from``
    end: int  # size from epoch ``ramp_to`` on (the final training size)
    ramp_from: int
    ramp_to: int

    def size(self, epoch: int) -> int:
        if epoch <= self.ramp_from:
            return self.start
        if epoch >= self.ramp_to:
            return self.end
        t = (epoch - self.ramp_from) / (self.ramp_to - self.ramp_from)
        rounded = ROUND_TO * round((self.start + t * (self.end - self.start)) / ROUND_TO)
        return min(max(rounded, min(self.start, self.end)), max(self.start, self.end))

    def sizes(self, epochs: int) -> list[int]:
        return [self.size(e) for e in range(epochs)]


def parse(sizes: str | None, epochs: str | None) -> Schedule | None:
    """The schedule of --progressive-resize START:END and --progressive-epochs A:B (None: off)."""
    if not sizes:
        if epochs:
            raise UserError("--progressive-epochs needs --progressive-resize START:END")
        return None
    start, end = _pair(sizes, "--progressive-resize", "START:END sizes in px, like 160:192")
    if not epochs:
        raise UserError(
            "--progressive-resize needs --progressive-epochs A:B (size START up to epoch A, "
            "END from epoch B on), like --progressive-epochs 10:13 for 16 epochs"
        )
    a, b = _pair(epochs, "--progressive-epochs", "A:B epochs (from 0), like 10:13")
    if start <= 0 or end <= 0:
        raise UserError(f"--progressive-resize {sizes}: sizes must be > 0")
    if not 0 <= a <= b:
        raise UserError(f"--progressive-epochs {epochs}: need 0 <= A <= B")
    return Schedule(start, end, a, b)


def _pair(text: str, name: str, example: str) -> tuple[int, int]:
    first, sep, last = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        return int(first), int(last)
    except ValueError:
        raise UserError(f"{name} must be {example} (got {text!r})") from None
