"""The policy runtime: a GGUF model run by llama.cpp through llama-cpp-python.

It exposes just what the search needs (the last position's logits, advance by one
token, end-of-generation) plus prompt rendering and UTF-8-safe detokenization.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

# llama.cpp's OpenMP threads spin while they wait. Spinning without end steals the cores
# that onnxruntime needs between two decodes; not spinning at all (OMP_WAIT_POLICY=PASSIVE)
# made a 2-thread decode 3x slower here. A short spin keeps both fast.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import llama_cpp  # noqa: E402
from llama_cpp import llama_chat_format  # noqa: E402
import numpy as np  # noqa: E402

from ..core.errors import ModelError, PromptError, SettingsError  # noqa: E402
from ..core.gguf import kv_cache_bytes, read_gguf  # noqa: E402
from ..core.settings import Settings  # noqa: E402
from .cpus import physical_cores  # noqa: E402
from .memory import available_bytes  # noqa: E402
from .template import ChatTemplate  # noqa: E402
from .vocab import ChatTokenizer  # noqa: E402

GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR = 3, 4
N_BATCH = 512  # tokens per llama_decode: a prompt is evaluated in chunks of this size
_LOG_TAIL: collections.deque[str] = collections.deque(maxlen=20)
_VERBOSE = False


@llama_cpp.llama_log_callback
def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Keep llama.cpp's log out of the terminal, but remember its tail for error messages."""
    line = text.decode("utf-8", errors="replace")
    _LOG_TAIL.append(line)
    if _VERBOSE and level in (GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR):
        sys.stderr.write(line)


llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))


def set_verbose(verbose: bool) -> None:
    """Show llama.cpp's own log on stderr (``-v``)."""
    global _VERBOSE
    _VERBOSE = verbose


