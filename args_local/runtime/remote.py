"""A policy served by another program: llama.cpp's server, or any server with the
OpenAI-compatible completions API and log-probabilities keyed by token id (vLLM).

ARGS needs one thing from the policy per step: the top candidates' log-probabilities after
a given token prefix. Log-probabilities differ from logits by one constant per step, so every
ARGS choice, every softmax over scores and every min-p/top-p cut is the same. The prefix goes
over the wire as token ids (never re-tokenized text) and the server keeps it cached, so a
step costs the server one decode. The reward model still runs here.

The tokenizer and chat template come from a local GGUF when one is given (only its
vocabulary is read), else from llama.cpp's server itself (:class:`ServerVocab`).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationParseError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from ..core.errors import ModelError, PromptError, ServerError, SettingsError
from ..core.settings import Settings
from .caches import common_prefix
from .vocab import ChatTokenizer

if TYPE_CHECKING:
    from .policy import LlamaVocab

log = logging.getLogger("args_local")

APIS = ("auto", "native", "openai")
CONNECT_TIMEOUT_S = 5.0
MAX_RESPONSE_BYTES = 16 << 20  # a step's answer is a few kB; a whole prompt's template some 100 kB
# The score of a token the server did not return: far below any log-probability, yet finite,
# so that the search's arithmetic (logit + w * reward, penalties, softmax) stays finite.
UNRETURNED = -1e30
RETRIES = 3  # connection failures and 502/503/504 (a server still loading its model says 503)
BACKOFF_S = 0.5  # waits 0, 1, 2 s between the tries


def check_url(url: str) -> None:
    """One sentence for a URL that cannot name a server."""
    try:
        parsed = urllib3.util.parse_url(url)
    except LocationParseError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise SettingsError(f"policy_url must be an http:// or https:// URL such as http://127.0.0.1:8080, not {url!r}", "policy_url")


def check_api(api: str) -> None:
    if api not in APIS:
        raise SettingsError(f"policy_api must be one of {', '.join(APIS)}, not {api!r}", "policy_api")


class Connection:
    """JSON over one kept-alive HTTP connection, with connect and read timeouts, bounded
    retries with backoff, bounded answers, and every failure as one sentence."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        check_url(url)
        parsed = urllib3.util.parse_url(url)
        self.url = url.rstrip("/")
        # The base URL: a trailing /v1 (how OpenAI clients are configured) is accepted.
        prefix = (parsed.path or "").rstrip("/")
        self.prefix = prefix[: -len("/v1")] if prefix.endswith("/v1") else prefix
        self.has_key = bool(api_key)
        self._api_key = api_key
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        retries = urllib3.Retry(
            total=RETRIES, connect=RETRIES, read=1, status=RETRIES, other=0, redirect=0,
            allowed_methods=None,  # every request here is a pure computation: safe to repeat
            status_forcelist=(502, 503, 504), backoff_factor=BACKOFF_S, backoff_max=4.0, raise_on_status=False,
        )
        self.timeout = timeout
        self.pool = urllib3.connection_from_url(
            f"{parsed.scheme}://{parsed.netloc}", maxsize=4, headers=headers, retries=retries,
            timeout=urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, timeout), read=timeout),
        )

    def another(self) -> "Connection":
        """A connection of its own to the same server, with the same key and timeouts."""
        return Connection(self.url, self._api_key, self.timeout)

    def get(self, path: str, missing_ok: bool = False) -> Any:
        return self.request("GET", path, None, missing_ok)

    def post(self, path: str, body: dict[str, Any], missing_ok: bool = False) -> Any:
        return self.request("POST", path, body, missing_ok)

    def request(self, method: str, path: str, body: dict[str, Any] | None, missing_ok: bool = False) -> Any:
        """The answer's JSON; None for a 404 when ``missing_ok`` (an endpoint this server lacks)."""
        data = json.dumps(body).encode() if body is not None else None
        try:
            response = self.pool.urlopen(method, self.prefix + path, body=data, preload_content=False, redirect=False)
            try:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
            except BaseException:
                response.close()
                raise
        except (HTTPError, OSError) as e:
            raise ServerError(self._unreachable(e)) from None
        if len(raw) > MAX_RESPONSE_BYTES:
            response.close()  # not read to the end: this connection cannot carry another request
            raise ServerError(f"the policy server at {self.url} answered {path} with more than {MAX_RESPONSE_BYTES >> 20} MB")
        response.release_conn()  # kept alive for the next step
        status = response.status
        if status == 404 and missing_ok:
            return None
        if status in (401, 403):
            fix = "check --policy-api-key" if self.has_key else "pass its key with --policy-api-key"
            raise ServerError(f"the policy server at {self.url} refused the request (HTTP {status}): {fix}")
        if not 200 <= status < 300:
            raise ServerError(f"the policy server at {self.url} answered HTTP {status} to {path}: {_message(raw)}")
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerError(f"the policy server at {self.url} answered {path} with something that is not JSON") from None

    def _unreachable(self, e: BaseException) -> str:
        reason = e.reason if isinstance(e, MaxRetryError) else e
        where = f"the policy server at {self.url}"
        if isinstance(reason, NameResolutionError):
            return f"cannot find the host of the policy server {self.url} (is the name right?)"
        if isinstance(reason, NewConnectionError):  # a subclass of ConnectTimeoutError: first
            return f"cannot reach {where}: connection refused (is it running?)"
        if isinstance(reason, ConnectTimeoutError):
            return f"{where} did not accept a connection within {CONNECT_TIMEOUT_S:g} s (is the address right?)"
        if isinstance(reason, ReadTimeoutError):
            return f"{where} did not answer within {self.timeout:g} s (--policy-timeout)"
        if isinstance(reason, ProtocolError):
            return f"{where} closed the connection mid-answer (did it crash?)"
        return f"cannot talk to {where}: {reason}"


