"""Pure math of the CIGMA method: no I/O, no Ray, no models."""
from .bootstrap import bootstrap, resample_counts, resampled_means
from .divergence import js, kl, probs
from .gains import bir, bir_statistics, bir_summary, gains
from .masks import baseline, counterfactuals, foreground_cells, optimise_masks
from .metrics import accuracy, ece, nll, prediction_statistics, weighted_ece
from .scores import SCORES, available_scores, head_scores, ranks, score_terms
from .stability import spearman, split_half, top_k_probability
from .swap import choose_donors, conflict_statistics, swapped

__all__ = ["bootstrap", "resample_counts", "resampled_means", "js", "kl", "probs", "bir", "bir_statistics",
           "bir_summary", "gains", "baseline", "counterfactuals", "foreground_cells", "optimise_masks", "accuracy",
           "ece", "nll", "prediction_statistics", "weighted_ece", "SCORES", "available_scores", "head_scores", "ranks", "score_terms",
           "spearman", "split_half", "top_k_probability", "choose_donors", "conflict_statistics", "swapped"]
