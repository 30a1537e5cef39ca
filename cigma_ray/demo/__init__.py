"""The built-in demo: a planted-shortcut benchmark (data/demo.py), the shipped model trained on it
(train.py: `python -m cigma_ray.demo.train`), and the whole method run on it (run.py)."""
from .run import run_demo

__all__ = ["run_demo"]
