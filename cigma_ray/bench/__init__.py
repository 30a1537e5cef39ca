"""Measuring the scan against its yardsticks (`cigma-ray bench`), and the machine numbers came from."""
from .suite import Settings, file_stem, machine, run_suite, versions

__all__ = ["Settings", "file_stem", "machine", "run_suite", "versions"]
