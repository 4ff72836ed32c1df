"""What a generation is asked for and what it reports: :class:`Request`, :class:`Result`,
:class:`Piece`, and the reward model's running costs (:class:`RewardStats`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .errors import PromptError
from .search import Step
from .settings import Settings


@dataclass(frozen=True)
class Request:
    """A prompt already rendered to token ids, and the settings to decode it with. ``prompt``
    and ``system`` are what the reward models read the response against (a conversation's
    last user message and its system message; None: the settings' system message)."""

    prompt: str
    tokens: Sequence[int]
    settings: Settings = Settings()
    system: str | None = None


ROLES = ("system", "user", "assistant")


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """A conversation as the chat template takes it: ``{"role", "content"}`` dicts with a known
    role and text content, ending in a user message (the one the reply answers), or a
    :class:`PromptError` that names the first message that is not."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise PromptError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    checked = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if role not in ROLES or not isinstance(content, str):
            raise PromptError(f"message {i} must have a role ({', '.join(ROLES)}) and a string content")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "user" or not checked[-1]["content"].strip():
        raise PromptError("the last message must be the user's, and not empty: it is what the reply answers")
    return checked


@dataclass
class RewardStats:
    """What a reward model cost: session runs, candidates scored, seconds. Counters only grow;
    what one generation cost is the difference of two copies (:meth:`since`)."""

    calls: int = 0
    candidates: int = 0
    seconds: float = 0.0

    def copy(self) -> "RewardStats":
        return dataclasses.replace(self)

    def since(self, before: "RewardStats") -> "RewardStats":
        return RewardStats(self.calls - before.calls, self.candidates - before.candidates, self.seconds - before.seconds)

    def __add__(self, other: "RewardStats") -> "RewardStats":
        return RewardStats(self.calls + other.calls, self.candidates + other.candidates, self.seconds + other.seconds)


@dataclass
class ModelReward:
    """One reward model's part in a generation: its weight, the reward it gave each chosen
    token it was asked about, and what it cost."""

    name: str
    weight: float
    rewards: list[float] = field(default_factory=list)
    cost: RewardStats = field(default_factory=RewardStats)

    @property
    def mean_reward(self) -> float | None:
        return sum(self.rewards) / len(self.rewards) if self.rewards else None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "mean_reward": self.mean_reward,
                "calls": self.cost.calls, "candidates": self.cost.candidates, "seconds": self.cost.seconds}


@dataclass
class Piece:
    """Text decided by one step ("" while a character or a possible stop string is incomplete)."""

    text: str
    step: Step


@dataclass
class Result:
    """What a finished generation reports (``--json``, batch and eval rows, bench timings).

    ``rewards`` holds what the search added at each step the reward models were asked: the
    reward of the one model, or with several the weighted sum ``sum_i w_i * r_i``; ``models``
    breaks it down per model (its own rewards, calls and seconds). The ``reward_*`` costs are
    the totals over all models.
    """

    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    elapsed_s: float = 0.0
    first_token_s: float | None = None
    reward_calls: int = 0
    reward_candidates: int = 0
    reward_s: float = 0.0
    rewards: list[float] = field(default_factory=list)
    models: list[ModelReward] = field(default_factory=list)
    stop_reason: str = "length"

    @property
    def mean_reward(self) -> float | None:
        return sum(self.rewards) / len(self.rewards) if self.rewards else None

    @property
    def reward_cost(self) -> RewardStats:
        return RewardStats(self.reward_calls, self.reward_candidates, self.reward_s)

    @reward_cost.setter
    def reward_cost(self, stats: RewardStats) -> None:
        self.reward_calls, self.reward_candidates, self.reward_s = stats.calls, stats.candidates, stats.seconds

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("rewards")
        d["reward_models"] = [m.as_dict() for m in self.models]
        d.pop("models")
        d["mean_reward"] = self.mean_reward
        d["tokens_per_s"] = self.tokens / self.elapsed_s if self.elapsed_s > 0 else None
        return d