def check_gguf(path: Path) -> None:
    """Fail with a clear message before llama.cpp gets a file it cannot read."""
    if not path.exists():
        raise ModelError(f"policy model not found: {path} (pass a GGUF file with -m)")
    if path.is_dir():
        raise ModelError(f"policy model is a folder, not a GGUF file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"policy model is empty: {path} (re-download or re-install it)")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"policy model is not a GGUF file: {path} (llama.cpp needs a .gguf model)")


class _NoChatHandler:
    """Stands in for llama-cpp-python's Jinja2ChatFormatter while a model loads (see below)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def to_chat_handler(self) -> None:
        return None


@contextlib.contextmanager
def _chat_templates_left_alone() -> Iterator[None]:
    """``Llama()`` compiles every chat template in the GGUF's metadata for its
    create_chat_completion (which args-local never calls), with Jinja's constant folding on:
    a template such as ``{{ 'x' * 10**10 }}`` builds its string while the model loads, before
    any bound applies. Templates are compiled and rendered here only, within bounds
    (:mod:`.template`)."""
    saved = llama_chat_format.Jinja2ChatFormatter
    llama_chat_format.Jinja2ChatFormatter = _NoChatHandler  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        llama_chat_format.Jinja2ChatFormatter = saved  # type: ignore[misc]


def check_memory(path: Path, n_ctx: int) -> None:
    """Refuse a context window whose KV cache cannot fit in memory, before llama.cpp allocates
    it: a large enough ``-c`` otherwise grows until the system kills the process (or another)."""
    need, free = kv_cache_bytes(read_gguf(path, full=False)[1], n_ctx), available_bytes()
    if need is not None and free is not None and need > free:
        raise SettingsError(
            f"-c {n_ctx} needs about {need / 2**30:.1f} GiB for llama.cpp's KV cache, but {free / 2**30:.1f} GiB "
            f"of memory is available; pass a smaller -c"
        )


def _load(path: Path, **params) -> llama_cpp.Llama:
    """llama.cpp's model, or one sentence saying why it could not be loaded."""
    check_gguf(path)
    _LOG_TAIL.clear()
    try:
        with _chat_templates_left_alone():
            return llama_cpp.Llama(model_path=str(path), verbose=False, **params)
    except (ValueError, RuntimeError) as e:
        lines = "".join(_LOG_TAIL).strip().splitlines()
        errors = [line.split("error loading model:", 1)[-1].strip() for line in lines if "error" in line.lower()]
        why = errors[0] if errors else (lines[-1] if lines else str(e))
        raise ModelError(
            f"llama.cpp could not load {path}: {why} "
            "(the file may be truncated, or need a newer llama-cpp-python)"
        ) from None


class LlamaVocab(ChatTokenizer):
    """A GGUF model's tokenizer and chat template. On its own (:meth:`open`) it reads only the
    vocabulary, not the weights: what a policy served elsewhere needs here."""

    def __init__(self, path: Path, **params) -> None:
        self.llm = _load(path, **params)
        self.path = path
        self.vocab = self.llm._model.vocab
        self.n_vocab = self.llm.n_vocab()
        bos = self.llm.token_bos()
        self.bos_id = bos if llama_cpp.llama_vocab_get_add_bos(self.vocab) and bos >= 0 else None
        self._template: ChatTemplate | None = None

    @classmethod
    def open(cls, path: Path) -> "LlamaVocab":
        return cls(path, vocab_only=True)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")

    @property
    def eos_id(self) -> int | None:
        eos = self.llm.token_eos()
        return eos if eos >= 0 else None

    def _render(self, messages: Sequence[dict[str, str]]) -> str:
        """The model's own chat template, rendered within bounds (see :mod:`.template`)."""
        if self._template is None:
            template = self.chat_template
            if not template:
                raise PromptError(
                    f"{self.path.name} has no chat template; pass --raw to send the prompt as it is"
                )
            eos = self.token_text(self.llm.token_eos())
            bos = self.token_text(self.llm.token_bos())
            self._template = ChatTemplate(template, self.path.name, eos_token=eos, bos_token=bos)  # compiled once
        return self._template.render(messages)

    def _tokenize(self, text: str, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def token_text(self, token: int) -> str:
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token, however long (llama-cpp-python's own helper stops at 32). The
        buffer is this call's own: ``serve`` asks from several threads at once (a remote policy)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def vocab_texts(self) -> list[str]:
        """Every token's vocabulary string, to tell whether a reward model shares this tokenizer."""
        return [
            llama_cpp.llama_vocab_get_text(self.vocab, i).decode("utf-8", errors="replace")
            for i in range(self.n_vocab)
        ]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))


def switch_threads(ctx: llama_cpp.llama_context_p, current: int, threads: int) -> int:
    """Make ``ctx`` decode (and evaluate prompts) on ``threads`` threads, unless it already
    does; returns the count now in force."""
    if threads != current:
        llama_cpp.llama_set_n_threads(ctx, threads, threads)
    return threads


class LlamaPolicy(LlamaVocab):
    """A GGUF model with one context whose KV cache follows the evaluated tokens.

    ``start`` reuses the cached prefix that a new prompt shares with what was
    evaluated before, so a chat's second turn evaluates only the new tokens.
    """

    def __init__(
        self,
        path: Path,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        seed: int | None = None,
    ) -> None:
        check_gguf(path)
        if n_gpu_layers == 0:
            check_memory(path, n_ctx)
        threads = n_threads or physical_cores()  # one per physical core: see cpus.py
        super().__init__(
            path,
            n_ctx=n_ctx,
            n_batch=min(N_BATCH, n_ctx),
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=n_gpu_layers,
            seed=seed if seed is not None else llama_cpp.LLAMA_DEFAULT_SEED,
            logits_all=False,
        )
        self.threads = threads
        # llama.cpp rounds the context up (to 256 tokens); llama-cpp-python's own buffers keep the size asked for.
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        self.evaluated = 0  # tokens run through the model since load: shows cache reuse
        self._logits: np.ndarray | None = None
        self._prompt_end: tuple[int, np.ndarray] | None = None  # (length, logits) of the last whole prompt

    # -- decoding (the search's Policy protocol) ------------------------------

    def start(self, tokens: Sequence[int], reuse_prefix: bool = False, settings: Settings | None = None) -> None:
        """Position the model after ``tokens`` (``settings`` change nothing here: every logit is at hand).

        llama.cpp's logits depend on the shape of the batch that computed them, so a prompt
        re-evaluated in part gives slightly different numbers than the same prompt evaluated
        whole, enough to flip a near tie. A prompt is therefore evaluated whole, unless it is
        exactly the prompt evaluated last (whose end logits are kept with the cache), so that a
        result never depends on what ran before in the process. ``reuse_prefix`` (a chat's next
        turn) evaluates only what the cache lacks instead.
        """
        if len(tokens) >= self.n_ctx:
            raise PromptError(
                f"the prompt is {len(tokens)} tokens but the context window is {self.n_ctx}; "
                f"pass -c {_fit_ctx(len(tokens))} or more (the model was trained on "
                f"{self.llm._model.n_ctx_train()})"
            )
        cached = self.llm.input_ids[: self.llm.n_tokens]
        keep = 0
        for a, b in zip(cached, tokens):
            if a != b:
                break
            keep += 1
        if self._prompt_end is not None and self._prompt_end[0] == len(tokens) <= keep:
            self.llm.n_tokens = len(tokens)
            self._logits = self._prompt_end[1].copy()
            return
        keep = min(keep, len(tokens) - 1) if reuse_prefix else 0  # at least one token gives logits
        self.llm.n_tokens = keep
        if self._prompt_end is not None and self._prompt_end[0] > keep:
            self._prompt_end = None
        self._eval(tokens[keep:])
        if keep == 0:
            self._prompt_end = (len(tokens), self._logits.copy())

    def forget_prompt(self) -> None:
        """Drop the kept prompt-end logits (before anything else writes this context's cache)."""
        self._prompt_end = None

    def set_threads(self, threads: int) -> None:
        """Decode with ``threads`` threads from now on (bench compares counts in one process)."""
        self.threads = switch_threads(self.llm.ctx, self.threads, threads)

    def room(self) -> int:
        """How many more tokens fit in the context window."""
        return self.n_ctx - self.llm.n_tokens

    def logits(self) -> np.ndarray:
        assert self._logits is not None, "start() must be called first"
        return self._logits

    def advance(self, token: int) -> None:
        self._eval([token])

    def _eval(self, tokens: Sequence[int]) -> None:
        self.llm.eval(list(tokens))
        self.evaluated += len(tokens)
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        # Copied: llama.cpp overwrites this buffer at the next decode.
        self._logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        self.llm.close()


def _fit_ctx(n_tokens: int) -> int:
    """The next power of two that leaves room for a reply after ``n_tokens``."""
    ctx = 512
    while ctx < n_tokens + 256:
        ctx *= 2
    return ctx
