"""Several reward models as one objective (core.combine), with fake policies and scorers."""

from __future__ import annotations

import numpy as np
import pytest

from args_local.core.combine import WeightedSum, weighted_bounds
from args_local.core.search import args_search
from args_local.core.settings import Settings
from fakes import FnScorer, TablePolicy


def sentiment(resp, t):
    return float((t * 7 + len(resp)) % 11) / 10


def length(resp, t):
    return float(t % 5) / 4


def steps(scorer, weight, n=25, **config):
    return list(args_search(TablePolicy(seed=4), scorer, Settings(top_k=8, weight=weight, **config), n))


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_one_part_at_weight_w_is_the_plain_search_at_w_to_the_bit(mode):
    plain = steps(FnScorer(sentiment, (0.0, 1.0)), 6.0, mode=mode, seed=3)
    summed = steps(WeightedSum([(FnScorer(sentiment, (0.0, 1.0)), 6.0)]), 1.0, mode=mode, seed=3)
    assert [s.token for s in summed] == [s.token for s in plain]
    assert [s.score for s in summed] == [s.score for s in plain]
    assert [s.scored for s in summed] == [s.scored for s in plain]  # the same pruning


def test_two_halves_of_one_model_are_that_model_at_the_whole_weight():
    plain = steps(FnScorer(sentiment, (0.0, 1.0)), 8.0)
    halves = steps(WeightedSum([(FnScorer(sentiment, (0.0, 1.0)), 4.0), (FnScorer(sentiment, (0.0, 1.0)), 4.0)]), 1.0)
    assert [s.token for s in halves] == [s.token for s in plain]


def test_the_sum_is_weighted_and_each_part_is_kept():
    a, b = FnScorer(sentiment), FnScorer(length)
    combined = WeightedSum([(a, 2.0), (b, -0.5)])
    total = combined.score([3, 4])
    assert total.tolist() == pytest.approx([2 * sentiment([], 3) - 0.5 * length([], 3), 2 * sentiment([], 4) - 0.5 * length([], 4)])
    assert combined.parts_of(4) == [sentiment([], 4), length([], 4)]
    combined.advance(4)
    assert a.response == b.response == [4]  # every part follows the chosen token


def test_a_second_objective_changes_the_choice():
    alone = [s.token for s in steps(FnScorer(sentiment, (0.0, 1.0)), 3.0)]
    both = [s.token for s in steps(WeightedSum([(FnScorer(sentiment, (0.0, 1.0)), 3.0), (FnScorer(length, (0.0, 1.0)), 3.0)]), 1.0)]
    assert both != alone


def test_bounds_add_the_weighted_ranges_and_unbounded_wins():
    assert weighted_bounds([(FnScorer(sentiment, (0.0, 1.0)), 2.0), (FnScorer(length, (-1.0, 3.0)), -0.5)]) == (-1.5, 2.5)
    assert weighted_bounds([(FnScorer(sentiment, (0.0, 1.0)), 2.0), (FnScorer(length), 1.0)]) is None


def test_pruning_uses_the_combined_range():
    """Candidates the weighted ranges cannot lift over the top one are never scored."""
    narrow = WeightedSum([(FnScorer(sentiment, (0.0, 1.0)), 0.01), (FnScorer(length, (0.0, 1.0)), 0.01)])
    wide = WeightedSum([(FnScorer(sentiment, (0.0, 1.0)), 5.0), (FnScorer(length, (0.0, 1.0)), 5.0)])
    assert sum(s.scored for s in steps(narrow, 1.0)) < sum(s.scored for s in steps(wide, 1.0))


def test_nan_in_one_part_drops_the_candidate():
    nan_for_3 = lambda resp, t: float("nan") if t == 3 else 0.0
    combined = WeightedSum([(FnScorer(sentiment), 1.0), (FnScorer(nan_for_3), 1.0)])
    assert np.isnan(combined.score([3, 4])[0])
