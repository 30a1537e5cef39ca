"""Progress for long work, on stderr: bars for stages (work done, rate and ETA), and a line per finished step
for evaluations (a log keeps every line; a bar redrawn in place leaves nothing between its first and last)."""
from __future__ import annotations

import sys
import time


def progress_bar(stage: str, total: int, initial: int, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"{stage:>7}", unit=unit, unit_scale=True,
                disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 07 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLines:
    """One line per finished step: `stage  i/total  what  (time so far, ETA)`; silent when not enabled.

    `update(n, what)` counts n steps done; steps skipped (no `what`) count without a line."""

    def __init__(self, stage: str, total: int, enabled: bool, stream=None):
        self.stage, self.total, self.enabled = stage, total, enabled
        self.stream = stream
        self.done = 0
        self.start = time.monotonic()

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1, what: str = "") -> None:
        self.done += n
        if not self.enabled or not what:
            return
        elapsed = time.monotonic() - self.start
        left = max(self.total - self.done, 0)
        eta = f", ETA {duration(elapsed / self.done * left)}" if left and self.done else ""
        print(f"{self.stage} {self.done}/{self.total}  {what}  ({duration(elapsed)}{eta})",
              file=self.stream or sys.stderr, flush=True)
