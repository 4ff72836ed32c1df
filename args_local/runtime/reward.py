"""The reward runtime: an ONNX reward model run by onnxruntime (the only importer of it).

A reward-model folder holds ``model.onnx``, ``tokenizer.json`` (for models that take
token ids) and ``reward.json``, the manifest (:mod:`args_local.core.manifest`) that says
how the text is built and which output is the reward. :class:`RewardModel` loads and checks
all three, scores whole texts or token rows, and offers the caches of
:mod:`args_local.runtime.caches` a small public interface: :meth:`RewardModel.run`,
:meth:`RewardModel.token_feeds`, :meth:`RewardModel.empty_past`,
:meth:`RewardModel.conversation_ids` (the ids around a response) and :meth:`RewardModel.rewards`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..core.contract import PAST_PREFIX, activate, last_positions, output_rows, padded_bias, returned_prefix, right_pad
from ..core.errors import ModelError, RewardError
from ..core.manifest import Manifest, read_manifest
from ..core.request import RewardStats
from .cpus import usable_cpus

try:
    import onnxruntime as ort
except ImportError:  # the package is an extra: cpu (onnxruntime) or cuda (onnxruntime-gpu)
    raise ModelError(
        "onnxruntime is not installed: pip install 'args-local[cpu]', or 'args-local[cuda]' for onnxruntime-gpu"
    ) from None

log = logging.getLogger("args_local")
T = TypeVar("T")

MAX_TOKENIZER_BYTES = 256 << 20
# Rows per onnxruntime call. The k candidates of a step go in calls of at most this many, so
# memory grows linearly with k (one call over all of them grows with k squared in a shared
# cache's attention bias); the default k = 10 is one call, as before.
ROWS_PER_CALL = 64
ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """onnxruntime prints its CUDA fallback banner on stdout, which belongs to the text."""
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def chunks(rows: Sequence[T]) -> Iterator[Sequence[T]]:
    """``rows`` in consecutive groups of at most :data:`ROWS_PER_CALL`."""
    for start in range(0, len(rows), ROWS_PER_CALL):
        yield rows[start : start + ROWS_PER_CALL]


# onnxruntime's log severities: 2 warning, 3 error, 4 fatal. Its errors reach us as exceptions,
# which become one sentence; the log lines it also prints would repeat them, in colour.
QUIET, VERBOSE = 4, 2
_log_level = QUIET


def quiet_onnxruntime(quiet: bool) -> None:
    """onnxruntime's own log (warnings and errors) stays off stderr unless asked for (-v)."""
    global _log_level
    _log_level = QUIET if quiet else VERBOSE
    ort.set_default_logger_severity(_log_level)


quiet_onnxruntime(True)  # until a front end asks for -v


