"""``args-local serve``: an OpenAI-compatible HTTP server with ARGS decoding and continuous
batching (Starlette, sse-starlette and uvicorn, from the ``server`` extra)."""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..core.errors import ArgsLocalError
from ..core.settings import Settings

if TYPE_CHECKING:
    from ..runtime.load import ModelOptions


@dataclass(frozen=True)
class ServeOptions:
    """Where to listen and how much to take on (what the command's flags set)."""

    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4
    queue: int = 16
    api_key: str | None = None
    lanes: int | None = None  # None: one per llama.cpp thread on the CPU, one on a GPU

    def lane_sizes(self, threads: int, gpu: bool) -> list[int]:
        """How many of the ``parallel`` sequences each lane holds. On a CPU a decode of a
        small model costs about the same per row batched or not, so lanes of their own
        threads use the cores better than one batch; a GPU batches for free."""
        lanes = min(self.parallel, self.lanes or (1 if gpu else threads))
        return [self.parallel // lanes + (i < self.parallel % lanes) for i in range(lanes)]


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that port 0 (any free port) can be reported."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ArgsLocalError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(models: ModelOptions, defaults: Settings, options: ServeOptions, announce: Callable[[str], None]) -> None:
    """Load the models, then answer requests until interrupted (Ctrl-C, SIGTERM); ``announce``
    gets one line when the server is ready."""
    try:
        import uvicorn
    except ImportError:
        raise ArgsLocalError("the server needs the server extra: pip install 'args-local[server]'") from None
    from ..runtime.batched import Batch, check_room
    from ..runtime.load import MIN_CTX, load_engine
    from .app import Api
    from .scheduler import Scheduler

    # The engine's own llama.cpp context only tokenizes here: keep it small. The requests'
    # sequences live in the lanes' contexts, -c tokens each.
    engine = load_engine(dataclasses.replace(models, ctx_size=MIN_CTX))
    threads = engine.policy.threads
    check_room(engine.policy, options.parallel, models.ctx_size)  # all lanes together
    batches: list[Batch] = []
    try:
        for size in options.lane_sizes(threads, gpu=models.gpu_layers != 0):
            batches.append(Batch(engine, size, models.ctx_size))
    except BaseException:
        for batch in batches:
            batch.close()
        raise
    scheduler = Scheduler(batches, options.queue, threads)
    model_id = engine.policy.path.stem
    n_ctx = batches[0].policy.n_ctx
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
    announce(f"serving {model_id} on http://{url_host}:{port}/v1 ({options.parallel} in parallel{lanes}, "
             f"{options.queue} queued, {n_ctx} tokens of context each"
             f"{', API key required' if options.api_key else ''})")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        scheduler.stop()
        for batch in batches:
            batch.close()
        sock.close()
