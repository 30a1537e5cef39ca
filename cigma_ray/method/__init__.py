"""Pure math of the CIGMA method: no I/O, no Ray, no models."""
from .divergence import js, kl, probs
from .gains import bir_summary, gains
from .masks import baseline, counterfactuals, foreground_cells, optimise_masks
from .metrics import accuracy, bootstrap, ece, nll, weighted_ece
from .scores import SCORES, head_scores, ranks, score_terms

__all__ = ["js", "kl", "probs", "gains", "bir_summary", "baseline", "counterfactuals", "foreground_cells",
           "optimise_masks", "accuracy", "bootstrap", "ece", "nll", "weighted_ece", "SCORES", "head_scores", "ranks",
           "score_terms"]
