"""The server's decoding threads: a bounded queue in front of one or more lanes.

HTTP handlers run on the event loop; llama.cpp and onnxruntime run here. A *lane* is a
:class:`~args_local.runtime.slots.Slots` (a :class:`~args_local.runtime.batched.Batch`: its own
llama.cpp context and sequences; or :class:`~args_local.runtime.slots.RemoteSlots`: requests
on a policy server) and the one thread that steps it. A handler :meth:`Scheduler.submit`\\ s
a :class:`Job` (refused with :class:`Busy` when every sequence is decoding and ``queue`` jobs are waiting), then reads the job's events from an
asyncio queue that its lane's thread fills. A job whose client left is
:meth:`Scheduler.cancel`\\ led: it leaves its batch at the next step boundary.

Why lanes: on a CPU, one decode of a small model is mostly arithmetic, done row by row, so a
batch of 4 rows costs about 4 times one row, and the threads of one decode wait for each other
at every operation. Two lanes of one thread each, side by side on two cores, keep both cores
busy with no waiting. A lone request goes to the first lane, which decodes on all the policy's
threads, as ``generate`` does, less one for each other lane then busy
(:meth:`Scheduler._threads_of`). With a
policy server one lane sends all its requests' steps at once, and the server batches them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..core.errors import ArgsLocalError
from ..core.request import Request, Result
from ..runtime.slots import Event, Slot, Slots

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


@dataclass(eq=False)
class Lane:
    """A batch and what the scheduler knows about it; ``active`` is touched by its thread only."""

    batch: Slots
    thread: threading.Thread | None = None
    active: dict[int, Job] = field(default_factory=dict)  # id(slot) -> job
    soonest_free: int = 0  # fewest tokens any active job has left


class Scheduler:
    """Admits jobs into the lanes at their step boundaries, steps them, and hands pieces back."""

    def __init__(self, batches: Sequence[Slots], queue: int, threads: int) -> None:
        self.lanes = [Lane(b) for b in batches]
        self.parallel = sum(b.free for b in batches)
        self.queue = queue
        self.threads = threads  # llama.cpp threads shared by the busy lanes
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._in_system = 0  # waiting + active, under the lock
        self._step_s = 0.05  # running mean of a step, for Retry-After
        self._stopping = False
        for i, lane in enumerate(self.lanes):
            if i:
                lane.batch.set_threads(1)
            lane.thread = threading.Thread(target=self._run, args=(lane,), name=f"args-local-lane-{i}", daemon=True)

    def start(self) -> None:
        for lane in self.lanes:
            assert lane.thread is not None
            lane.thread.start()

    def stop(self) -> None:
        """Cancel everything and end the threads (after their current steps)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for lane in self.lanes:
            assert lane.thread is not None
            lane.thread.join(timeout=30)

    @property
    def counts(self) -> dict[str, Any]:
        with self._cond:
            waiting = len(self._waiting)
            return {"active": self._in_system - waiting, "waiting": waiting, "parallel": self.parallel, "queue": self.queue,
                    "lanes": [len(lane.active) for lane in self.lanes]}

    def submit(self, job: Job) -> None:
        """Queue ``job``, or raise :class:`Busy` when ``parallel + queue`` jobs are already in."""
        with self._cond:
            if self._stopping or self._in_system >= self.parallel + self.queue:
                wait = self._step_s * max(1, min(lane.soonest_free for lane in self.lanes))
                raise Busy(max(1, min(60, math.ceil(wait))))
            self._in_system += 1
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client left: the job ends at the next step boundary (or before it starts)."""
        job.cancelled = True
        with self._cond:
            self._cond.notify_all()

    # -- the decoding threads, one per lane ------------------------------------------

    def _run(self, lane: Lane) -> None:
        while self._tick(lane):
            pass
        stopping = ArgsLocalError("the server is shutting down")
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for job in [*lane.active.values(), *waiting]:
            self._end(lane, job, "error", stopping)

    def _takes(self, lane: Lane) -> bool:
        """Whether ``lane`` should take the next waiting job: the first lane with the most free
        sequences does, so that requests spread over the lanes (and so over the cores), and a
        lone client keeps decoding on the same lane."""
        if not self._waiting:
            return False
        free = [other.batch.free for other in self.lanes]
        most = max(free)
        return most > 0 and free.index(most) == self.lanes.index(lane)

    def _threads_of(self, lane: Lane) -> int:
        """llama.cpp threads for ``lane``'s next step: the first lane takes the policy's threads
        less one for each other busy lane, which decode on one thread each. Only the first lane
        ever runs a team of several threads: once two OS threads own OpenMP teams, the process
        has more OpenMP threads than cores and libgomp stops spinning at its barriers, which
        made a lone request 1.5x slower per token here."""
        if lane is not self.lanes[0]:
            return 1
        busy = sum(1 for other in self.lanes if other.active)
        return max(1, self.threads - (busy - 1))

    def _tick(self, lane: Lane) -> bool:
        """One step boundary and one step of ``lane``; False when stopping."""
        with self._cond:
            while not (self._stopping or lane.active or self._takes(lane)):
                self._cond.wait()
            if self._stopping:
                return False
            unstarted = []  # cancelled while waiting
            while self._takes(lane):  # sequences are taken under the lock: the others see it
                job = self._waiting.popleft()
                if job.cancelled:
                    unstarted.append(job)
                    continue
                job.slot = lane.batch.add(job.request, job.result)
                lane.active[id(job.slot)] = job
            if self._waiting:
                self._cond.notify_all()  # another lane may have more room now
        for job in [*unstarted, *(j for j in lane.active.values() if j.cancelled)]:
            self._end(lane, job, "cancelled")
        if not lane.active:
            return True
        lane.batch.set_threads(self._threads_of(lane))
        start = time.perf_counter()
        events = lane.batch.step()
        self._step_s = 0.9 * self._step_s + 0.1 * (time.perf_counter() - start)
        for event in events:
            self._deliver(lane, event)
        lane.soonest_free = min(
            (j.request.settings.max_tokens - j.result.tokens for j in lane.active.values()), default=0
        )
        return True

    def _deliver(self, lane: Lane, event: Event) -> None:
        job = lane.active.get(id(event.slot))
        if job is None:
            return
        if event.piece is not None and event.piece.text:
            job._put("text", event.piece.text)
        if event.done:
            self._end(lane, job, "done")
        elif event.error is not None:
            e = event.error
            log.warning("a request failed: %s: %s", type(e).__name__, e, exc_info=None if isinstance(e, ArgsLocalError) else e)
            self._end(lane, job, "error", e)

    def _end(self, lane: Lane, job: Job, how: str, error: Exception | None = None) -> None:
        """Take ``job`` out of its batch and the count, and tell its handler how it ended."""
        if job.slot is not None:
            lane.active.pop(id(job.slot), None)
            lane.batch.remove(job.slot)
        with self._cond:
            self._in_system -= 1
            self._cond.notify_all()  # this lane has room again
        if how == "cancelled":
            log.info("request cancelled after %d tokens (the client left)", job.result.tokens)
        job._put(how, error)
