"""method/swap.py and the new config keys: donors, the swapped image, counterfactual conflict accuracy as a
function of image weights, swap_drop's terms, and the checks on ablation, measure_swap and objective."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cigma_ray.config import Config, ConfigError, from_dict
from cigma_ray.method import available_scores, bootstrap, choose_donors, conflict_statistics, score_terms, swapped
from cigma_ray.method.masks import upsample_hard


def test_donors_are_seeded_of_another_class_and_distinct_while_they_can_be():
    classes = np.array([0, 0, 1, 2, 1, 0, 2, 2])
    a = choose_donors(classes, seed=3, per_image=2)
    assert a.shape == (8, 2) and np.array_equal(a, choose_donors(classes, seed=3, per_image=2))
    assert not np.array_equal(a, choose_donors(classes, seed=4, per_image=2))
    assert all(classes[d] != classes[i] for i, row in enumerate(a) for d in row)
    assert all(len(set(row)) == 2 for row in a)  # without replacement: at least 5 candidates each
    few = choose_donors([0, 0, 0, 1], seed=0, per_image=3)
    assert (few[:3] == 3).all() and set(few[3]) <= {0, 1, 2}  # with replacement when too few
    assert (choose_donors([5, 5, 5], seed=0) == -1).all()  # no other class: no donor
    with pytest.raises(ValueError, match="at least one donor"):
        choose_donors([0, 1], 0, per_image=0)


def test_swapped_keeps_the_foreground_cells_and_takes_the_rest_from_the_donor():
    gen = torch.Generator().manual_seed(0)
    images, donors = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 16, 16, generator=gen)
    fg = torch.rand(2, 4, 4, generator=gen) > 0.5
    out = swapped(images, fg, donors)
    s = upsample_hard(fg, (16, 16)).bool().expand_as(images)
    assert torch.equal(out[s], images[s]) and torch.equal(out[~s], donors[~s])


def test_conflict_accuracy_counts_each_image_once_under_resampling():
    correct = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    stats = conflict_statistics(correct)
    assert stats["conflict_accuracy"](np.ones((1, 3)))[0] == pytest.approx(0.5)
    assert stats["conflict_accuracy"](np.array([[0.0, 2.0, 1.0]]))[0] == pytest.approx(2 / 3)
    point, low, high = bootstrap(stats, 3, 500, 0.95, 0)["conflict_accuracy"]
    assert low <= point <= high and low >= 0 and high <= 1


def test_swap_drop_terms_and_the_scores_a_scan_gives():
    terms = score_terms(np.array([0.1, 0.2]), np.array([[0.05, 0.1]]), swap=np.array([0.3, 0.4]),
                        swap_ablated=np.array([[0.1, 0.5]]))
    np.testing.assert_allclose(terms["swap_drop"], [[0.2, -0.1]])
    assert "bir_drop" not in terms  # no FIG^(-h): no FIG scores
    assert available_scores(True, True) == ["big_drop", "bir_drop", "big_minus_fig", "swap_drop"]
    assert available_scores(False, True) == ["big_drop", "swap_drop"]
    assert available_scores(True, False) == ["big_drop", "bir_drop", "big_minus_fig"]


def test_config_keys_of_mean_ablation_swap_and_objective():
    cfg = Config()
    assert (cfg.ablation, cfg.measure_swap, cfg.objective) == ("zero", False, "conflict")
    assert {"ablation", "measure_swap"} <= set(Config.RESULT_KEYS) and "objective" not in Config.RESULT_KEYS
    with pytest.raises(ConfigError, match="ablation='half'.*zero .*or mean"):
        from_dict({"ablation": "half"})
    with pytest.raises(ConfigError, match="objective='accuracy'"):
        from_dict({"objective": "accuracy"})
    with pytest.raises(ConfigError, match="score='swap_drop' needs SWAP\\^\\(-h\\).*measure_swap: true"):
        from_dict({"score": "swap_drop", "measure_swap": False})
    assert from_dict({"score": "swap_drop", "measure_fig": False, "measure_swap": True}).score == "swap_drop"
