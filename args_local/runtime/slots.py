"""One lane of the server: requests in flight, each its own, unchanged search (a generator
from :meth:`Engine.stream`), all advanced one decision per step by the lane's thread, joining
and leaving at step boundaries. :class:`Slots` holds what both runtimes share; where a
request's policy comes from and how a step reaches it is theirs:

- in process (:class:`~args_local.runtime.batched.Batch`): one llama.cpp context, a sequence
  per request, the decided tokens of a step decoded together in one batch;
- on a policy server (:class:`RemoteSlots`): a connection per request, each step one HTTP
  call, all of a step's calls sent at once from a thread pool, so that the server's parallel
  slots batch them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from ..core.request import Piece, Request, Result
from .engine import Engine, StreamPolicy
from .remote import RemotePolicy


@dataclass
class Slot:
    """An active request: the policy it decodes on, its piece stream and its result so far."""

    request: Request
    result: Result
    policy: StreamPolicy
    pieces: Iterator[Piece] = field(repr=False)


@dataclass
class Event:
    """What one request did in a step: a piece, its end (``done``), or an error that ended it."""

    slot: Slot
    piece: Piece | None = None
    done: bool = False
    error: Exception | None = None


def advance(slot: Slot) -> Event:
    """One decision of one request. A request that fails ends alone; the others go on."""
    try:
        return Event(slot, piece=next(slot.pieces))
    except StopIteration:
        return Event(slot, done=True)
    except Exception as e:  # noqa: BLE001 -- one request's failure (a bad reward, a bug) is its own
        return Event(slot, error=e)


class Slots(ABC):
    """Up to ``free`` more requests decoded in lock-step, ``n_ctx`` tokens of context each.

    Not thread-safe: one thread calls :meth:`add`, :meth:`step` and :meth:`remove`."""

    def __init__(self, engine: Engine, n_ctx: int) -> None:
        self.engine = engine
        self.n_ctx = n_ctx
        self.slots: list[Slot] = []

    @property
    @abstractmethod
    def free(self) -> int:
        """How many more requests can join now."""

    @abstractmethod
    def _take(self) -> StreamPolicy:
        """The policy for a joining request (there is a free one)."""

    @abstractmethod
    def _release(self, slot: Slot) -> None:
        """``slot`` has left: its policy is free again."""

    def _advance_all(self, slots: list[Slot]) -> list[Event]:
        """One decision of each request."""
        return [advance(slot) for slot in slots]

    def set_threads(self, threads: int) -> None:
        """Compute with ``threads`` threads from the next step on (the lanes share the cores);
        a policy computed elsewhere has none here."""

    def add(self, request: Request, result: Result) -> Slot:
        """Start ``request``; its prompt is evaluated at its first step."""
        policy = self._take()
        slot = Slot(request, result, policy, self.engine.stream(request, result, policy=policy))
        self.slots.append(slot)
        return slot

    def remove(self, slot: Slot) -> None:
        """End ``slot`` now (finished, failed or cancelled) and free its policy."""
        if slot in self.slots:
            self.slots.remove(slot)
            slot.pieces.close()
            self._release(slot)

    def step(self) -> list[Event]:
        """Advance every active request by one decision; those that ended leave."""
        events = self._advance_all(list(self.slots))
        for event in events:
            if event.done or event.error is not None:
                self.remove(event.slot)
        return events

    def close(self) -> None:
        for slot in list(self.slots):
            self.remove(slot)


class RemoteSlots(Slots):
    """Requests on a policy served elsewhere (:class:`~args_local.runtime.remote.RemotePolicy`),
    each over a connection of its own; the context is the server's per slot.

    A step runs every request's next decision at once in a thread pool: each is one HTTP call
    (and its reward-model call), so the calls reach the server together and it decodes them in
    one batch in its parallel slots. Measured on llama-server (README, Remote policy), steps
    sent together cost it about the CPU time per token of one request alone, and steps sent
    whenever each request is ready (a lane per request) up to twice that. The reward models are
    shared (onnxruntime runs calls side by side on one session; their counters are per
    thread)."""

    def __init__(self, engine: Engine, remote: RemotePolicy, size: int) -> None:
        super().__init__(engine, remote.n_ctx)
        self._policies = [remote.fork() for _ in range(size)]
        self._idle: list[StreamPolicy] = list(self._policies)
        self._pool = ThreadPoolExecutor(size, thread_name_prefix="args-local-remote")

    @property
    def free(self) -> int:
        return len(self._idle)

    def _take(self) -> StreamPolicy:
        return self._idle.pop()

    def _release(self, slot: Slot) -> None:
        self._idle.append(slot.policy)

    def _advance_all(self, slots: list[Slot]) -> list[Event]:
        return list(self._pool.map(advance, slots))

    def close(self) -> None:
        super().close()
        self._pool.shutdown()
        for policy in self._policies:
            policy.close()
