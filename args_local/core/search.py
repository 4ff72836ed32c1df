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


def penalize(logits: np.ndarray, window: Sequence[int], settings: "Settings") -> np.ndarray:
    """llama.cpp's repetition penalties over the tokens in ``window``: a seen token's logit is
    divided by ``repeat_penalty`` (multiplied when it is not positive), then lowered by
    ``frequency_penalty`` times its count plus ``presence_penalty``."""
    s = settings
    if not len(window) or (s.repeat_penalty == 1 and s.presence_penalty == 0 and s.frequency_penalty == 0):
        return logits
    ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
    out = logits.astype(np.float64)
    seen = out[ids]
    seen = np.where(seen <= 0, seen * s.repeat_penalty, seen / s.repeat_penalty)
    out[ids] = seen - counts * s.frequency_penalty - s.presence_penalty
    return out


def truncate(top_logits: np.ndarray, top_p: float, min_p: float) -> np.ndarray:
    """Mask of the candidates (best first) that llama.cpp's top-p and min-p keep, judged by the
    policy's own probabilities: the fewest whose probability reaches ``top_p``, and those at
    least ``min_p`` times as likely as the best. The best candidate is always kept."""
    rel = np.exp(top_logits - top_logits[0])  # p_i / p_max
    keep = rel >= min_p
    if top_p < 1.0:
        cum = np.cumsum(rel / rel.sum())
        keep[int(np.searchsorted(cum, top_p)) + 1 :] = False
    keep[0] = True
    return keep


def choose(scores: np.ndarray, mode: Mode, temperature: float, rng: np.random.Generator) -> int:
    """Index of the chosen candidate: argmax, or a draw from softmax(scores / T).

    Candidates with a score of -inf (dropped) are never chosen.
    """
    if mode == "greedy":
        return int(np.argmax(scores))
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the best to -inf: fine
        z = (scores - scores.max()) / temperature
    p = np.exp(z)
    return int(rng.choice(scores.shape[0], p=p / p.sum()))


def args_search(
    policy: Policy,
    scorer: Scorer | None,
    settings: "Settings",
    max_tokens: int,
    history: Sequence[int] = (),
) -> Iterator[Step]:
    """Yield up to ``max_tokens`` ARGS decisions, stopping at end-of-generation unless
    ``settings.ignore_eos``. ``settings.weight`` must be set (the engine fills in the reward
    model's suggestion). ``history`` (the prompt's tokens) opens the window the repetition
    penalties look at, as in llama.cpp.

    Each step is yielded before the policy evaluates it, so a consumer that stops
    (a stop string, Ctrl-C) wastes no decode. A candidate whose reward is NaN or
    infinite is dropped from that step; if every candidate is dropped the search
    stops with :class:`RewardError`, since no choice would be reward-guided.
    """
    assert settings.weight is not None, "the weight is resolved before the search"
    rng = np.random.default_rng(settings.seed)
    guided = scorer is not None and settings.weight != 0 and settings.top_k > 1
    n = settings.repeat_last_n
    window = list(history[-n:]) if n else []
    for _ in range(max_tokens):
        ids, logits = top_k(penalize(policy.logits(), window, settings), settings.top_k)
        rewards = np.full(ids.shape[0], np.nan)
        live = truncate(logits, settings.top_p, settings.min_p)
        if guided:
            if settings.mode == "greedy":
                live &= contenders(logits, settings.weight, scorer.bounds)
            if live.sum() > 1:
                rewards[live] = scorer.score(ids[live].tolist())
                usable = np.isfinite(rewards)
                if not usable[live].any():
                    raise RewardError("the reward model returned NaN or infinity for every candidate")
                live &= usable
        filled, mode = np.nan_to_num(rewards, nan=0.0), settings.mode
        with np.errstate(over="ignore"):
            scores = logits + settings.weight * filled
        if not np.isfinite(scores[live]).all():
            # |w| * reward is beyond the float range: the same order is logit / |w| + sign(w) * reward,
            # and softmax(score / T) at that scale puts all its mass on the best candidate.
            scores, mode = logits / abs(settings.weight) + np.sign(settings.weight) * filled, "greedy"
        scores = np.where(live, scores, -np.inf)
        i = choose(scores, mode, settings.temperature, rng)
        token = int(ids[i])
        if not settings.ignore_eos and policy.is_eog(token):
            return
        reward = float(rewards[i]) if np.isfinite(rewards[i]) else None
        yield Step(token, float(logits[i]), reward, float(scores[i]), int(np.isfinite(rewards).sum()))
        if guided:
            scorer.advance(token)
        if n:
            window.append(token)
            del window[:-n]
        policy.advance(token)
