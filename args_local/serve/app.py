"""The HTTP front end: a Starlette app with OpenAI's endpoints, streamed with sse-starlette.

Every error, ours or Starlette's (404, 405), leaves as OpenAI's JSON error body. Handlers
never decode: they parse, tokenize, hand a :class:`Job` to the :class:`Scheduler` and relay
its events, and cancel it when the client goes away.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.errors import ArgsLocalError, PromptError, SettingsError
from ..core.request import Request
from ..core.settings import Settings
from ..runtime.engine import Engine
from .protocol import ApiError, Call, Reply, bad, invalid, parse
from .scheduler import Busy, Job, Scheduler

log = logging.getLogger("args_local")

MAX_BODY = 4 << 20  # bytes: a whole context of text, JSON-escaped, fits many times over
STATUS_TYPES = {401: "authentication_error", 404: "invalid_request_error", 405: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error"}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Api:
    """The endpoints, bound to one engine, its scheduler and the server's defaults."""

    def __init__(self, engine: Engine, scheduler: Scheduler, defaults: Settings, model_id: str,
                 n_ctx: int, api_key: str | None = None) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.defaults = defaults
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.api_key = api_key
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        handlers = {HTTPException: self._http_error, ApiError: self._api_error, Exception: self._internal_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # -- errors ---------------------------------------------------------------------

    async def _http_error(self, request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(ApiError(exc.status_code, message, STATUS_TYPES.get(exc.status_code, "invalid_request_error"), code=code))

    async def _api_error(self, request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def _internal_error(self, request: HttpRequest, exc: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    def _authorize(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "invalid API key: send it as 'Authorization: Bearer KEY'", "authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # -- endpoints ------------------------------------------------------------------

    async def health(self, request: HttpRequest) -> Response:
        """Unauthenticated, as llama-server's: load balancers and test harnesses poll it."""
        return JSONResponse({"status": "ok", **self.scheduler.counts})

    async def models(self, request: HttpRequest) -> Response:
        self._authorize(request)
        entry = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "args-local"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat(self, request: HttpRequest) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: HttpRequest) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, http: HttpRequest, chat: bool) -> Response:
        self._authorize(http)
        call = parse(await read_json(http), self.defaults, chat)
        if call.model is not None and call.model != self.model_id:
            raise ApiError(404, f"model {call.model!r} is not served here; GET /v1/models lists {self.model_id!r}",
                           param="model", code="model_not_found")
        # Rendering and tokenizing a long conversation takes a while: off the event loop.
        job = Job(await run_in_threadpool(self._request, call), asyncio.get_running_loop())
        try:
            self.scheduler.submit(job)
        except Busy as e:
            raise ApiError(429, str(e), "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        reply = Reply(self.model_id, chat, call.include_usage)
        if call.stream:
            return EventSourceResponse(self._stream(job, reply), ping=15, sep="\n")
        return await self._whole(http, job, reply)

    def _request(self, call: Call) -> Request:
        """The prompt's tokens and the settings, checked against this model and context."""
        try:
            if call.messages is not None:
                request = self.engine.chat_request(call.messages, call.settings)
            else:
                request = self.engine.request(call.prompt or "", call.settings)
        except SettingsError as e:
            raise invalid(e, call.param) from None
        except PromptError as e:
            raise bad(str(e), call.text_param) from None
        if len(request.tokens) >= self.n_ctx:
            raise bad(f"the prompt is {len(request.tokens)} tokens but the context window is {self.n_ctx} per request; "
                      "restart the server with a larger -c", call.text_param, "context_length_exceeded")
        return request

    async def _whole(self, http: HttpRequest, job: Job, reply: Reply) -> Response:
        """Wait for the job while watching for the client to leave (then cancel it)."""
        left = asyncio.ensure_future(_disconnected(http))
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                await asyncio.wait({get, left}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    self.scheduler.cancel(job)
                    return Response(status_code=499)  # nobody reads it
                kind, value = get.result()
                if kind == "done":
                    return JSONResponse(reply.whole(job.result, job.request.settings))
                if kind == "error":
                    raise failure(value)
        finally:
            left.cancel()

    async def _stream(self, job: Job, reply: Reply) -> AsyncIterator[str]:
        """SSE events; sse-starlette cancels this generator when the client leaves."""
        done = False
        try:
            if reply.chat:
                yield _json(reply.first())
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield _json(reply.piece(value))
                    continue
                done = True
                if kind == "done":
                    for chunk in reply.last(job.result, job.request.settings):
                        yield _json(chunk)
                else:
                    yield _json(failure(value).body())
                yield "[DONE]"
                return
        finally:
            if not done:
                self.scheduler.cancel(job)


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def failure(error: Exception) -> ApiError:
    """An error raised while decoding, as the client sees it."""
    if isinstance(error, ArgsLocalError):
        return ApiError(500, str(error), "server_error")
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", "server_error")


async def read_json(http: HttpRequest) -> Any:
    """The body as JSON, refused past :data:`MAX_BODY` bytes (before reading it all, when the
    client says its length)."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {MAX_BODY}", code="request_too_large")
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"the request body is over the limit of {MAX_BODY} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad("the request body is nested too deeply", code="invalid_json") from None
