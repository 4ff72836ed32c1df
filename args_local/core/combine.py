"""Several reward models as one objective: ``reward = sum_i w_i * r_i``.

The search (:func:`args_local.core.search.args_search`) knows one :class:`Scorer` and one
weight. :class:`WeightedSum` is that scorer for any number of reward models: the weights are
folded in, so the engine runs the search with ``weight = 1`` and the score of a candidate is
``logit + sum_i w_i * r_i``. With one model at weight w this is ``logit + w * r`` to the last
bit (``1.0 * (0.0 + w * r) == w * r``), which is why ``-r A:8 -r B:0`` and ``-r A -w 8`` choose
the same tokens. Each part keeps its own scorer (its own KV cache) and its own bounds; the
combined bounds are the weighted sum of the parts' ranges, so the greedy pruning rule
``logit_1 - logit_i > r_max - r_min`` stays exact.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .search import Scorer


def weighted_bounds(parts: Sequence[tuple[Scorer, float]]) -> tuple[float, float] | None:
    """(min, max) of ``sum_i w_i * r_i`` over the parts' ranges; None when one part is unbounded."""
    low = high = 0.0
    for scorer, weight in parts:
        if scorer.bounds is None:
            return None
        a, b = weight * scorer.bounds[0], weight * scorer.bounds[1]
        low, high = low + min(a, b), high + max(a, b)
    return low, high


class WeightedSum:
    """The search's scorer over several weighted scorers (see the module's docstring).

    What each part gave the candidates of the last call is kept, so that the engine can
    report every model's reward of the token the search chose (:meth:`parts_of`).
    """

    def __init__(self, parts: Sequence[tuple[Scorer, float]]) -> None:
        self.parts = list(parts)
        self.bounds = weighted_bounds(self.parts)
        self._last: dict[int, list[float]] = {}

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        total = np.zeros(len(tokens))
        each = []
        for scorer, weight in self.parts:
            each.append(np.asarray(scorer.score(tokens), dtype=np.float64))
            total += weight * each[-1]
        self._last = {t: [float(r[j]) for r in each] for j, t in enumerate(tokens)}
        return total

    def parts_of(self, token: int) -> list[float]:
        """Each part's reward of ``token`` at the last call (the one that chose it)."""
        return self._last[token]

    def advance(self, token: int) -> None:
        for scorer, _ in self.parts:
            scorer.advance(token)
        self._last = {}
