"""Small stand-ins for the policy and the reward model, for the search arithmetic only.

Integration tests use the real GGUF and ONNX models; these only check the loop's logic.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


class TablePolicy:
    """A policy whose logits depend on the last token only, through a fixed random table."""

    def __init__(self, vocab: int = 50, seed: int = 0, eog: int | None = None) -> None:
        self.table = np.random.default_rng(seed).normal(0, 3, size=(vocab, vocab))
        self.tokens = [0]
        self.eog = eog

    def logits(self) -> np.ndarray:
        return self.table[self.tokens[-1]]

    def advance(self, token: int) -> None:
        self.tokens.append(token)

    def is_eog(self, token: int) -> bool:
        return token == self.eog

    def greedy(self, n: int) -> list[int]:
        out, last = [], self.tokens[-1]
        for _ in range(n):
            last = int(np.argmax(self.table[last]))
            if last == self.eog:
                break
            out.append(last)
        return out


class FnScorer:
    """Rewards from a function of (response so far, candidate)."""

    def __init__(self, fn: Callable[[list[int], int], float], bounds: tuple[float, float] | None = None) -> None:
        self.fn = fn
        self.bounds = bounds
        self.response: list[int] = []
        self.calls = 0
        self.seen = 0

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        self.calls += 1
        self.seen += len(tokens)
        return np.array([self.fn(self.response, t) for t in tokens], dtype=np.float64)

    def advance(self, token: int) -> None:
        self.response.append(token)