def session_options(threads: int | None) -> ort.SessionOptions:
    """One session thread pool that does not spin: llama.cpp needs the cores between runs."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or len(usable_cpus())
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = _log_level
    return so


def providers(gpu: bool) -> list[str]:
    """CUDA when asked for and present in the installed onnxruntime, else the CPU."""
    available = ort.get_available_providers()
    chosen = ["CUDAExecutionProvider"] if gpu and "CUDAExecutionProvider" in available else []
    return chosen + ["CPUExecutionProvider"]


def resolve_folder(path: Path) -> tuple[Path, Path]:
    """(model.onnx, folder) for a reward-model folder or a bare ``.onnx`` file."""
    if not path.exists():
        raise ModelError(f"reward model not found: {path} (pass a folder or .onnx file with -r)")
    onnx_file, folder = (path / "model.onnx", path) if path.is_dir() else (path, path.parent)
    if not onnx_file.exists():
        raise ModelError(f"reward model folder {path} has no model.onnx")
    if not onnx_file.is_file():  # a FIFO or a device would block or never end
        raise ModelError(f"reward model {onnx_file} is not a regular file")
    return onnx_file, folder


class _PerThread(threading.local):
    """What a reward model remembers of its last calls, kept per thread: the server's lanes
    score on threads of their own with one session (onnxruntime runs calls side by side), and
    each request must be charged its own calls only."""

    def __init__(self) -> None:
        self.stats = RewardStats()
        self.last_raw = np.zeros(0)  # the last rewards before the activation (args-local score --json)


class RewardModel:
    """An ONNX reward model with its manifest and tokenizer, checked when it loads."""

    def __init__(self, path: Path, threads: int | None = None, gpu: bool = False) -> None:
        onnx_file, folder = resolve_folder(path)
        self._special_strings: re.Pattern[str] | None = None
        self._template_tokenizer: Tokenizer | None = None
        self.path = path
        manifest = read_manifest(folder)
        if manifest is None:
            log.info("%s has no reward.json; scoring the response alone with the first output", folder)
            manifest = Manifest(name=onnx_file.stem)
        self.manifest = manifest
        if onnx_file.stat().st_size == 0:
            raise ModelError(f"reward model {onnx_file} is empty (re-export or re-install it)")
        try:
            with _stdout_to_stderr():
                self.session = ort.InferenceSession(
                    str(onnx_file), sess_options=session_options(threads), providers=providers(gpu)
                )
        except Exception as e:  # onnxruntime raises its own untyped errors for bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"onnxruntime could not load {onnx_file}: {first}") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.output = self.manifest.output or self.outputs[0]
        self.tokenizer = self._load_tokenizer(folder)
        self.past_names = sorted(n for n in self.inputs if n.startswith(PAST_PREFIX))
        # What the model returns for each past input: the whole longer past, or only the new part.
        returned = returned_prefix(self.manifest.kv_cache or "per-row")
        self.present_names = [n.replace(PAST_PREFIX, returned, 1) for n in self.past_names]
        self._mine = _PerThread()
        self._vocab_check: tuple[list[str], bool] | None = None
        self._check_io()
        self._smoke_test()

    @property
    def bounds(self) -> tuple[float, float] | None:
        return self.manifest.range

    # -- loading checks ---------------------------------------------------------

    def _load_tokenizer(self, folder: Path) -> Tokenizer | None:
        if self.manifest.input != "token_ids":
            return None
        file = folder / "tokenizer.json"
        if not file.exists():
            raise ModelError(f"reward model {folder} takes token ids but has no tokenizer.json")
        if not file.is_file():  # a FIFO or a device would block or never end
            raise ModelError(f"{file} is not a regular file")
        if file.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ModelError(f"{file} is larger than {MAX_TOKENIZER_BYTES >> 20} MB; no tokenizer is that large")
        raw = file.read_bytes()
        expected = self.manifest.tokenizer_sha256
        if expected and hashlib.sha256(raw).hexdigest() != expected:
            raise ModelError(
                f"{file} is not the tokenizer this reward model was exported with (its SHA-256 differs "
                f"from the manifest's); restore the original tokenizer.json or re-export the model"
            )
        try:
            # Two copies: user text is text (a special token's string in it stays characters, see
            # encode()), a template's own text holds special tokens. Two objects rather than one
            # whose setting is switched, which threads scoring side by side (serve's lanes) would race.
            tok, self._template_tokenizer = (Tokenizer.from_str(raw.decode("utf-8")) for _ in range(2))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ModelError(f"{file} is not a valid tokenizer.json: {str(e).splitlines()[0] if str(e) else e!r}") from None
        # A response (or a cached model's growing one) keeps its end; a whole text its beginning.
        side = "left" if self.manifest.format == "response" or self.manifest.kv_cache else "right"
        for t in (tok, self._template_tokenizer):
            t.enable_truncation(self.manifest.max_length, direction=side)
        tok.encode_special_tokens = True
        specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special and t.content]
        self._special_strings = re.compile("|".join(map(re.escape, specials))) if specials else None
        return tok

    def _check_io(self) -> None:
        m, name = self.manifest, self.path
        if self.output not in self.outputs:
            raise ModelError(
                f"reward model {name}: manifest output {self.output!r} is not among its outputs "
                f"({', '.join(self.outputs)})"
            )
        if m.input == "text":
            if len(self.inputs) != 1 or next(iter(self.inputs.values())).type != "tensor(string)":
                raise ModelError(
                    f"reward model {name}: the manifest says it takes text, but its inputs are "
                    f"{_describe(self.inputs)}; set \"input\": \"token_ids\" and ship a tokenizer.json"
                )
            return
        if m.kv_cache == "shared":
            expected = {"input_ids", "position_ids", "attention_bias", *self.past_names}
            if set(self.inputs) != expected or not self.past_names:
                raise ModelError(
                    f'reward model {name}: the manifest sets "kv_cache": "shared", which takes input_ids, '
                    f"position_ids, attention_bias and past_key_values.*, but its inputs are {_describe(self.inputs)}"
                )
        else:
            allowed = {"input_ids", "attention_mask", "token_type_ids", "position_ids", *self.past_names}
            if "input_ids" not in self.inputs or set(self.inputs) - allowed:
                raise ModelError(
                    f"reward model {name}: inputs {_describe(self.inputs)} do not fit; a token-id model "
                    "takes input_ids and optionally attention_mask, token_type_ids, position_ids, past_key_values.*"
                )
        if m.kv_cache:
            if not self.past_names or any(p not in self.outputs for p in self.present_names):
                raise ModelError(
                    f"reward model {name}: the manifest sets kv_cache but the model has no past_key_values.* "
                    'inputs with matching outputs (present.* for true, new_key_values.* for "shared"); '
                    "re-export it with --with-past"
                )
            if m.bos_token_id is None and m.format == "response":
                raise ModelError(f"reward model {name}: a kv_cache model that reads the response alone needs "
                                 "bos_token_id in its manifest")

    def _smoke_test(self) -> None:
        """Score one tiny text, with the tokenizer's largest id, so that a tokenizer that does
        not match the model, or an output index out of range, fails now and not mid-reply."""
        try:
            if self.manifest.input == "token_ids" and self.tokenizer is not None:
                top = self.tokenizer.get_vocab_size(with_added_tokens=True) - 1
                rows = [self.bos + [top, top]]
                self.score_ids(rows)
            else:
                self.score_texts(["Hello"], ["Hello there."])
        except (RewardError, ModelError):
            raise
        except Exception as e:  # onnxruntime's own errors: a shape or an id that does not fit
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(
                f"reward model {self.path} failed on a test input ({first}); its tokenizer.json or "
                "manifest does not fit the model"
            ) from None
        self._mine.stats = RewardStats()

    @property
    def stats(self) -> RewardStats:
        """This thread's session runs, candidates and seconds (they only grow)."""
        return self._mine.stats

    @property
    def last_raw(self) -> np.ndarray:
        """This thread's last rewards before the activation."""
        return self._mine.last_raw

    # -- scoring ----------------------------------------------------------------

    @property
    def bos(self) -> list[int]:
        """The token every scored sequence starts with ([] when the manifest names none)."""
        return [] if self.manifest.bos_token_id is None else [self.manifest.bos_token_id]

    def run(self, feeds: dict[str, Any], n_candidates: int, extra: Sequence[str] = ()) -> list[Any]:
        """One onnxruntime call: the reward output, then ``extra`` outputs; counted in ``stats``."""
        t = time.perf_counter()
        out = self.session.run([self.output, *extra], feeds)
        self.stats.calls += 1
        self.stats.candidates += n_candidates
        self.stats.seconds += time.perf_counter() - t
        return out

    def rewards(self, raw: Any, last: np.ndarray | None) -> np.ndarray:
        """One reward per row from the reward output (see :func:`output_rows`): the manifest's
        activation, then its index. The values before the activation stay in ``last_raw``."""
        values = output_rows(raw, last)
        if not -values.shape[1] <= self.manifest.index < values.shape[1]:
            raise ModelError(
                f"reward model {self.path}: output {self.output!r} has {values.shape[1]} values per "
                f"text; manifest index {self.manifest.index} is out of range"
            )
        self._mine.last_raw = values[:, self.manifest.index]
        return activate(values, self.manifest.activation)[:, self.manifest.index]

    def score_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Rewards of whole token sequences (right-padded), no cache."""
        out = []
        for part in chunks(rows):
            ids, mask = right_pad(part, self.manifest.pad_token_id)
            out.append(self._score_padded(ids, mask, np.zeros_like(ids)))
        return np.concatenate(out)

    def score_texts(self, prompts: Sequence[str], responses: Sequence[str], system: str | None = None) -> np.ndarray:
        """Rewards of finished (prompt, response) pairs built as the manifest says (``system``:
        the system message every pair was answered under)."""
        return np.concatenate([self._score_texts(p, r, system) for p, r in zip(chunks(prompts), chunks(responses))])

    def _score_texts(self, prompts: Sequence[str], responses: Sequence[str], system: str | None) -> np.ndarray:
        m = self.manifest
        if m.input == "text":
            feed_name = next(iter(self.inputs))
            if m.format == "template":
                texts = ["".join(text for text, _ in m.segments(p, r, system)) for p, r in zip(prompts, responses)]
            elif m.format == "pair":
                texts = [f"{p}\n{r}" for p, r in zip(prompts, responses)]
            else:
                texts = list(responses)
            (raw,) = self.run({feed_name: np.array(texts, dtype=object)}, len(texts))
            return self.rewards(raw, None)
        enc = self.encode(prompts, responses, system)
        bos = self.bos
        ids, mask = right_pad([bos + e.ids for e in enc], m.pad_token_id)
        types = np.zeros_like(ids)
        for i, e in enumerate(enc):
            types[i, len(bos) : len(bos) + len(e.type_ids)] = e.type_ids
        return self._score_padded(ids, mask, types)

    def encode(self, prompts: Sequence[str], responses: Sequence[str], system: str | None = None) -> list[Encoding]:
        """The reward model's tokens for (prompt, response) pairs. The prompt and the response are
        the user's and the policy's text: a special token's string inside them (``<|im_end|>``)
        is tokenized as text (the tokenizer's ``encode_special_tokens``); only a template's own
        markers are special tokens. Pairs without such strings are tokenized whole, exactly as
        the model's own tokenizer does."""
        tok, m = self.tokenizer, self.manifest
        assert tok is not None
        if m.format == "pair":
            return tok.encode_batch(list(zip(prompts, responses)))
        if m.format == "response":
            return tok.encode_batch(list(responses), add_special_tokens=m.bos_token_id is None)
        return [self._encode_runs(m.segments(p, r, system), m.bos_token_id is None) for p, r in zip(prompts, responses)]

    def conversation_ids(self, prompt: str, system: str | None = None) -> tuple[list[int], list[int]]:
        """(before, after): the token ids around a response, for the KV-cached path, which feeds
        ``before + response + after`` with the response's ids in between. ``before`` is
        evaluated once per request; ``after`` (the template's end of turn, such as Qwen's
        ``<|im_end|>\n``) ends every candidate. A ``"response"`` model reads ``[bos]`` before
        the response and nothing after it."""
        if self.manifest.format != "template":
            return self.bos, []
        before, after = self.manifest.around_response(prompt, system)
        first = self._encode_runs(before, self.manifest.bos_token_id is None).ids
        return self.bos + first, self._encode_runs(after, False).ids

    def _encode_runs(self, runs: Sequence[tuple[str, bool]], with_bos: bool) -> Encoding:
        """Tokens of a filled template (see :meth:`Manifest.segments`): the template's own text
        with its special tokens, the user's text without; whole when the user's text holds no
        special token's string, so that the result is the model's own tokenizer's. ``with_bos``:
        the tokenizer's post-processor adds what it adds to a whole text (its BOS)."""
        tok, template = self.tokenizer, self._template_tokenizer
        assert tok is not None and template is not None
        if not (self._special_strings and any(self._special_strings.search(t) for t, own in runs if not own)):
            return template.encode("".join(t for t, _ in runs), add_special_tokens=with_bos)
        pieces = [(template if own else tok).encode(t, add_special_tokens=False) for t, own in runs]
        return tok.post_process(Encoding.merge(pieces), add_special_tokens=with_bos)

    def _score_padded(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        """Rewards of right-padded rows from an empty past, read at each row's last token."""
        feeds = self.token_feeds(ids, mask, types)
        feeds.update(self.empty_past(ids.shape[0]))
        (raw,) = self.run(feeds, ids.shape[0])
        return self.rewards(raw, last_positions(mask))

    def token_feeds(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray, past: int = 0) -> dict[str, Any]:
        """Inputs for right-padded rows that continue ``past`` cached tokens (per-row caches);
        a shared-cache model gets the same as a causal bias that hides the padding."""
        feeds: dict[str, Any] = {"input_ids": ids}
        if "attention_bias" in self.inputs:
            feeds["attention_bias"] = padded_bias(mask)
        if "attention_mask" in self.inputs:
            full = np.ones((ids.shape[0], past), dtype=np.int64)
            feeds["attention_mask"] = np.concatenate([full, mask], axis=1)
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = types
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(past, past + ids.shape[1], dtype=np.int64), ids.shape).copy()
        for name in feeds:
            want = ORT_TYPES.get(self.inputs[name].type)
            if want is not None and feeds[name].dtype != want:
                feeds[name] = feeds[name].astype(want)
        return feeds

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length pasts: [batch, heads, 0, dim], or [1, 0, heads, dim] for a shared cache."""
        shared = self.manifest.kv_cache == "shared"
        feeds = {}
        for name in self.past_names:
            shape = self.inputs[name].shape
            heads, dim = shape[2 if shared else 1], shape[3]
            if not (isinstance(heads, int) and isinstance(dim, int)):
                heads, dim = self.manifest.extra["num_kv_heads"], self.manifest.extra["head_dim"]
            feeds[name] = np.zeros((1, 0, heads, dim) if shared else (batch, heads, 0, dim), dtype=np.float32)
        return feeds

    def shares_vocab(self, policy_texts: list[str]) -> bool:
        """Whether token i means the same string to the policy and to this model, for every i.
        Remembered for the last vocabulary asked about: it costs ~40 ms, once per request otherwise."""
        if self._vocab_check is not None and self._vocab_check[0] is policy_texts:
            return self._vocab_check[1]
        shared = False
        if self.tokenizer is not None:
            vocab = self.tokenizer.get_vocab(with_added_tokens=True)
            shared = len(vocab) == len(policy_texts) and all(vocab.get(text) == i for i, text in enumerate(policy_texts))
        self._vocab_check = (policy_texts, shared)
        return shared




def _describe(inputs: dict[str, Any]) -> str:
    return ", ".join(f"{n} {i.type}" for n, i in inputs.items())
