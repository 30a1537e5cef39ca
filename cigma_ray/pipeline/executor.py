"""Running a stage's units: the in-process executor, and what every executor reports back.

An executor runs units and calls `on_done(unit, receipt)` for each one finished; it may call
`on_progress(unit, n)` as a unit advances and `on_retry(unit, error)` when it tries a unit again,
and returns the units it gave up on. The Ray executor (distributed/) has the same interface.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .units import Unit
from .worker import Worker


@dataclass
class Failure:
    unit: Unit
    attempts: int
    error: str


class UnitsFailed(RuntimeError):
    """Some units failed `max_attempts` times; the rest of their stage is done."""

    def __init__(self, failures: list[Failure]):
        self.failures = failures
        listed = "\n  ".join(f"{f.unit.file} ({f.attempts} attempts): {f.error.splitlines()[0] if f.error else ''}"
                             for f in failures[:10])
        more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
        super().__init__(f"{len(failures)} unit(s) failed for good (recorded in failures/):\n  {listed}{more}")


class LocalExecutor:
    """Units one after another in this process, on one worker made when the first unit needs it.

    A unit that fails on storage (an OSError: a flaky read of an image or an input, a failed write) is tried
    again, `max_attempts` times in all with a short pause between, then given up and reported, as on a cluster.
    Any other error is raised at once (a bug or bad input: retrying would only repeat it)."""

    def __init__(self, make_worker: Callable[[], Worker], max_attempts: int = 3, pause_s: float = 0.5):
        self.make_worker = make_worker
        self.max_attempts = max_attempts
        self.pause_s = pause_s

    def run(self, units: list[Unit], on_done: Callable[[Unit, dict], None],
            on_retry: Callable[[Unit, str], None] | None = None,
            on_progress: Callable[[Unit, int], None] | None = None) -> list[Failure]:
        worker = self.make_worker()
        failures = []
        for unit in units:
            for attempt in range(1, self.max_attempts + 1):
                try:
                    progress = (lambda n, unit=unit: on_progress(unit, n)) if on_progress else None
                    receipt = worker.run_unit(unit, progress)
                except OSError as e:
                    error = f"{type(e).__name__}: {e}"
                    if attempt == self.max_attempts:
                        failures.append(Failure(unit, attempt, error))
                        break
                    if on_retry:
                        on_retry(unit, error)
                    time.sleep(self.pause_s * attempt)
                    continue
                on_done(unit, receipt)
                break
        return failures
