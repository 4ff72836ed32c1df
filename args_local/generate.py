"""One generation: a prompt through the search, as a stream of text pieces.

This is where tokens become text (UTF-8 safe, stop strings) and where the cost is
counted; generate, chat, eval and bench all consume :meth:`Engine.stream`.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

from .errors import PromptError
from .policy import LlamaPolicy
from .reward import RewardModel
from .search import SearchConfig, Step, args_search


@dataclass
class Piece:
    """Text decided by one step ("" while a character or a possible stop string is incomplete)."""

    text: str
    step: Step


@dataclass
class Result:
    """What a finished generation reports (``--json``, eval rows, bench timings)."""

    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    elapsed_s: float = 0.0
    first_token_s: float | None = None
    reward_calls: int = 0
    reward_candidates: int = 0
    reward_s: float = 0.0
    rewards: list[float] = field(default_factory=list)
    stop_reason: str = "length"

    @property
    def mean_reward(self) -> float | None:
        return sum(self.rewards) / len(self.rewards) if self.rewards else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("rewards")
        d["mean_reward"] = self.mean_reward
        d["tokens_per_s"] = self.tokens / self.elapsed_s if self.elapsed_s > 0 else None
        return d


class StopFilter:
    """Holds back text that might be the start of a stop string, and cuts at the first one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.held, self.stopped = self.held[:cut], "", True
            return out
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass(frozen=True)
class Request:
    """A prompt already rendered to token ids, and how to decode it."""

    prompt: str
    tokens: Sequence[int]
    config: SearchConfig = SearchConfig()
    max_tokens: int = 256
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    use_cache: bool = True


class Engine:
    """A policy and an optional reward model, ready to serve requests one after another."""

    def __init__(self, policy: LlamaPolicy, reward: RewardModel | None) -> None:
        self.policy = policy
        self.reward = reward
        self._vocab: list[str] | None = None

    def _policy_vocab(self) -> list[str]:
        if self._vocab is None:
            self._vocab = self.policy.vocab_texts()
        return self._vocab

    def messages(self, prompt: str, system: str | None) -> list[dict[str, str]]:
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

    def encode(self, prompt: str, system: str | None = None, raw: bool = False) -> list[int]:
        """Token ids of a user prompt, in the chat template unless ``raw``."""
        if not prompt.strip():
            raise PromptError("the prompt is empty; pass it as an argument or on stdin")
        if raw:
            return self.policy.tokenize((system + "\n" if system else "") + prompt, special=False)
        return self.policy.tokenize(self.policy.render_chat(self.messages(prompt, system)), special=True)

    def stream(self, request: Request, result: Result) -> Iterator[Piece]:
        """Yield text pieces as they are decided, filling ``result`` as it goes.

        ``result`` is complete when the iterator ends, and stays consistent if the
        consumer stops early (Ctrl-C): it then holds what was shown.
        """
        start = time.perf_counter()
        policy, reward = self.policy, self.reward
        before = (reward.stats.calls, reward.stats.candidates, reward.stats.seconds) if reward else (0, 0, 0.0)
        policy.start(request.tokens)
        result.prompt_tokens = len(request.tokens)
        scorer = None
        if reward is not None and request.config.weight != 0 and request.config.top_k > 1:
            scorer = reward.scorer(request.prompt, policy.token_bytes, self._policy_vocab, request.use_cache)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopFilter(request.stop)
        budget = min(request.max_tokens, policy.room())

        def account() -> None:
            result.elapsed_s = time.perf_counter() - start
            if reward is not None:
                result.reward_calls = reward.stats.calls - before[0]
                result.reward_candidates = reward.stats.candidates - before[1]
                result.reward_s = reward.stats.seconds - before[2]

        try:
            for step in args_search(policy, scorer, request.config, budget, request.ignore_eos):
                result.tokens += 1
                if result.first_token_s is None:
                    result.first_token_s = time.perf_counter() - start
                if step.reward is not None:
                    result.rewards.append(step.reward)
                text = stops.feed(decoder.decode(policy.token_bytes(step.token)))
                result.text += text
                yield Piece(text, step)
                if stops.stopped:
                    result.stop_reason = "stop"
                    return
            if result.tokens < budget:
                result.stop_reason = "eog"
            elif budget < request.max_tokens:
                result.stop_reason = "context"
            tail = stops.feed(decoder.decode(b"", final=True)) + stops.flush()
            if tail:  # only after at least one step: an empty decoder holds nothing
                result.text += tail
                yield Piece(tail, step)
        finally:
            account()
