"""The engine: a policy and an optional reward model, ready to serve requests one after
another. This is where tokens become text (UTF-8 safe, stop strings) and where the cost is
counted; generate, chat, batch, eval and bench all consume :meth:`Engine.stream`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

from ..core.combine import WeightedSum
from ..core.errors import PromptError, SettingsError
from ..core.manifest import REFERENCE_WEIGHT
from ..core.request import ModelReward, Piece, Request, Result, RewardStats, chat_messages
from ..core.search import Policy, Scorer, Step, args_search
from ..core.settings import Settings
from ..core.text import StopFilter, Utf8Pieces, text_problem
from .caches import make_scorer
from .reward import RewardModel


class StreamPolicy(Policy, Protocol):
    """What :meth:`Engine.stream` needs of a policy beyond the search's protocol:
    :class:`LlamaPolicy`, one sequence of the server's batched context, or a policy on
    another server (:class:`~args_local.runtime.remote.RemotePolicy`)."""

    def start(self, tokens: Sequence[int], reuse_prefix: bool = False, settings: Settings | None = None) -> None:
        """Position the policy after ``tokens``. ``settings`` are the search's: a policy that
        returns only the top of its distribution learns from them how many candidates it reads."""

    def room(self) -> int: ...

    def token_bytes(self, token: int) -> bytes: ...


class PolicyModel(StreamPolicy, Protocol):
    """Everything the engine and the front ends use of their policy."""

    path: Path | str
    name: str  # what the server calls the model
    n_vocab: int
    n_ctx: int
    evaluated: int  # tokens the model ran (or was sent to run): shows cache reuse

    def vocab_texts(self) -> list[str]: ...

    def tokenize(self, text: str, special: bool, bos: bool = True) -> list[int]: ...

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str: ...

    def encode_chat(self, messages: Sequence[dict[str, str]], skip_chars: int = 0) -> list[int]: ...


@dataclass(frozen=True)
class Guide:
    """A reward model and the weight ``-r PATH:WEIGHT`` gave it (None: the request's -w,
    else the model's own suggestion)."""

    model: RewardModel
    weight: float | None = None


class Engine:
    """A policy and the reward models that guide it (none, one, or several whose weighted
    rewards add up). Requests run one after another; the policy's KV cache carries over
    between them only where that changes no result (see :meth:`LlamaPolicy.start`)."""

    def __init__(self, policy: PolicyModel, reward: RewardModel | None = None, guides: Sequence[Guide] | None = None) -> None:
        self.policy = policy
        self.guides: list[Guide] = list(guides) if guides is not None else ([Guide(reward)] if reward else [])
        self._vocab: list[str] | None = None

    @property
    def reward(self) -> RewardModel | None:
        """The first reward model (the only one, usually)."""
        return self.guides[0].model if self.guides else None

    @reward.setter
    def reward(self, model: RewardModel | None) -> None:
        self.guides = [Guide(model)] if model else []

    def labels(self) -> list[str]:
        """The reward models' names, numbered where one is given twice."""
        names = [g.model.manifest.name for g in self.guides]
        return [n if names.count(n) == 1 else f"{n}#{names[:i + 1].count(n)}" for i, n in enumerate(names)]

    def _policy_vocab(self) -> list[str]:
        if self._vocab is None:
            self._vocab = self.policy.vocab_texts()
        return self._vocab

    @property
    def default_weight(self) -> float | None:
        """The weight when a request sets none: the reward model's (its -r weight, else its
        suggestion), the reference's without one, and None with several (each has its own)."""
        if len(self.guides) > 1:
            return None
        return self.weights(Settings())[0] if self.guides else REFERENCE_WEIGHT

    def weights(self, settings: Settings) -> list[float]:
        """Each reward model's weight for a request: its -r weight, else -w, else its suggestion."""
        return [g.weight if g.weight is not None else settings.weight if settings.weight is not None
                else g.model.manifest.suggested_weight for g in self.guides]

    def resolve(self, settings: Settings) -> Settings:
        """Settings ready for the search: the weight filled in, and checked against this policy."""
        if settings.top_k > self.policy.n_vocab:
            raise SettingsError(f"top_k {settings.top_k} is more than the vocabulary ({self.policy.n_vocab})", "top_k")
        return settings.with_weight(self.default_weight)

    def make_scorer(self, model: RewardModel, prompt: str, use_cache: bool = True, system: str | None = None) -> Scorer:
        """The fastest exact scorer of ``model`` for responses to ``prompt`` (under the system
        message ``system``) by this policy."""
        return make_scorer(model, prompt, self.policy.token_bytes, self._policy_vocab, use_cache, system)

    def scorer(self, prompt: str, settings: Settings, system: str | None = None) -> tuple[Scorer | None, float, list[int]]:
        """(scorer, weight for the search, indices of the models it asks). One model is searched
        with its weight as before; several through :class:`WeightedSum` with weight 1. Models
        with weight 0, or any when k = 1, are not asked."""
        weights = self.weights(settings)
        active = [i for i, w in enumerate(weights) if w != 0] if settings.top_k > 1 else []
        scorers = [self.make_scorer(self.guides[i].model, prompt, settings.use_cache, system) for i in active]
        if len(active) == 1:
            return scorers[0], weights[active[0]], active
        if not active:
            return None, 0.0, active
        return WeightedSum([(s, weights[i]) for s, i in zip(scorers, active)]), 1.0, active

    @staticmethod
    def messages(prompt: str, system: str | None) -> list[dict[str, str]]:
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

    def encode(self, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
        """Token ids of a user prompt, in the chat template unless ``raw``."""
        if not prompt.strip():
            raise PromptError("the prompt is empty; pass it as an argument or on stdin")
        problem = text_problem(prompt)
        if problem:
            raise PromptError(f"the prompt {problem}")
        if raw:
            return self.policy.tokenize((system + "\n" if system else "") + prompt, special=False)
        return self.policy.encode_chat(self.messages(prompt, system))

    def request(self, prompt: str, settings: Settings) -> Request:
        """A request for one user prompt under ``settings`` (checked and completed here)."""
        settings = self.resolve(settings)
        return Request(prompt=prompt, tokens=self.encode(prompt, settings.system, settings.raw), settings=settings)

    def chat_request(self, messages: Sequence[Mapping[str, Any]], settings: Settings) -> Request:
        """A request for the next reply of a conversation (see :func:`chat_messages`), rendered
        whole in the chat template. ``settings.system`` is used when the messages hold no
        system message of their own."""
        settings = self.resolve(settings)
        if settings.raw:
            raise SettingsError("raw does not apply to a conversation: its messages are rendered in the chat template", "raw")
        checked = chat_messages(messages)
        if settings.system and checked[0]["role"] != "system":
            checked.insert(0, {"role": "system", "content": settings.system})
        system = checked[0]["content"] if checked[0]["role"] == "system" else None
        return Request(prompt=checked[-1]["content"], tokens=self.policy.encode_chat(checked), settings=settings, system=system)

    def stream(self, request: Request, result: Result, continues: bool = False, policy: StreamPolicy | None = None) -> Iterator[Piece]:
        """Yield text pieces as they are decided, filling ``result`` as it goes.

        ``result`` is complete when the iterator ends, and stays consistent if the consumer
        stops early (Ctrl-C): it then holds what was shown. ``continues`` marks a request
        that extends the previous one (a chat's next turn): only its new tokens are evaluated.
        ``policy`` replaces the engine's own (the server's per-request sequences of
        :mod:`args_local.runtime.batched`); it needs ``start``, ``room`` and ``token_bytes``.
        """
        start = time.perf_counter()
        policy = policy or self.policy
        settings = self.resolve(request.settings)
        policy.start(request.tokens, reuse_prefix=continues, settings=settings)
        result.prompt_tokens = len(request.tokens)
        system = request.system if request.system is not None else settings.system
        scorer, weight, active = self.scorer(request.prompt, settings, system)
        result.models = [ModelReward(label, w) for label, w in zip(self.labels(), self.weights(settings))]
        pieces = Utf8Pieces()
        stops = StopFilter(settings.stop)
        budget = min(settings.max_tokens, policy.room())

        try:
            steps = args_search(policy, scorer, settings.update(weight=weight), budget, request.tokens)
            for step in _charged(steps, self.guides, result):
                result.tokens += 1
                if result.first_token_s is None:
                    result.first_token_s = time.perf_counter() - start
                if step.reward is not None:
                    result.rewards.append(step.reward)
                    each = scorer.parts_of(step.token) if isinstance(scorer, WeightedSum) else [step.reward]
                    for i, r in zip(active, each):
                        result.models[i].rewards.append(r)
                text = stops.feed(pieces.feed(policy.token_bytes(step.token)))
                result.text += text
                yield Piece(text, step)
                if stops.stopped:
                    result.stop_reason = "stop"
                    return
            if result.tokens < budget:
                result.stop_reason = "eog"
            elif budget < settings.max_tokens:
                result.stop_reason = "context"
            tail = stops.feed(pieces.flush()) + stops.flush()
            if tail:  # only after at least one step: an empty decoder holds nothing
                result.text += tail
                yield Piece(tail, step)
        finally:
            result.elapsed_s = time.perf_counter() - start

    def generate(self, request: Request, continues: bool = False) -> Result:
        """The whole reply at once."""
        result = Result()
        for _ in self.stream(request, result, continues):
            pass
        return result


def _charged(steps: Iterator[Step], guides: Sequence[Guide], result: Result) -> Iterator[Step]:
    """The search's steps, with each reward model's cost spent inside each step added to
    ``result``: requests whose steps interleave (the server's) each count only their own."""
    while True:
        before = [g.model.stats.copy() for g in guides]
        try:
            step = next(steps)
        except StopIteration:
            return
        finally:
            for m, g, b in zip(result.models, guides, before):
                m.cost = m.cost + g.model.stats.since(b)
            result.reward_cost = sum((m.cost for m in result.models), RewardStats())
        yield step
