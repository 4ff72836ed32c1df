"""The server's decoding thread: a bounded queue in front of a :class:`Batch`.

HTTP handlers run on the event loop; llama.cpp and onnxruntime run here, on one thread that
owns the batch. A handler :meth:`Scheduler.submit`\\ s a :class:`Job` (refused with
:class:`Busy` when ``parallel`` are decoding and ``queue`` are waiting), then reads the job's
events from an asyncio queue that this thread fills. A job whose client left is
:meth:`Scheduler.cancel`\\ led: it leaves the batch at the next step boundary.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import ArgsLocalError
from ..core.request import Request, Result
from ..runtime.batched import Batch, Event, Slot

log = logging.getLogger("args_local")


class Busy(Exception):
    """Every sequence is decoding and the queue is full; ``retry_after`` is a guess in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry in about {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request on its way through the scheduler. ``events`` receives ``("text", str)``
    pieces, then ``("done", None)`` or ``("error", exception)``; ``result`` is complete at
    ``done``."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    result: Result = field(default_factory=Result)
    cancelled: bool = False
    slot: Slot | None = None

    def _put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class Scheduler:
    """Admits jobs into ``batch`` at step boundaries, steps it, and hands pieces back."""

    def __init__(self, batch: Batch, queue: int) -> None:
        self.batch = batch
        self.parallel = batch.free
        self.queue = queue
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}  # id(slot) -> job; this thread only
        self._in_system = 0  # waiting + active, under the lock
        self._step_s = 0.05  # running mean of a step, for Retry-After
        self._soonest_free = 0  # fewest tokens any active job has left
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="args-local-decoder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Cancel everything and end the thread (after its current step)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    @property
    def counts(self) -> dict[str, int]:
        with self._cond:
            waiting = len(self._waiting)
            return {"active": self._in_system - waiting, "waiting": waiting, "parallel": self.parallel, "queue": self.queue}

    def submit(self, job: Job) -> None:
        """Queue ``job``, or raise :class:`Busy` when ``parallel + queue`` jobs are already in."""
        with self._cond:
            if self._stopping or self._in_system >= self.parallel + self.queue:
                wait = self._step_s * max(1, self._soonest_free)
                raise Busy(max(1, min(60, math.ceil(wait))))
            self._in_system += 1
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client left: the job ends at the next step boundary (or before it starts)."""
        job.cancelled = True
        with self._cond:
            self._cond.notify()

    # -- the decoding thread --------------------------------------------------------

    def _run(self) -> None:
        while self._tick():
            pass
        stopping = ArgsLocalError("the server is shutting down")
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for job in [*self._active.values(), *waiting]:
            self._end(job, "error", stopping)

    def _tick(self) -> bool:
        """One step boundary and one step; False when stopping."""
        with self._cond:
            while not (self._stopping or self._waiting or self._active):
                self._cond.wait()
            if self._stopping:
                return False
            joining = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.batch.free))]
        for job in [j for j in self._active.values() if j.cancelled]:
            self._end(job, "cancelled")
        for job in joining:
            if job.cancelled:
                self._end(job, "cancelled")
                continue
            job.slot = self.batch.add(job.request, job.result)
            self._active[id(job.slot)] = job
        if not self._active:
            return True
        start = time.perf_counter()
        events = self.batch.step()
        self._step_s = 0.9 * self._step_s + 0.1 * (time.perf_counter() - start)
        for event in events:
            self._deliver(event)
        self._soonest_free = min(
            (j.request.settings.max_tokens - j.result.tokens for j in self._active.values()), default=0
        )
        return True

    def _deliver(self, event: Event) -> None:
        job = self._active.get(id(event.slot))
        if job is None:
            return
        if event.piece is not None and event.piece.text:
            job._put("text", event.piece.text)
        if event.done:
            self._end(job, "done")
        elif event.error is not None:
            e = event.error
            log.warning("a request failed: %s: %s", type(e).__name__, e, exc_info=None if isinstance(e, ArgsLocalError) else e)
            self._end(job, "error", e)

    def _end(self, job: Job, how: str, error: Exception | None = None) -> None:
        """Take ``job`` out of the batch and the count, and tell its handler how it ended."""
        if job.slot is not None:
            self._active.pop(id(job.slot), None)
            self.batch.remove(job.slot)
        with self._cond:
            self._in_system -= 1
        if how == "cancelled":
            log.info("request cancelled after %d tokens (the client left)", job.result.tokens)
        job._put(how, error)
