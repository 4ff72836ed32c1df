"""The ARGS decoding loop: reward-guided search over the policy's top-k tokens.

At every step the policy proposes its k most likely next tokens, the reward model
scores the response extended by each of them, and the token with the best
``logit + w * reward`` is taken (greedy) or sampled from ``softmax(score / T)``.

This module knows nothing about llama.cpp or onnxruntime: it talks to a
:class:`Policy` and a :class:`Scorer`, so it can be tested with small fakes and
reused by generate, chat, eval and bench, which all consume :func:`args_search`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import numpy as np

from .errors import RewardError

if TYPE_CHECKING:
    from .settings import Mode, Settings

class Policy(Protocol):
    """A language model positioned after a prompt; only the last position's logits matter."""

    def logits(self) -> np.ndarray:
        """Next-token logits (a float vector over the vocabulary) at the current position."""

    def advance(self, token: int) -> None:
        """Append ``token`` to the sequence and compute the next logits."""

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends the generation (EOS, EOT, ``<|im_end|>``...)."""


class Scorer(Protocol):
    """Rewards for the response so far extended by each candidate token.

    ``bounds`` is ``(r_min, r_max)`` when the reward is bounded, which lets the
    greedy search skip candidates that cannot win whatever their reward.
    """

    bounds: tuple[float, float] | None

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """One reward per candidate token, computed in a single batched call."""

    def advance(self, token: int) -> None:
        """Append the chosen token to the response the scorer tracks."""


@dataclass(frozen=True)
class Step:
    """One decision of the search.

    ``reward`` is None when the reward model was not asked (w = 0, k = 1, or no
    other candidate could overtake the top one); ``scored`` counts the candidates
    the reward model saw at this step.
    """

    token: int
    logit: float
    reward: float | None
    score: float
    scored: int


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits and their token ids, best first; ties go to the lower id,
    as in llama.cpp's greedy sampler, so that k = 1 reproduces it exactly."""
    k = min(k, logits.shape[0])
    ids = np.argpartition(-logits, k - 1)[:k] if k < logits.shape[0] else np.arange(logits.shape[0])
    values = logits[ids]
    order = np.lexsort((ids, -values))
    return ids[order], values[order].astype(np.float64)


def contenders(top_logits: np.ndarray, weight: float, bounds: tuple[float, float] | None) -> np.ndarray:
    """Mask of the candidates that could still beat the top one under greedy ARGS.

    With rewards in [r_min, r_max], candidate i cannot win when
    ``logit_1 - logit_i > |w| * (r_max - r_min)``: its reward can make up at most that much.
    """
    if bounds is None:
        return np.ones(top_logits.shape[0], dtype=bool)
    reach = abs(weight) * (bounds[1] - bounds[0])
    return (top_logits[0] - top_logits) <= reach


def choose(scores: np.ndarray, mode: Mode, temperature: float, rng: np.random.Generator, top_p: float = 1.0) -> int:
    """Index of the chosen candidate: argmax, or a draw from softmax(scores / T) restricted to
    the smallest set of candidates whose probability reaches ``top_p`` (nucleus sampling).

    Candidates with a score of -inf (dropped) are never chosen.
    """
    if mode == "greedy":
        return int(np.argmax(scores))
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the best to -inf: fine
        z = (scores - scores.max()) / temperature
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        nucleus = np.zeros_like(p)
        nucleus[keep] = p[keep]
        p = nucleus / nucleus.sum()
    return int(rng.choice(scores.shape[0], p=p))


def args_search(
    policy: Policy,
    scorer: Scorer | None,
    settings: "Settings",
    max_tokens: int,
) -> Iterator[Step]:
    """Yield up to ``max_tokens`` ARGS decisions, stopping at end-of-generation unless
    ``settings.ignore_eos``. ``settings.weight`` must be set (the engine fills in the reward
    model's suggestion).

    Each step is yielded before the policy evaluates it, so a consumer that stops
    (a stop string, Ctrl-C) wastes no decode. A candidate whose reward is NaN or
    infinite is dropped from that step; if every candidate is dropped the search
    stops with :class:`RewardError`, since no choice would be reward-guided.
    """
    assert settings.weight is not None, "the weight is resolved before the search"
    rng = np.random.default_rng(settings.seed)
    guided = scorer is not None and settings.weight != 0 and settings.top_k > 1
    for _ in range(max_tokens):
        ids, logits = top_k(policy.logits(), settings.top_k)
        rewards = np.full(ids.shape[0], np.nan)
        live = np.ones(ids.shape[0], dtype=bool)
        if guided:
            if settings.mode == "greedy":
                live = contenders(logits, settings.weight, scorer.bounds)
            if live.sum() > 1:
                rewards[live] = scorer.score(ids[live].tolist())
                usable = np.isfinite(rewards)
                if not usable[live].any():
                    raise RewardError("the reward model returned NaN or infinity for every candidate")
                live &= usable
        scores = np.where(live, logits + settings.weight * np.nan_to_num(rewards, nan=0.0), -np.inf)
        i = choose(scores, settings.mode, settings.temperature, rng, settings.top_p)
        token = int(ids[i])
        if not settings.ignore_eos and policy.is_eog(token):
            return
        reward = float(rewards[i]) if np.isfinite(rewards[i]) else None
        yield Step(token, float(logits[i]), reward, float(scores[i]), int(np.isfinite(rewards).sum()))
        if guided:
            scorer.advance(token)
        policy.advance(token)