def _message(raw: bytes) -> str:
    """The server's own explanation of an error, on one short line."""
    try:
        body = json.loads(raw)
        if isinstance(body, dict):
            error = body.get("error", body.get("detail", body.get("message", body)))
            body = error.get("message", error) if isinstance(error, dict) else error
        text = str(body)
    except ValueError:
        text = raw.decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text[:300] or "(no message)"


def _served(conn: Connection) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """llama.cpp's ``/props`` (None from other servers) and the first model ``/v1/models``
    lists ({} when it lists none)."""
    props = conn.get("/props", missing_ok=True)
    models = conn.get("/v1/models", missing_ok=True)
    data = models.get("data") if isinstance(models, dict) else None
    model = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    return (props if isinstance(props, dict) and "default_generation_settings" in props else None), model


def _stem(served: str) -> str:
    """A served model's short name: llama.cpp's server names it by its GGUF's path."""
    name = PurePosixPath(served).name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def served_model(url: str, api_key: str | None = None, timeout: float = 600.0) -> dict[str, Any]:
    """What identifies the model behind ``url`` for a batch's stamp: the URL, and the model's
    name, file and size as the server reports them (not its volatile fields, such as the time
    it started), so that a server restarted on another model is not taken for the same."""
    conn = Connection(url, api_key, timeout)
    try:
        props, model = _served(conn)
    finally:
        conn.pool.close()
    base = f"{conn.pool.scheme}://{conn.pool.host}:{conn.pool.port}{conn.prefix}"  # with or without /v1, the same
    return {"url": base, "model_path": (props or {}).get("model_path"),
            **{k: model.get(k) for k in ("id", "root", "meta", "max_model_len") if k in model}}


@dataclass
class Candidate:
    token: int
    logprob: float
    piece: bytes | None  # the token's bytes, when the server says (llama.cpp's server does)


