"""The engine: a policy and an optional reward model, ready to serve requests one after
another. This is where tokens become text (UTF-8 safe, stop strings) and where the cost is
counted; generate, chat, batch, eval and bench all consume :meth:`Engine.stream`."""

from __future__ import annotations

import time
from typing import Any, Iterator, Mapping, Protocol, Sequence

from ..core.errors import PromptError, SettingsError
from ..core.manifest import REFERENCE_WEIGHT
from ..core.request import Piece, Request, Result, chat_messages
from ..core.search import Policy, Step, args_search
from ..core.settings import Settings
from ..core.text import StopFilter, Utf8Pieces, text_problem
from .caches import make_scorer
from .policy import LlamaPolicy
from .reward import RewardModel


class StreamPolicy(Policy, Protocol):
    """What :meth:`Engine.stream` needs of a policy beyond the search's protocol:
    :class:`LlamaPolicy`, or one sequence of the server's batched context."""

    def start(self, tokens: Sequence[int], reuse_prefix: bool = False) -> None: ...

    def room(self) -> int: ...

    def token_bytes(self, token: int) -> bytes: ...


class Engine:
    """A policy and an optional reward model. Requests run one after another; the policy's
    KV cache carries over between them only where that changes no result (see
    :meth:`LlamaPolicy.start`)."""

    def __init__(self, policy: LlamaPolicy, reward: RewardModel | None) -> None:
        self.policy = policy
        self.reward = reward
        self._vocab: list[str] | None = None

    def _policy_vocab(self) -> list[str]:
        if self._vocab is None:
            self._vocab = self.policy.vocab_texts()
        return self._vocab

    @property
    def default_weight(self) -> float:
        """The weight when a request sets none: the reward model's suggestion, else the reference's."""
        return self.reward.manifest.suggested_weight if self.reward else REFERENCE_WEIGHT

    def resolve(self, settings: Settings) -> Settings:
        """Settings ready for the search: the weight filled in, and checked against this policy."""
        if settings.top_k > self.policy.n_vocab:
            raise SettingsError(f"top_k {settings.top_k} is more than the vocabulary ({self.policy.n_vocab})", "top_k")
        return settings.with_weight(self.default_weight)

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
        return Request(prompt=checked[-1]["content"], tokens=self.policy.encode_chat(checked), settings=settings)

    def stream(self, request: Request, result: Result, continues: bool = False, policy: StreamPolicy | None = None) -> Iterator[Piece]:
        """Yield text pieces as they are decided, filling ``result`` as it goes.

        ``result`` is complete when the iterator ends, and stays consistent if the consumer
        stops early (Ctrl-C): it then holds what was shown. ``continues`` marks a request
        that extends the previous one (a chat's next turn): only its new tokens are evaluated.
        ``policy`` replaces the engine's own (the server's per-request sequences of
        :mod:`args_local.runtime.batched`); it needs ``start``, ``room`` and ``token_bytes``.
        """
        start = time.perf_counter()
        policy, reward = policy or self.policy, self.reward
        settings = self.resolve(request.settings)
        policy.start(request.tokens, reuse_prefix=continues)
        result.prompt_tokens = len(request.tokens)
        scorer = None
        if reward is not None and settings.weight != 0 and settings.top_k > 1:
            scorer = make_scorer(reward, request.prompt, policy.token_bytes, self._policy_vocab, settings.use_cache)
        pieces = Utf8Pieces()
        stops = StopFilter(settings.stop)
        budget = min(settings.max_tokens, policy.room())

        try:
            steps = args_search(policy, scorer, settings, budget, request.tokens)
            for step in _charged(steps, reward, result) if reward is not None else steps:
                result.tokens += 1
                if result.first_token_s is None:
                    result.first_token_s = time.perf_counter() - start
                if step.reward is not None:
                    result.rewards.append(step.reward)
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


def _charged(steps: Iterator[Step], reward: RewardModel, result: Result) -> Iterator[Step]:
    """The search's steps, with the reward model's cost spent inside each one added to
    ``result``: requests whose steps interleave (the server's) each count only their own."""
    while True:
        before = reward.stats.copy()
        try:
            step = next(steps)
        except StopIteration:
            return
        finally:
            result.reward_cost = result.reward_cost + reward.stats.since(before)
        yield step
