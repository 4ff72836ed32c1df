"""The OpenAI API's shapes: request bodies into :class:`Settings` and messages, results into
responses, stream chunks and error bodies. No HTTP and no models here, so it is tested alone.

Extensions sit at the top level of the body, where vLLM and llama-server put theirs:
``top_k`` (ARGS candidates), ``reward_weight`` (w), ``min_p``, ``repeat_penalty``,
``ignore_eos``. ``temperature`` 0 is ARGS-greedy and above 0 ARGS-stochastic at that
temperature; absent, the server's defaults hold (those of ``args-local generate``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..core.errors import SettingsError
from ..core.request import Result
from ..core.settings import Settings

# Request field -> setting. max_completion_tokens is OpenAI's newer name for max_tokens.
FIELDS: dict[str, str] = {
    "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "top_p": "top_p", "seed": "seed",
    "stop": "stop", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "top_k": "top_k", "reward_weight": "weight", "min_p": "min_p", "repeat_penalty": "repeat_penalty",
    "ignore_eos": "ignore_eos",
}
# OpenAI fields whose other values ask for something this server does not do: refused, not ignored.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,),
    "suffix": ("",), "tools": ([],), "functions": ([],),
}
FINISH = {"eog": "stop", "stop": "stop", "length": "length", "context": "length"}


class ApiError(Exception):
    """An error with its HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Call:
    """One parsed request: what to decode and how to answer."""

    settings: Settings
    stream: bool = False
    include_usage: bool = False
    messages: Any = None  # chat: checked when the engine renders them
    prompt: str | None = None  # completions
    model: str | None = None
    param: dict[str, str] = field(default_factory=dict)  # setting -> the field that set it, for errors

    @property
    def text_param(self) -> str:
        return "messages" if self.messages is not None else "prompt"


def parse(body: Any, defaults: Settings, chat: bool) -> Call:
    """A chat (``messages``) or completions (``prompt``) body as a :class:`Call`; every value
    checked by :class:`Settings`, whose errors name the request's own field."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) not in (None, *allowed):
            raise bad(f"{name} {body[name]!r} is not supported by this server", name, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("only the text response_format is supported", "response_format", "unsupported_parameter")
    changes: dict[str, Any] = {}
    param: dict[str, str] = {}
    for key, name in FIELDS.items():
        if body.get(key) is not None and not (key == "max_tokens" and body.get("max_completion_tokens") is not None):
            changes[name], param[name] = body[key], key
    temperature = body.get("temperature")
    if temperature is not None:
        param["temperature"] = param["mode"] = "temperature"
        if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0:
            changes["mode"] = "greedy"
        else:
            changes["mode"], changes["temperature"] = "sample", temperature
    changes["raw"] = not chat
    try:
        settings = defaults.update(changes)
    except SettingsError as e:
        raise invalid(e, param) from None
    call = Call(settings, _flag(body, "stream"), model=_model(body), param=param)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options must be an object", "stream_options")
        call.include_usage = _flag(options, "include_usage", "stream_options.include_usage")
    if chat:
        call.messages = messages(body.get("messages"))
    else:
        call.prompt = prompt(body.get("prompt"))
    return call


def invalid(e: SettingsError, param: Mapping[str, str]) -> ApiError:
    """A 400 for a bad setting, in the request's words (reward_weight, not weight)."""
    message, field = str(e), param.get(e.setting or "", e.setting)
    if e.setting is not None and field is not None:
        for label in (e.setting.replace("_", "-"), e.setting):
            if message.startswith(label):
                message = field + message[len(label):]
                break
    return bad(message, field)


def _flag(body: Mapping[str, Any], key: str, param: str | None = None) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{param or key} must be true or false, not {value!r}", param or key)
    return value


def _model(body: Mapping[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string", "model")
    return model


def messages(value: Any) -> Any:
    """OpenAI's message forms in the shape :func:`~args_local.core.request.chat_messages` checks:
    content as a list of text parts joined into one string, ``developer`` (OpenAI's newer name)
    as ``system``. Anything else is left for that check to name."""
    if not isinstance(value, list):
        return value
    out = []
    for i, m in enumerate(value):
        if isinstance(m, dict):
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            m = {"role": "system" if m.get("role") == "developer" else m.get("role"), "content": content}
        out.append(m)
    return out


def prompt(value: Any) -> str:
    """The completions prompt: a string (or a list holding one)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise bad("prompt must be a string (token ids and several prompts are not supported)", "prompt")
    return value


# -- responses ----------------------------------------------------------------


@dataclass
class Reply:
    """The fixed parts of one response (its id, time and model) and its shape (chat or not)."""

    model: str
    chat: bool
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
            return {"id": f"chatcmpl-{self.id}", "object": kind, "created": self.created, "model": self.model}
        return {"id": f"cmpl-{self.id}", "object": "text_completion", "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, chunk: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not chunk:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None, "finish_reason": finish}

    def whole(self, result: Result, settings: Settings) -> dict[str, Any]:
        """The non-streamed response."""
        return {**self._head(False), "choices": [self._choice(result.text, FINISH[result.stop_reason], False)],
                "usage": usage(result), "args": args_object(result, settings)}

    def first(self) -> dict[str, Any]:
        """A chat stream opens with the assistant's role (completions streams have no such chunk)."""
        chunk = self.piece("")
        chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return chunk

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk([self._choice(text, None, True)])

    def last(self, result: Result, settings: Settings) -> list[dict[str, Any]]:
        """The closing chunks: the finish reason and the ``args`` object, then the usage when asked."""
        out = [{**self._chunk([self._choice(None, FINISH[result.stop_reason], True)]), "args": args_object(result, settings)}]
        if self.include_usage:
            out.append({**self._chunk([]), "usage": usage(result)})
        return out

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**self._head(True), "choices": choices}
        if self.include_usage:  # OpenAI: every chunk carries "usage", null but in the last one
            chunk["usage"] = None
        return chunk


def usage(result: Result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.tokens,
            "total_tokens": result.prompt_tokens + result.tokens}


def args_object(result: Result, settings: Settings) -> dict[str, Any]:
    """What ARGS did for this request: the reward model's calls and the mean reward of the
    chosen tokens (None when it was never asked), and the weight and k it ran with."""
    return {"reward_calls": result.reward_calls, "mean_reward": result.mean_reward,
            "reward_weight": settings.weight, "top_k": settings.top_k}
