"""The reward runtime: an ONNX reward model run by onnxruntime.

A reward-model folder holds ``model.onnx``, ``tokenizer.json`` (for models that take
token ids) and ``reward.json``, the manifest that says how the text is built and
which output is the reward (see README). Three scorers implement the search's
``Scorer`` protocol:

* :class:`TextScorer` re-reads ``prompt + response + candidate`` as text for every
  candidate: works for any model (encoders, string classifiers, decoders).
* :class:`CachedScorer` is for causal models exported with a KV cache: the response
  is prefilled once and the k candidates are scored in one call against the cached
  prefix (single tokens when the model shares the policy's tokenizer; otherwise the
  re-tokenized tail after the longest prefix the cache still matches). Two cache
  contracts exist (``kv_cache`` in the manifest): ``true``, optimum's, where every row
  of a batch carries its own copy of the past (:class:`RowCache`), and ``"shared"``,
  where one past serves all candidates and the model returns only the new tokens' keys
  and values (:class:`SharedCache`): the per-step cost then grows with one read of the
  cache, not k copies of it.
* :class:`CausalFullScorer` feeds the same causal model the whole token sequence
  for every candidate: the plain path the cached one must agree with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
from tokenizers import Tokenizer

from .errors import ModelError, RewardError
from .search import SearchConfig

try:
    import onnxruntime as ort
except ImportError:  # the package is an extra: cpu (onnxruntime) or cuda (onnxruntime-gpu)
    raise ModelError(
        "onnxruntime is not installed: pip install 'args-local[cpu]', or 'args-local[cuda]' for onnxruntime-gpu"
    ) from None

log = logging.getLogger("args_local")

MANIFEST = "reward.json"
INPUTS = ("token_ids", "text")
FORMATS = ("response", "pair", "template")
ACTIVATIONS = ("none", "sigmoid", "softmax")
ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
NO_ATTENTION = float(np.finfo(np.float32).min)  # attention_bias where a token may not look


@dataclass(frozen=True)
class Manifest:
    """How to build the reward model's input and read its reward (``reward.json``)."""

    name: str
    input: Literal["token_ids", "text"] = "token_ids"
    format: Literal["response", "pair", "template"] = "response"
    template: str | None = None
    kv_cache: bool | Literal["shared"] = False
    bos_token_id: int | None = None
    pad_token_id: int = 0
    tokenizer_sha256: str | None = None
    output: str | None = None
    index: int = 0
    activation: Literal["none", "sigmoid", "softmax"] = "none"
    range: tuple[float, float] | None = None
    max_length: int = 512
    weight: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path) -> "Manifest":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("name", where.parent.name)
        try:
            m = cls(**values, extra={k: v for k, v in data.items() if k not in known})
        except TypeError as e:
            raise ModelError(f"{where}: {e}") from None
        m.check(where)
        if m.range is not None:
            object.__setattr__(m, "range", (float(m.range[0]), float(m.range[1])))
        elif m.activation in ("sigmoid", "softmax"):
            object.__setattr__(m, "range", (0.0, 1.0))
        return m

    @property
    def suggested_weight(self) -> float:
        """The -w to use when none is given: this model's own suggestion, else the reference's."""
        return self.weight if self.weight is not None else SearchConfig.weight

    def check(self, where: Path) -> None:
        def bad(what: str) -> ModelError:
            return ModelError(f"{where}: {what}")

        if self.input not in INPUTS:
            raise bad(f'"input" must be one of {", ".join(INPUTS)}, not {self.input!r}')
        if self.format not in FORMATS:
            raise bad(f'"format" must be one of {", ".join(FORMATS)}, not {self.format!r}')
        if self.format == "template" and (
            not self.template or "{response}" not in self.template
        ):
            raise bad('"format": "template" needs a "template" containing {response}')
        if self.activation not in ACTIVATIONS:
            raise bad(f'"activation" must be one of {", ".join(ACTIVATIONS)}')
        if not (isinstance(self.kv_cache, bool) or self.kv_cache == "shared"):
            raise bad('"kv_cache" must be false, true (a past per row) or "shared" (one past for all rows)')
        if self.kv_cache and (self.input != "token_ids" or self.format != "response"):
            raise bad('"kv_cache" needs "input": "token_ids" and "format": "response"')
        if self.range is not None and not (
            len(self.range) == 2 and all(math.isfinite(v) for v in self.range) and self.range[0] <= self.range[1]
        ):
            raise bad('"range" must be [low, high] with finite low <= high')