@dataclass
class Answer:
    """One step's top candidates, and what the server says the step cost it."""

    candidates: list[Candidate]
    evaluated: int | None = None  # prompt tokens the server decoded (not found in its cache)
    server_ms: float | None = None


def _llama_cpp_fields(fresh: bool, anchor: int | None) -> dict[str, Any]:
    """What llama.cpp's server needs beside the prompt. ``cache_prompt`` false re-evaluates a
    prompt whole: llama.cpp's numbers depend on the batch that computed them, and a result must
    not depend on what the server ran before. The token the server samples itself is pinned to
    ``anchor`` (an end-of-generation token, whose text is empty): the server answers without
    probabilities when the token it samples is part of a UTF-8 character."""
    return {"cache_prompt": not fresh, **({"logit_bias": {str(anchor): 1000}} if anchor is not None else {})}


class NativeAPI:
    """llama.cpp's own ``/completion``: a token-id prompt, one token, ``n_probs`` candidates
    from the raw logits (not after sampling)."""

    name = "native"

    def __init__(self, conn: Connection, anchor: int | None) -> None:
        self.conn = conn
        self.anchor = anchor

    def top(self, tokens: Sequence[int], n: int, fresh: bool) -> Answer:
        out = self.conn.post("/completion", {
            "prompt": list(tokens), "n_predict": 1, "n_probs": n, "temperature": 0,
            "response_fields": ["completion_probabilities", "timings"], **_llama_cpp_fields(fresh, self.anchor),
        })
        probs = out.get("completion_probabilities") if isinstance(out, dict) else None
        if not probs or not isinstance(probs, list) or "top_logprobs" not in probs[0]:
            raise ServerError(f"the policy server at {self.conn.url} returned no log-probabilities from /completion (n_probs)")
        timings = out.get("timings") or {}
        return Answer(
            _entries(probs[0]["top_logprobs"], n, self.conn.url),
            evaluated=timings.get("prompt_n"),
            server_ms=_server_ms(timings),
        )


class OpenAIAPI:
    """``/v1/completions`` with a token-id prompt and ``logprobs``: vLLM, llama.cpp's ``/v1``.
    Candidates must come as token ids: llama.cpp's server lists them with ids; vLLM does when
    asked with ``return_tokens_as_token_ids``."""

    name = "openai"

    def __init__(self, conn: Connection, model: str, llama_cpp: bool, anchor: int | None) -> None:
        self.conn = conn
        self.model = model
        self.llama_cpp = llama_cpp
        self.anchor = anchor

    def top(self, tokens: Sequence[int], n: int, fresh: bool) -> Answer:
        body: dict[str, Any] = {"model": self.model, "prompt": list(tokens), "max_tokens": 1, "logprobs": n, "temperature": 0}
        if self.llama_cpp:
            body.update(_llama_cpp_fields(fresh, self.anchor))
        else:
            body["return_tokens_as_token_ids"] = True
        out = self.conn.post("/v1/completions", body)
        try:
            logprobs = out["choices"][0]["logprobs"]
        except (KeyError, IndexError, TypeError):
            logprobs = None
        if not logprobs:
            raise ServerError(f"the policy server at {self.conn.url} returned no log-probabilities from /v1/completions (logprobs)")
        timings = out.get("timings") or {}
        if isinstance(logprobs.get("content"), list) and logprobs["content"]:  # llama.cpp's server
            return Answer(_entries(logprobs["content"][0].get("top_logprobs"), n, self.conn.url),
                          evaluated=timings.get("prompt_n"), server_ms=_server_ms(timings))
        top = logprobs.get("top_logprobs")
        if not isinstance(top, list) or not top or not isinstance(top[0], dict):
            raise ServerError(f"the policy server at {self.conn.url} returned no top log-probabilities from /v1/completions")
        candidates = []
        for key, value in list(top[0].items())[:n + 1]:
            if not (isinstance(key, str) and key.startswith("token_id:") and key[9:].lstrip("-").isdigit()):
                raise ServerError(
                    f"the policy server at {self.conn.url} keys its log-probabilities by token text, not token id "
                    "(vLLM gives ids with return_tokens_as_token_ids; other servers are not supported)"
                )
            candidates.append(Candidate(int(key[9:]), float(value), None))
        return Answer(candidates)


