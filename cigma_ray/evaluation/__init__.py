"""Evaluating a run's pruning: eval sets (evalsets.py), experiments against controls, prune and sweep
(experiments.py), the automatic choice of score and K (autok.py), and what the report inspects
(inspection.py). Results are rows and dataclasses; reports/ turns them into text and figures."""
from .autok import AutoK, auto_k, choose_pruning, default_k_grid
from .evalsets import EvalSet, eval_set, eval_sets, heldout_set, open_eval_source, scan_eval_set
from .experiments import collapsed, evaluate, prune, random_heads, run_experiments, sweep

__all__ = ["AutoK", "EvalSet", "auto_k", "choose_pruning", "collapsed", "default_k_grid", "eval_set", "eval_sets",
           "evaluate", "heldout_set", "open_eval_source", "prune", "random_heads", "run_experiments", "scan_eval_set",
           "sweep"]