@dataclass
class RewardStats:
    """What the reward model cost: session runs, candidates scored, seconds."""

    calls: int = 0
    candidates: int = 0
    seconds: float = 0.0


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


def session_options(threads: int | None) -> ort.SessionOptions:
    """One session thread pool that does not spin: llama.cpp needs the cores between runs."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
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
    if path.is_dir():
        onnx_file = path / "model.onnx"
        if not onnx_file.exists():
            raise ModelError(f"reward model folder {path} has no model.onnx")
        return onnx_file, path
    return path, path.parent


def read_manifest(folder: Path, onnx_file: Path) -> Manifest:
    where = folder / MANIFEST
    if not where.exists():
        log.info("%s has no %s; scoring the response alone with the first output", folder, MANIFEST)
        return Manifest(name=onnx_file.stem)
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{where} must hold a JSON object")
    return Manifest.from_dict(data, where)


class RewardModel:
    """An ONNX reward model with its manifest and tokenizer, checked when it loads."""

    def __init__(self, path: Path, threads: int | None = None, gpu: bool = False) -> None:
        onnx_file, folder = resolve_folder(path)
        self.path = path
        self.manifest = read_manifest(folder, onnx_file)
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
        self.past_names = sorted(n for n in self.inputs if n.startswith("past_key_values."))
        # What the model returns for each past input: the whole longer past, or only the new part.
        returned = "new_key_values." if self.manifest.kv_cache == "shared" else "present."
        self.present_names = [n.replace("past_key_values.", returned, 1) for n in self.past_names]
        self.stats = RewardStats()
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
        expected = self.manifest.tokenizer_sha256
        if expected and hashlib.sha256(file.read_bytes()).hexdigest() != expected:
            raise ModelError(
                f"{file} is not the tokenizer this reward model was exported with (its SHA-256 differs "
                f"from the manifest's); restore the original tokenizer.json or re-export the model"
            )
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ModelError(f"{file} is not a valid tokenizer.json: {e}") from None
        side = "left" if self.manifest.format == "response" else "right"
        tok.enable_truncation(self.manifest.max_length, direction=side)
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
            if m.bos_token_id is None:
                raise ModelError(f"reward model {name}: a kv_cache model needs bos_token_id in its manifest")

    def _smoke_test(self) -> None:
        """Score one tiny text, with the tokenizer's largest id, so that a tokenizer that does
        not match the model, or an output index out of range, fails now and not mid-reply."""
        try:
            if self.manifest.input == "token_ids" and self.tokenizer is not None:
                top = self.tokenizer.get_vocab_size(with_added_tokens=True) - 1
                rows = [self._bos() + [top, top]]
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
        self.stats = RewardStats()

    # -- scoring ----------------------------------------------------------------

    def _bos(self) -> list[int]:
        return [] if self.manifest.bos_token_id is None else [self.manifest.bos_token_id]

    def _run(self, feeds: dict[str, Any], n_candidates: int, extra: Sequence[str] = ()) -> list[Any]:
        t = time.perf_counter()
        out = self.session.run([self.output, *extra], feeds)
        self.stats.calls += 1
        self.stats.candidates += n_candidates
        self.stats.seconds += time.perf_counter() - t
        return out

    def _reward(self, raw: Any, last: np.ndarray | None) -> np.ndarray:
        """Rewards from the chosen output: [b, n], [b, s, n] at each row's last position, [b],
        or a list of {label: prob} maps (scikit-learn exports); then the activation."""
        if isinstance(raw, list):
            values = np.array([[row[k] for k in sorted(row)] for row in raw], dtype=np.float64)
        else:
            values = np.asarray(raw, dtype=np.float64)
        if values.ndim == 3:
            rows = np.arange(values.shape[0])
            values = values[rows, last if last is not None else -1]
        if values.ndim == 1:
            values = values[:, None]
        if not -values.shape[1] <= self.manifest.index < values.shape[1]:
            raise ModelError(
                f"reward model {self.path}: output {self.output!r} has {values.shape[1]} values per "
                f"text; manifest index {self.manifest.index} is out of range"
            )
        if self.manifest.activation == "softmax":
            z = np.exp(values - values.max(axis=1, keepdims=True))
            values = z / z.sum(axis=1, keepdims=True)
        elif self.manifest.activation == "sigmoid":
            values = 1.0 / (1.0 + np.exp(-values))
        return values[:, self.manifest.index]

    def score_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Rewards of whole token sequences (right-padded), no cache."""
        n = max(len(r) for r in rows)
        ids = np.full((len(rows), n), self.manifest.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), n), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        feeds = self._token_feeds(ids, mask, np.zeros_like(ids))
        feeds.update(self._empty_past(len(rows)))
        (raw,) = self._run(feeds, len(rows))
        return self._reward(raw, mask.sum(axis=1) - 1)

    def score_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Rewards of finished (prompt, response) pairs built as the manifest says."""
        m = self.manifest
        if m.format == "template":
            texts = [m.template.replace("{prompt}", p).replace("{response}", r) for p, r in zip(prompts, responses)]
        else:
            texts = list(responses)
        if m.input == "text":
            feed_name = next(iter(self.inputs))
            if m.format == "pair":
                texts = [f"{p}\n{r}" for p, r in zip(prompts, texts)]
            (raw,) = self._run({feed_name: np.array(texts, dtype=object)}, len(texts))
            return self._reward(raw, None)
        assert self.tokenizer is not None
        if m.format == "pair":
            enc = self.tokenizer.encode_batch(list(zip(prompts, texts)))
        else:
            enc = self.tokenizer.encode_batch(texts, add_special_tokens=m.bos_token_id is None)
        bos = self._bos()
        n = max(len(e.ids) for e in enc) + len(bos)
        ids = np.full((len(enc), n), m.pad_token_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for i, e in enumerate(enc):
            row = bos + e.ids
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
            types[i, len(bos) : len(row)] = e.type_ids
        feeds = self._token_feeds(ids, mask, types)
        feeds.update(self._empty_past(len(enc)))
        (raw,) = self._run(feeds, len(enc))
        return self._reward(raw, mask.sum(axis=1) - 1)

    def _token_feeds(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray, past: int = 0) -> dict[str, Any]:
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

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
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

    # -- scorers ----------------------------------------------------------------

    def scorer(
        self,
        prompt: str,
        token_bytes: Callable[[int], bytes],
        policy_vocab: Callable[[], list[str]] | None = None,
        use_cache: bool = True,
    ) -> "TextScorer | CachedScorer | CausalFullScorer":
        """The fastest exact scorer for this model and policy: a KV-cached one for causal
        models exported with their cache (token ids straight from the policy when both share
        a vocabulary, else bridged through text), a text re-scorer for everything else."""
        if self.manifest.kv_cache:
            shared = policy_vocab is not None and self.shares_vocab(policy_vocab())
            if not shared:
                log.info("reward model %s does not share the policy's tokenizer: bridging through text", self.path)
            sequences = Sequences(self, token_bytes, bridge=not shared)
            return CachedScorer(self, sequences) if use_cache else CausalFullScorer(self, sequences)
        return TextScorer(self, prompt, token_bytes)

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


def candidate_texts(response: bytes, token_bytes: Callable[[int], bytes], tokens: Sequence[int]) -> list[str]:
    """The response extended by each candidate, as text. A candidate may end inside a UTF-8
    character: the complete characters are scored."""
    return [(response + token_bytes(t)).decode("utf-8", errors="ignore") for t in tokens]


class TextScorer:
    """Re-reads the whole text of each candidate; identical texts are scored once."""

    def __init__(self, model: RewardModel, prompt: str, token_bytes: Callable[[int], bytes]) -> None:
        self.model = model
        self.prompt = prompt
        self.token_bytes = token_bytes
        self.bounds = model.bounds
        self.response = bytearray()

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        texts = candidate_texts(bytes(self.response), self.token_bytes, tokens)
        unique = list(dict.fromkeys(texts))
        rewards = self.model.score_texts([self.prompt] * len(unique), unique)
        by_text = dict(zip(unique, rewards))
        return np.array([by_text[t] for t in texts])

    def advance(self, token: int) -> None:
        self.response += self.token_bytes(token)


class Sequences:
    """The reward model's token ids for the response extended by one candidate.

    When the reward model shares the policy's vocabulary the policy's ids are used as
    they are. Otherwise (``bridge``) the response text is tokenized with the reward
    model's own tokenizer; only the tail after the part the cache already holds is
    fed to the model, so the result equals full re-scoring of the same text.
    """

    def __init__(self, model: RewardModel, token_bytes: Callable[[int], bytes] | None = None, bridge: bool = False) -> None:
        self.model = model
        self.token_bytes = token_bytes
        self.bridge = bridge
        self.ids: list[int] = list(model._bos())
        self.text = bytearray()

    def split(self, tokens: Sequence[int]) -> tuple[list[int], list[list[int]]]:
        """(shared prefix, tails): candidate i's sequence is ``prefix + tails[i]``, and every
        tail holds at least one token. With a shared vocabulary this costs nothing per step."""
        if not self.bridge:
            return self.ids, [[t] for t in tokens]
        assert self.token_bytes is not None and self.model.tokenizer is not None
        bos = self.model._bos()
        texts = candidate_texts(bytes(self.text), self.token_bytes, tokens)
        seqs = [bos + e.ids for e in self.model.tokenizer.encode_batch(texts, add_special_tokens=False)]
        shared = min(len(q) for q in seqs) - 1
        for q in seqs[1:]:
            shared = min(shared, _common_prefix(seqs[0], q))
        return seqs[0][:shared], [q[shared:] for q in seqs]

    def advance(self, token: int) -> None:
        if self.bridge:
            assert self.token_bytes is not None
            self.text += self.token_bytes(token)
        else:
            self.ids.append(token)


class CausalFullScorer:
    """Feeds every candidate's whole sequence, no cache: the plain path."""

    def __init__(self, model: RewardModel, sequences: Sequences | None = None) -> None:
        self.model = model
        self.bounds = model.bounds
        self.sequences = sequences or Sequences(model)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        prefix, tails = self.sequences.split(tokens)
        return self.model.score_ids([prefix + t for t in tails])

    def advance(self, token: int) -> None:
        self.sequences.advance(token)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    if len(a) <= len(b) and a == b[: len(a)]:  # the usual case, compared in C
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def padded_bias(mask: np.ndarray) -> np.ndarray:
    """``attention_bias`` [b, n, n] for right-padded rows: causal, and padding is never a key."""
    n = mask.shape[1]
    allowed = np.tril(np.ones((n, n), dtype=bool))[None] & mask[:, None, :].astype(bool)
    return np.where(allowed, 0.0, NO_ATTENTION).astype(np.float32)