def _entries(entries: Any, n: int, url: str) -> list[Candidate]:
    """llama.cpp's ``[{"id", "logprob", "bytes"}...]``, checked (at most ``n`` read)."""
    if not isinstance(entries, list):
        raise ServerError(f"the policy server at {url} returned no top log-probabilities")
    out = []
    for e in entries[:n]:
        try:
            piece = bytes(e["bytes"]) if isinstance(e.get("bytes"), list) else None
            out.append(Candidate(int(e["id"]), float(e["logprob"]), piece))
        except (KeyError, TypeError, ValueError):
            raise ServerError(f"the policy server at {url} returned log-probabilities without token ids") from None
    return out


def _server_ms(timings: dict[str, Any]) -> float | None:
    if "prompt_ms" not in timings:
        return None
    return float(timings.get("prompt_ms") or 0.0) + float(timings.get("predicted_ms") or 0.0)


class ServerVocab(ChatTokenizer):
    """llama.cpp's server's own tokenizer and chat template, over its ``/tokenize``
    (``parse_special`` only for the template's text), ``/apply-template`` and ``/detokenize``.
    It cannot list its vocabulary, so a reward model that shares the policy's tokenizer is
    fed through text here (exact, a little slower): pass the GGUF with ``-m`` to avoid that."""

    def __init__(self, conn: Connection, props: dict[str, Any], n_vocab: int) -> None:
        self.conn = conn
        self.path = conn.url
        self.n_vocab = n_vocab
        self.has_template = bool(props.get("chat_template"))
        self.pieces: dict[int, bytes] = {}  # token -> bytes, learned from every step's answer
        plain, marked = self._tokenize("a", False), self._ids("a", add_special=True, special=False)
        self.bos_id = marked[0] if len(marked) > len(plain) and marked[1 : 1 + len(plain)] == plain else None
        self.eog = self._eog_tokens()
        self.eos_id = min(self.eog) if self.eog else None

    def _eog_tokens(self) -> frozenset[int]:
        """The end-of-generation tokens as llama.cpp defines them (EOS, EOT, ``<|im_end|>``...):
        the server lists them as the logit biases that ``ignore_eos`` adds."""
        out = self.conn.post("/completion", {
            "prompt": [self.bos_id if self.bos_id is not None else 0], "n_predict": 1, "ignore_eos": True,
            "cache_prompt": False, "response_fields": ["generation_settings/logit_bias"],
        })
        biases = out.get("generation_settings/logit_bias") if isinstance(out, dict) else None
        if not isinstance(biases, list):
            raise ServerError(f"the policy server at {self.conn.url} does not say which tokens end a generation")
        return frozenset(int(b["token"]) for b in biases if isinstance(b, dict) and "token" in b)

    def _ids(self, text: str, add_special: bool, special: bool) -> list[int]:
        out = self.conn.post("/tokenize", {"content": text, "add_special": add_special, "parse_special": special})
        tokens = out.get("tokens") if isinstance(out, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ServerError(f"the policy server at {self.conn.url} answered /tokenize without token ids")
        return tokens

    def _tokenize(self, text: str, special: bool) -> list[int]:
        return self._ids(text, add_special=False, special=special) if text else []

    def _render(self, messages: Sequence[dict[str, str]]) -> str:
        if not self.has_template:
            raise PromptError("the policy server's model has no chat template; pass --raw to send the prompt as it is")
        out = self.conn.post("/apply-template", {"messages": list(messages)})
        if not isinstance(out, dict) or not isinstance(out.get("prompt"), str):
            raise ServerError(f"the policy server at {self.conn.url} answered /apply-template without a prompt")
        return out["prompt"]

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """Every candidate's bytes come with the step that proposed it; others are asked for."""
        if not special and token in self.pieces:
            return self.pieces[token]
        out = self.conn.post("/detokenize", {"tokens": [token]})
        return str(out.get("content", "")).encode("utf-8")

    def vocab_texts(self) -> list[str]:
        return []  # unknown: no reward model shares a vocabulary it cannot compare

    def is_eog(self, token: int) -> bool:
        return token in self.eog


@dataclass
class RoundTrips:
    """What the steps cost: requests, their wall time here, and the server's own time."""

    calls: int = 0
    seconds: float = 0.0
    server_seconds: float = 0.0


class RemotePolicy:
    """A policy on a server, driven one token at a time through its API.

    ``logits()`` is a vector over the vocabulary that holds the returned candidates'
    log-probabilities and :data:`UNRETURNED` everywhere else. The search reads only its top
    k, so the server is asked for k (plus the tokens the repetition penalties may push down,
    when they are on). A server that returns fewer is used as it is, with one warning: the
    search then never chooses the missing candidates (its softmax gives them exactly 0).
    """

    def __init__(
        self,
        url: str,
        api: str = "auto",
        api_key: str | None = None,
        vocab: LlamaVocab | None = None,
        timeout: float = 600.0,
        n_ctx: int = 4096,
    ) -> None:
        check_api(api)
        self.conn = Connection(url, api_key, timeout)
        self.path = self.conn.url
        props, model = _served(self.conn)
        llama_cpp = props is not None
        if api == "native" and not llama_cpp:
            raise ServerError(f"{self.conn.url} is not llama.cpp's server (no /props): try --policy-api openai")
        if not llama_cpp and not model:
            raise ServerError(
                f"{self.conn.url} serves neither llama.cpp's API (/props) nor an OpenAI-compatible one (/v1/models)"
            )
        meta = model.get("meta")
        server_vocab = int(meta["n_vocab"]) if isinstance(meta, dict) and meta.get("n_vocab") else None
        if vocab is None:
            if not llama_cpp:
                raise ModelError(
                    f"{self.conn.url} has no tokenizer endpoints (it is not llama.cpp's server): pass -m with a GGUF "
                    "of the served model for its vocabulary and chat template (its weights are not loaded)"
                )
            vocab = ServerVocab(self.conn, props, server_vocab or 0)
        elif server_vocab and server_vocab != vocab.n_vocab:
            raise ModelError(
                f"{vocab.path} has {vocab.n_vocab} tokens but the model at {self.conn.url} has {server_vocab}: "
                "pass the GGUF the server runs, or leave -m out to use the server's tokenizer"
            )
        self.vocab = vocab
        self.n_vocab = vocab.n_vocab
        if api == "openai" or not llama_cpp:
            self.api: NativeAPI | OpenAIAPI = OpenAIAPI(self.conn, str(model.get("id", "")), llama_cpp, vocab.eos_id)
        else:
            self.api = NativeAPI(self.conn, vocab.eos_id)
        if not self.n_vocab:
            raise ServerError(f"the policy server at {self.conn.url} does not say how many tokens its vocabulary has")
        slot_ctx = (props or {}).get("default_generation_settings", {}).get("n_ctx") if llama_cpp else model.get("max_model_len")
        self.n_ctx = int(slot_ctx) if slot_ctx else n_ctx
        served = str(model.get("id") or (props or {}).get("model_path") or "")
        self.name = _stem(served) or self.conn.url  # what `serve` calls the model
        self.slots: int | None = (props or {}).get("total_slots")  # llama-server --parallel
        self.evaluated = 0
        self.trips = RoundTrips()
        self._tokens: list[int] = []
        self._sent: list[int] = []
        self._logits: np.ndarray | None = None
        self._settings = Settings()
        self._warned = False

    def fork(self) -> "RemotePolicy":
        """The same served model over a connection of its own, for one more request decoding at
        the same time (``serve``'s requests, in the server's parallel slots). The vocabulary is
        shared (its lookups are read-only, or kept-alive requests of their own); the prefix,
        the counters and the connection are not."""
        twin = copy.copy(self)
        twin.conn = self.conn.another()
        twin.api = copy.copy(self.api)
        twin.api.conn = twin.conn
        twin.evaluated, twin.trips, twin._tokens, twin._sent, twin._logits = 0, RoundTrips(), [], [], None
        twin._settings, twin._warned = Settings(), False
        return twin

    # -- the vocabulary, from the GGUF or the server -----------------------------

    def tokenize(self, text: str, special: bool, bos: bool = True) -> list[int]:
        return self.vocab.tokenize(text, special, bos)

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return self.vocab.render_chat(messages)

    def encode_chat(self, messages: Sequence[dict[str, str]], skip_chars: int = 0) -> list[int]:
        return self.vocab.encode_chat(messages, skip_chars)

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        return self.vocab.token_bytes(token, special)

    def vocab_texts(self) -> list[str]:
        return self.vocab.vocab_texts()

    def is_eog(self, token: int) -> bool:
        return self.vocab.is_eog(token)

    # -- decoding ---------------------------------------------------------------

    def start(self, tokens: Sequence[int], reuse_prefix: bool = False, settings: Settings | None = None) -> None:
        """Position the server after ``tokens``. A new prompt is evaluated whole (see
        :class:`NativeAPI`); ``reuse_prefix`` (a chat's next turn) lets the server's cache serve it."""
        if len(tokens) >= self.n_ctx:
            raise PromptError(
                f"the prompt is {len(tokens)} tokens but the policy server's context window is {self.n_ctx} per request"
            )
        self._settings = settings or Settings()
        self._tokens = list(tokens)
        self._step(fresh=not reuse_prefix)

    def advance(self, token: int) -> None:
        self._tokens.append(token)
        self._step(fresh=False)

    def logits(self) -> np.ndarray:
        assert self._logits is not None, "start() must be called first"
        return self._logits

    def room(self) -> int:
        return self.n_ctx - len(self._tokens)

    def wanted(self) -> int:
        """Candidates to ask for: k, plus every token the repetition penalties may lower below
        one of the top k (those in their window), so the penalized top k is exact."""
        s = self._settings
        n = s.top_k
        if s.repeat_last_n and (s.repeat_penalty != 1 or s.presence_penalty or s.frequency_penalty):
            n += len(set(self._tokens[-s.repeat_last_n:]))
        return min(n, self.n_vocab)

    def _step(self, fresh: bool) -> None:
        n = self.wanted()
        start = time.perf_counter()
        answer = self.api.top(self._tokens, n, fresh)
        self.trips.calls += 1
        self.trips.seconds += time.perf_counter() - start
        self.trips.server_seconds += (answer.server_ms or 0.0) / 1000
        if answer.evaluated is not None:
            self.evaluated += int(answer.evaluated)
        else:
            self.evaluated += len(self._tokens) - (0 if fresh else common_prefix(self._sent, self._tokens))
        self._sent = list(self._tokens)
        candidates = [c for c in answer.candidates if 0 <= c.token < self.n_vocab]
        if not candidates:
            raise ServerError(f"the policy server at {self.conn.url} returned no candidate tokens")
        if len(candidates) < min(self._settings.top_k, self.n_vocab) and not self._warned:
            self._warned = True
            log.warning("the policy server returned %d candidates per token where %d were asked for; "
                        "ARGS chooses among those it returned", len(candidates), n)
        logits = np.full(self.n_vocab, UNRETURNED, dtype=np.float32)
        for c in candidates:
            logits[c.token] = c.logprob
        self._logits = logits
        if isinstance(self.vocab, ServerVocab):
            self.vocab.pieces.update((c.token, c.piece) for c in candidates if c.piece is not None)

    def close(self) -> None:
        self.conn.pool.close()
