"""``args-local serve``: an OpenAI-compatible HTTP server with ARGS decoding and continuous
batching (Starlette, sse-starlette and uvicorn, from the ``server`` extra): in llama.cpp
contexts here, or, with ``--policy-url``, in the policy server's parallel slots."""

from __future__ import annotations

import dataclasses
import functools
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..core.errors import ArgsLocalError
from ..core.settings import Settings

if TYPE_CHECKING:
    from ..runtime.engine import Engine
    from ..runtime.load import ModelOptions
    from ..runtime.slots import Slots

log = logging.getLogger("args_local")


@dataclass(frozen=True)
class ServeOptions:
    """Where to listen and how much to take on (what the command's flags set)."""

    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4
    queue: int = 16
    api_key: str | None = None
    lanes: int = 1

    def lane_sizes(self) -> list[int]:
        """How many of the ``parallel`` sequences each lane holds (never more lanes than
        sequences). One lane is the default: on this project's 2-core machine two lanes gave
        4 requests about the throughput of one (see the README's Server section); on a GPU, or
        with a policy server, one lane's batch is what the engine batches best."""
        lanes = min(self.parallel, self.lanes)
        return [self.parallel // lanes + (i < self.parallel % lanes) for i in range(lanes)]


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that port 0 (any free port) can be reported."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ArgsLocalError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def open_lanes(models: ModelOptions, options: ServeOptions) -> tuple[Engine, list[Slots], int]:
    """The engine, the lanes and the llama.cpp threads they share: the one place that chooses
    between llama.cpp contexts here and requests on a policy server (``--policy-url``)."""
    from ..runtime.load import MIN_CTX, load_engine
    from ..runtime.remote import RemotePolicy
    from ..runtime.slots import RemoteSlots

    make: Callable[[int], Slots]  # a lane of this many requests
    if models.policy_url:
        engine = load_engine(models)
        remote = engine.policy
        assert isinstance(remote, RemotePolicy)
        if remote.slots and options.parallel > remote.slots:
            log.warning("the policy server decodes %d requests at once (its --parallel); the other %d of --parallel %d "
                        "wait there for a slot", remote.slots, options.parallel - remote.slots, options.parallel)
        threads = 1  # the policy's threads are the server's
        sizes = options.lane_sizes()
        make = functools.partial(RemoteSlots, engine, remote)
    else:
        from ..runtime.batched import Batch, check_room

        # The engine's own llama.cpp context only tokenizes here: keep it small. The requests'
        # sequences live in the lanes' contexts, -c tokens each.
        engine = load_engine(dataclasses.replace(models, ctx_size=MIN_CTX))
        threads = engine.policy.threads
        check_room(engine.policy, options.parallel, models.ctx_size)  # all lanes together
        sizes = options.lane_sizes()
        make = functools.partial(Batch, engine, n_ctx=models.ctx_size)
    lanes: list[Slots] = []
    try:
        for size in sizes:
            lanes.append(make(size))
    except BaseException:
        for lane in lanes:
            lane.close()
        raise
    return engine, lanes, threads


def serve(models: ModelOptions, defaults: Settings, options: ServeOptions, announce: Callable[[str], None]) -> None:
    """Load the models, then answer requests until interrupted (Ctrl-C, SIGTERM); ``announce``
    gets one line when the server is ready."""
    try:
        import uvicorn
    except ImportError:
        raise ArgsLocalError("the server needs the server extra: pip install 'args-local[server]'") from None
    from .app import Api
    from .scheduler import Scheduler

    engine, batches, threads = open_lanes(models, options)
    scheduler = Scheduler(batches, options.queue, threads)
    model_id = engine.policy.name
    n_ctx = batches[0].n_ctx
    api = Api(engine, scheduler, defaults, model_id, n_ctx, options.api_key)
    sock = listen(options.host, options.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        api.app(), log_level="info" if models.verbose else "warning", access_log=models.verbose,
        timeout_graceful_shutdown=5, server_header=False,
    )
    scheduler.start()
    url_host = f"[{host}]" if ":" in host else host
    lanes = f" in {len(batches)} lanes" if len(batches) > 1 else ""
    served = f", the policy on {models.policy_url}" if models.policy_url else ""
    announce(f"serving {model_id} on http://{url_host}:{port}/v1 ({options.parallel} in parallel{lanes}{served}, "
             f"{options.queue} queued, {n_ctx} tokens of context each"
             f"{', API key required' if options.api_key else ''})")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        scheduler.stop()
        for batch in batches:
            batch.close()
        sock.close()
