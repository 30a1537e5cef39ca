"""The scan as stages and units: what a scan is (units.py), a replica's side of a unit (worker.py),
running units in this process (executor.py), ranking (ranking.py), and the stages with resume
(stages.py). distributed/ runs the same units on Ray: it imports units, worker and executor, and
importing them does not load the stages (`Pipeline` and `run_status` load on first use)."""
from .executor import Failure, LocalExecutor, UnitsFailed
from .units import Job, Unit, select_images
from .worker import Worker

__all__ = ["Failure", "Job", "LocalExecutor", "Pipeline", "Unit", "UnitsFailed", "Worker", "run_status",
           "select_images"]


def __getattr__(name: str):
    if name in ("Pipeline", "run_status"):
        from . import stages

        return getattr(stages, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