def packed_bias(lengths: Sequence[int]) -> np.ndarray:
    """``attention_bias`` [1, n, n] for token runs packed side by side in one row: each run is
    causal inside itself and blind to the others (k single tokens: the diagonal)."""
    run = np.repeat(np.arange(len(lengths)), lengths)
    index = np.concatenate([np.arange(n) for n in lengths])
    allowed = (run[:, None] == run[None, :]) & (index[:, None] >= index[None, :])
    return np.where(allowed, 0.0, NO_ATTENTION).astype(np.float32)[None]


class RowCache:
    """optimum's contract: each row of a batch carries its own past, and the model returns
    it again one step longer (``present.*``). Scoring k candidates repeats the past k times;
    the chosen row of ``present`` is the next cache."""

    def __init__(self, model: RewardModel) -> None:
        self.model = model
        self.length = 0
        self.past = model._empty_past(1)
        self._presents: list[np.ndarray] = []

    def truncate(self, n: int) -> None:
        self.past = {name: p[:, :, :n] for name, p in self.past.items()}
        self.length = n

    def _forward(self, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray], n_candidates: int) -> tuple[Any, list[np.ndarray]]:
        m = self.model
        feeds = m._token_feeds(ids, mask, np.zeros_like(ids), past=self.length)
        feeds.update(past)
        raw, *presents = m._run(feeds, n_candidates, m.present_names)
        return raw, presents

    def extend(self, tokens: list[int]) -> None:
        ids = np.array([tokens], dtype=np.int64)
        _, presents = self._forward(ids, np.ones_like(ids), self.past, 0)
        self.past = dict(zip(self.model.past_names, presents))
        self.length += len(tokens)

    def candidates(self, tails: list[list[int]]) -> tuple[Any, np.ndarray]:
        width = max(len(t) for t in tails)
        ids = np.full((len(tails), width), self.model.manifest.pad_token_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, t in enumerate(tails):
            ids[i, : len(t)] = t
            mask[i, : len(t)] = 1
        past = {n: np.repeat(v, len(tails), axis=0) for n, v in self.past.items()}
        raw, self._presents = self._forward(ids, mask, past, len(tails))
        return raw, mask.sum(axis=1) - 1

    def accept(self, i: int, tail: list[int]) -> None:
        end = self.length + len(tail)  # the row without the padding after its tail
        self.past = {n: p[i : i + 1, :, :end] for n, p in zip(self.model.past_names, self._presents)}
        self.length = end


class SharedCache:
    """The ``"shared"`` contract: one past, sequence-major [1, length, heads, dim], read by
    every candidate; the model returns only the new tokens' keys and values, which are
    appended in place (the buffers grow by doubling, and a prefix of them is handed to
    onnxruntime without a copy). The k candidates' tails are packed in one row."""

    def __init__(self, model: RewardModel) -> None:
        self.model = model
        self.length = 0
        self.buffers = {n: np.empty((1, 64, *p.shape[2:]), dtype=np.float32) for n, p in model._empty_past(1).items()}
        self._new: list[np.ndarray] = []
        self._starts: list[int] = []

    def truncate(self, n: int) -> None:
        self.length = n

    def _forward(self, ids: list[int], positions: np.ndarray, bias: np.ndarray, n_candidates: int) -> tuple[Any, list[np.ndarray]]:
        m = self.model
        feeds = {"input_ids": np.array([ids], dtype=np.int64), "position_ids": positions[None], "attention_bias": bias}
        feeds.update({n: b[:, : self.length] for n, b in self.buffers.items()})
        raw, *new = m._run(feeds, n_candidates, m.present_names)
        return raw, new

    def _append(self, new: list[np.ndarray], start: int, stop: int) -> None:
        end = self.length + stop - start
        for (name, buffer), part in zip(list(self.buffers.items()), new):
            if end > buffer.shape[1]:
                grown = np.empty((1, max(end, 2 * buffer.shape[1]), *buffer.shape[2:]), dtype=np.float32)
                grown[:, : self.length] = buffer[:, : self.length]
                self.buffers[name] = buffer = grown
            buffer[:, self.length : end] = part[:, start:stop]
        self.length = end

    def extend(self, tokens: list[int]) -> None:
        positions = np.arange(self.length, self.length + len(tokens), dtype=np.int64)
        _, new = self._forward(tokens, positions, packed_bias([len(tokens)]), 0)
        self._append(new, 0, len(tokens))

    def candidates(self, tails: list[list[int]]) -> tuple[Any, None]:
        lengths = [len(t) for t in tails]
        ends = np.cumsum(lengths)
        self._starts = [0, *ends[:-1].tolist()]
        positions = self.length + np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
        raw, self._new = self._forward([t for tail in tails for t in tail], positions, packed_bias(lengths), len(tails))
        return np.asarray(raw)[0, ends - 1], None  # [k, outputs]: each tail's last position

    def accept(self, i: int, tail: list[int]) -> None:
        self._append(self._new, self._starts[i], self._starts[i] + len(tail))


class CachedScorer:
    """Scores k candidates against the reward model's KV cache of the response so far.

    Each step: the part all candidates share and the cache lacks (tokens accepted on
    steps that were skipped, or a re-tokenized tail) is fed once as a batch of one; then
    the k distinct tails (a single token each when the vocabularies are shared) go in one
    call against the cache. The chosen candidate's keys and values become the cache, so
    accepting a scored token costs no model call.
    """

    def __init__(self, model: RewardModel, sequences: Sequences | None = None) -> None:
        self.model = model
        self.bounds = model.bounds
        self.sequences = sequences or Sequences(model)
        self.cache: RowCache | SharedCache = SharedCache(model) if model.manifest.kv_cache == "shared" else RowCache(model)
        self.cached: list[int] = []
        self._last: dict[int, tuple[int, list[int]]] = {}  # token -> (row, tail)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        prefix, tails = self.sequences.split(tokens)
        keep = _common_prefix(self.cached, prefix)
        if keep < len(self.cached):
            self.cached = self.cached[:keep]
            self.cache.truncate(keep)
        if len(prefix) > len(self.cached):
            self.cache.extend(prefix[len(self.cached) :])
            self.cached.extend(prefix[len(self.cached) :])
        raw, last = self.cache.candidates(tails)
        self._last = {token: (i, tail) for i, (token, tail) in enumerate(zip(tokens, tails))}
        return self.model._reward(raw, last)

    def advance(self, token: int) -> None:
        self.sequences.advance(token)
        if token in self._last:
            row, tail = self._last[token]
            self.cache.accept(row, tail)
            self.cached.extend(tail)
        self._last = {}
